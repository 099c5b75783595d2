"""Method §6 on tensors: the patch branches fused into maps ``(N, S, S)`` and image scores ``(N,)``.

Without a ``scale`` (zero-shot, golden references) the branches are brought to one scale over the run
(``Fusion.norm``); with a profile's :class:`~dualclip.profile.ScoreScale` by the normal images' fixed moments,
and maps and scores end in profile units. :func:`normal_scale` computes those units at fit time by the same
steps.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..profile import Moments, ScoreScale
from ..scoring import fuse, map_scores, upsample
from .branches import BranchScores


@dataclass(frozen=True)
class Fusion:
    """The weights of fusion: ``alpha`` (text slot vs visual), ``beta`` (global text vs map), the run-relative
    normalisation ``norm``, the image score from a map (``image_score``), the smoothing ``sigma``, the map
    side ``size`` (the backbone's processing size) and ``plain``, the plain view's weight in a profile's map
    (:func:`mix_views`, where the profile has one)."""

    alpha: float
    beta: float
    norm: str
    image_score: str
    sigma: float
    size: int
    plain: float = 0.0


def fused_maps(
    branches: BranchScores, grid: tuple[int, int], fusion: Fusion, scale: ScoreScale | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The fused, upsampled, smoothed maps and their image scores (max or top 1%).

    Text and adapted scores share the text slot (weight alpha, split evenly where both ran: adaptation adds
    to the text evidence instead of replacing it); the visual map gets 1 - alpha.
    """
    slot = [(n, b) for n, b in (("text", branches.text), ("adapted", branches.adapted)) if b is not None]
    parts = [(n, b, fusion.alpha / len(slot)) for n, b in slot]
    if branches.visual is not None:
        parts.append(("visual", branches.visual, 1.0 - fusion.alpha))
    # a branch of weight 0 drops out; a branch alone keeps its own units whatever its weight
    parts = [p for p in parts if p[2] > 0] or parts
    moments = None if scale is None else [scale.patch[n] for n, _, _ in parts]
    fused = fuse([(b, w) for _, b, w in parts], fusion.norm, moments)
    maps = upsample(fused, grid, fusion.size, fusion.sigma)
    return maps, map_scores(maps, fusion.image_score)


def image_scores(
    branches: BranchScores, map_max: torch.Tensor, fusion: Fusion, scale: ScoreScale | None = None
) -> torch.Tensor:
    """``S = beta * g_txt + (1 - beta) * max(M)``, each brought to one scale first."""
    if branches.text_global is None or fusion.beta <= 0:
        return map_max
    if fusion.beta >= 1:
        return branches.text_global
    moments = None if scale is None else [scale.image["text_global"], scale.image["map"]]
    return fuse([(branches.text_global, fusion.beta), (map_max, 1.0 - fusion.beta)], fusion.norm, moments)


def fuse_branches(
    branches: BranchScores, grid: tuple[int, int], fusion: Fusion, scale: ScoreScale | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """docs/method.md §6: maps ``(N, S, S)`` and image scores ``(N,)`` of the patch branches, in the run's units or
    (``scale``) a profile's; with a profile's plain view, the two views' mixed map (:func:`mix_views`)."""
    maps, map_max = fused_maps(branches, grid, fusion, scale)
    scores = image_scores(branches, map_max, fusion, scale)
    if scale is not None:
        maps, scores = scale.score.standardize(maps), scale.score.standardize(scores)
        if branches.plain is not None:
            views = scale.image["views"]
            mixed = mix_views(maps, branches.plain, branches.plain_grid, fusion, scale)
            maps, scores = views.standardize(mixed), views.standardize(map_scores(mixed, fusion.image_score))
    return maps, scores


def mix_views(
    maps: torch.Tensor, plain: torch.Tensor, grid: tuple[int, int], fusion: Fusion, scale: ScoreScale
) -> torch.Tensor:
    """A profile's two views in one map (:mod:`dualclip.scoring.plain`): ``(1 - w) * maps + w * P``, where
    ``maps`` ``(N, S, S)`` is the main view's map in profile units, ``P`` the plain view's ``(N, P')`` distances
    on its own ``grid``, standardised by the normal images' moments (``scale.patch["plain"]``) and upsampled (bilinear,
    not smoothed), and ``w`` the plain view's weight ``fusion.plain``."""
    z = upsample(scale.patch["plain"].standardize(plain), grid, fusion.size, 0.0)
    return (1.0 - fusion.plain) * maps + fusion.plain * z


def normal_scale(branches: BranchScores, grid: tuple[int, int], fusion: Fusion) -> tuple[ScoreScale, torch.Tensor]:
    """The profile units from the normal images' (leave-one-out) branch scores, step by step as
    :func:`fuse_branches` uses them: patch moments, then image moments, then the moments of the fused score.
    Returns the scale and the normal images' scores in it."""
    scale = ScoreScale(patch={name: Moments.of(t) for name, t in branches.patch().items()})
    maps, map_max = fused_maps(branches, grid, fusion, scale)
    scale.image["map"] = Moments.of(map_max)
    if branches.text_global is not None:
        scale.image["text_global"] = Moments.of(branches.text_global)
    raw = image_scores(branches, map_max, fusion, scale)
    scale.score = Moments.of(raw)
    if branches.plain is None:
        return scale, scale.score.standardize(raw)
    mixed = mix_views(scale.score.standardize(maps), branches.plain, branches.plain_grid, fusion, scale)
    raw = map_scores(mixed, fusion.image_score)
    scale.image["views"] = Moments.of(raw)
    return scale, scale.image["views"].standardize(raw)
