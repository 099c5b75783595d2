"""Scores and profiles (docs/reliability.md, "Fault matrix", rows 26-38): non-finite scores, stale archive blocks and
eval results, listing-order-dependent partners, mismatched masks, degenerate or tampered profiles, messages,
and the out-of-distribution guard. One test per case, each failing when its behaviour is removed."""

from __future__ import annotations

import dataclasses
import json
import os
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from conftest import reseal_profile, set_field, shared_dataset, write_mvtec_tree
from dualclip import DetectorConfig, DualClipDetector
from dualclip.cli.main import app
from dualclip.cli.predict import EXIT_SOME_FAILED, run_predict
from dualclip.data import datasets as D
from dualclip.profile import Moments, Profile, ProfileError

EFFNET = DetectorConfig(backbone="effnet-lite0", image_size=64, device="cpu", progress=False)


def _save_all(folder: Path, images) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, img in enumerate(images):
        paths.append(folder / f"{i:02d}.png")
        img.save(paths[-1])
    return paths


@pytest.fixture(scope="module")
def split(texture_set):
    images, _, labels = texture_set
    normal = [im for im, y in zip(images, labels, strict=True) if y == 0]
    anomalous = [im for im, y in zip(images, labels, strict=True) if y == 1]
    return normal, anomalous


@pytest.fixture(scope="module")
def fitted(split):
    """An effnet-lite0 profile of the 6 normal textures, with a threshold."""
    return DualClipDetector(EFFNET).fit(split[0], class_name="tile", threshold_quantile=0.9)


@pytest.fixture(scope="module")
def profile_dir(tmp_path_factory, fitted):
    return fitted.save(tmp_path_factory.mktemp("profile") / "tile.dualclip")


def _copy_detector(det: DualClipDetector) -> DualClipDetector:
    """A detector sharing ``det``'s backbone with a deep copy of its profile (free to tamper with)."""
    p = det.profile_
    bank = {part: [[t.clone() for t in space] for space in spaces] for part, spaces in p.bank.items()}
    profile = dataclasses.replace(p, bank=bank, bank_owner=p.bank_owner.clone(), meta=dict(p.meta))
    return DualClipDetector(dataclasses.replace(det.config), backbone=det.backbone, profile=profile)


# -- D2: a non-finite score is an error for that image, never a verdict --------------------------------------
def _poison(det: DualClipDetector, how: str) -> DualClipDetector:
    det = _copy_detector(det)
    p = det.profile_
    if how == "empty":
        p.bank = {part: [[t[:0] for t in space] for space in spaces] for part, spaces in p.bank.items()}
        p.bank_owner = p.bank_owner[:0]
    else:
        for spaces in p.bank.values():
            for space in spaces:
                for t in space:
                    t[3] = float(how)
    return det


@pytest.mark.parametrize("how", ["nan", "inf", "empty"])
def test_a_non_finite_score_is_an_error_row_never_a_verdict(tmp_path, fitted, split, how):
    det = _poison(fitted, how)
    paths = _save_all(tmp_path / "in", split[1][:2])
    said = []
    code, doc = run_predict([str(p) for p in paths], tmp_path / "o", det.config, detector=det, warn=said.append)
    assert code == EXIT_SOME_FAILED
    for row in doc["predictions"]:
        assert row["score"] is None and row["verdict"] is None
        assert "score is not a finite number" in row["error"]
    csv = (tmp_path / "o" / "predictions.csv").read_text()
    assert ",ok," not in csv and ",defective," not in csv
    assert sum("score is not a finite number" in s for s in said) == 2


def test_the_service_answers_a_non_finite_score_with_an_error_status(fitted, split):
    pytest.importorskip("fastapi", reason="the serve extra is not installed")
    import io

    from fastapi.testclient import TestClient

    from dualclip.serve import ServeSettings, create_app

    buf = io.BytesIO()
    split[1][0].save(buf, format="PNG")
    with TestClient(create_app(_poison(fitted, "nan"), ServeSettings())) as c:
        r = c.post("/v1/score", content=buf.getvalue())
    assert r.status_code == 500
    assert "score is not a finite number" in r.json()["detail"]


# -- D3: an archive run resumes on content, not on paths ----------------------------------------------------
def test_an_archive_rerun_rescores_after_the_profile_is_refitted_or_an_image_replaced(tmp_path, split):
    from dualclip.distributed import run_archive

    normal, anomalous = split
    paths = _save_all(tmp_path / "in", normal[:3] + anomalous)
    items = [(str(p), None) for p in paths]
    prof = tmp_path / "p.dualclip"
    DualClipDetector(EFFNET).fit(normal[:4], threshold_quantile=0.9).save(prof)
    args = dict(profile=prof, engine="inline", block_size=4, progress=False)
    first = run_archive(items, tmp_path / "o", **args)
    assert first.scored_blocks == first.blocks == 2
    assert run_archive(items, tmp_path / "o", **args).scored_blocks == 0  # unchanged: resumed
    DualClipDetector(EFFNET).fit(normal[2:], threshold_quantile=0.5).save(prof, overwrite=True)
    refit = run_archive(items, tmp_path / "o", **args)
    assert refit.scored_blocks == 2  # every block: the profile changed under the same path
    now = DualClipDetector.load(prof)
    assert {r["path"]: r["score"] for r in refit.rows} == {str(p): now.predict([p])[0].score for p in paths}
    assert {r["threshold"] for r in refit.rows} == {now.threshold_.value}
    st = os.stat(paths[0])
    normal[5].save(paths[0])  # another image at the same path
    os.utime(paths[0], ns=(st.st_atime_ns, st.st_mtime_ns))  # even with the old modification time
    replaced = run_archive(items, tmp_path / "o", **args)
    assert replaced.scored_blocks == 1 and replaced.reused_blocks == 1
    row = next(r for r in replaced.rows if r["path"] == str(paths[0]))
    assert row["score"] == now.predict([normal[5]])[0].score


# -- D14: eval fingerprints the data, not only the settings ------------------------------------------------
def test_eval_recomputes_after_an_image_or_mask_changes_at_the_same_path(tmp_path, texture_set):
    from dualclip.evaluation import run_eval

    root = write_mvtec_tree(tmp_path / "mv", texture_set, "tex", "hole")
    cats = D.mvtec(root)
    said = []
    cfg = dataclasses.replace(EFFNET)
    first = run_eval(cfg, cats, [0], tmp_path / "out", warn=said.append)["categories"]["tex"]
    assert run_eval(cfg, cats, [0], tmp_path / "out", warn=said.append)["categories"]["tex"] == first
    assert not any("recomputing" in s for s in said)
    assert said[-1] == "tex: saved with the same settings and data: reused; force=True recomputes it"
    good = sorted((root / "tex" / "test" / "good").glob("*.png"))
    bad = sorted((root / "tex" / "test" / "hole").glob("*.png"))
    Image.open(bad[0]).save(good[0])  # a defective image where a normal one was, same path
    changed = run_eval(cfg, cats, [0], tmp_path / "out", warn=said.append)["categories"]["tex"]
    assert any("recomputing" in s for s in said) and changed["fingerprint"] != first["fingerprint"]
    fresh = run_eval(cfg, D.mvtec(root), [0], tmp_path / "fresh", warn=said.append)["categories"]["tex"]
    assert changed["image_auroc"] == fresh["image_auroc"] != first["image_auroc"]
    said.clear()
    mask = sorted((root / "tex" / "ground_truth" / "hole").glob("*.png"))[0]
    m = np.asarray(Image.open(mask)).copy()
    m[:] = 0
    m[:8, :8] = 255
    Image.fromarray(m).save(mask)
    again = run_eval(cfg, cats, [0], tmp_path / "out", warn=said.append)["categories"]["tex"]
    assert any("recomputing" in s for s in said) and again["fingerprint"] != changed["fingerprint"]


# -- D22: partners are a function of the image set, not of the listing order ---------------------------------
def test_scores_do_not_depend_on_the_input_order(texture_set):
    images = list(texture_set[0])
    det = DualClipDetector(dataclasses.replace(EFFNET, seed=3))
    base = det.score_images(images)
    perm = np.random.default_rng(0).permutation(len(images))
    again = det.score_images([images[i] for i in perm])
    np.testing.assert_array_equal(again.image_scores.numpy(), base.image_scores.numpy()[perm])
    np.testing.assert_array_equal(again.maps.numpy(), base.maps.numpy()[perm])
    # partners are the same images, named by their new positions
    where = {int(old): new for new, old in enumerate(perm)}
    for new, old in enumerate(perm):
        assert again.run.references[new] == [where[j] for j in base.run.references[old]]


def test_an_archive_block_scores_like_plain_predict_on_the_same_folder(tmp_path, texture_set):
    from dualclip.distributed import run_archive

    paths = _save_all(tmp_path / "in", texture_set[0])
    cfg = dataclasses.replace(EFFNET, seed=1)
    run = run_archive(
        [(str(p), None) for p in paths],
        tmp_path / "a",
        spec_config=cfg.to_dict(),
        engine="inline",
        block_size=len(paths),
        seed=1,
        progress=False,
    )
    _, doc = run_predict([str(tmp_path / "in")], tmp_path / "p", cfg, quiet=True, warn=lambda m: None)
    plain = {r["path"]: r["score"] for r in doc["predictions"]}
    assert {r["path"]: r["score"] for r in run.rows} == plain


# -- D15: a mask of another size than its image -------------------------------------------------------------
@pytest.mark.parametrize("shape", [(50, 400), "rotated"])
def test_a_mask_of_another_size_than_its_image_is_an_error_naming_both_sizes(tmp_path, texture_set, shape):
    root = write_mvtec_tree(tmp_path / "mv", texture_set, "tex", "hole")
    mask = sorted((root / "tex" / "ground_truth" / "hole").glob("*.png"))[0]
    image = root / "tex" / "test" / "hole" / mask.name.replace("_mask", "")
    w, h = shape if shape != "rotated" else (96, 48)
    if shape == "rotated":  # a 48 x 96 image with its mask turned by 90 degrees
        Image.open(image).resize((48, 96)).save(image)
    Image.fromarray(np.full((h, w), 255, np.uint8)).save(mask)
    (cat,) = D.mvtec(root)
    iw, ih = Image.open(image).size
    with pytest.raises(D.DatasetLayoutError) as err:
        cat.check()
    msg = str(err.value)
    assert str(mask) in msg and f"{w} x {h}" in msg and f"{iw} x {ih}" in msg


# -- D8: identical normal images ----------------------------------------------------------------------------
def test_fit_on_identical_images_is_refused_and_no_zero_spread_divides(tmp_path, split):
    with pytest.raises(ValueError, match="do not vary"):
        DualClipDetector(EFFNET).fit([split[0][0]] * 4)
    x = torch.tensor([0.5, 1.5])
    for m in (Moments(1.0, 0.0), Moments(1.0, 1e-12)):
        assert m.standardize(x).tolist() == [-0.5, 0.5]  # a spread of (about) zero is never divided by
    good = tmp_path / "same"
    good.mkdir()
    for i in range(3):
        split[0][0].save(good / f"{i}.png")
    r = CliRunner().invoke(app, ["fit", str(good), "-o", str(tmp_path / "p"), "--backbone", "effnet-lite0", "-q"])
    assert r.exit_code == 2 and r.output.startswith("error: ") and "do not vary" in r.output
    assert "Traceback" not in r.output and not (tmp_path / "p").exists()


# -- D10: a memory bank too small for leave-one-out ---------------------------------------------------------
def test_a_bank_smaller_than_one_image_is_refused_with_the_smallest_valid_size(tmp_path, split):
    main_only = DualClipDetector(dataclasses.replace(EFFNET, memory_bank_size=1, plain_weight=0.0))
    assert main_only.min_bank_size() == main_only.features(split[0][:1]).match_features[0].shape[1] + 1
    det = DualClipDetector(dataclasses.replace(EFFNET, memory_bank_size=1))
    least = det.min_bank_size()
    assert least == 28 * 28 + 1  # the plain view at 224 px has the finer grid here (the main view: 8 x 8 at 64 px)
    with pytest.raises(ValueError, match=f"memory_bank_size=1 .* at least {least}"):
        det.fit(split[0])
    ok = DualClipDetector(dataclasses.replace(EFFNET, memory_bank_size=least)).fit(split[0])
    assert np.isfinite(ok.profile_.normal_scores).all() and np.isfinite(ok.predict(split[1][:1])[0].score)
    good = tmp_path / "good"
    _save_all(good, split[0])
    r = CliRunner().invoke(
        app, ["fit", str(good), "-o", str(tmp_path / "p"), "--backbone", "effnet-lite0", "--memory-bank-size", "1"]
    )
    assert r.exit_code == 2 and "--memory-bank-size 1" in r.output and "Traceback" not in r.output


# -- D16 and D13: every field of a profile is checked on load; a bad one is one ProfileError -----------------
def _tamper_json(path: Path, change) -> None:
    """Change ``profile.json`` of a profile and make its digests again, as a forger would (the field checks meet
    the change)."""
    reseal_profile(path, doc=change)


def _tamper_tensor(path: Path, name: str, change) -> None:
    reseal_profile(path, tensors=lambda t: {**t, name: change(t[name])})


TAMPERED_FIELDS = {
    "nan score std": (
        lambda p: _tamper_json(p, set_field("scale", "score", "std", value=float("nan"))),
        "scale.score.std",
    ),
    "negative score std": (
        lambda p: _tamper_json(p, set_field("scale", "score", "std", value=-1.0)),
        "scale.score.std",
    ),
    "1e308 score std": (lambda p: _tamper_json(p, set_field("scale", "score", "std", value=1e308)), "scale.score.std"),
    "huge patch std": (lambda p: _tamper_json(p, set_field("scale", "patch", "visual", "std", value=1e308)), "visual"),
    "short bank_owner": (lambda p: _tamper_tensor(p, "bank_owner", lambda t: t[:-1]), "bank_owner"),
    "float bank_owner": (lambda p: _tamper_tensor(p, "bank_owner", lambda t: t.double()), "bank_owner"),
    "owner out of range": (lambda p: _tamper_tensor(p, "bank_owner", lambda t: t + 100), "bank_owner"),
    "nan in the bank": (lambda p: _tamper_tensor(p, "bank.cosine.0.0", lambda t: t * float("nan")), "bank"),
    "string normal_scores": (
        lambda p: _tamper_json(p, set_field("normal_scores", value=["0.1", "x"])),
        "normal_scores",
    ),
}


@pytest.mark.parametrize("case", sorted(TAMPERED_FIELDS))
def test_a_tampered_profile_field_is_refused_on_load(tmp_path, fitted, case):
    tamper, field = TAMPERED_FIELDS[case]
    p = fitted.save(tmp_path / "p.dualclip")
    tamper(p)
    with pytest.raises(ProfileError, match=field.replace(".", r"\.")) as err:
        Profile.load(p)
    assert "\n" not in str(err.value)


TAMPERED_DOCS = {
    "a JSON list": lambda doc: [doc],
    "no config": lambda doc: {k: v for k, v in doc.items() if k != "config"},
    "parts empty": set_field("parts", value=[]),
    "string score mean": set_field("scale", "score", "mean", value="0.5"),
}


@pytest.mark.parametrize("case", sorted(TAMPERED_DOCS))
def test_a_damaged_profile_is_one_error_line_and_exit_2(tmp_path, fitted, split, case):
    p = fitted.save(tmp_path / "p.dualclip")
    _tamper_json(p, TAMPERED_DOCS[case])
    with pytest.raises(ProfileError):
        DualClipDetector.load(p)
    img = tmp_path / "x.png"
    split[1][0].save(img)
    r = CliRunner().invoke(app, ["predict", "--profile", str(p), str(img), "-o", str(tmp_path / "o"), "-q"])
    assert r.exit_code == 2, r.output
    assert r.output.startswith("error: ") and r.output.count("\n") == 1 and "Traceback" not in r.output


# -- D17, D18: messages of predict --profile -----------------------------------------------------------------
def test_predict_with_a_profile_does_not_warn_about_k(tmp_path, profile_dir, split):
    paths = _save_all(tmp_path / "in", split[1][:2])
    r = CliRunner().invoke(app, ["predict", "--profile", str(profile_dir), *map(str, paths), "-o", str(tmp_path / "o")])
    assert r.exit_code == 0, r.output
    assert "k=1 asked for" not in r.output and "warning" not in r.output


def test_another_class_name_with_a_vision_only_profile_is_warned_and_the_profiles_recorded(
    tmp_path, profile_dir, split
):
    paths = _save_all(tmp_path / "in", split[1][:1])
    args = ["predict", "--profile", str(profile_dir), str(paths[0]), "-o", str(tmp_path / "o"), "-q"]
    r = CliRunner().invoke(app, [*args, "--class-name", "carpet"])
    assert r.exit_code == 0, r.output
    assert "--class-name 'carpet' has no effect" in r.output and "'tile'" in r.output
    doc = json.loads((tmp_path / "o" / "predictions.json").read_text())
    assert doc["class_name"] == "tile" and any("'carpet' has no effect" in w for w in doc["warnings"])


# -- D21: an all-normal eval ---------------------------------------------------------------------------------
def test_an_all_normal_eval_reports_null_metrics_with_one_note_and_no_python_warnings(tmp_path, split):
    from dualclip.evaluation import run_eval

    good = tmp_path / "good"
    _save_all(good, split[0])
    cats = D.folder("allgood", [str(good)], None)
    said = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = run_eval(dataclasses.replace(EFFNET), cats, [0], tmp_path / "out", warn=said.append)
    assert [w for w in caught if issubclass(w.category, RuntimeWarning)] == []
    cat = json.loads((tmp_path / "out" / "results.json").read_text())["categories"]["allgood"]
    assert cat["image_auroc"] is None and cat["pixel_auroc"] is None
    notes = [w for w in res["categories"]["allgood"]["warnings"] if "undefined" in w]
    assert len(notes) == 1 and "every image is normal" in notes[0]


# -- out-of-distribution guard: blank frames are unusable --------------------------------------------------
def test_a_blank_frame_is_unusable_and_normal_and_defective_images_are_not(tmp_path, fitted, profile_dir, split):
    normal, anomalous = split
    size = normal[0].size
    blanks = [Image.new("RGB", size, (v, v, v)) for v in (0, 128, 255)]
    preds = fitted.predict(blanks + anomalous)
    assert [p.unusable is not None for p in preds] == [True] * 3 + [False] * len(anomalous)
    assert "no texture" in preds[0].unusable
    assert all(p.unusable is None for p in fitted.predict(normal))
    paths = _save_all(tmp_path / "in", blanks[:1] + anomalous[:1])
    r = CliRunner().invoke(app, ["predict", "--profile", str(profile_dir), *map(str, paths), "-o", str(tmp_path / "o")])
    assert r.exit_code == 0, r.output
    doc = json.loads((tmp_path / "o" / "predictions.json").read_text())
    rows = {Path(p["path"]).name: p for p in doc["predictions"]}
    assert rows["00.png"]["verdict"] == "unusable" and "no texture" in rows["00.png"]["reason"]
    assert rows["01.png"]["verdict"] in ("ok", "defective") and rows["01.png"]["reason"] is None
    assert doc["profile"]["ood_guard"].startswith("on")
    assert ",unusable," in (tmp_path / "o" / "predictions.csv").read_text()
    assert "unusable" in (tmp_path / "o" / "report.html").read_text()


def test_a_profile_saved_without_the_guard_still_loads_and_says_so(tmp_path, fitted, split):
    p = fitted.save(tmp_path / "old.dualclip")
    _tamper_json(p, lambda doc: {k: v for k, v in doc.items() if k != "ood"})
    _tamper_tensor(p, "ood.embeddings", lambda t: t)  # still there: ignored without its statistics
    det = DualClipDetector.load(p)
    assert det.profile_.ood is None
    assert det.predict([Image.new("RGB", (64, 64))])[0].unusable is None  # no guard
    img = tmp_path / "x.png"
    split[1][0].save(img)
    _, doc = run_predict([str(img)], tmp_path / "o", det.config, detector=det, quiet=True, warn=lambda m: None)
    assert doc["profile"]["ood_guard"].startswith("off")


def test_the_service_answers_unusable_with_its_reason(profile_dir, split):
    pytest.importorskip("fastapi", reason="the serve extra is not installed")
    import io

    from fastapi.testclient import TestClient

    from dualclip.serve import ServeSettings, create_app

    buf = io.BytesIO()
    Image.new("RGB", split[0][0].size, (255, 255, 255)).save(buf, format="PNG")
    with TestClient(create_app(DualClipDetector.load(profile_dir), ServeSettings())) as c:
        r = c.post("/v1/score", content=buf.getvalue()).json()
        info = c.get("/v1/info").json()
    assert r["verdict"] == "unusable" and "no texture" in r["reason"]
    assert info["ood_guard"].startswith("on")


@pytest.mark.slow
def test_blank_frames_are_unusable_against_a_magnetic_tile_profile():
    data = shared_dataset("magnetic_tile")
    free = sorted((data / "MT_Free" / "Imgs").glob("*.jpg"))
    defects = [sorted((data / c / "Imgs").glob("*.jpg"))[:4] for c in ("MT_Crack", "MT_Blowhole", "MT_Fray")]
    det = DualClipDetector(DetectorConfig(backbone="effnet-lite0", progress=False, device="cpu"))
    det.fit(free[:10], threshold_quantile=0.99)
    size = Image.open(free[0]).size
    blanks = [Image.new("RGB", size, (v, v, v)) for v in (0, 255)]
    preds = det.predict(blanks + free[10:16] + [p for d in defects for p in d])
    assert [p.unusable is not None for p in preds[:2]] == [True, True]
    assert all(p.unusable is None for p in preds[2:])


def test_a_class_name_with_a_profile_fitted_without_one_says_so(tmp_path, split):
    """The warning names the profile's lack of a class (it read 'fitted for class None')."""
    from dualclip import DetectorConfig, DualClipDetector

    cfg = DetectorConfig(backbone="effnet-lite0", pretrained=None, image_size=64, progress=False)
    profile = DualClipDetector(cfg).fit(split[0]).save(tmp_path / "p.dualclip")
    paths = _save_all(tmp_path / "in", split[1][:1])
    args = ["predict", "--profile", str(profile), str(paths[0]), "-o", str(tmp_path / "o"), "-q"]
    r = CliRunner().invoke(app, [*args, "--class-name", "carpet"])
    assert r.exit_code == 0, r.output
    assert "--class-name 'carpet' has no effect: the profile was fitted without a class name" in r.output
    assert "None" not in r.output
