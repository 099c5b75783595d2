"""Tests that bite: each checks a value against an independent recomputation, so that a small deliberate bug
in fusion, the image score, adaptation, verdicts, thresholds or the seed aggregation fails a named test.

The planted bugs they catch: ignoring beta in the image score; preferring the
text map over the adapted one; inverting verdicts; fixing the threshold quantile at 0.5; taking the max
instead of the mean over seeds.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from conftest import write_mvtec_tree
from dualclip import DetectorConfig, DualClipDetector, ScoreResult
from dualclip.cli.predict import run_predict
from dualclip.config import AdaptationConfig
from dualclip.evaluation import macro_mean, mean_over_seeds
from dualclip.scoring import map_scores, normalize_branch, upsample
from dualclip.thresholds import Threshold, f1_threshold, fit_threshold, manual_threshold, quantile_threshold


def _run(tiny_backbone, images, **settings) -> ScoreResult:
    cfg = DetectorConfig(pretrained=None, progress=False, **settings)
    return DualClipDetector(cfg, backbone=tiny_backbone).score_images(images, class_name="texture")


def _z(x: torch.Tensor) -> torch.Tensor:
    x = x.double()
    return (x - x.mean()) / x.std(unbiased=False)


@pytest.fixture
def images(texture_set):
    return texture_set[0]


def test_score_result_is_typed_and_consistent(tiny_backbone, images):
    r = _run(tiny_backbone, images)
    n, s = len(images), tiny_backbone.image_size
    assert r.image_scores.shape == (n,) and r.maps.shape == (n, s, s)
    assert r.branches.text.shape == r.branches.visual.shape == (n, r.grid[0] * r.grid[1])
    assert r.branches.adapted is None and r.run.branches == ["text", "visual"]
    assert sorted(r.branches.image()) == ["text", "text_global", "visual"]
    assert torch.equal(r.branches.image()["visual"], r.branches.visual.amax(dim=1))


def test_alpha_one_and_zero_reproduce_the_single_branches(tiny_backbone, images):
    """alpha = 1: the map is the text branch alone, in its own units; alpha = 0: the visual branch alone."""
    size, sigma = tiny_backbone.image_size, 4.0
    text_only = _run(tiny_backbone, images, alpha=1.0, beta=0.0)
    torch.testing.assert_close(text_only.maps, upsample(text_only.branches.text, text_only.grid, size, sigma))
    visual_only = _run(tiny_backbone, images, alpha=0.0, beta=0.0)
    torch.testing.assert_close(visual_only.maps, upsample(visual_only.branches.visual, visual_only.grid, size, sigma))


def test_alpha_weights_the_zscored_branches(tiny_backbone, images):
    r = _run(tiny_backbone, images, alpha=0.3, beta=0.0)
    fused = 0.3 * _z(r.branches.text) + 0.7 * _z(r.branches.visual)
    torch.testing.assert_close(r.maps, upsample(fused.float(), r.grid, tiny_backbone.image_size, 4.0))


def test_beta_weights_the_global_text_score(tiny_backbone, images):
    """beta = 1: the image score is g_txt; beta = 0: the map's max; in between the z-scored mix."""
    r1 = _run(tiny_backbone, images, beta=1.0)
    assert torch.equal(r1.image_scores, r1.branches.text_global)
    r0 = _run(tiny_backbone, images, beta=0.0)
    assert torch.equal(r0.image_scores, r0.maps.flatten(1).amax(dim=1))
    r = _run(tiny_backbone, images, beta=0.25)
    want = 0.25 * _z(r.branches.text_global) + 0.75 * _z(r.maps.flatten(1).amax(dim=1))
    torch.testing.assert_close(r.image_scores.double(), want, rtol=1e-5, atol=1e-6)


def test_image_score_mode_and_rank_fusion(tiny_backbone, images):
    r = _run(tiny_backbone, images, beta=0.0, image_score="top1pct")
    flat = r.maps.flatten(1)
    m = max(1, round(0.01 * flat.shape[1]))
    torch.testing.assert_close(r.image_scores, flat.sort(dim=1, descending=True).values[:, :m].mean(dim=1))
    rk = _run(tiny_backbone, images, beta=0.0, fusion_norm="rank")
    from scipy.stats import rankdata

    def ranks(x):
        v = rankdata(x.double().numpy().ravel(), method="average")
        return torch.from_numpy((v - 1) / (v.size - 1)).reshape(x.shape)

    fused = 0.5 * ranks(rk.branches.text) + 0.5 * ranks(rk.branches.visual)
    torch.testing.assert_close(rk.maps, upsample(fused.float(), rk.grid, tiny_backbone.image_size, 4.0))
    assert torch.equal(normalize_branch(torch.tensor([3.0, 1.0, 2.0]), "rank"), torch.tensor([1.0, 0.0, 0.5]))
    assert torch.equal(map_scores(torch.arange(200.0).reshape(1, 10, 20), "top1pct"), torch.tensor([198.5]))


def test_adapted_map_shares_the_text_slot(tiny_backbone, images):
    """With adaptation the text slot holds the text and the adapted branches, each standardised, at alpha / 2:
    adaptation adds to the text evidence instead of replacing it."""
    adapt = AdaptationConfig(num_images=4, steps=10)
    r = _run(tiny_backbone, images, alpha=1.0, beta=0.0, tta=True, adaptation=adapt)
    size = tiny_backbone.image_size

    def z(x):
        return (x - x.mean()) / x.std(unbiased=False)

    both = (z(r.branches.text.double()) + z(r.branches.adapted.double())) / 2
    torch.testing.assert_close(r.maps, upsample(both.float(), r.grid, size, 4.0), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(r.maps, upsample(z(r.branches.adapted), r.grid, size, 4.0), atol=1e-3)
    mixed = _run(tiny_backbone, images, alpha=0.5, beta=0.0, tta=True, adaptation=adapt)
    plain = _run(tiny_backbone, images, alpha=0.5, beta=0.0)
    assert not torch.allclose(mixed.maps, plain.maps)  # turning adaptation on changes the fused maps


def test_verdict_is_score_at_or_above_threshold(tmp_path, folder, tiny_backbone):
    det = DualClipDetector(DetectorConfig(pretrained=None, progress=False), backbone=tiny_backbone)
    scores = [p.score for p in det.predict(sorted(folder.rglob("*.png")))]
    t = float(np.median(scores))
    _, doc = run_predict([str(folder)], tmp_path / "o", det.config, detector=det, threshold=t)
    verdicts = [(p["score"], p["verdict"]) for p in doc["predictions"]]
    assert {v for _, v in verdicts} == {"ok", "defective"}
    assert all(v == ("defective" if s >= t else "ok") for s, v in verdicts)
    assert Threshold(0.5, "x").verdict(0.5) == "defective" and Threshold(0.5, "x").verdict(0.4999) == "ok"
    assert Threshold(None, "none").verdict(1e9) is None
    with pytest.raises(ValueError, match="finite"):
        Threshold(float("nan"), "x")


@pytest.mark.parametrize("q", [0.1, 0.9, 1.0])
def test_quantile_threshold_is_numpy_quantile_of_the_reference_scores(tmp_path, folder, tiny_backbone, q):
    det = DualClipDetector(DetectorConfig(pretrained=None, progress=False), backbone=tiny_backbone)
    refs = sorted(folder.rglob("*.png"))[:5]
    _, doc = run_predict(
        [str(folder)], tmp_path / "o", det.config, references=[str(p) for p in refs], threshold_quantile=q, detector=det
    )
    from dualclip.data.images import load_image

    ref_scores = det.score_images([load_image(p) for p in refs], class_name=None).image_scores.numpy()
    assert doc["threshold"]["value"] == float(np.quantile(ref_scores.astype(np.float64), q))
    assert doc["threshold"]["source"] == f"quantile {q} of 5 reference scores"
    assert quantile_threshold([1.0, 2.0, 3.0, 4.0], 0.25).value == 1.75


def test_f1_threshold_and_fit_threshold(tiny_backbone, images):
    labels = np.array([0, 0, 1, 0, 1, 1])
    scores = np.array([0.1, 0.35, 0.3, 0.2, 0.8, 0.9])
    # F1 at each threshold: 0.9: 1/2, 0.8: 4/5, 0.35: 2/3, 0.3: 6/7 (best), 0.2: 3/4, 0.1: 2/3
    assert f1_threshold(labels, scores).value == 0.3
    det = DualClipDetector(DetectorConfig(pretrained=None, progress=False), backbone=tiny_backbone)
    normal = images[:6]
    th = fit_threshold(det, normal, quantile=0.5)
    own = det.score_images(list(normal)).image_scores.numpy()
    assert th.value == float(np.quantile(own, 0.5))
    th = fit_threshold(det, normal[:3], anomalous=images[6:])
    both = det.score_images(list(normal[:3]) + list(images[6:])).image_scores.numpy()
    assert th.value == f1_threshold(np.array([0, 0, 0, 1, 1, 1, 1]), both).value


def test_seed_rows_are_means_and_population_std():
    per_seed = [{"image_auroc": 0.5, "x": 1.0}, {"image_auroc": 0.9, "x": 3.0}, {"image_auroc": 0.7, "x": 8.0}]
    out = mean_over_seeds(per_seed)
    assert out["image_auroc"] == pytest.approx(0.7) and out["x"] == pytest.approx(4.0)
    assert out["image_auroc_std"] == pytest.approx(np.std([0.5, 0.9, 0.7]))
    assert mean_over_seeds(per_seed[:1]) == {"image_auroc": 0.5, "x": 1.0}
    rows = [{"image_auroc": 0.5, "pixel_auroc": float("nan")}, {"image_auroc": 0.9, "pixel_auroc": 0.8}]
    mean = macro_mean(rows)
    assert mean["image_auroc"] == pytest.approx(0.7) and mean["pixel_auroc"] == pytest.approx(0.8)


def test_evaluate_category_reports_the_mean_of_its_seeds(tmp_path, texture_set, tiny_backbone):
    from dualclip.data import datasets as D
    from dualclip.evaluation import evaluate_category

    write_mvtec_tree(tmp_path / "mv", texture_set)
    (cat,) = D.mvtec(tmp_path / "mv")
    cfg = DetectorConfig(pretrained=None, progress=False)
    out = evaluate_category(cfg, cat, [0, 1, 2], {"backbone": tiny_backbone})
    single = [evaluate_category(cfg, cat, [s], {"backbone": tiny_backbone}) for s in (0, 1, 2)]
    for k in ("image_auroc", "pixel_auroc", "pixel_aupro"):
        vals = [r[k] for r in single]
        assert len(set(vals)) > 1 or k == "image_auroc"  # the seeds differ (random pairing)
        assert out[k] == pytest.approx(np.mean(vals)) and out[f"{k}_std"] == pytest.approx(np.std(vals))


def test_config_round_trips_and_rejects_bad_values():
    cfg = DetectorConfig(backbone="effnet-lite0", k=3, alpha=0.2)
    again = DetectorConfig(**{**cfg.to_dict(), "feature_layers": None})
    assert dataclasses.replace(again, feature_layers=None).to_dict() == cfg.to_dict()
    for bad in ({"alpha": 1.5}, {"beta": -0.1}, {"k": 0}, {"fusion_norm": "l2"}):
        with pytest.raises(ValueError):
            DetectorConfig(**bad)


def test_adaptation_starts_from_the_text_score(tiny_backbone, images):
    """Before any training step the adapted branch reproduces the text branch (head initialised from the text
    embeddings and the temperature), and it is trained from the most normal-looking half."""
    r = _run(tiny_backbone, images, tta=True, adaptation=AdaptationConfig(num_images=2, steps=0))
    torch.testing.assert_close(r.branches.adapted, r.branches.text, rtol=1e-4, atol=1e-5)
    from dualclip.scoring import fuse

    prior = fuse([(r.branches.text, 1.0), (r.branches.visual, 1.0)], "zscore").amax(dim=1)
    assert r.run.synthesis_bases == sorted(torch.argsort(prior, stable=True)[:5].tolist())


def test_fit_threshold_scores_with_the_class_name(tiny_backbone, images):
    det = DualClipDetector(DetectorConfig(pretrained=None, progress=False), backbone=tiny_backbone)
    own = det.score_images(list(images[:6]), class_name="texture").image_scores.numpy()
    assert fit_threshold(det, images[:6], class_name="texture").value == float(np.quantile(own.astype(float), 0.99))
    both = det.score_images(list(images[:3]) + list(images[6:]), class_name="texture").image_scores.numpy()
    th = fit_threshold(det, images[:3], anomalous=images[6:], class_name="texture")
    assert th.value == f1_threshold(np.array([0] * 3 + [1] * 4), both).value


def test_results_tables_exact():
    from dualclip.evaluation import results_table

    cat = {"image_auroc": 0.91234, "image_auroc_std": 0.003, "pixel_auroc": float("nan"), "ms_per_image": 12.34}
    for k in ("image_ap", "image_f1max", "pixel_ap", "pixel_f1max", "pixel_aupro"):
        cat[k] = 0.5
    results = {
        "config": {"seeds": [0, 1]},
        "categories": {"a": cat},
        "mean": dict(cat),
        "warnings": {"a": ["something odd"]},
    }
    row = "91.2 ± 0.3 | 50.0 | 50.0 | n/a | 50.0 | 50.0 | 50.0 | 12"
    assert results_table(results, "md") == (
        "| category | image auroc | image ap | image f1max | pixel auroc | pixel ap | pixel f1max | pixel aupro "
        "| ms/image |\n|---|---|---|---|---|---|---|---|---|\n"
        f"| a | {row} |\n| mean | {row} |\n\nMetrics in %, mean ± std over seeds [0, 1].\n\n"
        "**Warnings (1)**\n\n- a: something odd\n"
    )
    csv_row = "91.23,50.00,50.00,,50.00,50.00,50.00,12.3"
    assert results_table(results, "csv").splitlines() == [
        "category,defect,image_auroc,image_ap,image_f1max,pixel_auroc,pixel_ap,pixel_f1max,pixel_aupro,ms_per_image",
        f"a,,{csv_row}",
        f"mean,,{csv_row}",
    ]
    single = {**results, "config": {"seeds": [3]}, "warnings": {}}
    assert results_table(single, "md").splitlines()[2].startswith("| a | 91.2 | 50.0 |")
    assert results_table(single, "md").endswith("Metrics in %, seed 3.\n")


def test_fingerprint_changes_with_what_changes_numbers(tmp_path, texture_set, monkeypatch):
    from dualclip.data import datasets as D
    from dualclip.evaluation import fingerprint

    write_mvtec_tree(tmp_path / "mv", texture_set)
    (cat,) = D.mvtec(tmp_path / "mv")
    cfg = DetectorConfig(pretrained=None, progress=False)
    base = fingerprint(cfg, cat, [0])
    assert fingerprint(dataclasses.replace(cfg, progress=True, cache_dir="/x"), cat, [0]) == base
    assert fingerprint(dataclasses.replace(cfg, seed=5), cat, [0]) == base  # the seeds list decides
    assert fingerprint(dataclasses.replace(cfg, k=3), cat, [0]) != base
    assert fingerprint(dataclasses.replace(cfg, tta=True), cat, [0]) != base
    assert fingerprint(cfg, cat, [0, 1]) != base
    assert fingerprint(cfg, dataclasses.replace(cat, mask_threshold=127), [0]) != base
    assert fingerprint(cfg, dataclasses.replace(cat, samples=cat.samples[:-1]), [0]) != base
    flipped = [dataclasses.replace(s, label=1 - s.label) for s in cat.samples]
    assert fingerprint(cfg, dataclasses.replace(cat, samples=flipped), [0]) != base
    no_mask = [dataclasses.replace(s, mask=None) for s in cat.samples]
    assert fingerprint(cfg, dataclasses.replace(cat, samples=no_mask), [0]) != base
    assert fingerprint(cfg, dataclasses.replace(cat, references=[cat.samples[0].path]), [0]) != base
    assert fingerprint(dataclasses.replace(cfg, distance="euclidean"), cat, [0]) != base
    # a backbone's default matching is part of what the settings mean: a new default is a new fingerprint
    from dualclip.backbone import ClipBackbone

    monkeypatch.setattr(ClipBackbone, "default_neighbourhood", (1, 3, 5))
    assert fingerprint(cfg, cat, [0]) != base
    weights = tmp_path / "w.pt"
    weights.write_bytes(b"1")
    with_file = fingerprint(dataclasses.replace(cfg, pretrained=str(weights)), cat, [0])
    weights.write_bytes(b"22")  # same path, other content (size, mtime)
    assert fingerprint(dataclasses.replace(cfg, pretrained=str(weights)), cat, [0]) != with_file
    import dualclip.evaluation as E

    old = E.__version__
    E.__version__ = "99"
    try:
        assert fingerprint(cfg, cat, [0]) != base
    finally:
        E.__version__ = old


def test_features_and_prediction_repr(tiny_backbone, images):
    from dualclip.backbone import extract_features

    det = DualClipDetector(DetectorConfig(pretrained=None, progress=False), backbone=tiny_backbone)
    got = det.features(images[:3])
    want = extract_features(tiny_backbone, list(images[:3]))
    assert torch.equal(got.global_embedding, want.global_embedding)
    assert torch.equal(got.patch_embeddings, want.patch_embeddings)
    assert all(torch.equal(a, b) for a, b in zip(got.match_features, want.match_features, strict=True))
    p = det.predict(images[:2])[0]
    assert repr(p) == f"Prediction(score={p.score:.4f}, map=96x96, source=None)"


def test_results_tables_missing_values_and_two_seeds():
    from dualclip.evaluation import results_table

    cat = {k: 0.5 for k in ("image_auroc", "image_ap", "image_f1max", "pixel_auroc", "pixel_ap", "pixel_f1max")}
    cat.update({"pixel_aupro": 0.25, "pixel_aupro_std": 0.3})
    results = {"config": {"seeds": [0, 1]}, "categories": {"a": cat}, "mean": cat}  # no ms, no warnings
    md = results_table(results, "md")
    assert "| a | 50.0 | 50.0 | 50.0 | 50.0 | 50.0 | 50.0 | 25.0 ± 30.0 | n/a |" in md and "Warnings" not in md
    assert results_table(results, "csv").splitlines()[1] == "a,,50.00,50.00,50.00,50.00,50.00,50.00,25.00,"


def test_macro_mean_covers_every_key_and_all_undefined():
    import warnings

    rows = [
        {"image_auroc": 0.5, "pixel_auroc": float("nan"), "ms_per_image": 10.0},
        {"image_auroc": 0.9, "pixel_auroc": float("nan"), "ms_per_image": 30.0, "peak_rss_mb": 100.0},
    ]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "mean of empty slice"
        mean = macro_mean(rows)
    assert mean["image_auroc"] == pytest.approx(0.7) and mean["ms_per_image"] == 20.0
    assert mean["peak_rss_mb"] == 100.0  # a key only the second category has
    assert np.isnan(mean["pixel_auroc"]) and "pixel_aupro" not in mean
    two = mean_over_seeds([{"x": 1.0}, {"x": 3.0}])
    assert two == {"x": 2.0, "x_std": 1.0}


def test_threshold_sources_bounds_and_messages():
    assert manual_threshold(0.25) == Threshold(0.25, "manual")
    assert quantile_threshold([1.0, 3.0], 0.0) == Threshold(1.0, "quantile 0.0 of 2 reference scores")
    assert quantile_threshold([1.0, 3.0], 1.0).value == 3.0
    for q in (-0.01, 1.01, float("nan")):
        with pytest.raises(ValueError, match=r"the threshold quantile must lie in \[0, 1\], got"):
            quantile_threshold([1.0, 2.0, 3.0], q)
    with pytest.raises(ValueError, match="^a quantile threshold needs the scores of at least 2 normal images$"):
        quantile_threshold([1.0], 0.5)
    th = f1_threshold([0, 0, 0, 1, 1], [0.1, 0.2, 0.3, 0.8, 0.9])
    assert th == Threshold(0.8, "F1-optimal on validation (3 normal, 2 anomalous)")
    for labels in ([], [1, 1], [0, 0]):
        with pytest.raises(ValueError, match="^the validation set needs both normal and anomalous images"):
            f1_threshold(labels, [0.5] * len(labels))
    assert Threshold(None, "x").to_dict() == {"value": None, "source": "x"}


def test_resize_map_is_half_pixel_bilinear():
    from dualclip.scoring import resize_map

    m = torch.tensor([[0.0, 1.0], [2.0, 3.0]], dtype=torch.float64)
    out = resize_map(m, 4, 4)
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out[0], [0.0, 0.25, 0.75, 1.0])  # align_corners=True would give thirds
    np.testing.assert_array_equal(out[:, 0], [0.0, 0.5, 1.5, 2.0])
    same = resize_map(m, 2, 2)
    assert same.dtype == np.float32 and np.array_equal(same, m.numpy())


def test_normalize_branch_edge_cases():
    one = torch.tensor([[5.0]])
    assert torch.equal(normalize_branch(one, "zscore"), torch.zeros(1, 1))
    assert torch.equal(normalize_branch(one, "rank"), torch.zeros(1, 1))
    assert torch.equal(normalize_branch(torch.tensor([3.0, 1.0]), "rank"), torch.tensor([1.0, 0.0]))
    assert torch.equal(normalize_branch(torch.tensor([2.0, 2.0, 5.0]), "rank"), torch.tensor([0.25, 0.25, 1.0]))
    torch.testing.assert_close(normalize_branch(torch.tensor([1.0, 3.0]), "zscore"), torch.tensor([-1.0, 1.0]))
    with pytest.raises(ValueError, match="unknown normalisation 'l2'"):
        normalize_branch(one, "l2")


def test_aggregate_and_map_score_defaults():
    from dualclip.scoring import aggregate

    d = torch.tensor([[0.3, 0.1], [0.2, 0.4]])
    with pytest.raises(ValueError, match="unknown aggregation 'median'"):
        aggregate(d, "median")
    assert torch.equal(aggregate(d[:1], "mean_low30"), d[0])
    m = torch.zeros(2, 10, 10)
    m[0, 1, 2], m[1, 3, 3] = 7.0, 2.0
    assert torch.equal(map_scores(m), torch.tensor([7.0, 2.0]))  # the default is the maximum


def test_single_branch_keeps_its_units_whatever_alpha(tiny_backbone, images):
    for alpha in (0.0, 0.3, 1.0):
        visual = _run(tiny_backbone, images, use_text=False, alpha=alpha)
        torch.testing.assert_close(
            visual.maps, upsample(visual.branches.visual, visual.grid, tiny_backbone.image_size, 4.0)
        )
        text = _run(tiny_backbone, images, use_visual=False, alpha=alpha, beta=0.0)
        torch.testing.assert_close(text.maps, upsample(text.branches.text, text.grid, tiny_backbone.image_size, 4.0))


def test_branch_gating_messages_are_logged_as_warnings(tiny_backbone, images, texture_set, caplog):
    det = DualClipDetector(DetectorConfig(pretrained=None, progress=False), backbone=tiny_backbone)
    det.predict(images[:1])
    said = [r for r in caplog.records if r.name.startswith("dualclip")]
    assert [(r.levelname, r.getMessage()) for r in said] == [
        (
            "WARNING",
            "a single image has no partner for the visual reference: running text-only "
            "(give golden references to use the visual branch)",
        )
    ]
    pytest.importorskip("efficientnet_lite_pytorch")
    from dualclip.backbone import EffNetLite0Backbone

    effnet = EffNetLite0Backbone(image_size=64)
    text_only = DualClipDetector(DetectorConfig(backbone="effnet-lite0", use_visual=False, progress=False), effnet)
    with pytest.raises(
        ValueError, match=r"^backbone 'effnet-lite0' has no text tower: turn the visual branch or tta on$"
    ):
        text_only.score_images(images[:2])
    one = DualClipDetector(DetectorConfig(backbone="effnet-lite0", progress=False), effnet)
    with pytest.raises(ValueError, match=r"give at least two images or golden references$"):
        one.score_images(images[:1])


def test_gaussian_blur_exact_truncation_and_sigma_zero():
    from scipy.ndimage import gaussian_filter

    from dualclip.scoring import gaussian_blur

    x = torch.rand(1, 50, 50, generator=torch.Generator().manual_seed(1))
    assert torch.equal(gaussian_blur(x, 0.0), x)
    for sigma in (0.2, 2.0, 3.0):
        want = gaussian_filter(x[0].double().numpy(), sigma, mode="mirror", truncate=4.0)
        np.testing.assert_allclose(gaussian_blur(x, sigma)[0].numpy(), want, atol=2e-6)


def test_fuse_normalises_weights_and_names_errors():
    from dualclip.scoring import fuse

    a = torch.tensor([0.0, 1.0, 2.0])
    b = torch.tensor([2.0, 0.0, 1.0])
    want = 0.5 * normalize_branch(a, "zscore") + 0.5 * normalize_branch(b, "zscore")
    torch.testing.assert_close(fuse([(a, 0.3), (b, 0.3)], "zscore"), want)  # weights divided by their sum
    with pytest.raises(ValueError, match="^nothing to fuse: every branch is off$"):
        fuse([], "zscore")
    with pytest.raises(ValueError, match="^unknown image score mode 'mean'$"):
        map_scores(torch.zeros(1, 2, 2), "mean")


def test_a_score_that_is_not_a_finite_number_gets_no_verdict():
    from dualclip.thresholds import score_error

    th = Threshold(0.5, "manual")
    for bad in (float("nan"), float("inf"), None):
        message = (
            f"the score is not a finite number ({bad}): no verdict (the profile or the image gives no usable score)"
        )
        assert score_error(bad) == message
        with pytest.raises(ValueError) as raised:
            th.verdict(bad)
        assert str(raised.value) == message
    assert score_error(-3.0) is None and th.verdict(-3.0, unusable="far from the normal images") == "unusable"


def test_results_table_lists_defect_rows_and_few_shot_runs_exactly():
    from dualclip.evaluation import results_table

    cat = {k: 0.5 for k in ("image_auroc", "image_ap", "image_f1max", "pixel_auroc", "pixel_ap", "pixel_f1max")}
    cat["pixel_aupro"] = 0.5
    defect = {k: 0.25 for k in cat}
    results = {
        "config": {"seeds": [0], "shots": 4},
        "categories": {"a": {**cat, "ms_per_image": None, "per_defect": {"crack": defect}}},
        "mean": dict(cat),
    }
    row, low = " | ".join(["50.0"] * 7), " | ".join(["25.0"] * 7)
    assert results_table(results, "md") == (
        "| category | image auroc | image ap | image f1max | pixel auroc | pixel ap | pixel f1max | pixel aupro "
        f"| ms/image |\n|---|---|---|---|---|---|---|---|---|\n| a | {row} | n/a |\n| ↳ crack | {low} |  |\n"
        f"| mean | {row} | n/a |\n\nMetrics in %, seed 0.\n"
        "↳ rows: one defect type against every normal image of its category (not in the mean).\n"
        "Few-shot: 4 golden references per category from its normal training images.\n"
    )
    csv_row, csv_low = ",".join(["50.00"] * 7), ",".join(["25.00"] * 7)
    assert results_table(results, "csv").splitlines()[1:] == [
        f"a,,{csv_row},",
        f"a,crack,{csv_low},",
        f"mean,,{csv_row},",
    ]


def test_a_profiles_normal_scores_are_what_scoring_its_normal_images_in_its_units_gives():
    """normal_scale fixes the units step by step as fuse_branches applies them: with rank fusion (where the run's
    own normalisation and the fixed moments differ) the normal images scored in the returned scale get exactly
    the returned scores."""
    from dualclip.core import BranchScores
    from dualclip.core.maps import Fusion, fuse_branches, normal_scale

    g = torch.Generator().manual_seed(0)
    grid = (4, 4)
    branches = BranchScores(
        text=torch.rand(6, 16, generator=g) ** 3,
        visual=torch.rand(6, 16, generator=g) * 5,
        text_global=torch.rand(6, generator=g) ** 2,
    )
    fusion = Fusion(alpha=0.5, beta=0.5, norm="rank", image_score="max", sigma=1.0, size=16)
    scale, scores = normal_scale(branches, grid, fusion)
    _, again = fuse_branches(branches, grid, fusion, scale)
    torch.testing.assert_close(again, scores, rtol=0, atol=1e-6)
    assert scale.score.std > 0 and abs(float(scores.mean())) < 1e-6


def test_a_profiles_moments_standardise_each_branch_of_the_fused_map_with_its_share_of_the_slot():
    """Text and adapted share alpha (alpha / 2 each), visual gets 1 - alpha; each branch standardised by the
    profile's own moments, not over the run."""
    from dualclip.core.branches import BranchScores
    from dualclip.core.maps import Fusion, fused_maps
    from dualclip.profile import Moments, ScoreScale

    g = torch.Generator().manual_seed(0)
    grid = (4, 5)
    text, adapted, visual = (torch.rand(3, 20, generator=g) * s for s in (1.0, 2.0, 5.0))
    fusion = Fusion(alpha=0.4, beta=0.0, norm="zscore", image_score="max", sigma=0.0, size=10)
    scale = ScoreScale(patch={"text": Moments(0.3, 0.2), "adapted": Moments(1.0, 0.5), "visual": Moments(2.0, 4.0)})
    maps, scores = fused_maps(BranchScores(text=text, adapted=adapted, visual=visual), grid, fusion, scale)
    want = 0.2 * (text - 0.3) / 0.2 + 0.2 * (adapted - 1.0) / 0.5 + 0.6 * (visual - 2.0) / 4.0
    torch.testing.assert_close(maps, upsample(want, grid, 10, 0.0), rtol=0, atol=1e-5)
    torch.testing.assert_close(scores, maps.flatten(1).amax(1))


def test_upsampling_is_half_pixel_bilinear():
    up = upsample(torch.tensor([[0.0, 1.0, 2.0, 3.0]]), (2, 2), 4, 0.0)
    assert up[0, 0].tolist() == [0.0, 0.25, 0.75, 1.0] and up[0, :, 0].tolist() == [0.0, 0.5, 1.5, 2.0]


def test_fuse_with_a_profiles_moments_weights_each_standardised_branch_by_its_share():
    from dualclip.profile import Moments
    from dualclip.scoring import fuse

    a = torch.tensor([0.0, 1.0, 2.0])
    b = torch.tensor([2.0, 0.0, 1.0])
    ma, mb = Moments(1.0, 2.0), Moments(-1.0, 0.5)
    want = 0.25 * (a - 1.0) / 2.0 + 0.75 * (b + 1.0) / 0.5
    torch.testing.assert_close(fuse([(a, 1.0), (b, 3.0)], "zscore", [ma, mb]), want, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="zip"):  # one moment for two branches: never a silent truncation
        fuse([(a, 1.0), (b, 3.0)], "zscore", [ma])


def test_a_profiles_image_score_fuses_the_global_text_score_and_the_map_in_its_units():
    from dualclip.core.branches import BranchScores
    from dualclip.core.maps import Fusion, image_scores
    from dualclip.profile import Moments, ScoreScale

    text_global = torch.tensor([0.1, 0.5, 0.9])
    map_max = torch.tensor([3.0, 1.0, 2.0])
    fusion = Fusion(alpha=0.5, beta=0.3, norm="zscore", image_score="max", sigma=0.0, size=8)
    scale = ScoreScale(patch={}, image={"text_global": Moments(0.5, 0.2), "map": Moments(2.0, 0.5)})
    got = image_scores(BranchScores(text_global=text_global), map_max, fusion, scale)
    want = 0.3 * (text_global - 0.5) / 0.2 + 0.7 * (map_max - 2.0) / 0.5
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
