"""Test-time adaptation head on frozen patch features (docs/method.md §7).

    f' = normalize(f) + Up(GELU(Down(normalize(f))))        (residual low-rank adapter, Up starts at 0)
    logit = scale * <normalize(f'), w0 + delta> + b

The direction is its start ``w0`` (a fixed buffer) plus a learned change ``delta`` (starts at 0). With CLIP,
``w0 = t_a - t_n`` and ``scale`` is tau, so before any step ``sigmoid(logit) = softmax(tau * [<f, t_n>,
<f, t_a>])[a]``: the head reproduces the text patch score. On a vision-only backbone ``w0`` is zero.
Trained with BCE + Dice against synthetic masks plus ``anchor * ||delta||^2 / ||w0||^2``, which keeps the
head near the text evidence it starts from (no such term for a zero start: there is nothing to keep); AdamW's
weight decay also pulls ``delta``, not the direction, towards zero.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

ZERO_INIT_SCALE = 10.0


class AdaptationHead(nn.Module):
    """Patch-level anomaly head; see the module docstring for the formula."""

    def __init__(
        self,
        dim: int,
        direction: torch.Tensor | None = None,
        scale: float | None = None,
        rank: int = 16,
        generator: torch.Generator | None = None,
    ):
        """``generator``: draws the low-rank adapter's initial weights (nn.Linear's initialisation) without
        touching the global torch RNG; ``None``: the global RNG, as nn.Linear does."""
        super().__init__()
        self.rank = rank
        if rank > 0:
            with torch.random.fork_rng(devices=[], enabled=generator is not None):  # nn.Linear's draws undone
                self.down = nn.Linear(dim, rank, bias=False)
                self.up = nn.Linear(rank, dim, bias=False)
            if generator is not None:
                nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5), generator=generator)  # nn.Linear's rule
            nn.init.zeros_(self.up.weight)
        self.register_buffer("w0", direction.detach().clone().float() if direction is not None else torch.zeros(dim))
        self.delta = nn.Parameter(torch.zeros(dim))
        self.b = nn.Parameter(torch.zeros(()))
        self.scale = float(scale if scale is not None else ZERO_INIT_SCALE)

    def forward(self, features: torch.Tensor, normalized: bool = False) -> torch.Tensor:
        """Logits ``(...,)`` of ``(..., D)`` features; ``normalized=True`` skips their L2 normalisation
        (the caller has done it, e.g. once before many training steps)."""
        f = features.float() if normalized else F.normalize(features.float(), dim=-1)
        if self.rank > 0:
            f = F.normalize(f + self.up(F.gelu(self.down(f))), dim=-1)
        return self.scale * (f @ self.direction) + self.b

    def tensors(self) -> dict[str, torch.Tensor]:
        """Every tensor of the head, ``scale`` included (saved in a profile; :meth:`from_tensors` rebuilds it)."""
        out = {k: v.detach().float().cpu().clone() for k, v in self.state_dict().items()}
        out["scale"] = torch.tensor(self.scale)
        return out

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor]) -> AdaptationHead:
        rank = tensors["down.weight"].shape[0] if "down.weight" in tensors else 0
        head = cls(tensors["w0"].numel(), tensors["w0"], float(tensors["scale"]), rank)
        head.load_state_dict({k: v for k, v in tensors.items() if k != "scale"})
        return head.eval().requires_grad_(False)

    @property
    def direction(self) -> torch.Tensor:
        """The current direction ``w0 + delta``."""
        return self.w0 + self.delta

    def anchor_penalty(self) -> torch.Tensor:
        """``||delta||^2 / ||w0||^2``; 0 for a zero start (a vision-only backbone: no text evidence to keep)."""
        ref = float(self.w0.pow(2).sum())
        return self.delta.pow(2).sum() / ref if ref > 0 else self.delta.sum() * 0.0


def segmentation_loss(logits: torch.Tensor, target: torch.Tensor, dice_weight: float = 1.0) -> torch.Tensor:
    """BCE + ``dice_weight`` * soft Dice over all patches; ``target`` in [0, 1]."""
    bce = F.binary_cross_entropy_with_logits(logits, target)
    p = torch.sigmoid(logits)
    dice = 1 - (2 * (p * target).sum() + 1) / (p.sum() + target.sum() + 1)
    return bce + dice_weight * dice


def train_head(
    head: AdaptationHead,
    features: torch.Tensor,
    targets: torch.Tensor,
    steps: int,
    lr: float,
    weight_decay: float,
    dice_weight: float,
    anchor: float = 0.0,
) -> list[float]:
    """Full-batch AdamW on ``(M, P, D)`` features vs ``(M, P)`` targets, plus ``anchor`` times the head's
    :meth:`~AdaptationHead.anchor_penalty`. Returns the loss per step.

    Deterministic, and draws no random numbers (the global torch RNG is left as it was): the head's random
    start is drawn when it is built (``AdaptationHead(generator=...)``). The features are normalised once, not at
    every step (the head only sees their directions)."""
    features = F.normalize(features.float(), dim=-1)
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=weight_decay)
    losses = []
    with torch.enable_grad():
        for _ in range(steps):
            opt.zero_grad(set_to_none=True)
            loss = segmentation_loss(head(features, normalized=True), targets, dice_weight)
            if anchor > 0:
                loss = loss + anchor * head.anchor_penalty()
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
    return losses
