"""Visualisation: heat-map overlays on one colour scale, binary masks, outlines, the HTML report."""

from .heatmap import (
    THRESHOLD_POSITION,
    HeatmapScale,
    binary_mask,
    colorize,
    edges,
    normal_scale,
    outline,
    outline_layer,
    overlay,
    profile_scale,
    run_scale,
)
from .report import render_report

__all__ = [
    "THRESHOLD_POSITION",
    "HeatmapScale",
    "binary_mask",
    "colorize",
    "edges",
    "normal_scale",
    "outline",
    "outline_layer",
    "overlay",
    "profile_scale",
    "render_report",
    "run_scale",
]
