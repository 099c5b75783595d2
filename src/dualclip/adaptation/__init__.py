"""Test-time adaptation on synthesized anomalies (docs/method.md §7)."""

from .adapt import AdaptationResult, adapt_patch_scores, fit_head, head_inputs, head_scores, patch_targets
from .head import AdaptationHead, segmentation_loss, train_head
from .synthesis import cutpaste, perlin_anomaly, perlin_mask, synthesize, synthesize_batch

__all__ = [
    "AdaptationHead",
    "AdaptationResult",
    "adapt_patch_scores",
    "cutpaste",
    "fit_head",
    "head_scores",
    "head_inputs",
    "patch_targets",
    "perlin_anomaly",
    "perlin_mask",
    "segmentation_loss",
    "synthesize",
    "synthesize_batch",
    "train_head",
]
