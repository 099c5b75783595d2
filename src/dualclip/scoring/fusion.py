"""docs/method.md §6: joint scoring. Branches brought to one scale, fused, upsampled, smoothed; image scores."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from ..config import FusionNorm, ImageScoreMode


def normalize_branch(x: torch.Tensor, how: FusionNorm) -> torch.Tensor:
    """Bring one branch's scores to a common scale over all its values (the run's patches or images).

    ``zscore``: (x - mean) / std; ``rank``: quantile rank in [0, 1] (ties share their mean rank).
    A constant branch becomes all zeros.
    """
    flat = x.reshape(-1).double()
    if how == "zscore":
        std = flat.std(unbiased=False)  # 0 for a single value
        if not std > 0:
            return torch.zeros_like(x)
        return ((x.double() - flat.mean()) / std).to(x.dtype)
    if how == "rank":
        if flat.numel() < 2:
            return torch.zeros_like(x)
        return ((average_ranks(flat) - 1) / (flat.numel() - 1)).reshape(x.shape).to(x.dtype)
    raise ValueError(f"unknown normalisation {how!r}")


def average_ranks(values: torch.Tensor) -> torch.Tensor:
    """1-based ranks of a 1-d tensor, ties sharing their mean rank (``scipy.stats.rankdata(method="average")``),
    as float64 on the values' device."""
    order = torch.argsort(values, stable=True)
    ordered = values[order]
    n = ordered.numel()
    starts_run = torch.ones(n, dtype=torch.bool, device=values.device)
    starts_run[1:] = ordered[1:] != ordered[:-1]
    run = torch.cumsum(starts_run, dim=0) - 1
    starts = torch.nonzero(starts_run).squeeze(1)
    counts = torch.diff(starts, append=torch.tensor([n], device=values.device))
    mean_rank = starts.double() + (counts.double() + 1) / 2  # ranks start + 1 .. start + count
    out = torch.empty(n, dtype=torch.float64, device=values.device)
    out[order] = mean_rank[run]
    return out


def fuse(branches: list[tuple[torch.Tensor, float]], how: FusionNorm, moments: list | None = None) -> torch.Tensor:
    """Weighted sum of branches ``[(scores, weight), ...]``; one branch is returned unchanged (its own units).

    Each branch is normalised over its own values (``how``), or, with ``moments`` (one
    :class:`~dualclip.profile.Moments` per branch: a profile's fixed statistics), standardised by them, so that
    an image's fused score does not depend on the other images of the run."""
    if not branches:
        raise ValueError("nothing to fuse: every branch is off")
    if len(branches) == 1:
        return branches[0][0]
    total = sum(w for _, w in branches)
    if moments is not None:
        return sum(m.standardize(s) * (w / total) for (s, w), m in zip(branches, moments, strict=True))
    return sum(normalize_branch(s, how) * (w / total) for s, w in branches)


def gaussian_kernel1d(sigma: float) -> torch.Tensor:
    radius = max(1, int(math.ceil(4 * sigma)))
    x = torch.arange(-radius, radius + 1, dtype=torch.float32)
    k = torch.exp(-(x**2) / (2 * sigma**2))
    return k / k.sum()


def _blur_rows(x: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Each row of ``(N, H, W)`` maps convolved with the 1-D kernel ``k`` (reflect padding). The rows are the
    channels of one depthwise convolution: a single-channel convolution over ``N`` maps is tens of times slower
    on a CPU, and the depthwise one sums the same products in the same order (bit-equal results)."""
    r = k.numel() // 2
    h = int(x.shape[1])  # int(): a fixed kernel also in a traced graph (S is fixed)
    padded = F.pad(x.unsqueeze(2), (r, r, 0, 0), mode="reflect")
    return F.conv2d(padded, k.view(1, 1, 1, -1).repeat(h, 1, 1, 1), groups=h).squeeze(2)


def gaussian_blur(maps: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian smoothing of ``(N, H, W)`` maps with reflect padding: along the rows, then the
    columns."""
    if sigma <= 0:
        return maps
    k = gaussian_kernel1d(sigma).to(maps.device)
    x = _blur_rows(maps, k)
    return _blur_rows(x.transpose(1, 2), k).transpose(1, 2).contiguous()


def upsample(patch_scores: torch.Tensor, grid: tuple[int, int], size: int, sigma: float) -> torch.Tensor:
    """``(N, P)`` patch scores -> ``(N, size, size)`` maps: bilinear upsampling, then Gaussian smoothing."""
    n = patch_scores.shape[0]
    maps = patch_scores.reshape(n, 1, *grid).float()
    maps = F.interpolate(maps, size=(size, size), mode="bilinear", align_corners=False).squeeze(1)
    return gaussian_blur(maps, sigma)


def map_scores(maps: torch.Tensor, mode: ImageScoreMode = "max") -> torch.Tensor:
    """Image score from ``(N, H, W)`` maps: the maximum, or the mean of the top 1% of pixels."""
    flat = maps.reshape(maps.shape[0], -1)
    if mode == "max":
        return flat.amax(dim=1)
    if mode == "top1pct":
        m = max(1, round(0.01 * int(flat.shape[1])))  # int(): a fixed count also in a traced graph (S is fixed)
        return flat.topk(m, dim=1).values.mean(dim=1)
    raise ValueError(f"unknown image score mode {mode!r}")


def resize_map(m: torch.Tensor, height: int, width: int) -> np.ndarray:
    """One ``(S, S)`` map to the image's own ``(height, width)`` (bilinear), as float32 numpy."""
    if m.shape == (height, width):
        return m.float().numpy()
    out = F.interpolate(m[None, None].float(), size=(height, width), mode="bilinear", align_corners=False)
    return out[0, 0].numpy()
