"""Data: robust image loading and the field's dataset layouts."""

from .images import IMAGE_SUFFIXES, Expanded, ImageLoadError, array_to_rgb, expand_paths, load_image, to_rgb8

__all__ = ["IMAGE_SUFFIXES", "Expanded", "ImageLoadError", "array_to_rgb", "expand_paths", "load_image", "to_rgb8"]
