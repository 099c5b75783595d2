"""A bounded memory bank: greedy k-center coreset subsampling of patch features (PatchCore, Roth et al. 2022).

Starting from one seeded patch, the patch farthest from everything chosen so far is added until ``size``
patches are chosen, so that every patch of the bank lies close to a kept one. As in PatchCore the distances
are computed on a seeded Gaussian random projection (``projection`` dimensions) of the features, which
keeps the cost at ``M * size * projection`` operations for ``M`` patches.

The greedy loop picks one patch at a time, but its distance work is done in blocks: the ``B`` patches
farthest from the chosen ones are the next picks' candidates, and one matrix product gives the distance of
every patch to each of them (``B x M``). The loop then picks the farthest patch and lowers every patch's
distance with that candidate's row, for as long as the farthest patch is a candidate; a pick outside them
starts the next block. The picks are those of the one-at-a-time loop (each step still takes the farthest
patch over all ``M``); a matrix product instead of ``size`` matrix-vector products, and numpy's argmax over
a vector instead of torch's, make it several times faster on a CPU.
"""

from __future__ import annotations

import numpy as np
import torch

BLOCK_ELEMENTS = 16_000_000
"""Bound on the candidate block's distances (``B x M`` float32: 64 MB); ``B`` lies in [16, 256]."""


def greedy_coreset(
    features: torch.Tensor, size: int, seed: int = 0, projection: int | None = 128, progress: bool = False
) -> torch.Tensor:
    """Indices (sorted, ``(size,)``) of a greedy k-center coreset of ``(M, C)`` features.

    ``size >= M`` returns every index. ``projection=None`` (or ``>= C``) works on the features themselves.
    ``progress``: a progress bar over the picks.
    """
    from tqdm.auto import tqdm

    m, c = features.shape
    if size >= m:
        return torch.arange(m)
    if size < 1:
        raise ValueError(f"coreset size must be >= 1, got {size}")
    if projection is not None and projection < 1:
        raise ValueError(f"projection must be None or >= 1, got {projection}")
    if not bool(torch.isfinite(features).all()):
        raise ValueError("the features hold NaN or infinite values: no distance between them is defined")
    gen = torch.Generator().manual_seed(seed)  # drawn on the CPU: the same picks on every device
    x = features.float()
    if projection is not None and projection < c:
        x = x @ (torch.randn(c, projection, generator=gen) / projection**0.5).to(x.device)
    x = x.contiguous()
    sq = (x * x).sum(dim=1)
    first = int(torch.randint(m, (1,), generator=gen))
    chosen = [first]
    # squared distance of every patch to its nearest chosen patch (kept on the host: the picks are sequential)
    nearest = (sq - 2 * (x @ x[first]) + sq[first]).clamp_min_(0).cpu().numpy()
    nearest[first] = 0  # exactly: rounding must never make a chosen patch the farthest
    block = int(np.clip(BLOCK_ELEMENTS // m, 16, 256))
    row = np.full(m, -1, dtype=np.int64)  # each candidate's row in the block, -1 elsewhere
    with tqdm(total=size, initial=1, desc="coreset", unit="patch", disable=not progress, leave=False) as bar:
        while len(chosen) < size:
            if nearest.max() <= 0:  # every patch left coincides with a chosen one: any of them will do
                left = np.ones(m, dtype=bool)
                left[chosen] = False
                filled = np.flatnonzero(left)[: size - len(chosen)].tolist()
                chosen += filled
                bar.update(len(filled))
                break
            b = min(block, m)
            # the farthest b patches, and the first farthest of all (argmax's pick where several tie)
            cand = np.union1d(np.argpartition(nearest, m - b)[m - b :], [nearest.argmax()])
            b = len(cand)
            ct = torch.from_numpy(cand).to(x.device)
            dist = torch.addmm(sq.unsqueeze(0), x[ct], x.T, alpha=-2).add_(sq[ct].unsqueeze(1)).clamp_min_(0)
            dist = dist.cpu().numpy()
            row[cand] = np.arange(b)
            picked = len(chosen)
            while len(chosen) < size:
                nxt = int(nearest.argmax())
                if row[nxt] < 0 or nearest[nxt] <= 0:
                    break
                chosen.append(nxt)
                np.minimum(nearest, dist[row[nxt]], out=nearest)
                nearest[nxt] = 0
            row[cand] = -1
            bar.update(len(chosen) - picked)
    return torch.sort(torch.tensor(chosen)).values
