"""Backbones: frozen feature extractors behind one interface (:class:`Backbone`)."""

from __future__ import annotations

import warnings

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


def build_backbone(config) -> Backbone:
    """Build the backbone a :class:`~dualclip.config.DetectorConfig` names, on its (resolved) device."""
    from ..config import resolve_device

    device = resolve_device(config.device)
    if config.border == "reflect" and config.backbone != EFFNET_NAME:
        raise ValueError(
            f"border='reflect' pads a convolutional backbone's input; {config.backbone!r} has no zero padding to "
            "replace: leave border at None"
        )
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
            border=config.border,
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
    backbone = backbone.to(device).eval()
    if config.runtime == "onnxruntime":
        try:
            from ..export.onnx import OnnxBackbone, export_onnx, model_identity, onnx_cache_path
        except ImportError as exc:  # pragma: no cover - the convert extra is missing
            raise ValueError(
                f"runtime='onnxruntime' needs onnx and onnxruntime: pip install 'dualclip[convert]' ({exc})"
            ) from exc
        identity = model_identity(backbone)  # once: it hashes every weight
        if config.onnx_file is not None:
            return OnnxBackbone(backbone, config.onnx_file, identity=identity)
        path = onnx_cache_path(backbone, config.cache_dir, identity)
        if path.is_file():
            try:
                return OnnxBackbone(backbone, path, identity=identity)
            except ValueError as exc:  # an export of an earlier version, or a changed file: the cache is ours
                warnings.warn(f"the cached ONNX export is not usable ({exc}); exporting it again", stacklevel=2)
        path.parent.mkdir(parents=True, exist_ok=True)
        export_onnx(backbone, path, identity=identity)
        backbone = OnnxBackbone(backbone, path, identity=identity)
    return backbone
