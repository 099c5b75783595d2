"""Heat-map overlays with one colour scale for the whole run, and binary masks."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from matplotlib import colormaps
from PIL import Image, ImageDraw, ImageFont

COLORMAP = "jet"
_LUT = (colormaps[COLORMAP](np.linspace(0, 1, 256))[:, :3] * 255).round().astype(np.uint8)  # constant


@dataclass(frozen=True)
class HeatmapScale:
    """The colour scale of a run: ``vmin`` maps to the coolest colour, ``vmax`` to the hottest.

    ``flat``: every map pixel of the run has (to float precision) the same value; the maps are then drawn in
    the coolest colour, never as float noise turned into hot spots.
    """

    vmin: float
    vmax: float
    flat: bool = False

    def to_dict(self) -> dict:
        note = "one scale for the whole run (1st-99.9th percentile of all map pixels), in anomaly-score units"
        if self.flat:
            note = "flat: every map pixel of the run has the same value; drawn in the coolest colour"
        return {"vmin": self.vmin, "vmax": self.vmax, "flat": self.flat, "colormap": COLORMAP, "note": note}


def run_scale(maps: list[np.ndarray], low_pct: float = 1.0, high_pct: float = 99.9) -> HeatmapScale:
    """One scale for every map of a run: percentiles of all their pixels together, so a normal image looks
    cool and a defect hot (per-image scaling would paint every image's maximum red). Maps holding values that
    are not finite (images without a usable score) are left out; with none left the scale is flat at 0."""
    maps = [m for m in maps if np.isfinite(m).all()]
    if not maps:
        return HeatmapScale(0.0, 0.0, flat=True)
    sample = np.concatenate([m[:: max(1, m.shape[0] // 64), :: max(1, m.shape[1] // 64)].ravel() for m in maps])
    lo, hi = float(min(m.min() for m in maps)), float(max(m.max() for m in maps))
    if hi - lo <= 1e-6 * max(1.0, abs(hi), abs(lo)):
        return HeatmapScale(lo, hi, flat=True)
    vmin, vmax = np.percentile(sample, [low_pct, high_pct])
    if vmax <= vmin:
        vmin, vmax = lo, hi
    return HeatmapScale(float(vmin), float(vmax))


def profile_scale(profile) -> HeatmapScale:
    """The one colour scale of a saved profile's heat maps (service and archive runs): from the lowest normal
    score of ``profile`` (a :class:`~dualclip.profile.Profile`; coolest) to its threshold (hottest), or to the
    highest normal score + 3 without one."""
    normal = np.asarray(profile.normal_scores, dtype=np.float64)
    threshold = None if profile.threshold is None else profile.threshold.value
    vmin = float(normal.min())
    vmax = float(threshold) if threshold is not None and threshold > vmin else float(normal.max()) + 3.0
    return HeatmapScale(vmin, vmax)


def colorize(m: np.ndarray, scale: HeatmapScale) -> np.ndarray:
    """Map values to RGB uint8 with the run's scale (a 256-entry lookup table: one byte per pixel of work)."""
    if scale.flat:
        return np.broadcast_to(_LUT[0], (*m.shape, 3)).copy()
    idx = np.clip((m - scale.vmin) * (255.0 / (scale.vmax - scale.vmin)), 0, 255)
    return _LUT[np.rint(idx).astype(np.uint8)]


def overlay(
    image: Image.Image, m: np.ndarray, scale: HeatmapScale, alpha: float = 0.45, bar: bool = True
) -> Image.Image:
    """The image with its anomaly map blended on top (same size), and a colour bar labelled with the scale's
    ends (``flat`` when the run's maps are constant); the bar is as wide as its labels."""
    heat = Image.fromarray(colorize(m, scale))
    out = Image.blend(image.convert("RGB"), heat, alpha)
    if not bar:
        return out
    font = ImageFont.load_default()
    labels = ("flat", f"{scale.vmin:.3g}") if scale.flat else (f"{scale.vmax:.3g}", f"{scale.vmin:.3g}")
    probe = ImageDraw.Draw(out)
    text_w = int(max(probe.textlength(t, font=font) for t in labels)) + 2
    h = max(out.height, 40)
    width = 18 + text_w
    canvas = Image.new("RGB", (out.width + width + 4, h), (255, 255, 255))
    canvas.paste(out, (0, 0))
    ramp = np.linspace(1, 0, max(h - 24, 2))[:, None] * np.ones((1, 12))
    bar_scale = HeatmapScale(0.0, 0.0, flat=True) if scale.flat else HeatmapScale(0.0, 1.0)
    canvas.paste(Image.fromarray(colorize(ramp, bar_scale)), (out.width + 4, 12))
    draw = ImageDraw.Draw(canvas)
    draw.text((out.width + 18, 0), labels[0], fill=(0, 0, 0), font=font)
    draw.text((out.width + 18, h - 12), labels[1], fill=(0, 0, 0), font=font)
    return canvas


def binary_mask(m: np.ndarray, threshold: float) -> Image.Image:
    """Pixels at or above the threshold -> 255, else 0 (8-bit 'L')."""
    return Image.fromarray(((m >= threshold) * 255).astype(np.uint8), mode="L")


def outline(image: Image.Image, mask: np.ndarray, color: tuple[int, int, int] = (255, 255, 255)) -> Image.Image:
    """``image`` with the boundary of ``mask`` (``(H, W)`` bool, at the image's size or the size of its left
    part, e.g. an overlay with a colour bar) drawn in ``color``: a defect's outline over its heat map."""
    from scipy.ndimage import binary_erosion

    edge = mask & ~binary_erosion(mask, border_value=0)
    out = np.asarray(image.convert("RGB")).copy()
    h, w = edge.shape
    out[:h, :w][edge] = color
    return Image.fromarray(out)
