"""Heat-map overlays on one colour scale (the run's, or fixed by a fitted profile), and binary masks."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from matplotlib import colormaps
from PIL import Image

COLORMAP = "jet"
_LUT = (colormaps[COLORMAP](np.linspace(0, 1, 256))[:, :3] * 255).round().astype(np.uint8)  # constant


THRESHOLD_POSITION = 0.85
"""Where a profile's threshold sits on the colour map (0: coolest, 1: hottest): from there up the map is red,
below it blue to orange, so red means at or above the threshold."""


@dataclass(frozen=True)
class HeatmapScale:
    """The colour scale of heat maps: ``vmin`` maps to the coolest colour, ``vmax`` to the hottest.

    ``flat``: every map pixel of the run has (to float precision) the same value; the maps are then drawn in
    the coolest colour, never as float noise turned into hot spots. ``threshold``: the verdict threshold the
    scale was made around (a profile's scale: at :data:`THRESHOLD_POSITION`), or ``None``. ``kind``: ``run``
    (from the run's own maps) or ``profile`` (fixed by a fitted profile: the same in every run and service).
    """

    vmin: float
    vmax: float
    flat: bool = False
    threshold: float | None = None
    kind: str = "run"

    def position(self, value: float) -> float:
        """Where ``value`` falls on the colour map, in [0, 1]."""
        if self.flat:
            return 0.0
        return float(np.clip((value - self.vmin) / (self.vmax - self.vmin), 0.0, 1.0))

    def to_dict(self) -> dict:
        if self.flat:
            note = "flat: every map pixel of the run has the same value; drawn in the coolest colour"
        elif self.kind == "profile":
            note = (
                "fixed by the profile: a typical normal image's score (median) is the coolest colour and the "
                f"threshold sits at {THRESHOLD_POSITION:.2f} of the colour map, so red means at or above it"
                if self.threshold is not None
                else "fixed by the profile: from a typical normal image's score (median) to the highest normal "
                "score + 3 (no threshold)"
            )
        else:
            note = "one scale for the whole run (1st-99.9th percentile of all map pixels), in anomaly-score units"
        return {
            "vmin": self.vmin,
            "vmax": self.vmax,
            "flat": self.flat,
            "kind": self.kind,
            "threshold": self.threshold,
            "threshold_position": None if self.threshold is None or self.flat else self.position(self.threshold),
            "colormap": COLORMAP,
            "note": note,
        }


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


def profile_scale(profile, threshold: float | None = None) -> HeatmapScale:
    """The one colour scale of a fitted profile's heat maps (CLI, report, service and archive runs alike):
    :func:`normal_scale` over its normal images' leave-one-out scores. ``threshold``: the one the verdicts use
    (a manual one), else the profile's."""
    if threshold is None and profile.threshold is not None:
        threshold = profile.threshold.value
    return normal_scale(profile.normal_scores, threshold)


def normal_scale(normal_scores, threshold: float | None = None) -> HeatmapScale:
    """The fixed colour scale of a fitted detector's heat maps, derived from its normal images' leave-one-out
    scores: the coolest colour is a typical normal image's score (their median), and ``threshold`` sits at
    :data:`THRESHOLD_POSITION` of the colour map; without one, the scale ends at the highest normal score + 3
    (profile units are spreads of the normal scores)."""
    normal = np.asarray(normal_scores, dtype=np.float64)
    vmin = float(np.median(normal))
    if threshold is not None and threshold > vmin:
        vmax = vmin + (float(threshold) - vmin) / THRESHOLD_POSITION
        return HeatmapScale(vmin, float(vmax), threshold=float(threshold), kind="profile")
    vmax = max(float(normal.max()), vmin) + 3.0
    return HeatmapScale(vmin, vmax, threshold=None if threshold is None else float(threshold), kind="profile")


def colorize(m: np.ndarray, scale: HeatmapScale) -> np.ndarray:
    """Map values to RGB uint8 with the run's scale (a 256-entry lookup table: one byte per pixel of work)."""
    if scale.flat:
        return np.broadcast_to(_LUT[0], (*m.shape, 3)).copy()
    idx = np.clip((m - scale.vmin) * (255.0 / (scale.vmax - scale.vmin)), 0, 255)
    return _LUT[np.rint(idx).astype(np.uint8)]


HEATMAP_ALPHA = 0.45
"""Weight of the colours over the image in a heat-map overlay."""


def overlay(image: Image.Image, m: np.ndarray, scale: HeatmapScale, alpha: float = HEATMAP_ALPHA) -> Image.Image:
    """The image with its anomaly map blended on top, pixel-aligned: the same width and height as ``image``
    (``m`` is at the image's size); the colour bar is drawn by the report, never baked into the map."""
    if m.shape != (image.height, image.width):
        raise ValueError(f"the anomaly map is {m.shape[1]}x{m.shape[0]}, the image {image.width}x{image.height}")
    heat = Image.fromarray(colorize(m, scale))
    return Image.blend(image.convert("RGB"), heat, alpha)


def colour_ramp(width: int = 256) -> list[str]:
    """The colour map as ``#rrggbb`` stops from coolest to hottest (``width`` of them): the report's colour bar."""
    idx = np.linspace(0, 255, width).round().astype(int)
    return ["#" + "".join(f"{int(c):02x}" for c in _LUT[i]) for i in idx]


def binary_mask(m: np.ndarray, threshold: float) -> Image.Image:
    """Pixels at or above the threshold -> 255, else 0 (8-bit 'L')."""
    return Image.fromarray(((m >= threshold) * 255).astype(np.uint8), mode="L")


def edges(mask: np.ndarray) -> np.ndarray:
    """The boundary pixels of ``mask`` (``(H, W)`` bool): the mask less its erosion."""
    from scipy.ndimage import binary_erosion

    mask = np.asarray(mask, dtype=bool)
    return mask & ~binary_erosion(mask, border_value=0)


def outline(image: Image.Image, mask: np.ndarray, color: tuple[int, int, int] = (255, 255, 255)) -> Image.Image:
    """``image`` with the boundary of ``mask`` (``(H, W)`` bool, at the image's size) drawn in ``color``."""
    edge = edges(mask)
    out = np.asarray(image.convert("RGB")).copy()
    h, w = edge.shape
    out[:h, :w][edge] = color
    return Image.fromarray(out)


def outline_layer(size: tuple[int, int], outlines: list[tuple[np.ndarray, tuple[int, int, int]]]) -> Image.Image:
    """A transparent RGBA picture of ``size`` (width, height) holding the boundaries of each ``(mask, colour)``
    in ``outlines`` (later ones drawn over earlier ones): laid over a heat map without changing its pixels."""
    w, h = size
    out = np.zeros((h, w, 4), np.uint8)
    for mask, colour in outlines:
        edge = edges(mask)
        if edge.shape != (h, w):
            raise ValueError(f"an outline's mask is {edge.shape[1]}x{edge.shape[0]}, the picture {w}x{h}")
        out[edge] = (*colour, 255)
    return Image.fromarray(out, mode="RGBA")
