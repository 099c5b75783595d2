"""docs/method.md §5: the dual-image visual reference.

Each image a is given reference images (its partners) from the same unlabeled set, and every patch of a
is scored by its distance to the closest patch of the reference::

    s_vis(a, i) = mean over layers of  min_j (1 - <F_a,i , F_b,j>) / 2

Matching is mutual: one similarity matrix of a pair (a, b) gives a's scores (row minima) and b's
(column minima), so a pair used in both directions costs one matrix product.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Literal

import numpy as np
import torch

from ..config import Aggregation
from .matching import MATCH_MEMORY_MB, Distance, bank_distances, block_elements, nearest_distances


def near_duplicates(thumbnails: torch.Tensor, tolerance: float) -> torch.Tensor:
    """``(N, N)`` bool: images whose grey thumbnails (``(N, D)``, values 0-255) differ by at most ``tolerance``
    grey levels on average (mean absolute difference); the diagonal is False. ``tolerance < 0``: none."""
    n = thumbnails.shape[0]
    if tolerance < 0 or n < 2:
        return torch.zeros(n, n, dtype=torch.bool)
    t = thumbnails.float()
    dup = torch.cdist(t, t, p=1) / t.shape[1] <= tolerance
    dup.fill_diagonal_(False)
    return dup


def pair_references(
    n: int, k: int | Literal["all"] = 1, seed: int = 0, forbidden: torch.Tensor | None = None
) -> list[list[int]]:
    """References of each of ``n`` images: ``k`` distinct indices drawn at random (seeded), never the image
    itself, never one that ``forbidden[i, j]`` marks (near-exact duplicates: a defect and its copy would erase
    each other).

    With k = 1 a seeded derangement made of pairs (a <-> b), plus, for odd n, one image that references a random
    other one; with k > 1 the images are put on a random cycle and each references its nearest k neighbours on
    it (both sides alternately), so most references are mutual. ``k="all"`` (or k >= n - 1) gives every other
    image (full mutual scoring). An image left without an allowed partner (all others its duplicates) is
    given any other image. Partners chosen by similarity instead are refused by design: a defect that recurs
    across the images finds its copy and erases itself (docs/results.md, "Partner selection").
    """
    if n < 2:
        raise ValueError(f"pairing needs at least 2 images, got {n}")
    k_eff = n - 1 if k == "all" else min(int(k), n - 1)
    allowed = torch.ones(n, n, dtype=torch.bool) if forbidden is None else ~forbidden.bool()
    allowed.fill_diagonal_(False)
    if k_eff == n - 1:
        refs = [[j for j in range(n) if allowed[i, j]] for i in range(n)]
        return [r or [j for j in range(n) if j != i] for i, r in enumerate(refs)]
    rng = np.random.default_rng(seed)
    perm = rng.permutation(n).tolist()
    refs: list[list[int]] = [[] for _ in range(n)]
    if k_eff == 1:
        unpaired, left = list(perm), []
        while unpaired:
            a = unpaired.pop(0)
            b = next((j for j in unpaired if allowed[a, j]), None)
            if b is None:
                left.append(a)
                continue
            unpaired.remove(b)
            refs[a].append(b)
            refs[b].append(a)
        for a in left:
            cands = [j for j in perm if j != a and allowed[a, j]] or [j for j in perm if j != a]
            refs[a].append(cands[int(rng.integers(0, len(cands)))])
        return refs
    pos = {img: p for p, img in enumerate(perm)}
    offsets = [o for d in range(1, n) for o in (d, -d)]
    for img in range(n):
        p = pos[img]
        for o in offsets:
            j = perm[(p + o) % n]
            if j != img and j not in refs[img] and allowed[img, j]:
                refs[img].append(j)
            if len(refs[img]) == k_eff:
                break
        if not refs[img]:
            refs[img].append(perm[(p + 1) % n])
    return refs


def aggregate(distances: torch.Tensor, how: Aggregation) -> torch.Tensor:
    """Combine ``(k, P)`` per-reference distances into ``(P,)``: ``min`` or ``mean_low30``."""
    if how == "min":
        return distances.min(dim=0).values
    if how == "mean_low30":
        m = max(1, math.ceil(0.3 * distances.shape[0]))
        return distances.topk(m, dim=0, largest=False).values.mean(dim=0)
    raise ValueError(f"unknown aggregation {how!r}")


def reference_scores(
    features: Sequence[torch.Tensor],
    references: list[list[int]],
    aggregation: Aggregation = "mean_low30",
    progress: Callable[[int], None] | None = None,
    distance: Distance = "cosine",
    memory_mb: float = MATCH_MEMORY_MB,
) -> torch.Tensor:
    """Visual-reference score of every patch of every image, on the features' device.

    Parameters
    ----------
    features:
        One ``(N, P, C_l)`` tensor per matching layer, in the matching space of ``distance``
        (:func:`~dualclip.scoring.matching.to_match_space`).
    references:
        ``references[a]``: the indices of a's reference images.
    aggregation:
        How several references combine (:func:`aggregate`).
    progress:
        Called with the number of pairs done after each batch.
    distance:
        ``cosine``, ``euclidean`` or ``layernorm`` (:mod:`dualclip.scoring.matching`).
    memory_mb:
        Budget of one batch of distance matrices (pairs x P x P floats), in MiB: pairs are batched up to it,
        and a pair whose matrix alone exceeds it is computed in blocks of rows; the scores are the same in
        any batching.

    Returns
    -------
    ``(N, P)`` nearest-patch distances (``cosine``: in [0, 1]).
    """
    n, p = features[0].shape[:2]
    device = features[0].device
    needed = {(min(a, b), max(a, b)) for a, refs in enumerate(references) for b in refs}
    if any(a == b for a, b in needed):
        raise ValueError("an image cannot be its own reference")
    per_image: list[dict[int, torch.Tensor]] = [{} for _ in range(n)]
    pairs = sorted(needed)
    group = max(1, block_elements(memory_mb) // (p * p))
    for start in range(0, len(pairs), group):
        chunk = pairs[start : start + group]
        ia = torch.tensor([a for a, _ in chunk], device=device)
        ib = torch.tensor([b for _, b in chunk], device=device)
        da, db = nearest_distances([f[ia] for f in features], [f[ib] for f in features], distance, memory_mb)
        for g, (a, b) in enumerate(chunk):
            if b in references[a]:
                per_image[a][b] = da[g]
            if a in references[b]:
                per_image[b][a] = db[g]
        if progress is not None:
            progress(len(chunk))
    out = torch.empty(n, p, device=device)
    for a in range(n):
        out[a] = aggregate(torch.stack([per_image[a][b] for b in references[a]]), aggregation)
    return out


def golden_reference_scores(
    features: Sequence[torch.Tensor],
    golden: Sequence[torch.Tensor],
    distance: Distance = "cosine",
    progress: str | None = None,
    memory_mb: float = MATCH_MEMORY_MB,
) -> torch.Tensor:
    """Score every image against a bank of normal reference images (golden-reference mode).

    ``features`` and ``golden`` hold one ``(N, P, C_l)`` / ``(R, Pr, C_l)`` tensor per layer, in the matching
    space of ``distance``; every patch is scored by its distance to the nearest patch of all references
    (:func:`~dualclip.scoring.matching.bank_distances`): ``(N, P)``. ``progress``: a progress bar's label;
    ``memory_mb``: the budget of one block of distances.
    """
    bank = [g.reshape(-1, g.shape[-1]) for g in golden]
    return bank_distances(features, bank, distance, progress=progress, memory_mb=memory_mb)
