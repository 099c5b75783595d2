"""Where the visual reference (method §5) finds its normal patches: one source per mode, one interface.

A source turns the run's features, already in their matching spaces, into visual patch scores, and says in
which units the branches are fused:

:class:`MutualPairs`
    zero-shot: the run's images are each other's references (seeded pairs, mutual matching); the units are
    the run's own (``scale`` is ``None``: every branch is normalised over the run).
:class:`GoldenReferences`
    every image against all patches of a few normal images; the units are the run's own.
:class:`ProfileBank`
    every image against a fitted profile's memory bank; the units are the profile's fixed moments
    (``scale``), so a score does not depend on the other images of the run.

The bank searches of all three modes, and of :meth:`~dualclip.DualClipDetector.fit`'s leave-one-out pass,
go through one function, :func:`bank_scores`. Every tensor stays on the device of the features it is given.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch

from .matching import MATCH_MEMORY_MB, bank_distances, combine_parts, distance_parts, match_spaces
from .position import centre, positional_offsets
from .reference import pair_references, reference_scores

Spaces = dict[str, list[list[torch.Tensor]]]
"""``spaces[part][s][l]``: layer ``l``'s ``(N, P, C_l)`` features in the matching space of ``part`` (a plain
distance) at neighbourhood size ``s``; for a bank, ``(M, C_l)`` patches."""


@dataclass(frozen=True)
class Matching:
    """How patches are compared: the resolved distance, neighbourhood sizes, hybrid standardisation, positional
    centring, and the memory budget of one block of distances (MiB)."""

    distance: str
    sizes: tuple[int, ...]
    robust: bool = False
    centring: str = "none"
    memory_mb: float = MATCH_MEMORY_MB

    @property
    def parts(self) -> tuple[str, ...]:
        """The plain distances the setting is computed from (both parts of ``hybrid``)."""
        return distance_parts(self.distance)

    def spaces(self, layers: Sequence[torch.Tensor], grid: tuple[int, int]) -> Spaces:
        """Raw per-layer ``(N, P, C_l)`` tokens in every matching space of this setting."""
        return {p: match_spaces(layers, grid, p, self.sizes) for p in self.parts}


@dataclass
class VisualScores:
    """What a source gives back: ``scores`` ``(N, P)`` on the features' device, the positional ``centring``
    applied, each image's ``references`` (indices into the run for mutual pairs, into the golden images for
    golden references, none for a profile), and the near-duplicate pairs kept apart."""

    scores: torch.Tensor
    centring: str
    references: list[list[int]]
    duplicate_pairs: int = 0


class ReferenceSource(Protocol):
    """One mode's normal patches.

    Attributes
    ----------
    kind:
        Recorded in the run information (``RunInfo.pairing``): ``"random"``, ``"golden"`` or ``"profile"``.
    references_into_run:
        Whether :attr:`VisualScores.references` index the run's own images.
    scale:
        The fixed units the branches are fused in (a profile's :class:`~dualclip.profile.ScoreScale`), or
        ``None``: the run's own.
    """

    kind: str
    references_into_run: bool
    scale: object | None

    def visual_scores(
        self, spaces: Spaces, grid: tuple[int, int], matching: Matching, progress: bool = False
    ) -> VisualScores: ...


def _mean(tensors) -> torch.Tensor:
    """Mean of equally shaped tensors (one, returned unchanged)."""
    tensors = list(tensors)
    return tensors[0] if len(tensors) == 1 else torch.stack(tensors).mean(dim=0)


def flat_bank(spaces: Spaces) -> Spaces:
    """Images' ``(N, P, C)`` features as one bank of ``(N * P, C)`` patches (image by image, row-major)."""
    return {p: [[t.reshape(-1, t.shape[-1]) for t in space] for space in sp] for p, sp in spaces.items()}


def bank_scores(
    spaces: Spaces,
    bank: Spaces,
    query_owner: torch.Tensor | None = None,
    bank_owner: torch.Tensor | None = None,
    progress: str | None = None,
    memory_mb: float = MATCH_MEMORY_MB,
    nearest: Callable[..., torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """Each part's ``(N, P)`` distance of every query patch to its nearest bank patch, averaged over the
    neighbourhood sizes: the one bank search of golden references, profile scoring and the leave-one-out pass
    of a fit.

    ``query_owner`` / ``bank_owner``: image ids; a query image never matches bank patches of its own id
    (:func:`~dualclip.scoring.bank_distances`). ``progress``: a progress bar's label. ``nearest(query, bank,
    part)``: another search of the same result (the exported graph's batched form), without owners.
    """
    out = {}
    for p, sp in spaces.items():
        if nearest is not None:
            out[p] = _mean(nearest(s, b, p) for s, b in zip(sp, bank[p], strict=True))
            continue
        label = None if progress is None else f"{progress} ({p})"
        out[p] = _mean(
            bank_distances(s, b, p, query_owner=query_owner, bank_owner=bank_owner, progress=label, memory_mb=memory_mb)
            for s, b in zip(sp, bank[p], strict=True)
        )
    return out


def part_moments(scores: dict[str, torch.Tensor], robust: bool) -> dict | None:
    """The moments of each part's scores that put several parts on one scale (one part: ``None``)."""
    from ..profile import Moments

    return {p: Moments.of(v, robust) for p, v in scores.items()} if len(scores) > 1 else None


@dataclass
class MutualPairs:
    """Zero-shot: each image is matched with ``k`` seeded partners among the run's images (never one that
    ``forbidden[i, j]`` marks: near-exact duplicates); a pair's one distance matrix scores both images."""

    k: int | str
    aggregation: str
    seed: int
    forbidden: torch.Tensor
    kind: str = "random"
    references_into_run: bool = True
    scale: None = None

    def visual_scores(
        self, spaces: Spaces, grid: tuple[int, int], matching: Matching, progress: bool = False
    ) -> VisualScores:
        from tqdm.auto import tqdm

        n = next(iter(spaces.values()))[0][0].shape[0]
        refs = pair_references(n, self.k, self.seed, forbidden=self.forbidden)
        pairs = len({(min(a, b), max(a, b)) for a, r in enumerate(refs) for b in r})
        total = pairs * len(matching.sizes) * len(spaces)
        with tqdm(total=total, desc="matching", unit="pair", disable=not progress, leave=False) as bar:
            visual = combine_parts(
                {
                    p: _mean(
                        reference_scores(
                            s, refs, self.aggregation, bar.update, distance=p, memory_mb=matching.memory_mb
                        )
                        for s in sp
                    )
                    for p, sp in spaces.items()
                },
                robust=matching.robust,
            )
        visual = centre(visual, positional_offsets(visual, grid, matching.centring))
        return VisualScores(visual, matching.centring, refs, int(self.forbidden.sum()) // 2)


@dataclass
class GoldenReferences:
    """Every image against all patches of the golden images (``spaces``: theirs, on a ``grid`` of their own).
    With centring, the offsets come from the golden images' own leave-one-out scores."""

    spaces: Spaces
    grid: tuple[int, int]
    kind: str = "golden"
    references_into_run: bool = False
    scale: None = None

    def visual_scores(
        self, spaces: Spaces, grid: tuple[int, int], matching: Matching, progress: bool = False
    ) -> VisualScores:
        n = next(iter(spaces.values()))[0][0].shape[0]
        r = next(iter(self.spaces.values()))[0][0].shape[0]
        bank = flat_bank(self.spaces)
        scores = bank_scores(spaces, bank, progress="matching" if progress else None, memory_mb=matching.memory_mb)
        moments = part_moments(scores, matching.robust)
        visual, centring = combine_parts(scores, moments), "none"
        if matching.centring != "none" and r > 1:  # the references' own leave-one-out scores
            ids = torch.arange(r)
            owner = ids.repeat_interleave(self.grid[0] * self.grid[1])
            normal = bank_scores(self.spaces, bank, ids, owner, memory_mb=matching.memory_mb)
            offsets = positional_offsets(combine_parts(normal, moments), grid, matching.centring)
            visual, centring = centre(visual, offsets), matching.centring
        return VisualScores(visual, centring, [list(range(r)) for _ in range(n)])


@dataclass
class ProfileBank:
    """Every image on its own against a fitted profile's memory bank, in the profile's fixed units.

    ``bank``: the profile's patches (moved once to each device they are matched on); ``parts``: the hybrid
    parts' normal moments; ``offsets``: the normal images' positional offsets (``None``: no centring), applied
    as ``centring``; ``scale``: the profile's :class:`~dualclip.profile.ScoreScale`."""

    bank: Spaces
    parts: dict
    offsets: torch.Tensor | None
    centring: str
    scale: object
    kind: str = "profile"
    references_into_run: bool = False
    _on_device: dict = field(default_factory=dict, repr=False)

    @classmethod
    def of(cls, profile) -> ProfileBank:
        """The source of a :class:`~dualclip.profile.Profile`."""
        return cls(profile.bank, profile.scale.parts, profile.scale.position_offsets(), profile.centring, profile.scale)

    def bank_on(self, device: torch.device) -> Spaces:
        """The bank on ``device`` (moved there once)."""
        key = str(device)
        if key not in self._on_device:
            self._on_device[key] = {p: [[t.to(device) for t in s] for s in sp] for p, sp in self.bank.items()}
        return self._on_device[key]

    def visual_scores(
        self,
        spaces: Spaces,
        grid: tuple[int, int],
        matching: Matching,
        progress: bool = False,
        nearest: Callable[..., torch.Tensor] | None = None,
    ) -> VisualScores:
        """``nearest``: another bank search (:func:`bank_scores`)."""
        from ..profile import ProfileError

        first = next(iter(spaces.values()))[0][0]
        n = first.shape[0]
        if self.offsets is not None and self.offsets.numel() != grid[0] * grid[1]:
            raise ProfileError(
                f"the profile's positional offsets cover {self.offsets.numel()} positions, this model's grid "
                f"{grid[0]} x {grid[1]}: the profile is damaged"
            )
        bank = self.bank_on(first.device)
        scores = bank_scores(spaces, bank, memory_mb=matching.memory_mb, nearest=nearest)
        visual = centre(combine_parts(scores, self.parts if len(spaces) > 1 else None), self.offsets)
        return VisualScores(visual, self.centring, [[] for _ in range(n)])
