"""Backbones: frozen feature extractors behind one interface (:class:`Backbone`)."""

from __future__ import annotations

from ..errors import WeightsUnavailableError  # importable from here too (its home before dualclip.errors)
from .base import Backbone, BackboneOutput, extract_features
from .clip import CLIP_PRESETS, ClipBackbone, build_clip_backbone, load_open_clip
from .dinov2 import DINOV2_NAME, DinoV2Backbone
from .effnet import EFFNET_NAME, EffNetLite0Backbone

__all__ = [
    "Backbone",
    "BackboneOutput",
    "CLIP_PRESETS",
    "DINOV2_NAME",
    "EFFNET_NAME",
    "ClipBackbone",
    "DinoV2Backbone",
    "EffNetLite0Backbone",
    "WeightsUnavailableError",
    "build_clip_backbone",
    "extract_features",
    "load_open_clip",
    "matching_defaults",
]


def matching_defaults(backbone: str) -> tuple[str, tuple[int, ...], str, str, str]:
    """The (distance, neighbourhood sizes, hybrid_norm, centring, border) a backbone uses when the settings leave
    them at ``None`` (without building it: eval fingerprints record them)."""
    cls = {DINOV2_NAME: DinoV2Backbone, EFFNET_NAME: EffNetLite0Backbone}.get(backbone, ClipBackbone)
    return (
        cls.default_distance,
        tuple(cls.default_neighbourhood),
        cls.default_hybrid_norm,
        cls.default_centring,
        cls.default_border,
    )
