"""End to end: the detector on generated images with a small random CLIP, and with effnet-lite0."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from dualclip import DetectorConfig, DualClipDetector
from dualclip.metrics import image_auroc, pixel_auroc


def _det(tiny_backbone, **kw):
    return DualClipDetector(DetectorConfig(pretrained=None, progress=False, **kw), backbone=tiny_backbone)


def test_predict_shapes_finite_and_per_branch_outputs(tiny_backbone, texture_set):
    images, _, _ = texture_set
    mixed = list(images[:3]) + [images[3].resize((70, 50)), images[4].resize((33, 90))]
    preds = _det(tiny_backbone).predict(mixed, class_name="metal_nut")
    assert len(preds) == 5
    for img, p in zip(mixed, preds, strict=True):
        assert p.anomaly_map.shape == (img.height, img.width)
        assert p.anomaly_map.dtype == np.float32
        assert np.isfinite(p.anomaly_map).all() and np.isfinite(p.score)
        assert set(p.branch_scores) == {"text_global", "text", "visual"}
        assert set(p.branch_maps) == {"text", "visual"} and p.branch_maps["text"].shape == (4, 4)
        assert len(p.references) == 1 and p.references[0] != mixed.index(img)


def test_deterministic_per_seed_and_seed_changes_pairing(tiny_backbone, texture_set):
    images = texture_set[0]
    a = _det(tiny_backbone, seed=1).predict(images)
    b = _det(tiny_backbone, seed=1).predict(images)
    assert [p.score for p in a] == [p.score for p in b]
    assert all(np.array_equal(p.anomaly_map, q.anomaly_map) for p, q in zip(a, b, strict=True))
    others = [[p.references for p in _det(tiny_backbone, seed=s).predict(images)] for s in (2, 3, 4)]
    assert any(o != [p.references for p in a] for o in others)


def test_ablation_switches(tiny_backbone, texture_set):
    images = texture_set[0][:4]
    text_only = _det(tiny_backbone, use_visual=False).predict(images)
    assert set(text_only[0].branch_maps) == {"text"} and text_only[0].references == []
    visual_only = _det(tiny_backbone, use_text=False).predict(images)
    assert set(visual_only[0].branch_maps) == {"visual"}
    # visual-only with one branch keeps its own units: image score = max of the smoothed visual map
    assert 0 <= visual_only[0].score <= 1
    both = _det(tiny_backbone).predict(images)
    assert [p.score for p in both] != [p.score for p in visual_only]
    with pytest.raises(ValueError, match="at least one branch"):
        DetectorConfig(use_text=False, use_visual=False)


def test_single_image_runs_text_only_with_warning(tiny_backbone, texture_set, caplog):
    preds = _det(tiny_backbone).predict(texture_set[0][:1])
    assert any(r.levelname == "WARNING" and "text-only" in r.getMessage() for r in caplog.records)
    assert set(preds[0].branch_maps) == {"text"}


def test_two_images_are_each_others_reference(tiny_backbone, texture_set):
    preds = _det(tiny_backbone).predict(texture_set[0][:2])
    assert preds[0].references == [1] and preds[1].references == [0]


def test_golden_references_and_k_all(tiny_backbone, texture_set):
    images = texture_set[0]
    golden = _det(tiny_backbone).predict(images[6:], references=images[:3])
    assert all(p.references == [0, 1, 2] for p in golden)
    full = _det(tiny_backbone, k="all").predict(images[:5])
    assert all(len(p.references) == 4 for p in full)


def test_bad_inputs_are_clear(tiny_backbone, tmp_path):
    with pytest.raises(ValueError, match="no images"):
        _det(tiny_backbone).predict([])
    from dualclip.data import ImageLoadError

    bad = tmp_path / "empty.png"
    bad.write_bytes(b"")
    with pytest.raises(ImageLoadError, match="empty file"):
        _det(tiny_backbone).predict([bad, bad])


def test_effnet_visual_branch_finds_synthetic_defects(texture_set):
    pytest.importorskip("efficientnet_lite_pytorch")
    images, masks, labels = texture_set
    det = DualClipDetector(DetectorConfig(backbone="effnet-lite0", image_size=128, progress=False))
    preds = det.predict(images)
    assert image_auroc(labels, [p.score for p in preds]) >= 0.75
    assert pixel_auroc(np.stack(masks), np.stack([p.anomaly_map for p in preds])) >= 0.8


def test_vision_only_single_image_raises(texture_set):
    pytest.importorskip("efficientnet_lite_pytorch")
    det = DualClipDetector(DetectorConfig(backbone="effnet-lite0", image_size=64, progress=False))
    with pytest.raises(ValueError, match="vision-only"):
        det.predict(texture_set[0][:1])


def test_paths_and_pil_give_same_result(tiny_backbone, texture_set, tmp_path):
    images = texture_set[0][:3]
    paths = []
    for i, img in enumerate(images):
        p = tmp_path / f"é_{i}.png"
        img.save(p)
        paths.append(p)
    a = _det(tiny_backbone).predict(paths)
    b = _det(tiny_backbone).predict([Image.open(p) for p in paths])
    assert [p.score for p in a] == [p.score for p in b]
    assert a[0].source == str(paths[0])


def test_run_info_records_seconds_per_stage(tiny_backbone, texture_set):
    det = DualClipDetector(DetectorConfig(pretrained=None, progress=False), backbone=tiny_backbone)
    t = det.predict(texture_set[0][:4], class_name="texture").run.timings_s
    assert set(t) == {"backbone", "text", "reference", "fusion"}
    assert all(v >= 0 for v in t.values()) and t["backbone"] > 0


def test_text_embeddings_are_cached_on_the_detector_not_on_the_backbone_or_module(
    tiny_backbone, texture_set, monkeypatch
):
    import dualclip.text.embeddings as E

    calls = []
    original = E.state_embedding
    monkeypatch.setattr(E, "state_embedding", lambda bb, prompts: calls.append(1) or original(bb, prompts))
    images = texture_set[0][:3]
    first = DualClipDetector(DetectorConfig(pretrained=None, progress=False), backbone=tiny_backbone)
    first.predict(images, class_name="tile")
    first.predict(images, class_name="tile")
    assert len(calls) == 2 and len(first.text_cache) == 1  # t_n and t_a once: the second run reads the cache
    second = DualClipDetector(DetectorConfig(pretrained=None, progress=False), backbone=tiny_backbone)
    second.predict(images, class_name="tile")
    assert len(calls) == 4  # another detector owns another cache: nothing shared through the backbone
    assert "_text_cache" not in vars(tiny_backbone) and not hasattr(E, "_MEMORY")


def test_predict_returns_its_run_information_and_leaves_the_detector_as_it_was(tiny_backbone, texture_set):
    det = DualClipDetector(DetectorConfig(pretrained=None, progress=False), backbone=tiny_backbone)
    _ = det.backbone
    before = dict(vars(det))
    preds = det.predict(texture_set[0][:3], class_name="texture")
    assert isinstance(preds, list) and len(preds) == 3
    assert preds.run.n_images == 3 and preds.run.references == [p.references for p in preds]
    assert vars(det).keys() == before.keys() and all(vars(det)[k] is v for k, v in before.items())
    again = det.predict(texture_set[0][:2], class_name="texture")
    assert again.run.n_images == 2 and preds.run.n_images == 3  # each call's record is its own


def test_callers_ask_the_detector_what_its_profile_decides(tiny_backbone, texture_set):
    images = texture_set[0][:6]
    zero_shot = _det(tiny_backbone)
    assert zero_shot.scoring_class("screw") == "screw" and zero_shot.min_images() == 1
    assert zero_shot.profile_summary() is None and zero_shot.threshold_ is None
    fitted = _det(tiny_backbone).fit(images[:4], class_name="tile", threshold_quantile=0.9)
    assert fitted.scoring_class(None) == "tile" and fitted.scoring_class("screw", strict=False) == "tile"
    with pytest.raises(ValueError, match="fitted for class 'tile'"):
        fitted.scoring_class("screw")
    summary = fitted.profile_summary()
    assert summary["n_normal"] == 4 and summary["class_name"] == "tile" and summary["ood_guard"].startswith("on:")
    preds = fitted.predict(images[4:])
    assert preds.run.pairing == "profile" and preds.run.n_images == 2 and preds.run.k_effective is None


def test_the_fitted_units_and_profile_record_come_from_the_detector(tiny_backbone, texture_set):
    images = texture_set[0][:4]
    zero_shot = _det(tiny_backbone)
    assert zero_shot.normal_scores() is None and zero_shot.profile_meta() is None
    fitted = _det(tiny_backbone).fit(images, class_name="tile", sources=["a.png", "b.png", "c.png", "d.png"])
    assert fitted.normal_scores() == fitted.profile_.normal_scores and len(fitted.normal_scores()) == 4
    meta = fitted.profile_meta()
    assert meta["sources"] == ["a.png", "b.png", "c.png", "d.png"] and meta["n_normal"] == 4
    meta["n_normal"] = 99  # a copy: the profile keeps its record
    assert fitted.profile_meta()["n_normal"] == 4 and fitted.profile_.meta["n_normal"] == 4
    with pytest.raises(ValueError, match="sources names 1 origins for 4 images"):
        _det(tiny_backbone).fit(images, sources=["a.png"])
