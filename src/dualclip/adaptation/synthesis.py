"""Anomaly synthesis on the test images themselves (docs/method.md §7): CutPaste, scar, Perlin-noise textures.

Every function takes an ``H x W`` or ``H x W x C`` uint8 array and a ``numpy.random.Generator`` and returns
``(image, mask)``: the altered copy and a boolean ``H x W`` mask that is non-empty, and outside of which
the image is unchanged.
"""

from __future__ import annotations

import numpy as np

KINDS = ("cutpaste", "scar", "perlin")


def _as_hwc(image: np.ndarray) -> tuple[np.ndarray, bool]:
    image = np.asarray(image)
    if image.ndim == 2:
        return image[..., None], True
    if image.ndim != 3:
        raise ValueError(f"expected an H x W or H x W x C image, got shape {image.shape}")
    return image, False


def _restore(image: np.ndarray, squeeze: bool) -> np.ndarray:
    return image[..., 0] if squeeze else image


def cutpaste(image: np.ndarray, rng: np.random.Generator, scar: bool = False, source: np.ndarray | None = None):
    """Cut a rectangle (a thin one for ``scar``) from ``source`` (default: the image), jitter its
    brightness, paste it elsewhere."""
    img, squeeze = _as_hwc(image)
    h, w, c = img.shape
    src = img if source is None else _as_hwc(np.asarray(source))[0]
    if src.shape[2] != c:
        src = np.repeat(src.mean(axis=2, keepdims=True), c, axis=2).astype(img.dtype)
    if scar:
        ph, pw = (
            max(1, int(rng.integers(max(1, h // 5), max(2, h // 2)))),
            max(1, int(rng.integers(1, max(2, w // 24) + 1))),
        )
        if rng.random() < 0.5:
            ph, pw = pw, max(1, min(w, ph))
    else:
        ph = max(1, int(rng.integers(max(1, h // 10), max(2, h // 4) + 1)))
        pw = max(1, int(rng.integers(max(1, w // 10), max(2, w // 4) + 1)))
    ph, pw = min(ph, h, src.shape[0]), min(pw, w, src.shape[1])
    sy, sx = int(rng.integers(0, src.shape[0] - ph + 1)), int(rng.integers(0, src.shape[1] - pw + 1))
    patch = src[sy : sy + ph, sx : sx + pw].astype(np.float32)
    patch = patch * rng.uniform(0.6, 1.4) + rng.uniform(-40, 40)
    patch = np.clip(patch, 0, 255).astype(img.dtype)
    ty, tx = int(rng.integers(0, h - ph + 1)), int(rng.integers(0, w - pw + 1))
    out = img.copy()
    out[ty : ty + ph, tx : tx + pw] = patch
    mask = np.zeros((h, w), dtype=bool)
    mask[ty : ty + ph, tx : tx + pw] = True
    return _restore(out, squeeze), mask


def perlin_noise(h: int, w: int, rng: np.random.Generator, res: int) -> np.ndarray:
    """2-D Perlin (gradient) noise in about [-1, 1] with ``res`` lattice cells along each side."""
    gy = np.linspace(0, res, h, endpoint=False)
    gx = np.linspace(0, res, w, endpoint=False)
    yy, xx = np.meshgrid(gy, gx, indexing="ij")
    y0, x0 = yy.astype(int), xx.astype(int)
    fy, fx = yy - y0, xx - x0
    angles = rng.uniform(0, 2 * np.pi, (res + 1, res + 1))
    grads = np.stack([np.cos(angles), np.sin(angles)], axis=-1)

    def dot(iy, ix, dy, dx):
        g = grads[iy, ix]
        return g[..., 0] * dy + g[..., 1] * dx

    n00 = dot(y0, x0, fy, fx)
    n10 = dot(y0 + 1, x0, fy - 1, fx)
    n01 = dot(y0, x0 + 1, fy, fx - 1)
    n11 = dot(y0 + 1, x0 + 1, fy - 1, fx - 1)
    ty, tx = (6 * fy**5 - 15 * fy**4 + 10 * fy**3), (6 * fx**5 - 15 * fx**4 + 10 * fx**3)
    return np.sqrt(2) * ((n00 * (1 - ty) + n10 * ty) * (1 - tx) + (n01 * (1 - ty) + n11 * ty) * tx)


def perlin_mask(h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    """A thresholded Perlin blob mask; never empty (falls back to an ellipse)."""
    for _ in range(8):
        res = int(rng.choice([2, 4, 8]))
        noise = perlin_noise(h, w, rng, res)
        mask = noise > rng.uniform(0.4, 0.6)
        if mask.any() and mask.mean() < 0.5:
            return mask
    yy, xx = np.mgrid[0:h, 0:w]
    cy, cx = rng.integers(0, h), rng.integers(0, w)
    ry, rx = max(1, h // 8), max(1, w // 8)
    return ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1


def perlin_anomaly(image: np.ndarray, rng: np.random.Generator, source: np.ndarray | None = None):
    """Fill a Perlin mask with a foreign texture blended in (DRAEM style).

    The texture is a rotated, tile-shuffled copy of ``source`` (another image of the set), or procedural
    noise when no source is given; the blend factor is random in [0.5, 1].
    """
    img, squeeze = _as_hwc(image)
    h, w, c = img.shape
    if source is not None:
        src, _ = _as_hwc(np.asarray(source))
        src = np.rot90(src, int(rng.integers(1, 4)))
        if src.shape[2] != c:
            src = np.repeat(src.mean(axis=2, keepdims=True), c, axis=2)
        reps = (int(np.ceil(h / src.shape[0])) + 1, int(np.ceil(w / src.shape[1])) + 1, 1)
        tex = np.tile(src, reps)[:h, :w].astype(np.float32)
        # shuffle 4 x 4 tiles so the texture is foreign to the image's layout
        th, tw = max(1, h // 4), max(1, w // 4)
        tiles = [tex[i * th : (i + 1) * th, j * tw : (j + 1) * tw].copy() for i in range(4) for j in range(4)]
        order = rng.permutation(len(tiles))
        for k, t in enumerate(order):
            i, j = divmod(k, 4)
            tex[i * th : (i + 1) * th, j * tw : (j + 1) * tw] = tiles[t]
    else:
        tex = (perlin_noise(h, w, rng, int(rng.choice([4, 8, 16])))[..., None] * 127 + 128) * np.ones((1, 1, c))
    mask = perlin_mask(h, w, rng)
    beta = rng.uniform(0.5, 1.0)
    out = img.astype(np.float32)
    blended = (1 - beta) * out + beta * tex
    out[mask] = blended[mask]
    out = np.clip(np.rint(out), 0, 255).astype(img.dtype)
    return _restore(out, squeeze), mask


def synthesize(image: np.ndarray, rng: np.random.Generator, source: np.ndarray | None = None, kind: str | None = None):
    """One synthetic anomaly of a random (or the given) kind."""
    kind = kind or str(rng.choice(KINDS))
    if kind == "cutpaste":
        return cutpaste(image, rng, scar=False, source=source)
    if kind == "scar":
        return cutpaste(image, rng, scar=True, source=source)
    if kind == "perlin":
        return perlin_anomaly(image, rng, source=source)
    raise ValueError(f"unknown synthesis kind {kind!r}; choose from {KINDS}")


def synthesize_batch(
    images: list[np.ndarray], n: int, seed: int, bases: list[int] | None = None
) -> list[tuple[np.ndarray, np.ndarray, int]]:
    """``n`` synthetic anomalies made from ``images``; each takes its foreign texture from another image of
    the list. The base images (``bases``: their indices, default all) are taken in a seeded random order,
    each used once before any is used twice, so the result does not depend on how the images are ordered
    (an evaluation that lists normal images first must not feed only normal bases).
    Returns ``(image, mask, index of the image it was made from)``."""
    rng = np.random.default_rng(seed)
    pool = np.arange(len(images)) if bases is None else np.asarray(bases, dtype=np.int64)
    if pool.size == 0:
        raise ValueError("synthesize_batch needs at least one base image")
    order = rng.permutation(pool)
    out = []
    for i in range(n):
        base = int(order[i % len(order)])
        other = images[int(rng.integers(0, len(images)))] if len(images) > 1 else None
        img, mask = synthesize(images[base], rng, source=other)
        out.append((img, mask, base))
    return out
