"""The plain view of a fitted profile: the field's golden-reference nearest neighbour as one more patch branch.

A second pass of the same network at a coarser size (``plain_image_size``, 224 px by default) with the
network's own zero padding; its matching layers concatenated and averaged over 3 x 3 patches *counting the
zero padding* (a border patch's average shrinks toward zero, which damps the border responses every image
shows); each patch's Euclidean distance to its nearest patch of the normal images (a PatchCore bank). The
distances, standardised by the normal images' leave-one-out moments, are upsampled (bilinear) to the map's
size and mixed with the main view's map in profile units (:func:`~dualclip.core.maps.mix_views`).

The main view finds what the plain view misses (small and low-contrast defects, in its finer grid and its
hybrid distance); the plain view holds where the main view's border handling fails (defects along the edge
of a tile). Their mean is at or above the plain nearest neighbour on every fold of three products
(docs/results.md, "Saved profiles over three products").
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

PLAIN_NEIGHBOURHOOD = 3
"""Side of the square the plain view averages its features over (the zero padding counts)."""
PLAIN_DISTANCE = "euclidean"
"""The plain view's distance: Euclidean on the concatenated raw features (PatchCore's)."""


def plain_space(layers: Sequence[torch.Tensor], grid: tuple[int, int]) -> torch.Tensor:
    """The plain view's ``(N, P, C)`` patch features: the layers' ``(N, P, C_l)`` tokens concatenated, then
    averaged over :data:`PLAIN_NEIGHBOURHOOD` x :data:`PLAIN_NEIGHBOURHOOD` patches with the zero padding
    counted (``count_include_pad``): a border patch is the mean of its neighbours and of zeros."""
    x = torch.cat([t.float() for t in layers], dim=-1)
    n, p, c = x.shape
    x = x.transpose(1, 2).reshape(n, c, *grid)
    r = PLAIN_NEIGHBOURHOOD // 2
    x = F.avg_pool2d(x, PLAIN_NEIGHBOURHOOD, stride=1, padding=r, count_include_pad=True)
    return x.reshape(n, c, p).transpose(1, 2).contiguous()


@dataclass
class PlainBank:
    """A profile's plain-view memory bank.

    Attributes
    ----------
    bank:
        ``(M, C)`` normal patches in the plain view's space (:func:`plain_space`).
    owner:
        ``(M,)`` the normal image each patch came from.
    grid:
        The plain view's feature grid (rows, columns).
    total:
        The patch count before the coreset chose ``M`` of them.
    """

    bank: torch.Tensor
    owner: torch.Tensor
    grid: tuple[int, int]
    total: int
    _centred: dict = field(default_factory=dict, repr=False, compare=False)

    def centred_on(self, device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
        """``(bank - centre, centre)`` on ``device`` (made once per device), ``centre`` the bank's ``(C,)`` mean
        patch: distances are computed from it (the same distances; short vectors lose fewer digits to the
        ``|a|^2 + |b|^2 - 2ab`` of a float32 search)."""
        key = str(device)
        if key not in self._centred:
            centre = self.bank.double().mean(dim=0).float()
            self._centred[key] = ((self.bank - centre).to(device), centre.to(device))
        return self._centred[key]

    def scores(self, features: torch.Tensor, memory_mb: float | None = None, query_owner=None, progress=None):
        """``(N, P)`` Euclidean distance of each plain-view patch of ``features`` ``(N, P, C)`` to its nearest
        bank patch (with ``query_owner``: never one of its own image's, the leave-one-out pass of a fit)."""
        from .matching import MATCH_MEMORY_MB, bank_distances

        bank, centre = self.centred_on(features.device)
        return bank_distances(
            [features - centre],
            [bank],
            PLAIN_DISTANCE,
            query_owner=query_owner,
            bank_owner=None if query_owner is None else self.owner,
            progress=progress,
            memory_mb=MATCH_MEMORY_MB if memory_mb is None else memory_mb,
        )
