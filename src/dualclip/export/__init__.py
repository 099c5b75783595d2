"""Export of the one-pass image encoder to ONNX, and scoring with onnxruntime (``dualclip export``)."""

from .onnx import OnnxBackbone, export_onnx, model_identity, onnx_cache_path, onnx_metadata, output_names

__all__ = ["OnnxBackbone", "export_onnx", "model_identity", "onnx_cache_path", "onnx_metadata", "output_names"]
