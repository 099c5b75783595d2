"""METHOD.md §5: the dual-image visual reference.

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
import torch.nn.functional as F

from ..config import Aggregation, Pairing

# Bound on the elements of one batch of similarity matrices (pairs x P x P floats).
_MAX_SIM_ELEMENTS = 32_000_000


def pair_references(
    n: int,
    k: int | Literal["all"] = 1,
    strategy: Pairing = "random",
    seed: int = 0,
    global_embeddings: torch.Tensor | None = None,
) -> list[list[int]]:
    """References of each of ``n`` images: ``k`` distinct indices, never the image itself.

    ``random`` with k = 1 is a seeded derangement made of pairs (a <-> b), plus, for odd n, one image that
    references a random other one; with k > 1 the images are put on a random cycle and each references its
    nearest k neighbours on it (both sides alternately), so most references are mutual. ``similar`` picks
    the k other images whose global embeddings are the most cosine-similar. ``k="all"`` (or k >= n - 1)
    gives every other image (full mutual scoring).
    """
    if n < 2:
        raise ValueError(f"pairing needs at least 2 images, got {n}")
    k_eff = n - 1 if k == "all" else min(int(k), n - 1)
    if k_eff == n - 1:
        return [[j for j in range(n) if j != i] for i in range(n)]
    if strategy == "similar":
        if global_embeddings is None:
            raise ValueError("pairing 'similar' needs the global embeddings")
        g = F.normalize(global_embeddings.float(), dim=-1)
        sim = g @ g.T
        sim.fill_diagonal_(-math.inf)
        # ties broken by index (stable): deterministic
        order = torch.sort(sim, dim=1, descending=True, stable=True).indices[:, :k_eff]
        return order.tolist()
    if strategy != "random":
        raise ValueError(f"unknown pairing strategy {strategy!r}")
    rng = np.random.default_rng(seed)
    perm = rng.permutation(n).tolist()
    refs: list[list[int]] = [[] for _ in range(n)]
    if k_eff == 1:
        for p in range(0, n - 1, 2):
            a, b = perm[p], perm[p + 1]
            refs[a].append(b)
            refs[b].append(a)
        if n % 2 == 1:
            last = perm[-1]
            refs[last].append(perm[int(rng.integers(0, n - 1))])
        return refs
    pos = {img: p for p, img in enumerate(perm)}
    offsets = [o for d in range(1, n) for o in (d, -d)]
    for img in range(n):
        p = pos[img]
        for o in offsets:
            j = perm[(p + o) % n]
            if j != img and j not in refs[img]:
                refs[img].append(j)
            if len(refs[img]) == k_eff:
                break
    return refs


def aggregate(distances: torch.Tensor, how: Aggregation) -> torch.Tensor:
    """Combine ``(k, P)`` per-reference distances into ``(P,)``: ``min`` or ``mean_low30``."""
    if how == "min" or distances.shape[0] == 1:
        return distances.min(dim=0).values
    if how == "mean_low30":
        m = max(1, math.ceil(0.3 * distances.shape[0]))
        return distances.topk(m, dim=0, largest=False).values.mean(dim=0)
    raise ValueError(f"unknown aggregation {how!r}")


def _pair_min_distances(fa: list[torch.Tensor], fb: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """For batches of pairs ``(G, P, C)`` per layer: ``(G, Pa)`` and ``(G, Pb)`` layer-averaged min distances."""
    da = db = None
    for a, b in zip(fa, fb, strict=True):
        sim = torch.bmm(a, b.transpose(1, 2))  # (G, Pa, Pb)
        ra = (1 - sim.amax(dim=2)) / 2
        rb = (1 - sim.amax(dim=1)) / 2
        da = ra if da is None else da + ra
        db = rb if db is None else db + rb
    return da / len(fa), db / len(fb)


def reference_scores(
    features: Sequence[torch.Tensor],
    references: list[list[int]],
    aggregation: Aggregation = "mean_low30",
    progress: Callable[[int], None] | None = None,
) -> torch.Tensor:
    """Visual-reference score of every patch of every image.

    Parameters
    ----------
    features:
        One ``(N, P, C_l)`` tensor per matching layer, L2-normalised.
    references:
        ``references[a]``: the indices of a's reference images.
    aggregation:
        How several references combine (:func:`aggregate`).
    progress:
        Called with the number of pairs done after each batch.

    Returns
    -------
    ``(N, P)`` scores in [0, 1].
    """
    n, p = features[0].shape[:2]
    needed = {(min(a, b), max(a, b)) for a, refs in enumerate(references) for b in refs}
    if any(a == b for a, b in needed):
        raise ValueError("an image cannot be its own reference")
    per_image: list[dict[int, torch.Tensor]] = [{} for _ in range(n)]
    pairs = sorted(needed)
    group = max(1, _MAX_SIM_ELEMENTS // (p * p))
    for start in range(0, len(pairs), group):
        chunk = pairs[start : start + group]
        ia = torch.tensor([a for a, _ in chunk])
        ib = torch.tensor([b for _, b in chunk])
        da, db = _pair_min_distances([f[ia] for f in features], [f[ib] for f in features])
        for g, (a, b) in enumerate(chunk):
            if b in references[a]:
                per_image[a][b] = da[g]
            if a in references[b]:
                per_image[b][a] = db[g]
        if progress is not None:
            progress(len(chunk))
    out = torch.empty(n, p)
    for a in range(n):
        out[a] = aggregate(torch.stack([per_image[a][b] for b in references[a]]), aggregation)
    return out


def golden_reference_scores(
    features: Sequence[torch.Tensor], golden: Sequence[torch.Tensor], chunk_refs: int | None = None
) -> torch.Tensor:
    """Score every image against a bank of normal reference images (few-shot mode).

    ``features`` and ``golden`` hold one ``(N, P, C_l)`` / ``(R, Pr, C_l)`` tensor per layer. Per layer the
    distance is to the nearest patch over all references; the result is averaged over layers: ``(N, P)``.
    Memory stays bounded: references are processed in chunks.
    """
    n, p = features[0].shape[:2]
    out = torch.zeros(n, p)
    for fq, fr in zip(features, golden, strict=True):
        bank = fr.reshape(-1, fr.shape[-1])
        step = chunk_refs or max(1, _MAX_SIM_ELEMENTS // max(1, n * p))
        best = torch.full((n, p), -math.inf)
        for s in range(0, bank.shape[0], step):
            best = torch.maximum(best, (fq @ bank[s : s + step].T).amax(dim=-1))
        out += (1 - best) / 2
    return out / len(features)
