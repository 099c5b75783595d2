"""Positional centring of visual patch scores: a response that every image shows at the same place is not a
defect.

The patches at an image's border see the convolutions' zero padding (or a ViT's edge tokens), the squashed
outline of a non-square part, a fixture: every image of a product then scores high there, defect-free
ones included, and the image score (the map's maximum) ranks good images with hot borders above real
defects. Centring subtracts, from each patch score, the typical score at that place:

``"position"``
    the median over images of the score at the same grid position;
``"ring"``
    the median over images and over the positions at the same distance from the grid's border (for parts
    that are not aligned from image to image);
``"none"``
    no centring.

The offsets come from the run's own images (zero-shot: the median is robust to the defective ones as long
as fewer than half of the images show a defect at a place), or, in a saved profile, from the normal images'
leave-one-out scores, so that the units stay fixed.
"""

from __future__ import annotations

import torch

from ..config import CENTRINGS, Centring


def border_rings(grid: tuple[int, int]) -> torch.Tensor:
    """``(P,)`` distance of each grid position (row-major) from the nearest border of the grid (0 = on it)."""
    h, w = grid
    yy, xx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    return torch.minimum(torch.minimum(yy, h - 1 - yy), torch.minimum(xx, w - 1 - xx)).reshape(-1)


def positional_offsets(scores: torch.Tensor, grid: tuple[int, int], how: Centring) -> torch.Tensor | None:
    """The typical score of each of the ``P`` positions of ``(N, P)`` scores: ``(P,)``, or ``None`` for
    ``"none"``. Medians are taken as the lower median (``torch.median``), in the scores' dtype."""
    if how not in CENTRINGS:
        raise ValueError(f"centring must be one of {CENTRINGS}, got {how!r}")
    if how == "none":
        return None
    n, p = scores.shape
    if p != grid[0] * grid[1]:
        raise ValueError(f"scores have {p} positions, the grid {grid[0]} x {grid[1]} has {grid[0] * grid[1]}")
    if how == "position":
        return scores.median(dim=0).values
    rings = border_rings(grid).to(scores.device)
    out = torch.empty(p, dtype=scores.dtype, device=scores.device)
    for r in rings.unique():
        sel = rings == r
        out[sel] = scores[:, sel].median()
    return out


def centre(scores: torch.Tensor, offsets: torch.Tensor | None) -> torch.Tensor:
    """``scores - offsets`` (offsets broadcast over the images); ``None``: unchanged."""
    return scores if offsets is None else scores - offsets.to(scores.device, scores.dtype)[None]
