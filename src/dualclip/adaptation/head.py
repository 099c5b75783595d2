"""Test-time adaptation head on frozen patch features (METHOD.md §7).

    f' = normalize(f) + Up(GELU(Down(normalize(f))))        (residual low-rank adapter, Up starts at 0)
    logit = scale * <normalize(f'), w> + b

With CLIP, ``w`` starts at ``t_a - t_n`` and ``scale`` is tau, so before any step
``sigmoid(logit) = softmax(tau * [<f, t_n>, <f, t_a>])[a]``: the head reproduces the text patch score.
On a vision-only backbone ``w`` and ``b`` start at zero. Trained with BCE + Dice against synthetic masks.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

ZERO_INIT_SCALE = 10.0


class AdaptationHead(nn.Module):
    """Patch-level anomaly head; see the module docstring for the formula."""

    def __init__(self, dim: int, direction: torch.Tensor | None = None, scale: float | None = None, rank: int = 16):
        super().__init__()
        self.rank = rank
        if rank > 0:
            self.down = nn.Linear(dim, rank, bias=False)
            self.up = nn.Linear(rank, dim, bias=False)
            nn.init.zeros_(self.up.weight)
        self.w = nn.Parameter(direction.detach().clone().float() if direction is not None else torch.zeros(dim))
        self.b = nn.Parameter(torch.zeros(()))
        self.scale = float(scale if scale is not None else ZERO_INIT_SCALE)

    def forward(self, features: torch.Tensor, normalized: bool = False) -> torch.Tensor:
        """Logits ``(...,)`` of ``(..., D)`` features; ``normalized=True`` skips their L2 normalisation
        (the caller has done it, e.g. once before many training steps)."""
        f = features.float() if normalized else F.normalize(features.float(), dim=-1)
        if self.rank > 0:
            f = F.normalize(f + self.up(F.gelu(self.down(f))), dim=-1)
        return self.scale * (f @ self.w) + self.b


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
    seed: int,
) -> list[float]:
    """Full-batch AdamW on ``(M, P, D)`` features vs ``(M, P)`` targets. Returns the loss per step.

    The features are normalised once, not at every step (the head only sees their directions)."""
    torch.manual_seed(seed)
    features = F.normalize(features.float(), dim=-1)
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=weight_decay)
    losses = []
    with torch.enable_grad():
        for _ in range(steps):
            opt.zero_grad(set_to_none=True)
            loss = segmentation_loss(head(features, normalized=True), targets, dice_weight)
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
    return losses
