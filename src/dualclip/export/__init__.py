"""ONNX export (``dualclip export``): the one-pass image encoder, scored with onnxruntime in place of torch
(:class:`OnnxBackbone`), or a fitted profile's whole model from image to score and anomaly map
(:func:`export_model`)."""

from .model import ProfileGraph, export_model
from .onnx import OnnxBackbone, export_onnx, model_identity, onnx_cache_path, onnx_metadata, output_names

__all__ = [
    "OnnxBackbone",
    "ProfileGraph",
    "export_model",
    "export_onnx",
    "model_identity",
    "onnx_cache_path",
    "onnx_metadata",
    "output_names",
]
