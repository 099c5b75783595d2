"""The field's metrics (docs/method.md §8): image and pixel AUROC, AP, F1-max, and exact AUPRO.

All pixel metrics and AUPRO come from one sort of all pixels: scores are packed with the index of the
connected ground-truth region each pixel belongs to (0 = normal) into 64-bit keys and sorted once. Curves
are evaluated at every distinct score (ties grouped), so the results are exact:

- AUROC: trapezoidal area under (FPR, TPR), as ``sklearn.metrics.roc_auc_score``;
- AP: sum over thresholds of (R_i - R_{i-1}) P_i, as ``sklearn.metrics.average_precision_score``;
- F1-max: the maximum F1 over all thresholds;
- AUPRO: per-region overlap (the fraction of each connected anomalous region above the threshold, averaged
  over all regions of all images) against the FPR on normal pixels, integrated up to ``fpr_limit`` (the last
  segment interpolated linearly) and divided by ``fpr_limit``. Regions are 8-connected.

Pixel maps are compared at float32 precision. A metric that is undefined (no anomalous or no normal
sample) returns ``nan`` with a ``RuntimeWarning``.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike
from scipy import ndimage

log = logging.getLogger(__name__)

__all__ = [
    "all_metrics",
    "aupro",
    "best_f1_threshold",
    "image_ap",
    "image_auroc",
    "image_f1max",
    "pixel_ap",
    "pixel_auroc",
    "pixel_f1max",
]

_EIGHT = np.ones((3, 3), dtype=bool)
_trapezoid = getattr(np, "trapezoid", None) or np.trapz  # numpy < 2 has only trapz


@dataclass
class _Curve:
    tp: np.ndarray  # true positives at each distinct threshold, descending thresholds, with a leading 0
    fp: np.ndarray
    n_pos: int
    n_neg: int
    pro: np.ndarray | None = None  # mean region overlap at the same thresholds


def _monotonic_bits(scores: np.ndarray) -> np.ndarray:
    """float32 -> uint32 whose unsigned order is the float order (-0.0 folded into 0.0)."""
    x = np.ascontiguousarray(scores, dtype=np.float32).ravel() + np.float32(0.0)
    if np.isnan(x).any():
        raise ValueError("scores contain NaN")
    u = x.view(np.uint32)
    flip = (u >> np.uint32(31)) * np.uint32(0x7FFFFFFF) | np.uint32(0x80000000)
    return u ^ flip


def _sorted_desc(scores: np.ndarray, groups: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sort by score, descending. Returns (score keys, group ids) in that order; equal scores have equal
    keys (the keys serve only to find distinct thresholds)."""
    n = scores.size
    if n < 2_000_000:
        s = np.asarray(scores, dtype=np.float64).ravel()
        if np.isnan(s).any():
            raise ValueError("scores contain NaN")
        order = np.argsort(-s, kind="stable")
        return s[order], groups.ravel()[order]
    key = np.empty(n, dtype=np.uint64)
    halves = key.view(np.uint32).reshape(n, 2)
    lo, hi = (0, 1) if np.little_endian else (1, 0)
    halves[:, lo] = groups.ravel()
    halves[:, hi] = ~_monotonic_bits(scores)  # inverted: the ascending sort gives descending scores
    key.sort()
    return halves[:, hi], halves[:, lo]


def _curve(
    scores: np.ndarray,
    groups: np.ndarray,
    region_sizes: np.ndarray | None = None,
    totals: tuple[int, int] | None = None,
) -> _Curve:
    """Counts at every distinct threshold. ``groups``: 0 normal, >0 anomalous (a region id when sizes given).

    ``totals = (n_pos, n_neg)`` when ``scores`` are only the top of a larger set (the curve is then a prefix)."""
    vals, grp = _sorted_desc(scores, groups)
    pos = grp > 0
    ends = np.flatnonzero(vals[1:] != vals[:-1])
    ends = np.append(ends, vals.size - 1)
    tp_end = np.cumsum(pos, dtype=np.int32 if pos.size < 2**31 else np.int64)[ends]
    tp = np.concatenate([[0], tp_end])
    fp = np.concatenate([[0], ends + 1 - tp_end])
    pro = None
    if region_sizes is not None and region_sizes.size > 1:
        weight = np.zeros(region_sizes.size, dtype=np.float64)
        weight[1:] = 1.0 / (region_sizes[1:] * (region_sizes.size - 1))
        # overlap summed over the anomalous pixels only, read off at each threshold's positive count
        cum = np.concatenate([[0.0], np.cumsum(weight[grp[pos]])])
        pro = np.minimum(cum[tp], 1.0)  # cumsum rounding
    n_pos, n_neg = totals if totals is not None else (int(tp[-1]), int(fp[-1]))
    return _Curve(tp=tp, fp=fp, n_pos=n_pos, n_neg=n_neg, pro=pro)


def _undefined(name: str, why: str) -> float:
    log.warning("%s is undefined: %s; returning nan", name, why)
    return float("nan")


def _auroc(c: _Curve, name: str) -> float:
    if c.n_pos == 0 or c.n_neg == 0:
        return _undefined(name, "needs both normal and anomalous samples")
    return float(_trapezoid(c.tp / c.n_pos, c.fp / c.n_neg))


def _ap(c: _Curve, name: str) -> float:
    if c.n_pos == 0:
        return _undefined(name, "no anomalous sample")
    tp, fp = c.tp[1:], c.fp[1:]
    precision = tp / (tp + fp)
    recall = tp / c.n_pos
    return float(np.sum(np.diff(np.concatenate([[0.0], recall])) * precision))


def _f1_per_threshold(c: _Curve) -> np.ndarray:
    """F1 at each distinct threshold, in descending threshold order."""
    tp, fp = c.tp[1:], c.fp[1:]
    fn = c.n_pos - tp
    return 2 * tp / np.maximum(2 * tp + fp + fn, 1)


def _f1max(c: _Curve, name: str) -> float:
    if c.n_pos == 0:
        return _undefined(name, "no anomalous sample")
    return float(_f1_per_threshold(c).max())


def _image_curve(labels, scores) -> _Curve:
    labels = np.asarray(labels).ravel()
    scores = np.asarray(scores).ravel()
    if labels.shape != scores.shape:
        raise ValueError(f"labels {labels.shape} and scores {scores.shape} differ in shape")
    return _curve(scores, (labels > 0).astype(np.uint32))


def _check_maps(masks, maps) -> tuple[np.ndarray, np.ndarray]:
    masks = np.asarray(masks)
    maps = np.asarray(maps)
    if masks.shape != maps.shape:
        raise ValueError(f"masks {masks.shape} and maps {maps.shape} differ in shape")
    if masks.ndim == 2:
        masks, maps = masks[None], maps[None]
    if masks.ndim != 3:
        raise ValueError(f"expected N x H x W masks and maps, got {masks.ndim} dimensions")
    return masks > 0, maps


def _pixel_curve(masks, maps) -> _Curve:
    masks, maps = _check_maps(masks, maps)
    return _curve(maps, masks.astype(np.uint32))


def image_auroc(labels: ArrayLike, scores: ArrayLike) -> float:
    """Area under the ROC curve of image labels (1 = anomalous) vs image scores."""
    return _auroc(_image_curve(labels, scores), "image_auroc")


def image_ap(labels: ArrayLike, scores: ArrayLike) -> float:
    """Average precision of image scores."""
    return _ap(_image_curve(labels, scores), "image_ap")


def image_f1max(labels: ArrayLike, scores: ArrayLike) -> float:
    """Best F1 over all thresholds of image scores."""
    return _f1max(_image_curve(labels, scores), "image_f1max")


def best_f1_threshold(labels: ArrayLike, scores: ArrayLike) -> float:
    """The image-score threshold (predict anomalous at ``score >= threshold``) with the best F1."""
    c = _image_curve(labels, scores)
    if c.n_pos == 0:
        raise ValueError("best_f1_threshold needs at least one anomalous sample")
    distinct = np.unique(np.asarray(scores, dtype=np.float64))[::-1]  # the curve's thresholds, same order
    return float(distinct[int(np.argmax(_f1_per_threshold(c)))])


def pixel_auroc(masks: ArrayLike, maps: ArrayLike) -> float:
    """AUROC over all pixels of ``N x H x W`` masks (nonzero = anomalous) and maps."""
    return _auroc(_pixel_curve(masks, maps), "pixel_auroc")


def pixel_ap(masks: ArrayLike, maps: ArrayLike) -> float:
    """Average precision over all pixels."""
    return _ap(_pixel_curve(masks, maps), "pixel_ap")


def pixel_f1max(masks: ArrayLike, maps: ArrayLike) -> float:
    """Best F1 over all thresholds, over all pixels."""
    return _f1max(_pixel_curve(masks, maps), "pixel_f1max")


def _region_labels(masks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Global 8-connected region ids (0 = normal) and each region's pixel count (index 0 unused)."""
    labels = np.zeros(masks.shape, dtype=np.uint32)
    offset = 0
    for i, m in enumerate(masks):
        lab, count = ndimage.label(m, structure=_EIGHT)
        if count:
            labels[i] = np.where(lab > 0, lab + offset, 0)
            offset += count
    sizes = np.bincount(labels.ravel(), minlength=offset + 1).astype(np.float64)
    return labels, sizes


def _integrate_pro(c: _Curve, fpr_limit: float) -> float:
    fpr = c.fp / c.n_neg
    pro = c.pro
    cut = int(np.searchsorted(fpr, fpr_limit, side="right"))
    x, y = fpr[:cut], pro[:cut]
    if cut < fpr.size and x[-1] < fpr_limit:
        x0, x1, y0, y1 = fpr[cut - 1], fpr[cut], pro[cut - 1], pro[cut]
        x = np.append(x, fpr_limit)
        y = np.append(y, y0 + (y1 - y0) * (fpr_limit - x0) / (x1 - x0))
    return float(_trapezoid(y, x) / fpr_limit)


def _region_curve(masks, maps) -> _Curve:
    """The pixel curve with per-region overlap: one sort serves every pixel metric and AUPRO."""
    masks, maps = _check_maps(masks, maps)
    regions, sizes = _region_labels(masks)
    return _curve(maps, regions, sizes)


def _aupro(c: _Curve, fpr_limit: float) -> float:
    if not 0 < fpr_limit <= 1:
        raise ValueError("fpr_limit must lie in (0, 1]")
    if c.n_pos == 0 or c.n_neg == 0:
        return _undefined("aupro", "needs both normal and anomalous pixels")
    return _integrate_pro(c, fpr_limit)


def aupro(masks: ArrayLike, maps: ArrayLike, fpr_limit: float = 0.3) -> float:
    """Exact area under the per-region-overlap curve up to ``fpr_limit``, normalised by it.

    Only the part of the curve up to ``fpr_limit`` is needed, so only the pixels scored at least as high as
    the normal pixel where the FPR reaches the limit are sorted (about ``fpr_limit`` of the data); the
    result is the same as from the full curve."""
    if not 0 < fpr_limit <= 1:
        raise ValueError("fpr_limit must lie in (0, 1]")
    masks, maps = _check_maps(masks, maps)
    regions, sizes = _region_labels(masks)
    normal = regions == 0
    n_neg = int(np.count_nonzero(normal))
    n_pos = regions.size - n_neg
    if n_pos == 0 or n_neg == 0:
        return _undefined("aupro", "needs both normal and anomalous pixels")
    if np.isnan(maps).any():
        raise ValueError("scores contain NaN")
    m = min(n_neg, math.ceil(fpr_limit * n_neg))  # the FPR reaches the limit at the m-th highest normal pixel
    normal_scores = maps[normal]
    t = np.partition(normal_scores, n_neg - m)[n_neg - m]
    keep = maps >= t
    return _integrate_pro(_curve(maps[keep], regions[keep], sizes, totals=(n_pos, n_neg)), fpr_limit)


def all_metrics(
    labels: ArrayLike,
    scores: ArrayLike,
    masks: ArrayLike | None = None,
    maps: ArrayLike | None = None,
    fpr_limit: float = 0.3,
) -> dict[str, float]:
    """All seven metrics; the pixel ones share one sort. Pixel metrics only when masks and maps are given."""
    c = _image_curve(labels, scores)
    out = {
        "image_auroc": _auroc(c, "image_auroc"),
        "image_ap": _ap(c, "image_ap"),
        "image_f1max": _f1max(c, "image_f1max"),
    }
    if masks is not None and maps is not None:
        pc = _region_curve(masks, maps)
        out["pixel_auroc"] = _auroc(pc, "pixel_auroc")
        out["pixel_ap"] = _ap(pc, "pixel_ap")
        out["pixel_f1max"] = _f1max(pc, "pixel_f1max")
        out["pixel_aupro"] = _aupro(pc, fpr_limit)
    return out
