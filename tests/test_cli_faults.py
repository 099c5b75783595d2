"""The fault and bad-input matrix of predict and eval (docs/reliability.md, "Fault matrix", rows 1-15): the tests
each row names, and the property and kill tests.

Each row's test fails when the behaviour of its row is removed.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from conftest import TINY, write_mvtec_tree
from dualclip import DetectorConfig, DualClipDetector
from dualclip.cli.main import app, misplaced_paths
from dualclip.cli.predict import EXIT_OK, UsageError, run_predict
from dualclip.data import datasets as D
from dualclip.data.images import OUTPUT_MARKER, expand_paths
from dualclip.evaluation import run_eval
from dualclip.output import output_stem
from dualclip.visualization import HeatmapScale, overlay, run_scale

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def strict_json(text: str):
    """json.loads that refuses NaN and Infinity (they are not JSON)."""

    def bad(token):
        raise ValueError(f"invalid JSON constant {token}")

    return json.loads(text, parse_constant=bad)


@pytest.fixture
def det(tiny_backbone):
    return DualClipDetector(DetectorConfig(pretrained=None, progress=False), backbone=tiny_backbone)


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _complete(out: Path) -> dict:
    """Assert ``out`` holds one complete dualclip run; return its predictions document."""
    marker = strict_json((out / OUTPUT_MARKER).read_text())
    files = {str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()} - {OUTPUT_MARKER}
    assert files == set(marker["files"])
    return strict_json((out / "predictions.json").read_text())


# -- row 1: --out that is, or lies above, an input; never delete before success --------------------------------
def test_out_equal_to_or_above_the_inputs_is_refused(tmp_path, folder, det, monkeypatch):
    before = _tree(tmp_path)
    for out in (folder, tmp_path, Path(".")):
        if out == Path("."):
            monkeypatch.chdir(tmp_path)
        with pytest.raises(UsageError, match="is or contains the input"):
            run_predict([str(folder)], out, det.config, detector=det, overwrite=True)
    monkeypatch.chdir(ROOT)
    assert _tree(tmp_path) == before  # nothing deleted, nothing written


def test_a_failed_run_leaves_earlier_results_untouched(tmp_path, folder, det, monkeypatch):
    out = tmp_path / "out"
    run_predict([str(folder)], out, det.config, detector=det)
    before = _tree(out)

    def boom(*a, **k):
        raise RuntimeError("scoring failed")

    monkeypatch.setattr(det, "predict", boom)
    with pytest.raises(RuntimeError, match="scoring failed"):
        run_predict([str(folder)], out, det.config, detector=det, overwrite=True)
    assert _tree(out) == before
    assert not [p for p in tmp_path.iterdir() if ".dualclip-" in p.name]  # no staging left behind


def test_foreign_files_in_out_are_never_replaced(tmp_path, folder, det):
    out = tmp_path / "out"
    run_predict([str(folder)], out, det.config, detector=det)
    (out / "notes.txt").write_text("mine")
    with pytest.raises(UsageError, match="1 file\\(s\\) dualclip did not write \\(notes.txt\\)"):
        run_predict([str(folder)], out, det.config, detector=det, overwrite=True)
    assert (out / "notes.txt").read_text() == "mine"


def test_overwrite_removes_only_what_the_earlier_run_wrote(tmp_path, folder, det):
    out = tmp_path / "out"
    run_predict([str(folder)], out, det.config, detector=det, threshold=0.5)  # writes masks/
    assert (out / "masks").is_dir()
    run_predict([str(folder)], out, det.config, detector=det, overwrite=True)  # no threshold: no masks/
    doc = _complete(out)
    assert not (out / "masks").exists() and doc["threshold"]["value"] is None


# -- row 2: eval resumes only under the same settings fingerprint -------------------------------------------------
def test_eval_rerun_with_other_settings_recomputes(tmp_path, tiny_backbone, monkeypatch, texture_set):
    import dualclip.evaluation as E

    cats = D.mvtec(write_mvtec_tree(tmp_path / "mv", texture_set, "tex", "hole"))
    real = E.DualClipDetector
    calls = []

    def counting(cfg, backbone=None):
        calls.append(cfg.k)
        return real(cfg, backbone=tiny_backbone)

    monkeypatch.setattr(E, "DualClipDetector", counting)
    k1 = DetectorConfig(pretrained=None, progress=False, k=1)
    k3 = DetectorConfig(pretrained=None, progress=False, k=3)
    messages = []
    run_eval(k1, cats, [0], tmp_path / "out", warn=messages.append)
    assert calls == [1]
    res3 = run_eval(k3, cats, [0], tmp_path / "out", warn=messages.append)
    assert calls == [1, 3] and any("fingerprint differs" in m for m in messages)
    fresh = run_eval(k3, cats, [0], tmp_path / "fresh", warn=messages.append)
    assert res3["config"]["k"] == 3
    assert res3["categories"]["tex"]["pixel_auroc"] == fresh["categories"]["tex"]["pixel_auroc"]
    run_eval(k3, cats, [0], tmp_path / "out", warn=messages.append)  # same settings: resumed, not recomputed
    assert calls == [1, 3, 3]


# -- row 3: thresholds must be finite; every JSON is valid ------------------------------------------------------
@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_a_non_finite_threshold_is_a_usage_error(tmp_path, folder, value):
    r = CliRunner().invoke(app, ["predict", str(folder), "-o", str(tmp_path / "o"), "--threshold", value])
    assert r.exit_code == 2 and "--threshold must be a finite number" in r.output
    assert not (tmp_path / "o").exists()
    with pytest.raises(UsageError, match="quantile must lie in"):
        run_predict([str(folder)], tmp_path / "q", DetectorConfig(), threshold_quantile=float(value))


def test_every_json_written_is_strict(tmp_path, folder, det):
    out = tmp_path / "out"
    run_predict([str(folder)], out, det.config, detector=det, threshold=0.5)
    html = (out / "report.html").read_text()
    meta = html.split('<script type="application/json" id="meta">', 1)[1].split("</script>", 1)[0]
    strict_json(meta)
    strict_json((out / "predictions.json").read_text())
    from dualclip.atomic import dumps

    assert strict_json(dumps({"a": float("nan"), "b": [np.float32("inf"), 1.5]})) == {"a": None, "b": [None, 1.5]}


# -- row 4: any file name the OS allows ---------------------------------------------------------------------------
def test_long_and_non_utf8_file_names_are_scored_and_kept(tmp_path, texture_set, det):
    d = tmp_path / "names"
    d.mkdir()
    long_name = "x" * 251 + ".png"  # 255 bytes
    raw_name = os.fsdecode(b"bad-\xff\xfe-name.png")
    formula = "=HYPERLINK(1).png"
    for name, img in zip((long_name, raw_name, formula, "plain.png"), texture_set[0], strict=False):
        img.save(d / name)
    out = tmp_path / "out"
    code, doc = run_predict([str(d)], out, det.config, detector=det, threshold=0.5)
    assert code == EXIT_OK
    saved = _complete(out)
    names = {Path(p["path"]).name for p in saved["predictions"]}
    assert names == {long_name, "bad-\\xff\\xfe-name.png", formula, "plain.png"}
    heatmaps = sorted(p.name for p in (out / "heatmaps").iterdir())
    assert len(heatmaps) == 4 and all(len(n.encode()) <= 64 and n.isascii() for n in heatmaps)
    assert output_stem(7, Path(long_name)) == "00007_" + "x" * 48
    csv_text = (out / "predictions.csv").read_text(encoding="utf-8")
    assert "bad-\\xff\\xfe-name.png" in csv_text
    assert (out / "report.html").read_text(encoding="utf-8").count("<tr class=") == 4


# -- row 5: --out inside the input folder ------------------------------------------------------------------------
def test_outputs_are_never_inputs(tmp_path, folder, det):
    out = folder / "results"
    code, doc = run_predict([str(folder)], out, det.config, detector=det)
    n = len(doc["predictions"])
    code, doc2 = run_predict([str(folder)], out, det.config, detector=det, overwrite=True)
    assert code == EXIT_OK and len(doc2["predictions"]) == n == 10
    assert not any("results" in Path(p["path"]).parts for p in doc2["predictions"])
    assert any(s["reason"].startswith("the output folder") for s in doc2["skipped"])
    # another run's output folder inside the inputs is never read either (it holds the marker)
    code, doc3 = run_predict([str(folder)], tmp_path / "elsewhere", det.config, detector=det)
    assert len(doc3["predictions"]) == 10 and any("written by dualclip" in s["reason"] for s in doc3["skipped"])


# -- row 6: SIGINT / SIGTERM --------------------------------------------------------------------------------------
def _child(args: list[str], sleep: float = 0.0, cwd: Path = ROOT) -> subprocess.Popen:
    env = dict(os.environ, DUALCLIP_TEST_SLEEP=str(sleep), PYTHONUNBUFFERED="1")
    return subprocess.Popen(
        [sys.executable, str(HERE / "cli_subprocess.py"), *args],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _predict_args(folder: Path, out: Path, *extra: str) -> list[str]:
    return ["predict", str(folder), "-o", str(out), "-q", "--backbone", TINY, "--pretrained", "random", *extra]


def _wait_ready(proc: subprocess.Popen) -> None:
    line = proc.stderr.readline()
    assert "ready" in line, line


@pytest.mark.slow
@pytest.mark.parametrize(("sig", "code", "name"), [(signal.SIGINT, 130, "SIGINT"), (signal.SIGTERM, 143, "SIGTERM")])
def test_an_interrupt_leaves_earlier_results_untouched(tmp_path, folder, sig, code, name):
    out = tmp_path / "out"
    first = _child(_predict_args(folder, out))
    assert first.wait(timeout=120) == 0, first.stderr.read()
    before = _tree(out)
    proc = _child(_predict_args(folder, out, "--overwrite", "--threshold", "0.5"), sleep=30)
    _wait_ready(proc)
    time.sleep(3.0)  # well inside the 30 s sleep in scoring
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == code
    lines = [ln for ln in err.splitlines() if ln.strip() and "Model initialized randomly" not in ln]
    assert lines == [f"interrupted ({name}): nothing written; earlier outputs are untouched"]
    assert _tree(out) == before
    assert not [p for p in tmp_path.iterdir() if ".dualclip-" in p.name]


# -- row 7: one clear line, exit 2, no traceback --------------------------------------------------------------------
def _one_line_error(r, *fragments: str) -> None:
    assert r.exit_code == 2, r.output
    assert "Traceback" not in r.output
    errors = [ln for ln in r.output.splitlines() if ln.startswith("error: ")]
    assert len(errors) == 1, r.output
    for f in fragments:
        assert f in errors[0], r.output


def test_bad_outputs_and_settings_are_one_line_errors(tmp_path, folder, monkeypatch):
    run = CliRunner().invoke
    (tmp_path / "file").write_text("x")
    _one_line_error(run(app, ["predict", str(folder), "-o", str(tmp_path / "file")]), "is a file")
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    _one_line_error(run(app, ["predict", str(folder), "-o", str(tmp_path / "dangling")]), "dangling symbolic link")
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, m: False if Path(p) == tmp_path / "ro" else real_access(p, m))
    (tmp_path / "ro").mkdir()
    _one_line_error(run(app, ["predict", str(folder), "-o", str(tmp_path / "ro" / "o")]), "permission denied")
    monkeypatch.undo()
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a checkpoint")
    args = ["predict", str(folder), "-o", str(tmp_path / "o"), "--backbone", TINY, "--pretrained", str(bad)]
    _one_line_error(run(app, args))
    _one_line_error(run(app, ["predict", str(folder), "-o", str(tmp_path / "o"), "--backbone", "nope"]), "nope")
    assert not (tmp_path / "o").exists()
    r = run(app, [*args, "--debug"])  # --debug shows the traceback
    assert r.exit_code != 0 and r.exception is not None


def test_eval_of_an_empty_category_or_a_zero_byte_image_is_one_line_error(tmp_path):
    root = tmp_path / "mv"
    (root / "a" / "test" / "good").mkdir(parents=True)
    r = CliRunner().invoke(app, ["eval", "--dataset", "mvtec", "--root", str(root), "-o", str(tmp_path / "o")])
    _one_line_error(r, "no test image")
    Image.new("RGB", (32, 32)).save(root / "a" / "test" / "good" / "ok.png")
    (root / "a" / "test" / "good" / "zero.png").write_bytes(b"")
    r = CliRunner().invoke(app, ["eval", "--dataset", "mvtec", "--root", str(root), "-o", str(tmp_path / "o")])
    _one_line_error(r, "empty image file (0 bytes)")
    assert "zero.png" in r.output


# -- row 8: default CLIP weights without a network -------------------------------------------------------------------
def test_default_clip_offline_fails_fast_with_instructions(tmp_path, folder, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    start = time.perf_counter()
    r = CliRunner().invoke(app, ["predict", str(folder), "-o", str(tmp_path / "o")])
    assert time.perf_counter() - start < 20
    _one_line_error(r, "ViT-B-16-plus-240", "laion400m_e32", "--pretrained /path/to/file", "effnet-lite0")


# -- row 9: huge pixel counts in small files -----------------------------------------------------------------------
@pytest.mark.slow
def test_a_100_megapixel_png_stays_under_1_5_gb(tmp_path):
    pytest.importorskip("efficientnet_lite_pytorch")
    d = tmp_path / "in"
    d.mkdir()
    big = np.zeros((10_000, 10_000), np.uint8)
    big[4000:4100, 4000:4100] = 255
    Image.fromarray(big).save(d / "big.png", optimize=False)
    del big
    Image.new("L", (640, 480), 0).save(d / "small.png")
    assert (d / "big.png").stat().st_size < 2_000_000
    # each child reports its own peak (RUSAGE_CHILDREN would hold the largest child of the whole test session);
    # the same command on two small images is the baseline (torch and the model), measured in the same setting
    child = (
        "import resource, sys\n"
        "from dualclip.cli.main import app\n"
        "try:\n    app(args=sys.argv[1:], prog_name='dualclip')\n"
        "except SystemExit as e:\n    code = e.code\n"
        "print('PEAK_KB', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)\n"
        "sys.exit(code)\n"
    )
    small = tmp_path / "small"
    small.mkdir()
    Image.new("L", (640, 480), 0).save(small / "a.png")
    Image.new("L", (640, 480), 9).save(small / "b.png")

    def peak_mb(folder, out):
        proc = subprocess.run(
            [sys.executable, "-c", child, "predict", str(folder), "-o", str(out), "-q", "--backbone", "effnet-lite0"],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert proc.returncode == 0, proc.stderr
        return int(proc.stderr.rsplit("PEAK_KB", 1)[1].split()[0]) / 1024

    base = peak_mb(small, tmp_path / "o_small")
    peak = peak_mb(d, tmp_path / "o")
    print(f"100-MP PNG: peak {peak:.0f} MB, baseline {base:.0f} MB")
    assert peak - base < 300, f"the 100-MP image adds {peak - base:.0f} MB (peak {peak:.0f}, baseline {base:.0f})"
    assert peak < 1500 or base > 1200, f"peak {peak:.0f} MB with a baseline of {base:.0f} MB"
    doc = _complete(tmp_path / "o")
    big_row = next(p for p in doc["predictions"] if p["path"].endswith("big.png"))
    assert big_row["original_size"] == [10_000, 10_000] and max(big_row["size"]) == 2048


# -- row 10: several values after one path flag ------------------------------------------------------------------
def test_paths_after_a_reference_value_warn(tmp_path, folder, monkeypatch, tiny_backbone):
    assert misplaced_paths(["x", "--reference", "a", "b", "c", "--out", "o"]) == [
        ("b", "--reference"),
        ("c", "--reference"),
    ]
    assert misplaced_paths(["x", "--reference", "a", "--reference", "b", "y"]) == [("y", "--reference")]
    assert misplaced_paths(["x", "--reference=a", "b"]) == [("b", "--reference")]
    assert misplaced_paths(["x", "y", "--reference", "a", "--out", "o"]) == []
    import dualclip.cli.predict as P

    real = P.DualClipDetector
    monkeypatch.setattr(P, "DualClipDetector", lambda cfg: real(cfg, backbone=tiny_backbone))
    files = sorted(str(p) for p in folder.rglob("*.png"))
    r = CliRunner().invoke(
        app, ["predict", files[0], "--reference", files[1], files[2], "-o", str(tmp_path / "o"), "-q"]
    )
    assert r.exit_code == 0, r.output
    assert f"warning: {files[2]} follows the value of --reference" in r.output
    assert "repeat the flag (--reference a --reference b)" in r.output


# -- row 11: identical images ----------------------------------------------------------------------------------------
def test_constant_maps_are_drawn_flat(tmp_path, texture_set, tiny_backbone):
    maps = [np.full((40, 50), 0.25, np.float32) + np.float32(1e-9) * np.random.default_rng(0).random((40, 50))]
    scale = run_scale(maps)
    assert scale.flat and scale.to_dict()["flat"] is True
    img = Image.new("RGB", (50, 40), (100, 100, 100))
    ov = np.asarray(overlay(img, maps[0], scale))
    assert (ov == ov[0, 0]).all()  # one colour: no hot spots from float noise
    d = tmp_path / "same"
    d.mkdir()
    for i in range(4):
        texture_set[0][0].save(d / f"{i}.png")
    det = DualClipDetector(DetectorConfig(pretrained=None, progress=False, use_text=False), backbone=tiny_backbone)
    _, doc = run_predict([str(d)], tmp_path / "o", det.config, detector=det)
    assert doc["heatmap_scale"]["flat"] is True and "flat" in doc["heatmap_scale"]["note"]


def test_heat_map_is_pixel_aligned_and_the_colour_bar_is_in_the_report(tmp_path, folder, det):
    scale = HeatmapScale(-0.000123456, 12345.678)
    ov = overlay(Image.new("RGB", (64, 48)), np.zeros((48, 64), np.float32), scale)
    assert ov.size == (64, 48)  # no colour bar baked into the map
    with pytest.raises(ValueError, match="the anomaly map is 10x10, the image 64x48"):
        overlay(Image.new("RGB", (64, 48)), np.zeros((10, 10), np.float32), scale)
    out = tmp_path / "o"
    _, doc = run_predict([str(folder)], out, det.config, detector=det, warn=lambda m: None)
    for p in doc["predictions"]:
        assert Image.open(out / p["heatmap"]).size == Image.open(p["path"]).size
    html = (out / "report.html").read_text()
    bar = html.split('<div class="colourbar">', 1)[1].split("</div>", 1)[0]
    s = doc["heatmap_scale"]
    assert f'<span class="end">{s["vmin"]:.4g}</span>' in bar and f'<span class="end">{s["vmax"]:.4g}</span>' in bar


# -- row 12: permissions follow the umask ----------------------------------------------------------------------------
@pytest.mark.parametrize(("umask", "mode"), [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_outputs_follow_the_umask(tmp_path, folder, det, umask, mode):
    old = os.umask(umask)
    try:
        run_predict([str(folder)], tmp_path / "o", det.config, detector=det, threshold=0.5)
    finally:
        os.umask(old)
    modes = {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / "o").rglob("*") if p.is_file()}
    assert set(modes.values()) == {mode}, modes


# -- row 13: spreadsheet formulas in CSV cells -----------------------------------------------------------------------
def test_csv_cells_are_not_formulas(tmp_path, texture_set, det, monkeypatch):
    import csv

    from dualclip.output import csv_cell

    d = tmp_path / "f"
    d.mkdir()
    names = ["=HYPERLINK(1).png", "+a.png", "-b.png", "@c.png"]
    for name, img in zip(names, texture_set[0], strict=False):
        img.save(d / name)
    monkeypatch.chdir(d)  # relative paths: the cells start with the file names
    run_predict(names, tmp_path / "o", det.config, detector=det)
    rows = list(csv.reader((tmp_path / "o" / "predictions.csv").open(encoding="utf-8")))[1:]
    assert sorted(r[0] for r in rows) == sorted("'" + n for n in names)
    assert all(np.isfinite(float(r[1])) for r in rows)  # scores stay plain numbers
    assert csv_cell("-0.5") == "'-0.5" and csv_cell(-0.5) == -0.5 and csv_cell("ok.png") == "ok.png"


# -- row 14: skipped paths are listed ---------------------------------------------------------------------------------
def test_skipped_paths_are_listed_and_folders_expand(tmp_path, texture_set, det, monkeypatch):
    d = tmp_path / "in"
    (d / "x.png").mkdir(parents=True)
    (d / "locked").mkdir()
    texture_set[0][0].save(d / "x.png" / "inner.png")
    texture_set[0][1].save(d / "anim.gif")
    texture_set[0][2].save(d / "locked" / "hidden.png")
    (d / "notes.txt").write_text("hi")
    real_scandir = os.scandir

    def scandir(path="."):
        if Path(path) == d / "locked":
            raise PermissionError(13, "Permission denied", str(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    exp = expand_paths([str(d)])
    assert sorted(p.name for p in exp.files) == ["anim.gif", "inner.png"]
    reasons = {Path(p).name: r for p, r in exp.skipped}
    assert reasons["notes.txt"].startswith("not an image file name")
    assert reasons["locked"].startswith("folder cannot be read")
    _, doc = run_predict([str(d)], tmp_path / "o", det.config, detector=det)
    assert {Path(s["path"]).name for s in doc["skipped"]} == {"notes.txt", "locked"}
    monkeypatch.undo()
    assert [p.name for p in expand_paths([str(d / "x.png")]).files] == ["inner.png"]  # an explicit folder


# -- row 15: k larger than the run allows -----------------------------------------------------------------------------
def test_effective_k_is_recorded_and_warned(tmp_path, texture_set, tiny_backbone):
    d = tmp_path / "six"
    d.mkdir()
    for i, img in enumerate(texture_set[0][:6]):
        img.save(d / f"{i}.png")
    cfg = DetectorConfig(pretrained=None, progress=False, k=1000)
    det = DualClipDetector(cfg, backbone=tiny_backbone)
    messages = []
    _, doc = run_predict([str(d)], tmp_path / "o", cfg, detector=det, warn=messages.append)
    assert doc["run"]["k_effective"] == 5 and doc["config"]["k"] == 1000
    assert "warning: k=1000 asked for, but 6 images allow at most k=5" in messages


# -- property test: the loader's only outcomes are an RGB image or ImageLoadError --------------------------------
def _seed_files() -> dict[str, bytes]:
    import io

    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 255, (24, 32, 3), dtype=np.uint8))
    out = {}
    for fmt in ("PNG", "JPEG", "TIFF", "WEBP", "GIF", "BMP"):
        buf = io.BytesIO()
        img.save(buf, format=fmt)
        out[fmt] = buf.getvalue()
    return out


SEEDS = _seed_files()


def test_loader_property_random_and_mutated_bytes(tmp_path_factory):
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    from dualclip.data.images import ImageLoadError, load_image

    folder = tmp_path_factory.mktemp("fuzz")

    @st.composite
    def mutated(draw):
        if draw(st.booleans()):
            return draw(st.binary(max_size=2048))
        data = bytearray(SEEDS[draw(st.sampled_from(sorted(SEEDS)))])
        kind = draw(st.sampled_from(["truncate", "flip", "both"]))
        if kind in ("flip", "both"):
            for _ in range(draw(st.integers(1, 8))):
                pos = draw(st.integers(0, len(data) - 1))
                data[pos] ^= 1 << draw(st.integers(0, 7))
        if kind in ("truncate", "both"):
            data = data[: draw(st.integers(0, len(data)))]
        return bytes(data)

    @settings(max_examples=300, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
    @given(mutated())
    def check(data):
        path = folder / "f.img"
        path.write_bytes(data)
        try:
            img = load_image(path)
        except ImageLoadError as exc:
            assert exc.reason and exc.path == str(path)
            return
        assert img.mode == "RGB" and img.width > 0 and img.height > 0

    check()


# -- kill test: SIGINT / SIGKILL at seeded random points -----------------------------------------------------------
@pytest.mark.slow
def test_kill_predict_at_random_points_never_leaves_a_mix(tmp_path, folder):
    out = tmp_path / "out"
    first = _child(_predict_args(folder, out))
    assert first.wait(timeout=120) == 0, first.stderr.read()
    docs = {json.dumps(_complete(out)["threshold"])}
    rng = np.random.default_rng(1234)
    for attempt in range(4):
        threshold = str(0.1 * (attempt + 1))
        proc = _child(_predict_args(folder, out, "--overwrite", "--threshold", threshold))
        _wait_ready(proc)
        time.sleep(float(rng.uniform(0.0, 2.5)))
        proc.send_signal(signal.SIGKILL if attempt % 2 else signal.SIGINT)
        proc.communicate(timeout=60)
        doc = _complete(out)  # always one complete run: the earlier one or the new one
        docs.add(json.dumps(doc["threshold"]))
        assert doc["threshold"]["value"] in (None, *[0.1 * (a + 1) for a in range(attempt + 1)])
    proc = _child(_predict_args(folder, out, "--overwrite"))
    assert proc.wait(timeout=120) == 0
    _complete(out)
    assert not [p for p in tmp_path.iterdir() if ".dualclip-staging" in p.name]


@pytest.mark.slow
def test_kill_eval_resumes_to_identical_numbers(tmp_path, texture_set):
    root = tmp_path / "mv"
    for c in ("c1", "c2", "c3"):
        write_mvtec_tree(root, texture_set, c, "hole")

    def args(out):
        return ["eval", "--dataset", "mvtec", "--root", str(root), "-o", str(out), "-q", "--backbone", TINY]

    extra = ["--pretrained", "random", "--seeds", "0,1"]
    clean = _child([*args(tmp_path / "clean"), *extra])
    assert clean.wait(timeout=300) == 0, clean.stderr.read()
    want = strict_json((tmp_path / "clean" / "results.json").read_text())
    rng = np.random.default_rng(99)
    out = tmp_path / "killed"
    for attempt in range(3):
        proc = _child([*args(out), *extra], sleep=0.5)
        _wait_ready(proc)
        time.sleep(float(rng.uniform(0.5, 3.0)))
        proc.send_signal(signal.SIGKILL if attempt % 2 == 0 else signal.SIGINT)
        proc.communicate(timeout=60)
        for saved in (out / "categories").glob("*.json") if (out / "categories").is_dir() else []:
            strict_json(saved.read_text())  # a category file is complete or absent
    final = _child([*args(out), *extra])
    assert final.wait(timeout=300) == 0, final.stderr.read()
    got = strict_json((out / "results.json").read_text())
    for name in ("c1", "c2", "c3"):
        for k in ("image_auroc", "pixel_auroc", "pixel_aupro", "image_auroc_std"):
            assert got["categories"][name][k] == want["categories"][name][k]


def test_stale_staging_of_a_killed_run_is_removed_a_live_one_kept(tmp_path, folder, det):
    out = tmp_path / "out"
    dead = tmp_path / ".out.dualclip-staging-dead"
    live = tmp_path / ".out.dualclip-staging-live"
    for d, pid in ((dead, 2**22 + 12345), (live, os.getpid())):
        d.mkdir()
        (d / ".staging").write_text(str(pid))
        (d / "predictions.json").write_text("{}")
    run_predict([str(folder)], out, det.config, detector=det)
    assert not dead.exists() and live.is_dir()
    _complete(out)
