"""The everyday conveniences: python -m, --version, completion, array inputs, --exclude, mask and class-name
warnings, the report's summary and links, defect outlines, per-defect eval rows, few-shot eval, --json."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter
from sklearn.metrics import roc_auc_score
from typer.testing import CliRunner

from conftest import write_mvtec_tree
from dualclip import DetectorConfig, DualClipDetector, __version__
from dualclip.cli.main import app
from dualclip.cli.predict import run_predict
from dualclip.data import datasets as D
from dualclip.evaluation import run_eval
from dualclip.thresholds import fit_threshold, quantile_threshold
from dualclip.visualization import outline

EFFNET = dict(backbone="effnet-lite0", image_size=64, progress=False, device="cpu")


def test_python_m_dualclip_version_and_shell_completion():
    r = subprocess.run([sys.executable, "-m", "dualclip", "--version"], capture_output=True, text=True, timeout=120)
    assert (r.returncode, r.stdout.strip()) == (0, f"dualclip {__version__}")
    r = subprocess.run(
        [sys.executable, "-m", "dualclip", "--show-completion", "bash"], capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 0 and "complete -o default -F _dualclip_completion dualclip" in r.stdout


def test_arrays_and_tensors_score_like_the_same_pil_images(texture_set):
    images = texture_set[0][:4]
    det = DualClipDetector(DetectorConfig(**EFFNET))
    want = [p.score for p in det.predict(images)]
    arrays = [np.asarray(images[0]), np.asarray(images[1]), images[2], images[3]]
    arrays[2] = torch.from_numpy(np.array(images[2])).permute(2, 0, 1).float() / 255.0  # C x H x W in [0, 1]
    grey = np.asarray(images[3].convert("L"))
    got = det.predict(arrays[:3] + [grey])
    assert [p.score for p in got[:3]] == want[:3]
    assert got[3].score == det.predict(images[:3] + [images[3].convert("L").convert("RGB")])[3].score
    assert repr(got[0]) == f"Prediction(score={got[0].score:.4f}, map=96x96, source=None)"


def test_thresholds_fit_from_the_api(texture_set):
    images, _, labels = texture_set
    normal = [img for img, y in zip(images, labels, strict=True) if not y]
    det = DualClipDetector(DetectorConfig(**EFFNET))
    th = fit_threshold(det, normal, quantile=0.9)
    assert th == quantile_threshold(det.score_images(normal).image_scores.numpy(), 0.9)
    fitted = DualClipDetector(DetectorConfig(**EFFNET)).fit(normal, threshold_quantile=0.9)
    assert fitted.threshold_.value == pytest.approx(float(np.quantile(fitted.profile_.normal_scores, 0.9)))


@pytest.fixture
def with_masks(folder, texture_set):
    """The folder, with a ground-truth mask beside every image."""
    for p in sorted(folder.rglob("*.png")):
        Image.new("L", (96, 96)).save(p.with_name(p.stem + "_mask.png"))
    return folder


def test_exclude_leaves_out_matching_files_and_masks_are_warned_of(tmp_path, with_masks):
    det = DualClipDetector(DetectorConfig(**EFFNET))
    warned = []
    _, doc = run_predict([str(with_masks)], tmp_path / "a", det.config, detector=det, warn=warned.append)
    assert len(doc["predictions"]) == 20
    assert any("10 input file(s) look like ground-truth masks" in w for w in warned)
    assert doc["warnings"] == [w.removeprefix("warning: ") for w in warned if w.startswith("warning: ")]
    warned.clear()
    _, doc = run_predict(
        [str(with_masks)], tmp_path / "b", det.config, detector=det, warn=warned.append, exclude=["*_mask.png"]
    )
    assert sorted(p["path"] for p in doc["predictions"]) == sorted(
        str(p) for p in with_masks.rglob("*.png") if not p.stem.endswith("_mask")
    )
    assert sum(s["reason"] == "excluded by exclude_patterns=*_mask.png" for s in doc["skipped"]) == 10
    assert doc["warnings"] == [] and warned == []
    r = CliRunner().invoke(
        app,
        ["predict", str(with_masks), "-o", str(tmp_path / "c"), "--backbone", "effnet-lite0", "--image-size", "64"]
        + ["--exclude", "sub/*", "--exclude", "*_mask.png", "--device", "cpu", "-q", "--json"],
    )
    assert r.exit_code == 0, r.output
    assert len(json.loads(r.stdout)["predictions"]) == 5  # the 5 images outside sub/


@pytest.fixture
def magnetic_tile_like(tmp_path, texture_set):
    """Each image x.jpg beside its ground-truth mask x.png (anti-aliased 0/255, as magnetic_tile keeps them),
    and one pair of two photographs of the same name (no mask: both kept)."""
    d = tmp_path / "Imgs"
    d.mkdir()
    images, masks, _ = texture_set
    for i, (img, m) in enumerate(zip(images, masks, strict=True)):
        img.save(d / f"{i:02d}.jpg")
        edge = np.asarray(Image.fromarray(m.astype(np.uint8) * 255).filter(ImageFilter.SMOOTH))
        Image.fromarray(edge).save(d / f"{i:02d}.png")  # a few grey levels on the boundary
    images[0].save(d / "photo.jpg")
    images[1].save(d / "photo.png")
    return d


def test_masks_beside_their_images_are_left_out_with_a_warning(tmp_path, magnetic_tile_like):
    det = DualClipDetector(DetectorConfig(**EFFNET))
    warned = []
    _, doc = run_predict([str(magnetic_tile_like)], tmp_path / "o", det.config, detector=det, warn=warned.append)
    d = magnetic_tile_like
    want = sorted([str(d / f"{i:02d}.jpg") for i in range(10)] + [str(d / "photo.jpg"), str(d / "photo.png")])
    assert sorted(p["path"] for p in doc["predictions"]) == want
    assert {s["path"]: s["reason"] for s in doc["skipped"]} == {
        str(d / f"{i:02d}.png"): f"the ground-truth mask of {i:02d}.jpg beside it (same name, binary)"
        for i in range(10)
    }
    note = f"10 input file(s) are ground-truth masks beside an image of the same name (binary pictures, e.g. {d / '00.png'} beside 00.jpg): left out"
    assert doc["warnings"] == [note] and warned == [f"warning: {note}"]
    # fit: the profile is made of the images alone
    r = CliRunner().invoke(
        app, ["fit", str(d), "-o", str(tmp_path / "p"), "--backbone", "effnet-lite0", "--image-size", "64", "-q"]
    )
    assert r.exit_code == 0, r.output
    assert f"warning: {note}" in r.output and "skipped" not in r.output
    assert json.loads((tmp_path / "p" / "profile.json").read_text())["n_normal"] == 12


def test_class_name_with_a_vision_only_backbone_is_warned_of_and_recorded(tmp_path, folder):
    det = DualClipDetector(DetectorConfig(**EFFNET))
    warned = []
    _, doc = run_predict([str(folder)], tmp_path / "o", det.config, class_name="tile", detector=det, warn=warned.append)
    note = next(w for w in doc["warnings"] if "--class-name 'tile' is not used" in w)
    assert "vision-only" in note and f"warning: {note}" in warned
    assert doc["run"]["branches"] == ["visual"]
    assert doc["text_branch"] == "off: effnet-lite0 is vision-only (no text tower)"
    saved = json.loads((tmp_path / "o" / "predictions.json").read_text())
    assert saved["warnings"] == doc["warnings"]


def test_report_has_counts_coloured_verdicts_outlines_and_links(tmp_path, folder):
    (folder / "broken.png").write_text("not an image")
    det = DualClipDetector(DetectorConfig(**EFFNET))
    _, doc = run_predict([str(folder)], tmp_path / "o", det.config, detector=det, threshold=0.5, warn=lambda m: None)
    html = (tmp_path / "o" / "report.html").read_text()
    preds = doc["predictions"]
    flagged = sum(p["verdict"] == "defective" for p in preds)
    ok = sum(p["verdict"] == "ok" for p in preds)
    assert "<b>11</b> files: 10 scored, " in html
    assert f"{flagged} flagged defective</span>" in html and f"{ok} ok</span>" in html and "1 failed</span>" in html
    for p in preds:
        if p.get("heatmap"):
            assert f'<a href="{p["heatmap"]}" title="full-size heat map" class="view"' in html
            assert (tmp_path / "o" / p["heatmap"]).is_file()
    assert '<td class="verdict" data-v="defective">' in html and "td.verdict" in html
    _, doc = run_predict([str(folder)], tmp_path / "p", det.config, detector=det, warn=lambda m: None)
    html = (tmp_path / "p" / "report.html").read_text()
    assert "none (none" not in html and "threshold: none (no verdicts" in html
    assert "flagged defective" not in html  # no verdicts, no verdict counts


def test_outline_is_the_masks_inner_boundary():
    rng = np.random.default_rng(0)
    mask = rng.random((20, 24)) > 0.6
    mask[5:12, 6:15] = True
    img = Image.new("RGB", (30, 20), (10, 20, 30))  # wider than the mask: a colour bar on the right
    got = np.asarray(outline(img, mask, (255, 0, 255)))
    padded = np.pad(mask, 1)
    edge = np.zeros_like(mask)
    for y in range(20):
        for x in range(24):  # brute force: a mask pixel with a 4-neighbour outside the mask (or the border)
            nb = (padded[y, x + 1], padded[y + 2, x + 1], padded[y + 1, x], padded[y + 1, x + 2])
            edge[y, x] = mask[y, x] and not all(nb)
    np.testing.assert_array_equal((got[:, :24] == (255, 0, 255)).all(-1), edge)
    assert (got[:, 24:] == (10, 20, 30)).all()


@pytest.fixture
def two_defects(tmp_path, texture_set):
    """An MVTec tree with two defect types (broken, scratch) and 4 training images."""
    root = write_mvtec_tree(tmp_path / "mv", texture_set)
    test = root / "bottle" / "test"
    gt = root / "bottle" / "ground_truth"
    (test / "scratch").mkdir()
    (gt / "scratch").mkdir(parents=True)
    for p in sorted((test / "broken").glob("*.png"))[:2]:
        shutil.move(p, test / "scratch" / p.name)
        shutil.move(gt / "broken" / f"{p.stem}_mask.png", gt / "scratch" / f"{p.stem}_mask.png")
    train = root / "bottle" / "train" / "good"
    train.mkdir(parents=True)
    for i, img in enumerate(texture_set[0][:4]):
        img.rotate(90).save(train / f"{i:03d}.png")
    return root


def test_eval_reports_each_defect_type_against_every_normal_image_in_plain_text(tmp_path, two_defects):
    (cat,) = D.mvtec(two_defects)
    assert cat.defects == ["broken", "scratch"]
    cfg = DetectorConfig(**EFFNET)
    res = run_eval(cfg, [cat], [0], tmp_path / "out", warn=lambda m: None)["categories"]["bottle"]
    scores = DualClipDetector(cfg).score_images(cat.images(), class_name=cat.name).image_scores.numpy()
    labels = cat.labels
    for d in ("broken", "scratch"):
        keep = np.array([s.label == 0 or s.defect == d for s in cat.samples])
        assert res["per_defect"][d]["image_auroc"] == pytest.approx(roc_auc_score(labels[keep], scores[keep]))
        assert res["per_defect"][d]["n_anomalous"] == 2
    assert res["image_auroc"] == pytest.approx(roc_auc_score(labels, scores))
    md = (tmp_path / "out" / "results.md").read_text()
    assert "\n| ↳ broken | " in md and "\n| ↳ scratch | " in md
    assert "&" not in md  # printed in a terminal by `dualclip eval`: no HTML entities
    csv = (tmp_path / "out" / "results.csv").read_text().splitlines()
    assert [line.split(",")[:2] for line in csv] == [
        ["category", "defect"],
        ["bottle", ""],
        ["bottle", "broken"],
        ["bottle", "scratch"],
        ["mean", ""],
    ]


def test_eval_shots_uses_seeded_training_images_as_references_and_json(tmp_path, two_defects):
    (cat,) = D.mvtec(two_defects)
    assert [p.name for p in cat.train] == ["000.png", "001.png", "002.png", "003.png"]
    (a,) = D.with_shots([cat], 2, seed=0)
    (b,) = D.with_shots([cat], 2, seed=0)
    assert a.references == b.references and len(a.references) == 2 and set(a.references) <= set(cat.train)
    pick = sorted(np.random.default_rng(0).choice(4, size=2, replace=False))
    assert a.references == [cat.train[i] for i in pick]
    args = ["eval", "--dataset", "mvtec", "--root", str(two_defects), "-o", str(tmp_path / "o")]
    args += ["--backbone", "effnet-lite0", "--image-size", "64", "--device", "cpu", "-q"]
    r = CliRunner().invoke(app, [*args, "--shots", "2", "--json"])
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert doc["config"]["shots"] == 2 and doc["config"]["shots_seed"] == 0
    assert doc["categories"]["bottle"]["references"] == [str(p) for p in a.references]
    r = CliRunner().invoke(app, [*args, "--shots", "5"])
    assert r.exit_code == 2 and "--shots 5 needs 5 normal training images" in r.output


def _anchors(page: Path) -> set[str]:
    """The #anchors GitHub gives a Markdown page's headings: lower case, punctuation dropped, spaces to hyphens,
    a repeated heading numbered (-1, -2, ...); fenced code is no heading."""
    import re

    text = re.sub(r"^```.*?^```", "", page.read_text(), flags=re.M | re.S)
    anchors: set[str] = set()
    for heading in re.findall(r"^#{1,6} (.+)$", text, re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        n, candidate = 0, slug
        while candidate in anchors:
            n += 1
            candidate = f"{slug}-{n}"
        anchors.add(candidate)
    return anchors


def test_license_matches_pyproject_and_doc_links_resolve_in_a_clone():
    import re

    root = Path(__file__).resolve().parents[1]
    license_text = (root / "LICENSE").read_text()
    pyproject = (root / "pyproject.toml").read_text()
    declared = re.search(r'^license = "([^"]+)"$', pyproject, re.M)[1]
    assert re.search(r'^license-files = \["LICENSE"\]$', pyproject, re.M)
    assert declared == "Apache-2.0" and "Apache License" in license_text and "Version 2.0, January 2004" in license_text
    readme_links = re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", (root / "README.md").read_text())
    assert "docs/method.md" in readme_links and "LICENSE" in readme_links
    broken = []
    for page in [root / "README.md", *sorted((root / "docs").glob("*.md"))]:
        for target, anchor in re.findall(r"\]\(([^)#:\s]*)(?:#([^)\s]*))?\)", page.read_text()):
            path = (page.parent / target).resolve() if target else page
            if not path.exists() or root.resolve() not in [path, *path.parents]:
                broken.append(f"{page.name}: {target}")  # every relative link works in a clone, inside it
            elif anchor and path.suffix == ".md" and anchor not in _anchors(path):
                broken.append(f"{page.name}: {target}#{anchor}")
    assert broken == []


def test_report_stays_small_per_image(tmp_path, folder):
    det = DualClipDetector(DetectorConfig(**EFFNET))
    _, doc = run_predict([str(folder)], tmp_path / "o", det.config, detector=det, threshold=0.5, warn=lambda m: None)
    size = (tmp_path / "o" / "report.html").stat().st_size
    assert size / len(doc["predictions"]) < 40_000  # two JPEG thumbnails per image, not full-size PNGs


def test_parallel_decoding_gives_the_same_images_in_order(tmp_path, folder):
    from dualclip.data.images import ImageLoadError, load_images

    (folder / "broken.png").write_text("not an image")
    paths = sorted(folder.rglob("*.png"))
    serial, threaded = load_images(paths, 0), load_images(paths, 3)
    for a, b in zip(serial, threaded, strict=True):
        if isinstance(a, ImageLoadError):
            assert isinstance(b, ImageLoadError) and (a.path, a.reason) == (b.path, b.reason)
        else:
            assert np.array_equal(np.asarray(a), np.asarray(b))
    assert sum(isinstance(x, ImageLoadError) for x in threaded) == 1
    det = DualClipDetector(DetectorConfig(**EFFNET, num_workers=3))
    _, doc = run_predict([str(folder)], tmp_path / "o", det.config, detector=det, warn=lambda m: None)
    det0 = DualClipDetector(DetectorConfig(**EFFNET))
    _, doc0 = run_predict([str(folder)], tmp_path / "p", det0.config, detector=det0, warn=lambda m: None)
    assert [(p["path"], p["score"]) for p in doc["predictions"]] == [
        (p["path"], p["score"]) for p in doc0["predictions"]
    ]


def test_bf16_backbone_keeps_the_pixel_ranking_within_the_documented_tolerance(texture_set):
    """precision="bf16": the backbone under autocast (CPU here), the rest in fp32. Documented tolerance
    (docs/cli.md, GPU): maps rank pixels with Spearman >= 0.994 per image, image scores within 0.1 run spreads."""
    from scipy.stats import spearmanr

    images = texture_set[0]
    fp32 = DualClipDetector(DetectorConfig(**{**EFFNET, "image_size": 128}, precision="fp32")).score_images(images)
    det = DualClipDetector(DetectorConfig(**{**EFFNET, "image_size": 128}, precision="bf16"))
    bf16 = det.score_images(images)
    assert bf16.run.precision == "bf16" and fp32.run.precision == "fp32"
    assert bf16.maps.dtype == torch.float32
    assert not torch.equal(bf16.maps, fp32.maps)  # bf16 did run
    for a, b in zip(fp32.maps, bf16.maps, strict=True):
        assert spearmanr(a.ravel(), b.ravel()).statistic >= 0.994
    spread = float(fp32.image_scores.std())
    assert float((bf16.image_scores - fp32.image_scores).abs().max()) <= 0.1 * spread
    from dualclip.config import resolve_precision

    assert resolve_precision("auto", "cpu") == "fp32" and resolve_precision("bf16", "cpu", "onnxruntime") == "fp32"


def test_demo_warns_of_no_class_name_the_user_did_not_pass(tmp_path, monkeypatch):
    monkeypatch.delenv("DUALCLIP_DEMO_DATA", raising=False)
    r = CliRunner().invoke(app, ["demo", "-o", str(tmp_path / "demo"), "-q"])
    assert r.exit_code == 0, r.output
    assert "Running the dual-image visual branch with effnet-lite0 instead." in r.output  # a warning, also under -q
    assert "--class-name" not in r.output and sum(line.startswith("warning:") for line in r.output.splitlines()) == 1
    assert len(json.loads((tmp_path / "demo" / "predictions.json").read_text())["predictions"]) == 9


def test_quiet_hides_progress_bars_but_not_the_scores_or_where_they_were_written(tmp_path, folder):
    out = tmp_path / "o"
    args = ["predict", str(folder), "-o", str(out), "--backbone", "effnet-lite0", "--image-size", "64", "-q"]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    doc = json.loads((out / "predictions.json").read_text())
    lines = r.stdout.splitlines()
    assert sorted(lines) == sorted(f"{p['score']:.4f}\t{p['path']}" for p in doc["predictions"])
    assert f"wrote {out}/report.html" in r.stderr and "%|" not in r.stderr  # no bar


HELP_CHILD = """
import sys
from dualclip.cli.main import app
try:
    app(args=sys.argv[1:], prog_name="dualclip")
except SystemExit as exc:
    assert exc.code == 0, exc.code
heavy = sorted(m for m in ("torch", "open_clip", "torchvision", "timm", "scipy", "sklearn", "matplotlib") if m in sys.modules)
print("heavy:", heavy)
"""


@pytest.mark.parametrize("command", [[], ["predict"], ["fit"], ["eval"], ["serve"], ["export"], ["demo"]])
def test_help_starts_without_importing_torch_or_open_clip(command):
    r = subprocess.run(
        [sys.executable, "-c", HELP_CHILD, *command, "--help"], capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 0, r.stderr
    assert "Usage: dualclip" in r.stdout and r.stdout.rstrip().endswith("heavy: []")


def test_help_cuts_no_option_at_any_width_and_names_every_backbone():
    from typer.main import get_command

    from dualclip.backbone import DINOV2_NAME, EFFNET_NAME

    group = get_command(app)
    for name, command in group.commands.items():
        for width in (40, 80):
            r = CliRunner().invoke(app, [name, "--help"], terminal_width=width)
            assert r.exit_code == 0, r.output
            flags = [o for p in command.params for o in p.opts + p.secondary_opts if o.startswith("--")]
            assert flags and all(f in r.output.split() or f"{f}," in r.output for f in flags), (name, width)
            assert "…" not in r.output
    text = CliRunner().invoke(app, ["fit", "--help"], terminal_width=200).output
    assert f"{EFFNET_NAME} or {DINOV2_NAME} (vision-only)" in text


def test_eval_with_a_profile_counts_its_verdicts_at_its_threshold(tmp_path, two_defects):
    runner = CliRunner()
    model = ["--backbone", "effnet-lite0", "--image-size", "64", "-q"]
    train = two_defects / "bottle" / "train" / "good"
    r = runner.invoke(app, ["fit", str(train), "-o", str(tmp_path / "p"), "--threshold-quantile", "0.5", *model])
    assert r.exit_code == 0, r.output
    evaluate = ["eval", "--dataset", "mvtec", "--root", str(two_defects), "--profile", str(tmp_path / "p")]
    evaluate += ["-o", str(tmp_path / "e"), "-q"]
    r = runner.invoke(app, evaluate)
    assert r.exit_code == 0, r.output
    res = json.loads((tmp_path / "e" / "results.json").read_text())["categories"]["bottle"]
    # by hand: the loaded profile's own scores of the same files, judged at its threshold
    (cat,) = D.mvtec(two_defects)
    det = DualClipDetector.load(tmp_path / "p", progress=False)
    scores = np.array([p.score for p in det.predict([str(s.path) for s in cat.samples])])
    labels, th = cat.labels, det.threshold_.value
    np.testing.assert_allclose([i["score"] for i in res["images"]], scores, atol=1e-5)
    assert res["image_auroc"] == pytest.approx(roc_auc_score(labels, scores))

    def by_hand(t):
        flagged = scores >= t
        defect = np.array([s.defect for s in cat.samples])
        return {
            "n_normal": 6,
            "n_anomalous": 4,
            "defects_caught": int(flagged[labels == 1].sum()),
            "defects_missed": int((~flagged[labels == 1]).sum()),
            "false_alarms": int(flagged[labels == 0].sum()),
            "normal_passed": int((~flagged[labels == 0]).sum()),
            "per_defect": {
                d: {
                    "n_anomalous": 2,
                    "caught": int(flagged[defect == d].sum()),
                    "missed": int((~flagged[defect == d]).sum()),
                }
                for d in ("broken", "scratch")
            },
        }

    got = res["at_threshold"]
    assert got["value"] == th and got["source"] == det.threshold_.source
    assert {k: got[k] for k in by_hand(th)} == by_hand(th)
    assert [i["verdict"] for i in res["images"]] == ["defective" if s >= th else "ok" for s in scores]
    md = (tmp_path / "e" / "results.md").read_text()
    want = by_hand(th)
    assert (
        f"| bottle | {th:.4g} | {want['defects_caught']} of 4 | {want['defects_missed']} | "
        f"{want['false_alarms']} of 6 | {want['normal_passed']} |" in md
    )
    assert f"| ↳ scratch | | {want['per_defect']['scratch']['caught']} of 2 |" in md
    # --threshold judges at another value (the median score: some caught, some passed); a new fingerprint
    t = float(np.median(scores))
    r = runner.invoke(app, [*evaluate, "--threshold", str(t)])
    assert r.exit_code == 0, r.output
    got = json.loads((tmp_path / "e" / "results.json").read_text())["categories"]["bottle"]["at_threshold"]
    assert got["source"] == "manual" and {k: got[k] for k in by_hand(t)} == by_hand(t)
    # a profile without a threshold: scores and metrics, no verdicts, and a warning that says why
    det.profile_.threshold = None
    res = run_eval(det.config, [cat], [0], tmp_path / "e2", warn=lambda m: None, fitted=det)["categories"]["bottle"]
    assert "at_threshold" not in res and {i["verdict"] for i in res["images"]} == {None}
    assert "the profile has no threshold: no confusion counts" in res["warnings"][-1]
    # the profile carries the model; --threshold needs a profile
    r = runner.invoke(
        app,
        [
            "eval",
            "--dataset",
            "mvtec",
            "--root",
            str(two_defects),
            "--profile",
            str(tmp_path / "p"),
            "-o",
            str(tmp_path / "x"),
            "--backbone",
            "b",
            "--seeds",
            "1",
        ],
    )
    assert (
        r.exit_code == 2
        and "error: --profile carries the model, settings and references: drop --backbone, --seeds" in r.output
    )
    r = runner.invoke(
        app, ["eval", "--dataset", "mvtec", "--root", str(two_defects), "-o", str(tmp_path / "x"), "--threshold", "1"]
    )
    assert r.exit_code == 2 and "error: --threshold judges a profile's verdicts: give --profile too" in r.output


def test_every_phase_of_fit_predict_and_eval_shows_a_progress_bar(tmp_path, capsys, texture_set, two_defects):
    images, _, labels = texture_set
    normal = [img for img, y in zip(images, labels, strict=True) if not y]
    # a bank above the plain view's 6 x 784 patches' smallest size and below their number: its coreset runs
    cfg = DetectorConfig(**{**EFFNET, "progress": True}, memory_bank_size=800)
    fitted = DualClipDetector(cfg).fit(normal)
    err = capsys.readouterr().err
    for phase in (
        "normal images",
        "normal images (plain view)",
        "coreset",
        "leave-one-out (cosine)",
        "leave-one-out (euclidean)",
        "leave-one-out (plain view)",
    ):
        assert f"\r{phase}: " in err, phase
    run_predict([str(p) for p in sorted((two_defects / "bottle" / "test").rglob("*.png"))], tmp_path / "o", cfg)
    err = capsys.readouterr().err
    for phase in ("features", "matching", "writing"):
        assert f"\r{phase}: " in err, phase
    fitted.predict(images[:3])
    err = capsys.readouterr().err
    assert "\rscoring: " in err
    run_eval(cfg, D.mvtec(two_defects), [0], tmp_path / "e", warn=lambda m: None)
    err = capsys.readouterr().err
    for phase in ("categories", "features", "matching"):
        assert f"\r{phase}: " in err, phase
    DualClipDetector(DetectorConfig(**EFFNET, memory_bank_size=800)).fit(normal).predict(images[:3])
    run_predict([str(two_defects)], tmp_path / "q", DetectorConfig(**EFFNET), quiet=True)
    assert "%|" not in capsys.readouterr().err  # progress=False / --quiet: no bar
