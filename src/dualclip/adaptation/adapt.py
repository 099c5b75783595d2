"""Adaptation inside the detector: synthesize anomalies on the test images, train the head, score."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm.auto import tqdm

from ..backbone import Backbone, BackboneOutput, extract_features
from ..config import resolve_precision
from ..scoring.matching import to_match_space
from .head import AdaptationHead, train_head
from .synthesis import synthesize_batch


def head_inputs(feats: BackboneOutput, use_text: bool) -> torch.Tensor:
    """The features the head sees: joint-space V-V tokens (CLIP), or the matching layers' tokens in the cosine
    space (L2-normalised, averaged over 3 x 3, re-normalised), concatenated."""
    if use_text and feats.patch_embeddings is not None:
        return feats.patch_embeddings
    return torch.cat([to_match_space(t, feats.grid, "cosine", 3) for t in feats.match_features], dim=-1)


def patch_targets(masks: list[np.ndarray], size: int, grid: tuple[int, int]) -> torch.Tensor:
    """Boolean masks -> the fraction of each patch they cover, ``(M, P)``."""
    out = []
    for m in masks:
        small = Image.fromarray(m.astype(np.uint8) * 255).resize((size, size), Image.NEAREST)
        t = torch.from_numpy(np.array(small))
        out.append(F.adaptive_avg_pool2d(t[None, None].float() / 255.0, grid).reshape(-1))
    return torch.stack(out)


def base_images(prior_scores: torch.Tensor | None, fraction: float) -> list[int] | None:
    """Indices of the most normal-looking images (lowest unadapted image scores), ``ceil(fraction * N)``
    of them; ``None`` (all images) without prior scores or with ``fraction`` 1."""
    if prior_scores is None or fraction >= 1.0:
        return None
    keep = max(1, math.ceil(fraction * prior_scores.numel()))
    return sorted(torch.argsort(prior_scores, stable=True)[:keep].tolist())


def _fit(
    backbone, sources, n, seed, text, temperature, cfg, use_text, bases=None
) -> tuple[AdaptationHead, list[float]]:
    arrays = [np.asarray(img) for img in sources]
    synth = synthesize_batch(arrays, n, seed, bases)
    pils = [Image.fromarray(img) for img, _, _ in synth]
    precision = resolve_precision(cfg.precision, str(next(backbone.parameters()).device), cfg.runtime)
    feats = extract_features(
        backbone, pils, cfg.batch_size, keep_patch_embeddings=use_text, desc="adaptation", precision=precision
    )
    x = head_inputs(feats, use_text)
    y = patch_targets([m for _, m, _ in synth], backbone.image_size, feats.grid).to(x.device)
    direction = (text[1] - text[0]) if use_text else None
    generator = torch.Generator().manual_seed(seed)  # the adapter's start is seeded; the global torch RNG untouched
    head = AdaptationHead(x.shape[-1], direction, temperature if use_text else None, cfg.adaptation.rank, generator)
    head = head.to(x.device)  # initialised on the host (the same numbers on any device), trained where x is
    a = cfg.adaptation
    losses = train_head(head, x, y, a.steps, a.lr, a.weight_decay, a.dice_weight, a.anchor)
    return head, losses


@dataclass
class AdaptationResult:
    """What test-time adaptation produced and used.

    Attributes
    ----------
    patch_scores:
        ``(N, P)`` adapted patch scores in [0, 1] of the test images.
    bases:
        Indices of the test images the synthetic anomalies were made from (``scope="category"``; ``None``:
        all images, or every image its own base with ``scope="image"``).
    losses:
        The training losses of each head (one list per head: one head per category, or one per image).
    """

    patch_scores: torch.Tensor
    bases: list[int] | None
    losses: list[list[float]]


def adapt_patch_scores(
    backbone: Backbone,
    images: list[Image.Image],
    feats: BackboneOutput,
    text: torch.Tensor | None,
    temperature: float,
    cfg,
    prior_scores: torch.Tensor | None = None,
) -> AdaptationResult:
    """Adapt on synthetic anomalies and score the test images (``feats`` are theirs).

    ``scope="category"``: one head trained on ``budget`` synthetic images made from the whole set.
    ``scope="image"``: for each image a fresh head trained on ``budget`` synthetic copies of it alone.
    ``budget`` is ``cfg.adaptation.synthetic_budget(N)``. With ``prior_scores`` (``(N,)`` unadapted image
    scores), category synthesis starts only from the ``base_fraction`` most normal-looking images
    (:func:`base_images`).
    """
    use_text = text is not None and backbone.has_text
    x_test = head_inputs(feats, use_text)
    a = cfg.adaptation
    budget = a.synthetic_budget(len(images))
    if a.scope == "category":
        bases = base_images(prior_scores, a.base_fraction)
        head, losses = _fit(backbone, images, budget, cfg.seed, text, temperature, cfg, use_text, bases)
        with torch.no_grad():
            return AdaptationResult(torch.sigmoid(head(x_test)), bases, [losses])
    out = torch.empty(x_test.shape[:2], device=x_test.device)
    all_losses = []
    for i in tqdm(range(len(images)), desc="adapting per image", disable=not cfg.progress, leave=False):
        head, losses = _fit(backbone, [images[i]], budget, cfg.seed + i, text, temperature, cfg, use_text)
        all_losses.append(losses)
        with torch.no_grad():
            out[i] = torch.sigmoid(head(x_test[i]))
    return AdaptationResult(out, None, all_losses)


def fit_head(
    backbone: Backbone, images: list[Image.Image], text: torch.Tensor | None, temperature: float, cfg
) -> tuple[AdaptationHead, list[float]]:
    """A head trained on anomalies synthesized on ``images`` (all of them bases: normal images at fit time)."""
    use_text = text is not None and backbone.has_text
    budget = cfg.adaptation.synthetic_budget(len(images))
    return _fit(backbone, images, budget, cfg.seed, text, temperature, cfg, use_text)


def head_scores(head: AdaptationHead, feats: BackboneOutput, use_text: bool) -> torch.Tensor:
    """``(N, P)`` patch probabilities of a trained head."""
    with torch.no_grad():
        return torch.sigmoid(head(head_inputs(feats, use_text)))
