"""Backbones: frozen feature extractors behind one interface (:class:`Backbone`)."""

from __future__ import annotations

from .base import Backbone, BackboneOutput, extract_features
from .clip import CLIP_PRESETS, ClipBackbone, WeightsUnavailableError, build_clip_backbone, load_open_clip
from .effnet import EFFNET_NAME, EffNetLite0Backbone

__all__ = [
    "Backbone",
    "BackboneOutput",
    "CLIP_PRESETS",
    "ClipBackbone",
    "EffNetLite0Backbone",
    "WeightsUnavailableError",
    "build_backbone",
    "extract_features",
    "load_open_clip",
]


def build_backbone(config) -> Backbone:
    """Build the backbone a :class:`~dualclip.config.DetectorConfig` names."""
    if config.backbone == EFFNET_NAME:
        backbone: Backbone = EffNetLite0Backbone(
            pretrained=config.pretrained,
            image_size=config.image_size,
            feature_layers=config.feature_layers,
        )
    else:
        backbone = build_clip_backbone(
            config.backbone,
            config.pretrained,
            config.image_size,
            feature_layers=config.feature_layers,
            vv_start=config.vv_start,
            cache_dir=config.cache_dir,
            device=config.device,
            quick_gelu=config.quick_gelu,
        )
    return backbone.to(config.device).eval()
