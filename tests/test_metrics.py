"""Metrics against scikit-learn and brute-force references."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import ndimage
from sklearn.metrics import average_precision_score, roc_auc_score

from dualclip import metrics as M


def _brute_f1max(y, s):
    best = 0.0
    for t in np.unique(s):
        pred = s >= t
        tp = np.sum(pred & (y > 0))
        fp = np.sum(pred & (y == 0))
        fn = np.sum(~pred & (y > 0))
        best = max(best, 2 * tp / (2 * tp + fp + fn))
    return best


def _brute_aupro(masks, maps, limit):
    """Threshold by threshold, region by region, then trapezoid with interpolation at the limit."""
    regions = []
    for i, m in enumerate(masks):
        lab, n = ndimage.label(m, structure=np.ones((3, 3)))
        regions += [(i, lab == r) for r in range(1, n + 1)]
    normal = ~masks.astype(bool)
    pts = [(0.0, 0.0)]
    for t in np.unique(maps)[::-1]:
        above = maps >= t
        fpr = above[normal].mean()
        pro = np.mean([above[i][r].mean() for i, r in regions])
        pts.append((fpr, pro))
    x, y = np.array(pts).T
    keep = x <= limit
    xs, ys = list(x[keep]), list(y[keep])
    j = np.argmax(x > limit) if (x > limit).any() else None
    if j is not None and xs[-1] < limit:
        ys.append(y[j - 1] + (y[j] - y[j - 1]) * (limit - x[j - 1]) / (x[j] - x[j - 1]))
        xs.append(limit)
    return np.trapezoid(ys, xs) / limit


@settings(max_examples=40, deadline=None)
@given(n=st.integers(2, 60), levels=st.integers(1, 6), seed=st.integers(0, 10_000))
def test_image_metrics_match_sklearn_with_ties(n, levels, seed):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    if y.min() == y.max():
        y[0] = 1 - y[0]
    s = rng.integers(0, levels, n).astype(float)  # few levels -> many ties
    assert M.image_auroc(y, s) == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    assert M.image_ap(y, s) == pytest.approx(average_precision_score(y, s), abs=1e-12)
    assert M.image_f1max(y, s) == pytest.approx(_brute_f1max(y, s), abs=1e-12)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), levels=st.sampled_from([3, 20, 1000]), limit=st.sampled_from([0.05, 0.3, 1.0]))
def test_pixel_metrics_and_aupro_match_brute_force(seed, levels, limit):
    rng = np.random.default_rng(seed)
    masks = np.zeros((3, 12, 10), dtype=np.uint8)
    masks[0, 2:5, 2:6] = 1
    masks[0, 8:10, 7:9] = 255
    masks[2, 5:11, 1:3] = 1
    maps = rng.integers(0, levels, masks.shape) / levels + 0.3 * (masks > 0) * rng.random()
    assert M.pixel_auroc(masks, maps) == pytest.approx(roc_auc_score(masks.ravel() > 0, maps.ravel()), abs=1e-9)
    assert M.pixel_ap(masks, maps) == pytest.approx(average_precision_score(masks.ravel() > 0, maps.ravel()), abs=1e-9)
    assert M.pixel_f1max(masks, maps) == pytest.approx(_brute_f1max(masks.ravel(), maps.ravel()), abs=1e-9)
    assert M.aupro(masks, maps, limit) == pytest.approx(_brute_aupro(masks > 0, maps, limit), abs=1e-9)


@settings(max_examples=30, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    levels=st.sampled_from([2, 5, 50, 10**6]),
    limit=st.sampled_from([0.01, 0.3, 0.7, 1.0]),
    big=st.booleans(),
)
def test_aupro_from_the_top_of_the_curve_equals_the_full_curve(seed, levels, limit, big):
    """aupro sorts only the pixels above the FPR limit; the full curve (all pixels sorted, as all_metrics
    does) must give the same value, on both sort paths (small: float64 argsort; big: packed 64-bit keys)."""
    rng = np.random.default_rng(seed)
    shape = (9, 500, 500) if big else (4, 20, 30)  # 2.25 M pixels take the packed-key path
    masks = np.zeros(shape, dtype=bool)
    for i in range(shape[0]):
        if rng.random() < 0.6:
            y, x = rng.integers(0, shape[1] // 2, 2)
            masks[i, y : y + shape[1] // 4, x : x + shape[2] // 5] = True
    masks[0, 1, 1] = True  # at least one region
    maps = (rng.integers(0, levels, shape) / levels + 0.2 * masks * rng.random()).astype(np.float32)
    full = M._aupro(M._region_curve(masks, maps), limit)
    assert M.aupro(masks, maps, limit) == pytest.approx(full, abs=1e-12)


def test_large_input_sort_path_matches_sklearn(monkeypatch):
    rng = np.random.default_rng(0)
    masks = rng.random((4, 800, 700)) > 0.97
    maps = (rng.random(masks.shape) + masks * 0.3).astype(np.float32)
    maps[0, :10] = -0.0  # negative zero and negatives must order correctly
    maps[1, :10] = -1.5
    small = {
        k: v
        for k, v in M.all_metrics([0, 1, 1, 0], [0.1, 0.9, 0.8, 0.2], masks[:, :40, :40], maps[:, :40, :40]).items()
    }
    assert M.pixel_auroc(masks, maps) == pytest.approx(roc_auc_score(masks.ravel(), maps.ravel()), abs=1e-9)
    assert M.pixel_ap(masks, maps) == pytest.approx(average_precision_score(masks.ravel(), maps.ravel()), abs=1e-9)
    assert small["pixel_auroc"] == pytest.approx(roc_auc_score(masks[:, :40, :40].ravel(), maps[:, :40, :40].ravel()))


def test_constant_maps_and_perfect_maps():
    masks = np.zeros((2, 8, 8), dtype=bool)
    masks[0, 2:4, 2:4] = True
    const = np.ones(masks.shape)
    p = masks.mean()
    assert M.pixel_auroc(masks, const) == 0.5
    assert M.pixel_ap(masks, const) == pytest.approx(p)
    assert M.pixel_f1max(masks, const) == pytest.approx(2 * p / (1 + p))
    # one tie group: the curve is the straight line (0,0)-(1,1), as for ROC; its area to 0.3 is 0.045
    assert M.aupro(masks, const) == pytest.approx(0.15)
    perfect = masks.astype(float)
    assert M.pixel_auroc(masks, perfect) == 1.0
    assert M.aupro(masks, perfect) == 1.0


def test_undefined_cases_return_nan_with_warning(caplog):
    masks = np.zeros((1, 4, 4))
    assert np.isnan(M.pixel_auroc(masks, np.random.rand(1, 4, 4)))
    assert np.isnan(M.aupro(masks, np.random.rand(1, 4, 4)))
    assert np.isnan(M.image_auroc([1], [0.3]))
    said = [r for r in caplog.records if r.name == "dualclip.metrics"]
    assert len(said) == 3 and all(r.levelname == "WARNING" and "undefined" in r.getMessage() for r in said)


def test_one_image_and_shape_errors():
    mask = np.zeros((6, 6))
    mask[1:3, 1:3] = 1
    m = np.random.default_rng(1).random((6, 6))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert 0 <= M.aupro(mask, m) <= 1
    with pytest.raises(ValueError, match="differ in shape"):
        M.pixel_auroc(np.zeros((2, 4, 4)), np.zeros((2, 4, 5)))
    with pytest.raises(ValueError, match="NaN"):
        M.pixel_auroc(mask, np.full((6, 6), np.nan))


def test_all_metrics_agrees_with_individual_functions():
    rng = np.random.default_rng(3)
    masks = rng.random((3, 20, 20)) > 0.9
    maps = rng.random(masks.shape) + masks
    labels, scores = [0, 1, 1], [0.2, 0.7, 0.9]
    out = M.all_metrics(labels, scores, masks, maps)
    assert out["pixel_aupro"] == M.aupro(masks, maps)
    assert out["pixel_ap"] == M.pixel_ap(masks, maps)
    assert out["image_auroc"] == M.image_auroc(labels, scores) == 1.0
    assert all(0 <= v <= 1 for v in out.values())
