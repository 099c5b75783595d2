"""A bounded memory bank: greedy k-center coreset subsampling of patch features (PatchCore, Roth et al. 2022).

Starting from one seeded patch, the patch farthest from everything chosen so far is added until ``size``
patches are chosen, so that every patch of the bank lies close to a kept one. As in PatchCore the distances
are computed on a seeded Gaussian random projection (``projection`` dimensions) of the features, which
keeps the cost at ``M * size * projection`` operations for ``M`` patches.
"""

from __future__ import annotations

import torch


def greedy_coreset(features: torch.Tensor, size: int, seed: int = 0, projection: int | None = 128) -> torch.Tensor:
    """Indices (sorted, ``(size,)``) of a greedy k-center coreset of ``(M, C)`` features.

    ``size >= M`` returns every index. ``projection=None`` (or ``>= C``) works on the features themselves.
    """
    m, c = features.shape
    if size >= m:
        return torch.arange(m)
    if size < 1:
        raise ValueError(f"coreset size must be >= 1, got {size}")
    gen = torch.Generator().manual_seed(seed)
    x = features.float()
    if projection is not None and projection < c:
        x = x @ (torch.randn(c, projection, generator=gen) / projection**0.5)
    sq = (x * x).sum(dim=1)
    first = int(torch.randint(m, (1,), generator=gen))
    chosen = torch.empty(size, dtype=torch.long)
    chosen[0] = first
    # squared distance of every patch to its nearest chosen patch
    nearest = (sq - 2 * (x @ x[first]) + sq[first]).clamp_min_(0)
    for i in range(1, size):
        nxt = int(torch.argmax(nearest))
        chosen[i] = nxt
        nearest = torch.minimum(nearest, (sq - 2 * (x @ x[nxt]) + sq[nxt]).clamp_min_(0))
    return torch.sort(chosen).values
