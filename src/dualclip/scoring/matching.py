"""The patch-matching space of the visual reference (METHOD.md §5): how raw backbone tokens become the
features two images are compared in, and the distance between two patches.

Three distances, chosen with ``DetectorConfig.distance``:

``cosine``
    Each layer's tokens are L2-normalised, averaged over the neighbourhood and re-normalised; the distance
    of two patches is ``(1 - <a, b>) / 2`` per layer, the nearest patch is found per layer and the
    distances are averaged over the layers (the paper's setting). It discards feature magnitude.
``euclidean``
    Raw tokens averaged over the neighbourhood; the distance is the Euclidean distance of the layers'
    features concatenated (``sqrt(sum_l ||a_l - b_l||^2)``), as PatchCore and the plain nearest-neighbour
    baseline. Magnitude, which often carries the defect, is kept.
``layernorm``
    MuSc's choice: each patch token is layer-normalised over its channels (no affine), averaged over the
    neighbourhood; per layer the Euclidean distance to the nearest patch, averaged over the layers.

Several neighbourhood sizes (e.g. ``(1, 3, 5)``) give one matching space each; the visual score is the
mean of their scores (MuSc's multi-degree aggregation).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from ..config import DISTANCES, Distance

# Bound on the elements of one query-by-bank distance block (query patches x bank patches).
_MAX_BLOCK_ELEMENTS = 16_000_000


def neighbourhood_mean(tokens: torch.Tensor, grid: tuple[int, int], size: int) -> torch.Tensor:
    """Average ``(B, P, C)`` tokens over a ``size x size`` square around each patch of the ``grid`` (only the
    patches inside the grid count: no zero padding at the border)."""
    if size == 1:
        return tokens
    b, p, c = tokens.shape
    x = tokens.transpose(1, 2).reshape(b, c, *grid)
    x = F.avg_pool2d(x, size, stride=1, padding=size // 2, count_include_pad=False)
    return x.reshape(b, c, p).transpose(1, 2)


def to_match_space(tokens: torch.Tensor, grid: tuple[int, int], distance: Distance, size: int) -> torch.Tensor:
    """One layer's raw ``(B, P, C)`` tokens in the matching space of ``distance`` at neighbourhood ``size``."""
    tokens = tokens.float()
    if distance == "cosine":
        return F.normalize(neighbourhood_mean(F.normalize(tokens, dim=-1), grid, size), dim=-1).contiguous()
    if distance == "euclidean":
        return neighbourhood_mean(tokens, grid, size).contiguous()
    if distance == "layernorm":
        return neighbourhood_mean(F.layer_norm(tokens, tokens.shape[-1:]), grid, size).contiguous()
    raise ValueError(f"unknown distance {distance!r}; choose one of {', '.join(DISTANCES)}")


def match_spaces(
    layers: Sequence[torch.Tensor], grid: tuple[int, int], distance: Distance, sizes: Sequence[int]
) -> list[list[torch.Tensor]]:
    """``spaces[s][l]``: layer ``l``'s tokens in the matching space of neighbourhood ``sizes[s]``."""
    return [[to_match_space(t, grid, distance, s) for t in layers] for s in sizes]


def _sq_dist(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Squared Euclidean distances ``(..., Pa, Pb)`` of ``(..., Pa, C)`` and ``(..., Pb, C)`` (clamped >= 0)."""
    sq = (a * a).sum(-1).unsqueeze(-1) + (b * b).sum(-1).unsqueeze(-2) - 2 * (a @ b.transpose(-1, -2))
    return sq.clamp_min_(0)


def nearest_distances(
    fa: Sequence[torch.Tensor], fb: Sequence[torch.Tensor], distance: Distance
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mutual nearest-patch distances of batched image pairs.

    ``fa[l]``: ``(G, Pa, C_l)``, ``fb[l]``: ``(G, Pb, C_l)``, both in the matching space of ``distance``.
    Returns ``(G, Pa)``: each patch of a to its nearest patch of b, and ``(G, Pb)``: the reverse, from one
    distance matrix per layer (``cosine``, ``layernorm``: per layer, then averaged over layers;
    ``euclidean``: of the concatenated layers).
    """
    if distance == "cosine":
        da = db = None
        for a, b in zip(fa, fb, strict=True):
            sim = torch.bmm(a, b.transpose(1, 2))
            ra, rb = (1 - sim.amax(dim=2)) / 2, (1 - sim.amax(dim=1)) / 2
            da, db = (ra, rb) if da is None else (da + ra, db + rb)
        return da / len(fa), db / len(fb)
    if distance == "euclidean":
        sq = sum(_sq_dist(a, b) for a, b in zip(fa, fb, strict=True))
        return sq.amin(dim=2).sqrt(), sq.amin(dim=1).sqrt()
    if distance == "layernorm":
        da = db = None
        for a, b in zip(fa, fb, strict=True):
            sq = _sq_dist(a, b)
            ra, rb = sq.amin(dim=2).sqrt(), sq.amin(dim=1).sqrt()
            da, db = (ra, rb) if da is None else (da + ra, db + rb)
        return da / len(fa), db / len(fb)
    raise ValueError(f"unknown distance {distance!r}; choose one of {', '.join(DISTANCES)}")


def bank_distances(
    query: Sequence[torch.Tensor],
    bank: Sequence[torch.Tensor],
    distance: Distance,
    chunk: int = 4096,
    query_owner: torch.Tensor | None = None,
    bank_owner: torch.Tensor | None = None,
) -> torch.Tensor:
    """Distance of every query patch to its nearest patch of a memory bank.

    ``query[l]``: ``(N, P, C_l)``; ``bank[l]``: ``(M, C_l)`` (the same M patches in every layer). Returns
    ``(N, P)``. The bank is visited ``chunk`` patches at a time, so memory stays ``N * P * chunk`` floats.
    With ``query_owner`` (``(N,)``) and ``bank_owner`` (``(M,)``) image ids, a query image never matches
    bank patches of its own id (leave-one-out scores of the bank's own images).
    """
    n, p = query[0].shape[:2]
    if distance not in DISTANCES:
        raise ValueError(f"unknown distance {distance!r}; choose one of {', '.join(DISTANCES)}")
    chunk = max(1, min(chunk, _MAX_BLOCK_ELEMENTS // p))
    # one image at a time: the same shapes, hence the same arithmetic, whatever the batch holds
    out = torch.empty(n, p)
    for i in range(n):
        same = None if query_owner is None else bank_owner == query_owner[i]
        out[i] = _bank_block([t[i] for t in query], bank, distance, chunk, same)
    return out


def _bank_block(q, bank, distance, chunk, same) -> torch.Tensor:
    """``(P,)`` nearest-bank distances of one image's ``(P, C_l)`` features; ``same``: ``(M,)`` bank patches
    it may not match, or ``None``."""
    per_layer = distance != "euclidean"
    m = bank[0].shape[0]
    best = torch.full((len(q) if per_layer else 1, q[0].shape[0]), torch.inf)
    for s in range(0, m, chunk):
        parts = [(a, b[s : s + chunk]) for a, b in zip(q, bank, strict=True)]
        if distance == "cosine":
            mats = [(1 - a @ b.T) / 2 for a, b in parts]
        elif per_layer:
            mats = [_sq_dist(a, b) for a, b in parts]
        else:
            mats = [sum(_sq_dist(a, b) for a, b in parts)]
        if same is not None:
            mats = [d.masked_fill_(same[None, s : s + chunk], torch.inf) for d in mats]
        best = torch.minimum(best, torch.stack([d.amin(dim=1) for d in mats]))
    if distance != "cosine":
        best = best.sqrt()
    return best.mean(dim=0)
