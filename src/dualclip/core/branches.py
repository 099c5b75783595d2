"""The branch scores of one run: each patch branch's ``(N, P)`` scores, and the text branch (method §4)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..backbone.base import BackboneOutput
from ..scoring import text_anomaly_scores


@dataclass
class BranchScores:
    """The scores of each branch that ran (``None`` where it did not).

    Attributes
    ----------
    text:
        ``(N, P)`` text-guided patch scores (docs/method.md §4), probabilities in (0, 1).
    text_global:
        ``(N,)`` text score of each global embedding (g_txt).
    visual:
        ``(N, P)`` visual-reference patch scores (docs/method.md §5), distances in [0, 1].
    adapted:
        ``(N, P)`` adapted-head patch scores (docs/method.md §7), probabilities in (0, 1).
    plain:
        ``(N, P')`` a fitted profile's plain-view distances (:mod:`dualclip.scoring.plain`), on ``plain_grid``.
    duplicate_pairs:
        Pairs of near-exact duplicates kept from being each other's reference in this run.
    """

    text: torch.Tensor | None = None
    text_global: torch.Tensor | None = None
    visual: torch.Tensor | None = None
    adapted: torch.Tensor | None = None
    plain: torch.Tensor | None = None
    duplicate_pairs: int = 0
    centring: str = "none"
    plain_grid: tuple[int, int] | None = None

    def grid_of(self, name: str, grid: tuple[int, int]) -> tuple[int, int]:
        """The grid of patch branch ``name``: the plain view's own, or the main ``grid``."""
        return self.plain_grid if name == "plain" else grid

    def patch(self) -> dict[str, torch.Tensor]:
        """The patch branches that ran, by name: ``(N, P)`` each."""
        named = {"text": self.text, "visual": self.visual, "adapted": self.adapted, "plain": self.plain}
        return {k: v for k, v in named.items() if v is not None}

    def image(self) -> dict[str, torch.Tensor]:
        """Image-level score of each branch that ran: ``text_global``, and the max of each patch branch."""
        out = {} if self.text_global is None else {"text_global": self.text_global}
        out.update({k: v.amax(dim=1) for k, v in self.patch().items()})
        return out


def text_scores(feats: BackboneOutput, text: torch.Tensor, temperature: float, out: BranchScores) -> None:
    """docs/method.md §4: fills ``out.text`` (each patch) and ``out.text_global`` (each global embedding) from the
    ``(2, D)`` text embeddings ``[t_n, t_a]``."""
    out.text = text_anomaly_scores(feats.patch_embeddings, text, temperature)
    out.text_global = text_anomaly_scores(feats.global_embedding, text, temperature)
