"""Loading images of any common mode as 8-bit RGB, with clear errors for bad files (METHOD.md §1)."""

from __future__ import annotations

import glob
import os
import warnings
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
DEFAULT_MAX_PIXELS = 100_000_000  # decompression-bomb limit


class ImageLoadError(ValueError):
    """A file that is not a readable image; ``path`` and ``reason`` say which and why."""

    def __init__(self, path: str | os.PathLike, reason: str) -> None:
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


def to_rgb8(img: Image.Image) -> Image.Image:
    """Any PIL mode to 8-bit RGB: 16/32-bit and float scaled to their range, RGBA/LA composited on black,
    palette and CMYK converted."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        if img.mode.startswith("I;16"):
            arr = arr / 257.0
        elif arr.size and (arr.max() > 255 or arr.min() < 0):
            lo, hi = float(arr.min()), float(arr.max())
            arr = (arr - lo) / (hi - lo) * 255.0 if hi > lo else np.zeros_like(arr)
        img = Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), mode="L")
    if img.mode == "P":
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA"):
        background = Image.new("RGBA", img.size, (0, 0, 0, 255))
        img = Image.alpha_composite(background, img.convert("RGBA"))
    return img.convert("RGB") if img.mode != "RGB" else img


def load_image(path: str | os.PathLike, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Read an image as 8-bit RGB, EXIF orientation applied.

    Raises :class:`ImageLoadError` for a missing, empty, truncated, non-image or over-large file.
    """
    p = Path(path)
    if not p.is_file():
        raise ImageLoadError(p, "file not found")
    if p.stat().st_size == 0:
        raise ImageLoadError(p, "empty file (0 bytes)")
    old = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = max_pixels
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(p) as img:
                if max_pixels is not None and img.width * img.height > max_pixels:
                    raise ImageLoadError(p, f"{img.width}x{img.height} pixels exceeds the limit of {max_pixels}")
                img.load()
                img = ImageOps.exif_transpose(img)
                return to_rgb8(img)
    except ImageLoadError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageLoadError(p, f"too many pixels (decompression-bomb limit {max_pixels}): {exc}") from exc
    except UnidentifiedImageError as exc:
        raise ImageLoadError(p, "not an image file (format not recognised)") from exc
    except OSError as exc:
        raise ImageLoadError(p, f"corrupt or truncated image: {exc}") from exc
    finally:
        Image.MAX_IMAGE_PIXELS = old


def expand_paths(inputs: Iterable[str | os.PathLike]) -> list[Path]:
    """Files, folders (recursively, image suffixes only) and glob patterns -> sorted unique files.

    A named file is kept whatever its suffix (so a bad file gets its own error later); a pattern or
    folder that matches nothing raises ``FileNotFoundError``.
    """
    out: list[Path] = []
    for item in inputs:
        s = str(item)
        p = Path(s)
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                raise FileNotFoundError(f"no images ({', '.join(IMAGE_SUFFIXES)}) under folder {p}")
            out.extend(found)
        elif p.is_file():
            out.append(p)
        elif any(ch in s for ch in "*?["):
            found = sorted(Path(f) for f in glob.glob(s, recursive=True) if Path(f).is_file())
            if not found:
                raise FileNotFoundError(f"no file matches pattern {s}")
            out.extend(found)
        else:
            raise FileNotFoundError(f"no such file or folder: {s}")
    seen: set[Path] = set()
    unique = []
    for f in out:
        key = f.resolve()
        if key not in seen:
            seen.add(key)
            unique.append(f)
    return unique
