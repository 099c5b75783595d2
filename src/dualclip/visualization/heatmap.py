"""Heat-map overlays with one colour scale for the whole run, and binary masks."""

from __future__ import annotations

import numpy as np
from matplotlib import colormaps
from PIL import Image, ImageDraw

COLORMAP = "jet"


def run_scale(maps: list[np.ndarray], low_pct: float = 1.0, high_pct: float = 99.9) -> tuple[float, float]:
    """One (vmin, vmax) for every map of a run: percentiles of all their pixels together, so a normal image
    looks cool and a defect hot (per-image scaling would paint every image's maximum red)."""
    sample = np.concatenate([m[:: max(1, m.shape[0] // 64), :: max(1, m.shape[1] // 64)].ravel() for m in maps])
    vmin, vmax = np.percentile(sample, [low_pct, high_pct])
    if vmax <= vmin:
        vmax = vmin + 1e-6
    return float(vmin), float(vmax)


def colorize(m: np.ndarray, vmin: float, vmax: float) -> np.ndarray:
    """Map values to RGB uint8 with the run's scale."""
    x = np.clip((m - vmin) / (vmax - vmin), 0, 1)
    return (colormaps[COLORMAP](x)[..., :3] * 255).astype(np.uint8)


def overlay(
    image: Image.Image, m: np.ndarray, vmin: float, vmax: float, alpha: float = 0.45, bar: bool = True
) -> Image.Image:
    """The image with its anomaly map blended on top (same size), and a colour bar with the scale's ends."""
    heat = Image.fromarray(colorize(m, vmin, vmax))
    out = Image.blend(image.convert("RGB"), heat, alpha)
    if not bar:
        return out
    h = out.height
    width = max(40, h // 8)
    canvas = Image.new("RGB", (out.width + width + 4, h), (255, 255, 255))
    canvas.paste(out, (0, 0))
    ramp = np.linspace(1, 0, max(h - 24, 2))[:, None] * np.ones((1, 12))
    canvas.paste(Image.fromarray(colorize(ramp, 0, 1)), (out.width + 4, 12))
    draw = ImageDraw.Draw(canvas)
    draw.text((out.width + 18, 0), f"{vmax:.3g}", fill=(0, 0, 0))
    draw.text((out.width + 18, h - 12), f"{vmin:.3g}", fill=(0, 0, 0))
    return canvas


def binary_mask(m: np.ndarray, threshold: float) -> Image.Image:
    """Pixels at or above the threshold -> 255, else 0 (8-bit 'L')."""
    return Image.fromarray(((m >= threshold) * 255).astype(np.uint8), mode="L")
