"""Backbones: frozen feature extractors behind one interface (:class:`Backbone`)."""

from __future__ import annotations

from .base import Backbone, BackboneOutput, extract_features
from .clip import CLIP_PRESETS, ClipBackbone, WeightsUnavailableError, build_clip_backbone, load_open_clip
from .dinov2 import DINOV2_NAME, DinoV2Backbone
from .effnet import EFFNET_NAME, EffNetLite0Backbone

__all__ = [
    "Backbone",
    "BackboneOutput",
    "CLIP_PRESETS",
    "ClipBackbone",
    "DinoV2Backbone",
    "EffNetLite0Backbone",
    "WeightsUnavailableError",
    "build_backbone",
    "extract_features",
    "load_open_clip",
    "matching_defaults",
]


def matching_defaults(backbone: str) -> tuple[str, tuple[int, ...]]:
    """The (distance, neighbourhood sizes) a backbone uses when the settings leave them at ``None`` (without
    building it: eval fingerprints record them)."""
    cls = {DINOV2_NAME: DinoV2Backbone, EFFNET_NAME: EffNetLite0Backbone}.get(backbone, ClipBackbone)
    return cls.default_distance, tuple(cls.default_neighbourhood)


def build_backbone(config) -> Backbone:
    """Build the backbone a :class:`~dualclip.config.DetectorConfig` names, on its (resolved) device."""
    from ..config import resolve_device

    device = resolve_device(config.device)
    if config.backbone == DINOV2_NAME:
        backbone: Backbone = DinoV2Backbone(
            pretrained=config.pretrained,
            image_size=config.image_size,
            feature_layers=config.feature_layers,
            vv_start=0 if config.vv_start is None else config.vv_start,
        )
    elif config.backbone == EFFNET_NAME:
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
            vv_start=1 if config.vv_start is None else config.vv_start,
            cache_dir=config.cache_dir,
            device=device,
            quick_gelu=config.quick_gelu,
        )
    return backbone.to(device).eval()
