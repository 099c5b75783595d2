"""Saved profiles: fixed score units, batch independence, leave-one-out statistics, files, refusals."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from conftest import TINY
from dualclip import DetectorConfig, DualClipDetector
from dualclip.profile import PROFILE_JSON, PROFILE_TENSORS, Moments, ProfileError, ScoreScale, build_bank
from dualclip.scoring import bank_distances, match_spaces
from dualclip.scoring.coreset import greedy_coreset

CFG = DetectorConfig(backbone=TINY, pretrained=None, progress=False, memory_bank_size=None)


@pytest.fixture
def split(texture_set):
    images, _, labels = texture_set
    normal = [im for im, y in zip(images, labels, strict=True) if y == 0]
    anomalous = [im for im, y in zip(images, labels, strict=True) if y == 1]
    return normal[:4], normal[4:] + anomalous


@pytest.mark.parametrize(("tta", "distance"), [(False, "cosine"), (True, "cosine"), (False, "hybrid")])
def test_a_profile_scores_an_image_the_same_alone_and_in_any_batch(tiny_backbone, split, tta, distance):
    train, test = split
    cfg = dataclasses.replace(CFG, tta=tta, distance=distance, adaptation={"num_images": 4, "steps": 5})
    det = DualClipDetector(cfg, backbone=tiny_backbone).fit(train, class_name="tile")
    together = [p.score for p in det.predict(test)]
    for i, img in enumerate(test):
        alone = det.predict([img])[0].score
        assert abs(alone - together[i]) <= 1e-5
    preds = det.predict(test[::-1] + test[:2])
    np.testing.assert_allclose([p.score for p in preds][: len(test)], together[::-1], atol=1e-5)
    assert preds.run.pairing == "profile"
    if tta:
        assert "adapted" in det.predict(test[:1])[0].branch_scores


def test_normal_scores_are_the_units_leave_one_out(tiny_backbone, split):
    train, _ = split
    det = DualClipDetector(CFG, backbone=tiny_backbone).fit(train, class_name="tile")
    normal = np.array(det.profile_.normal_scores)
    # the units: the normal images' leave-one-out scores have mean 0 and standard deviation 1
    assert normal.mean() == pytest.approx(0.0, abs=1e-6)
    assert normal.std() == pytest.approx(1.0, abs=1e-6)
    # leave-one-out: image 0's visual scores at fit are its scores against a profile of the other images
    loo = DualClipDetector(CFG, backbone=tiny_backbone).fit(train[1:], class_name="tile")
    got = loo.predict([train[0]])[0].branch_maps["visual"]
    feats = det.features([train[0]])
    distance, sizes = det.matching()
    spaces = match_spaces(feats.match_features, feats.grid, distance, sizes)
    owners = (torch.zeros(1, dtype=torch.long), det.profile_.bank_owner)
    want = torch.stack(
        [
            bank_distances(s, b, distance, query_owner=owners[0], bank_owner=owners[1])
            for s, b in zip(spaces, det.profile_.bank[distance], strict=True)
        ]
    ).mean(0)
    np.testing.assert_allclose(got.reshape(-1), want.reshape(-1).numpy(), rtol=1e-5, atol=1e-6)


def test_thresholds_at_fit(tiny_backbone, split):
    train, test = split
    det = DualClipDetector(CFG, backbone=tiny_backbone).fit(train, class_name="tile", threshold_quantile=0.75)
    assert det.threshold_.value == pytest.approx(float(np.quantile(det.profile_.normal_scores, 0.75)))
    val_n, val_a = test[:2], test[2:]
    det.fit(train, class_name="tile", validation_normal=val_n, validation_anomalous=val_a)
    scores = [p.score for p in det.predict(val_n + val_a)]
    from dualclip.metrics import best_f1_threshold

    assert det.threshold_.value == pytest.approx(best_f1_threshold([0] * 2 + [1] * len(val_a), scores))
    with pytest.raises(ValueError, match="either a threshold quantile or a validation set"):
        det.fit(train, threshold_quantile=0.9, validation_normal=val_n, validation_anomalous=val_a)


def test_save_load_round_trip_gives_the_same_scores(tmp_path, tiny_backbone, split):
    train, test = split
    cfg = dataclasses.replace(CFG, tta=True, adaptation={"num_images": 4, "steps": 3})
    det = DualClipDetector(cfg, backbone=tiny_backbone).fit(train, class_name="tile", threshold_quantile=0.9)
    path = det.save(tmp_path / "tile.dualclip")
    assert sorted(p.name for p in path.iterdir()) == [PROFILE_JSON, PROFILE_TENSORS]
    doc = json.loads((path / PROFILE_JSON).read_text())
    assert doc["backbone"] == TINY and doc["format"] == 1 and doc["n_normal"] == 4
    assert doc["config"]["tta"] is True and doc["threshold"]["value"] == det.threshold_.value
    loaded = DualClipDetector.load(path, backbone=tiny_backbone)
    assert [p.score for p in loaded.predict(test)] == pytest.approx([p.score for p in det.predict(test)], abs=1e-6)
    assert loaded.threshold_ == det.threshold_
    # a second save needs overwrite, and never replaces a folder that is not a profile
    with pytest.raises(ProfileError, match="exists"):
        det.save(path)
    det.save(path, overwrite=True)
    other = tmp_path / "mine"
    other.mkdir()
    (other / "notes.txt").write_text("keep")
    with pytest.raises(ProfileError, match="not a profile folder"):
        det.save(other, overwrite=True)
    assert (other / "notes.txt").read_text() == "keep"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine", "tile.dualclip"]  # no staging left behind


def test_loading_with_other_weights_or_format_is_a_clear_error(tmp_path, tiny_backbone, split):
    train, _ = split
    path = DualClipDetector(CFG, backbone=tiny_backbone).fit(train, class_name="tile").save(tmp_path / "p")
    other = type(tiny_backbone)(tiny_backbone.model, tiny_backbone.tokenizer, TINY, None)
    with torch.no_grad():
        next(other.model.visual.parameters()).add_(0.01)  # other weights, same architecture
    with pytest.raises(ProfileError, match="fingerprint"):
        DualClipDetector.load(path, backbone=other)
    doc = json.loads((path / PROFILE_JSON).read_text())
    doc["format"] = 99
    (path / PROFILE_JSON).write_text(json.dumps(doc))
    with pytest.raises(ProfileError, match="format 99"):
        DualClipDetector.load(path, backbone=tiny_backbone)
    (path / PROFILE_TENSORS).unlink()
    with pytest.raises(ProfileError, match="is not a profile"):
        DualClipDetector.load(path)


def test_a_fitted_detector_refuses_another_class_and_references(tiny_backbone, split):
    train, test = split
    det = DualClipDetector(CFG, backbone=tiny_backbone).fit(train, class_name="tile")
    with pytest.raises(ValueError, match="fitted for class 'tile'"):
        det.predict(test, class_name="carpet")
    with pytest.raises(ValueError, match="compares images with its profile"):
        det.predict(test, references=train)
    with pytest.raises(ValueError, match="at least 2 normal images"):
        det.fit(train[:1])


def test_memory_bank_is_bounded_and_keeps_owners(tiny_backbone, split):
    train, test = split
    det = DualClipDetector(dataclasses.replace(CFG, memory_bank_size=20), backbone=tiny_backbone).fit(train)
    prof = det.profile_
    assert prof.meta["bank_patches"] == 20 and prof.meta["bank_patches_total"] == 4 * 16
    assert all(t.shape[0] == 20 for spaces in prof.bank.values() for space in spaces for t in space)
    spaces = {"cosine": [[torch.randn(4, 16, 3)], [torch.randn(4, 16, 3)]], "euclidean": [[torch.randn(4, 16, 3)]]}
    bank, owner, total = build_bank(spaces, 10, seed=0)
    keep = greedy_coreset(spaces["cosine"][0][0].reshape(64, 3), 10, seed=0)
    torch.testing.assert_close(bank["cosine"][1][0], spaces["cosine"][1][0].reshape(64, 3)[keep])
    torch.testing.assert_close(bank["euclidean"][0][0], spaces["euclidean"][0][0].reshape(64, 3)[keep])
    assert owner.tolist() == (keep // 16).tolist() and total == 64


def test_build_bank_keeps_every_patch_up_to_its_size_and_a_seeded_coreset_above(capsys):
    """Two parts, two sizes, two layers: up to ``size`` every patch, image by image; above it the seeded greedy
    coreset of the first part's first space (layers concatenated) picks the same patches everywhere; the
    coreset's progress bar only when asked."""
    gen = torch.Generator().manual_seed(0)

    def layers():
        return [torch.randn(3, 8, 4, generator=gen), torch.randn(3, 8, 2, generator=gen)]

    spaces = {"cosine": [layers(), layers()], "euclidean": [layers()]}
    flat = {p: [[t.reshape(24, -1) for t in s] for s in sp] for p, sp in spaces.items()}
    for size in (None, 24, 100):
        bank, owner, total = build_bank(spaces, size)
        assert {p: [len(s) for s in sp] for p, sp in bank.items()} == {"cosine": [2, 2], "euclidean": [2]}
        assert total == 24
        for p, sp in flat.items():
            for s, space in enumerate(sp):
                for layer, t in enumerate(space):
                    torch.testing.assert_close(bank[p][s][layer], t, rtol=0, atol=0)
        assert owner.tolist() == [i for i in range(3) for _ in range(8)]
    first = torch.cat(flat["cosine"][0], dim=-1)
    picks = {}
    for seed in (None, 0, 3):
        bank, owner, total = build_bank(spaces, 10) if seed is None else build_bank(spaces, 10, seed=seed)
        keep = greedy_coreset(first, 10, seed=0 if seed is None else seed)
        picks[seed] = keep.tolist()
        for p, sp in flat.items():
            for s, space in enumerate(sp):
                for layer, t in enumerate(space):
                    torch.testing.assert_close(bank[p][s][layer], t[keep], rtol=0, atol=0)
        assert owner.tolist() == (keep // 8).tolist() and total == 24
    assert picks[None] == picks[0] != picks[3]  # the default seed is 0, and the seed matters
    assert capsys.readouterr().err == ""
    build_bank(spaces, 10, progress=True)
    assert "coreset" in capsys.readouterr().err


@pytest.mark.parametrize("bad", [[], [1.0, float("nan")], [float("-inf")], [True, 1.0], "0.5", {"0": 0.5}], ids=repr)
def test_positional_offsets_are_null_or_a_non_empty_list_of_finite_numbers(bad):
    doc = ScoreScale(patch={"visual": Moments(0.0, 1.0)}).to_dict()
    assert ScoreScale.from_dict(doc).position is None and ScoreScale.from_dict(doc).position_offsets() is None
    read = ScoreScale.from_dict({**doc, "position": [1, 2.5]})
    assert read.position == [1.0, 2.5] and all(type(v) is float for v in read.position)
    # integers are numbers too: the offsets are float32 whatever they were given as
    offsets = ScoreScale(patch={}, position=[1, 2]).position_offsets()
    assert offsets.dtype == torch.float32 and offsets.tolist() == [1.0, 2.0]
    with pytest.raises(ValueError) as err:
        ScoreScale.from_dict({**doc, "position": bad})
    assert str(err.value) == "scale.position must be null or a non-empty list of finite numbers"


def test_cli_fit_records_its_sources_then_predict_with_the_profile(tmp_path, texture_set):
    from typer.testing import CliRunner

    from dualclip.cli.main import app

    images, _, labels = texture_set
    good, test = tmp_path / "good", tmp_path / "test"
    good.mkdir()
    test.mkdir()
    for i, (img, y) in enumerate(zip(images, labels, strict=True)):
        img.save((good if y == 0 and i < 4 else test) / f"{i:02d}.png")
    runner = CliRunner()
    model = ["--backbone", TINY, "--pretrained", "random", "-q"]
    res = runner.invoke(
        app,
        ["fit", str(good), "--class-name", "tile", "--threshold-quantile", "0.9", "-o", str(tmp_path / "p"), *model],
    )
    assert res.exit_code == 0, res.output
    assert "4 normal images" in res.output
    saved = json.loads((tmp_path / "p" / "profile.json").read_text())
    assert saved["sources"] == [str(good / f"{i:02d}.png") for i in range(4)]  # the paths, as the API records
    profile = DualClipDetector.load(tmp_path / "p")
    res = runner.invoke(app, ["predict", "--profile", str(tmp_path / "p"), str(test), "-o", str(tmp_path / "o"), "-q"])
    assert res.exit_code == 0, res.output
    doc = json.loads((tmp_path / "o" / "predictions.json").read_text())
    assert doc["threshold"] == profile.threshold_.to_dict() and doc["class_name"] == "tile"
    assert doc["run"]["pairing"] == "profile" and doc["profile"]["n_normal"] == 4
    by_path = {p["path"]: p for p in doc["predictions"]}
    one = sorted(by_path)[0]
    res = runner.invoke(app, ["predict", "--profile", str(tmp_path / "p"), one, "-o", str(tmp_path / "o1"), "-q"])
    alone = json.loads((tmp_path / "o1" / "predictions.json").read_text())["predictions"][0]
    assert abs(alone["score"] - by_path[one]["score"]) <= 1e-5 and alone["verdict"] == by_path[one]["verdict"]
    # the profile carries the model: model options are refused, not silently ignored
    res = runner.invoke(
        app, ["predict", "--profile", str(tmp_path / "p"), one, "-o", str(tmp_path / "o2"), "--backbone", "x"]
    )
    assert res.exit_code == 2 and "--profile carries the model and settings: drop --backbone" in res.output
    res = runner.invoke(app, ["fit", str(good), "-o", str(tmp_path / "p"), *model])
    assert res.exit_code == 2 and "exists" in res.output
    res = runner.invoke(
        app, ["predict", "--profile", str(tmp_path / "p"), one, "-o", str(tmp_path / "o3"), "--class-name", "carpet"]
    )
    assert res.exit_code == 2 and "fitted for class 'tile'" in res.output


def test_hybrid_profile_standardises_each_part_by_its_normal_moments(tiny_backbone, split):
    train, test = split
    cfg = dataclasses.replace(CFG, distance="hybrid", use_text=False)
    det = DualClipDetector(cfg, backbone=tiny_backbone).fit(train)
    parts = det.profile_.scale.parts
    assert sorted(parts) == ["cosine", "euclidean"]
    feats = det.features(test[:1])
    want = 0
    for part in ("cosine", "euclidean"):
        (space,) = match_spaces(feats.match_features, feats.grid, part, (3,))
        d = bank_distances(space, det.profile_.bank[part][0], part)
        want = want + (d - parts[part].mean) / parts[part].std
    got = det.predict(test[:1])[0].branch_maps["visual"]
    np.testing.assert_allclose(got.reshape(-1), (want / 2).reshape(-1).numpy(), rtol=1e-5, atol=1e-5)


def test_a_profile_matches_its_bank_at_its_own_default_neighbourhood(tmp_path, split):
    """effnet-lite0 defaults to neighbourhood 1 zero-shot and 3 for a fitted profile's bank: the fit records 3,
    the fitted detector scores at 3 in the same process and after a save and load, and a zero-shot run of the
    same settings still matches at 1."""
    train, test = split
    cfg = DetectorConfig(backbone="effnet-lite0", pretrained=None, image_size=64, progress=False, seed=0)
    det = DualClipDetector(cfg)
    assert det.matching() == ("hybrid", (1,))
    det.fit(train)
    assert det.matching() == ("hybrid", (3,))
    doc = json.loads((det.save(tmp_path / "p.dualclip") / PROFILE_JSON).read_text())
    assert doc["neighbourhood"] == [3] and doc["config"]["neighbourhood"] == [3]
    # the bank holds the normal images' features in the matching space of size 3 (no coreset at this size)
    feats = det.features(train)
    for part in ("euclidean", "cosine"):
        (want,) = match_spaces(feats.match_features, feats.grid, part, (3,))
        for got, layer in zip(det.profile_.bank[part][0], want, strict=True):
            assert torch.allclose(got, layer.reshape(-1, layer.shape[-1]), atol=1e-5)
    loaded = DualClipDetector.load(tmp_path / "p.dualclip", backbone=det.backbone)
    assert loaded.matching() == ("hybrid", (3,))
    assert [p.score for p in loaded.predict(test)] == pytest.approx([p.score for p in det.predict(test)], abs=1e-5)
    assert DualClipDetector(cfg, backbone=det.backbone).matching() == ("hybrid", (1,))


def test_a_profile_is_saved_into_an_empty_folder_one_made_and_keeps_its_mode(tmp_path, tiny_backbone, texture_set):
    import os

    from dualclip.profile import PROFILE_JSON, PROFILE_TENSORS

    images, _, labels = texture_set
    det = DualClipDetector(DetectorConfig(pretrained=None, progress=False), backbone=tiny_backbone)
    det.fit([img for img, y in zip(images, labels, strict=True) if not y])
    out = tmp_path / "mine.dualclip"
    out.mkdir()
    os.chmod(out, 0o700)
    det.save(out)  # no overwrite needed: the folder is empty
    assert sorted(p.name for p in out.iterdir()) == sorted([PROFILE_JSON, PROFILE_TENSORS])
    assert out.stat().st_mode & 0o777 == 0o700
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="exists"):
        det.save(tmp_path / "full")
    det.save(out, overwrite=True)  # replaces its own files only; no leftover sibling
    assert sorted(p.name for p in tmp_path.iterdir()) == ["full", "mine.dualclip"]
