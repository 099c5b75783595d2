"""The patch-matching space of the visual reference (docs/method.md §5): how raw backbone tokens become the
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

``hybrid``
    Both ``cosine`` and ``euclidean`` (:data:`HYBRID_PARTS`): each part's scores are standardised (over the
    run, or by a profile's normal moments) and averaged (:func:`combine_parts`), so that a defect shown by
    the features' direction or by their magnitude both count.

Several neighbourhood sizes (e.g. ``(1, 3, 5)``) give one matching space each; the visual score is the
mean of their scores (MuSc's multi-degree aggregation).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from ..config import DISTANCES, Distance
from ..errors import ConfigError

HYBRID_PARTS: tuple[str, ...] = ("cosine", "euclidean")


def distance_parts(distance: Distance) -> tuple[str, ...]:
    """The plain distances a setting is computed from: both :data:`HYBRID_PARTS` for ``hybrid``, else itself."""
    if distance not in DISTANCES:
        raise ValueError(f"unknown distance {distance!r}; choose one of {', '.join(DISTANCES)}")
    return HYBRID_PARTS if distance == "hybrid" else (distance,)


MAD_TO_STD = 1.4826
"""The median absolute deviation of a normal distribution times this is its standard deviation."""


def centre_and_spread(x: torch.Tensor, robust: bool = False) -> tuple[float, float]:
    """``(centre, spread)`` of all values of ``x``: mean and population standard deviation, or (``robust``)
    the lower median and 1.4826 times the median absolute deviation, which a minority of defects cannot
    move."""
    flat = x.double().reshape(-1)
    if robust:
        med = flat.median()
        return float(med), float((flat - med).abs().median() * MAD_TO_STD)
    return float(flat.mean()), float(flat.std(unbiased=False)) if flat.numel() > 1 else 0.0


def combine_parts(parts: dict[str, torch.Tensor], moments: dict | None = None, robust: bool = False) -> torch.Tensor:
    """One visual score from the parts' scores: a single part unchanged; several standardised and averaged,
    by ``moments[part]`` (a profile's fixed :class:`~dualclip.profile.Moments`), else over all their values
    (:func:`centre_and_spread`: z-scores, or ``robust``: median and MAD)."""
    if len(parts) == 1:
        return next(iter(parts.values()))
    out = None
    for name, x in parts.items():
        if moments is not None:
            z = moments[name].standardize(x)
        else:
            c, s = centre_and_spread(x, robust)
            z = ((x.double() - c) / s if s > 0 else x.double() - c).to(x.dtype)
        out = z if out is None else out + z
    return out / len(parts)


MATCH_MEMORY_MB = 512.0
"""The default budget of one block of patch distances (``DetectorConfig.match_memory_mb``)."""
FLOAT_BYTES = 4


MIN_BLOCK = 64
"""A block of a matching spans at least this many patches on each side, whatever the budget: matrix products of
at least 64 rows or columns round every dot product as the unblocked product does, so blocking never
changes a score."""


def block_elements(memory_mb: float) -> int:
    """How many float32 distances one block of a matching may hold under a budget of ``memory_mb`` MiB (at
    least one)."""
    return max(1, int(memory_mb * 2**20) // FLOAT_BYTES)


def block_side(memory_mb: float, other: int, most: int) -> int:
    """Patches per block along one side of a ``most x other`` distance matrix (``other``: the full side):
    as many as the budget allows, at least :data:`MIN_BLOCK`, at most ``most``."""
    return max(1, min(most, max(MIN_BLOCK, block_elements(memory_mb) // max(1, other))))


def blocks(total: int, side: int) -> list[tuple[int, int]]:
    """``[start, stop)`` of ``total // side`` (at least one; none for ``total`` 0) blocks of nearly equal size
    covering ``range(total)``: none smaller than ``side`` (where ``total`` allows), none above ``2 * side``."""
    if total <= 0:
        return []
    n = max(1, total // max(1, side))
    edges = [total * i // n for i in range(n + 1)]
    return list(zip(edges[:-1], edges[1:], strict=True))


def neighbourhood_mean(tokens: torch.Tensor, grid: tuple[int, int], size: int) -> torch.Tensor:
    """Average ``(B, P, C)`` tokens over a ``size x size`` square around each patch of the ``grid`` (only the
    patches inside the grid count: no zero padding at the border). ``size`` is odd and at most the grid's
    longer side (a larger square is the whole grid)."""
    if size % 2 != 1 or not 1 <= size <= max(grid):
        raise ConfigError(
            f"neighbourhood={size} does not fit the feature grid ({grid[0]} x {grid[1]}): choose an odd size at "
            f"most {max(grid)}"
        )
    if size == 1:
        return tokens
    b, p, c = tokens.shape
    x = tokens.transpose(1, 2).reshape(b, c, *grid)
    x = F.avg_pool2d(x, size, stride=1, padding=size // 2, count_include_pad=False)
    return x.reshape(b, c, p).transpose(1, 2)


def to_match_space(tokens: torch.Tensor, grid: tuple[int, int], distance: Distance, size: int) -> torch.Tensor:
    """One layer's raw ``(B, P, C)`` tokens in the matching space of ``distance`` at neighbourhood ``size``."""
    tokens = tokens.float()
    if distance == "hybrid":
        raise ValueError("'hybrid' has no matching space of its own: use distance_parts() for its parts")
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


def _groups(layers: Sequence[torch.Tensor], distance: Distance) -> list[torch.Tensor]:
    """The tensors one distance matrix is computed from: each layer, or (``euclidean``) all layers concatenated
    (the sum of per-layer squared distances is the squared distance of the concatenation)."""
    if distance not in DISTANCES:
        raise ValueError(f"unknown distance {distance!r}; choose one of {', '.join(DISTANCES)}")
    return [torch.cat(list(layers), dim=-1)] if distance == "euclidean" else list(layers)


def _sq_norms(x: torch.Tensor) -> torch.Tensor:
    return (x * x).sum(dim=-1)


def nearest_distances(
    fa: Sequence[torch.Tensor],
    fb: Sequence[torch.Tensor],
    distance: Distance,
    memory_mb: float = MATCH_MEMORY_MB,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mutual nearest-patch distances of batched image pairs.

    ``fa[l]``: ``(G, Pa, C_l)``, ``fb[l]``: ``(G, Pb, C_l)``, both in the matching space of ``distance``.
    Returns ``(G, Pa)``: each patch of a to its nearest patch of b, and ``(G, Pb)``: the reverse, from one
    distance matrix per layer (``cosine``, ``layernorm``: per layer, then averaged over layers;
    ``euclidean``: of the concatenated layers). Where the ``G x Pa x Pb`` matrices exceed ``memory_mb`` MiB,
    they are computed a block of a's patches at a time (b's minima kept as a running minimum: the same values; a block spans at least
    :data:`MIN_BLOCK` patches of a).
    """
    ga, gb = _groups(fa, distance), _groups(fb, distance)
    g, pa = ga[0].shape[:2]
    pb = gb[0].shape[1]
    rows = block_side(memory_mb, g * pb, pa)
    cosine = distance == "cosine"
    da = db = None
    for a, b in zip(ga, gb, strict=True):
        row_parts, best = [], None
        bt, b_sq = b.transpose(1, 2), None if cosine else _sq_norms(b).unsqueeze(1)
        for s, e in blocks(pa, rows):
            a_s = a[:, s:e]
            if cosine:
                sim = torch.bmm(a_s, bt)
                row_parts.append((1 - sim.amax(dim=2)) / 2)
                col = sim.amax(dim=1)
                best = col if best is None else torch.maximum(best, col)
            else:  # squared distances |a|^2 + |b|^2 - 2ab in two passes over the matrix
                sq = torch.baddbmm(b_sq, a_s, bt, alpha=-2)
                sq.add_(_sq_norms(a_s).unsqueeze(2))
                row_parts.append(sq.amin(dim=2).clamp_min(0).sqrt())
                col = sq.amin(dim=1)
                best = col if best is None else torch.minimum(best, col)
        ra = row_parts[0] if len(row_parts) == 1 else torch.cat(row_parts, dim=1)
        rb = (1 - best) / 2 if cosine else best.clamp_min(0).sqrt()
        da, db = (ra, rb) if da is None else (da + ra, db + rb)
    return da / len(ga), db / len(gb)


def bank_distances(
    query: Sequence[torch.Tensor],
    bank: Sequence[torch.Tensor],
    distance: Distance,
    chunk: int = 1024,
    query_owner: torch.Tensor | None = None,
    bank_owner: torch.Tensor | None = None,
    progress: str | None = None,
    memory_mb: float = MATCH_MEMORY_MB,
) -> torch.Tensor:
    """Distance of every query patch to its nearest patch of a memory bank.

    ``query[l]``: ``(N, P, C_l)``; ``bank[l]``: ``(M, C_l)`` (the same M patches in every layer). Returns
    ``(N, P)`` on the query's device (the bank is moved there). The bank is visited in blocks of about
    ``chunk`` patches (:func:`blocks`), fewer where ``P * chunk`` floats would exceed ``memory_mb`` MiB, but at
    least :data:`MIN_BLOCK` (the same scores in any blocking).
    With ``query_owner`` (``(N,)``) and ``bank_owner`` (``(M,)``) image ids, a query image never matches
    bank patches of its own id (leave-one-out scores of the bank's own images): the bank is ordered by owner
    once, and each image's own patches, one run of columns, are set out of reach in the chunks they fall in.
    ``progress``: the label of a progress bar over the query images (``None``: no bar).
    """
    from tqdm.auto import tqdm

    n, p = query[0].shape[:2]
    device = query[0].device
    bank = [b.to(device) for b in bank]
    owned = None
    if query_owner is not None:
        bank_owner = bank_owner.cpu()
        order = torch.argsort(bank_owner, stable=True)
        bank = [b[order.to(device)] for b in bank]
        sorted_owner = bank_owner[order].contiguous()
        ids = query_owner.to("cpu", sorted_owner.dtype)
        owned = zip(
            torch.searchsorted(sorted_owner, ids, side="left").tolist(),
            torch.searchsorted(sorted_owner, ids, side="right").tolist(),
            strict=True,
        )
    groups = _groups(bank, distance)
    queries = _groups(query, distance)
    norms = [None if distance == "cosine" else _sq_norms(g) for g in groups]
    chunk = block_side(memory_mb, p, chunk)
    # one image at a time: the same shapes, hence the same arithmetic, whatever the batch holds
    out = torch.empty(n, p, device=device)
    for i in tqdm(range(n), desc=progress, unit="img", disable=progress is None, leave=False):
        own = None if owned is None else next(owned)
        per_group = [
            _nearest_in_bank(q[i], g, nb, distance, chunk, own) for q, g, nb in zip(queries, groups, norms, strict=True)
        ]
        out[i] = torch.stack(per_group).mean(dim=0)
    return out


def _nearest_in_bank(
    q: torch.Tensor,
    bank: torch.Tensor,
    bank_sq: torch.Tensor | None,
    distance: Distance,
    chunk: int,
    own: tuple[int, int] | None,
) -> torch.Tensor:
    """``(P,)`` distances of one image's ``(P, C)`` features to their nearest of ``(M, C)`` bank rows; ``own``:
    the ``[start, stop)`` bank rows it may not match, or ``None``."""
    cosine = distance == "cosine"
    best = torch.full((q.shape[0],), -torch.inf if cosine else torch.inf, device=q.device)
    for s, e in blocks(bank.shape[0], chunk):
        b = bank[s:e]
        if cosine:
            m = q @ b.T
        else:  # |b|^2 - 2ab; |a|^2 is added after the minimum (it is the same along a row)
            m = torch.addmm(bank_sq[s:e].unsqueeze(0), q, b.T, alpha=-2)
        if own is not None and own[0] < s + b.shape[0] and own[1] > s:
            m[:, max(own[0] - s, 0) : own[1] - s] = -torch.inf if cosine else torch.inf
        best = torch.maximum(best, m.amax(dim=1)) if cosine else torch.minimum(best, m.amin(dim=1))
    if cosine:
        return (1 - best) / 2
    return (best + _sq_norms(q)).clamp_min(0).sqrt()


def bank_distances_batched(
    query: Sequence[torch.Tensor],
    bank: Sequence[torch.Tensor],
    distance: Distance,
    chunk: int = 4096,
    memory_mb: float = MATCH_MEMORY_MB,
) -> torch.Tensor:
    """:func:`bank_distances` (no owners) of a whole batch at once: one product per bank chunk of ``(N, P, C)``
    queries, no per-image loop, no in-place writes, so that a traced graph (the whole-model ONNX export) runs
    it at any batch size. The same formula; its sums may be rounded differently (about 1e-7 relative). The
    chunk holds at most ``memory_mb`` MiB of distances per image (the batch size is not known when traced)."""
    p = query[0].shape[1]
    chunk = block_side(memory_mb, p, chunk)
    cosine = distance == "cosine"
    per_group = []
    for q, g in zip(_groups(query, distance), _groups(bank, distance), strict=True):
        best = None
        for s, e in blocks(g.shape[0], chunk):
            b = g[s:e]
            if cosine:
                m = (q @ b.T).amax(dim=-1)
            else:  # |b|^2 - 2ab; |a|^2 is added after the minimum (it is the same along a row)
                m = (_sq_norms(b) - 2 * (q @ b.T)).amin(dim=-1)
            best = m if best is None else torch.maximum(best, m) if cosine else torch.minimum(best, m)
        per_group.append((1 - best) / 2 if cosine else (best + _sq_norms(q)).clamp_min(0).sqrt())
    return torch.stack(per_group).mean(dim=0)
