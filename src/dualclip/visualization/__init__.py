"""Visualisation: heat-map overlays on one scale per run, binary masks, the HTML report."""

from .heatmap import HeatmapScale, binary_mask, colorize, outline, overlay, profile_scale, run_scale
from .report import render_report

__all__ = [
    "HeatmapScale",
    "binary_mask",
    "colorize",
    "outline",
    "overlay",
    "profile_scale",
    "render_report",
    "run_scale",
]
