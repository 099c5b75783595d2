"""Generated textures with synthetic defects: an offline stand-in dataset for demos and tests."""

from __future__ import annotations

import numpy as np
from PIL import Image


def _texture(rng: np.random.Generator, size: int, phase: float) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    base = 0.5 + 0.2 * np.sin(2 * np.pi * (6 * xx + phase)) * np.sin(2 * np.pi * (6 * yy + phase))
    base += rng.normal(0, 0.03, (size, size)).astype(np.float32)
    return np.clip(base, 0, 1)


def make_texture_set(
    n_normal: int = 6, n_anomalous: int = 4, size: int = 128, seed: int = 0
) -> tuple[list[Image.Image], list[np.ndarray], list[int]]:
    """Periodic grey textures; anomalous ones carry a dark scratch or a bright blob.

    Returns ``(images, masks, labels)``: RGB PIL images, boolean ``(size, size)`` masks, 0/1 labels.
    """
    rng = np.random.default_rng(seed)
    images, masks, labels = [], [], []
    for i in range(n_normal + n_anomalous):
        tex = _texture(rng, size, phase=float(rng.uniform(0, 0.1)))
        mask = np.zeros((size, size), dtype=bool)
        if i >= n_normal:
            yy, xx = np.mgrid[0:size, 0:size]
            cy, cx = rng.integers(size // 4, 3 * size // 4, size=2)
            if i % 2 == 0:
                r = max(3, size // 12)
                mask = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
                tex[mask] = 1.0
            else:
                half = size // 5
                mask = (np.abs(yy - cy) <= max(1, size // 64)) & (np.abs(xx - cx) <= half)
                tex[mask] = 0.0
        rgb = np.repeat((tex * 255).astype(np.uint8)[..., None], 3, axis=2)
        images.append(Image.fromarray(rgb))
        masks.append(mask)
        labels.append(int(i >= n_normal))
    return images, masks, labels
