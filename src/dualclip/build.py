"""Build the backbone a :class:`~dualclip.config.DetectorConfig` names, in the runtime it names (torch, or the
same backbone's exported graph run by onnxruntime).

It lives above both :mod:`dualclip.backbone` and :mod:`dualclip.export`: the backbones know nothing of their
export, so the package's imports stay free of circles (``tests/test_imports.py``)."""

from __future__ import annotations

import logging

from .backbone import DINOV2_NAME, EFFNET_NAME, Backbone, DinoV2Backbone, EffNetLite0Backbone, build_clip_backbone
from .errors import ConfigError, MissingDependencyError

log = logging.getLogger(__name__)


def build_backbone(config) -> Backbone:
    """Build the backbone a :class:`~dualclip.config.DetectorConfig` names, on its (resolved) device."""
    from .config import resolve_device

    device = resolve_device(config.device)
    if config.border == "reflect" and config.backbone != EFFNET_NAME:
        raise ConfigError(
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
            from .export.onnx import OnnxBackbone, export_onnx, model_identity, onnx_cache_path
        except ImportError as exc:  # pragma: no cover - the convert extra is missing
            raise MissingDependencyError(
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
                log.warning("the cached ONNX export is not usable (%s); exporting it again", exc)
        path.parent.mkdir(parents=True, exist_ok=True)
        export_onnx(backbone, path, identity=identity)
        backbone = OnnxBackbone(backbone, path, identity=identity)
    return backbone
