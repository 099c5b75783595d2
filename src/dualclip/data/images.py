"""Loading images of any common mode as 8-bit RGB, with clear errors for bad files (docs/method.md §1)."""

from __future__ import annotations

import fnmatch
import glob
import hashlib
import io
import os
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path, PurePath

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from ..errors import InputError, InputNotFoundError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".gif")
DEFAULT_MAX_PIXELS = 100_000_000
"""Decompression-bomb limit: a file declaring more pixels than this is refused before decoding."""
DEFAULT_MAX_SIDE = 2048
"""Images whose longer side exceeds this are decoded reduced (JPEG: at decode time; others: right after)
so that no image is held larger than needed; outputs are written at the reduced size."""
OUTPUT_MARKER = ".dualclip-output.json"
"""The file that marks a folder written by dualclip (never read as input; see :func:`expand_paths`)."""
OUTPUT_LOCK_SUFFIX = ".dualclip.lock"
"""The lock file beside an output folder, ``.<name>.dualclip.lock`` (never read as input either)."""


class ImageLoadError(InputError):
    """A file that is not a readable image; ``path`` and ``reason`` say which and why."""

    def __init__(self, path: str | os.PathLike, reason: str) -> None:
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


def to_rgb8(img: Image.Image) -> Image.Image:
    """Any PIL mode to 8-bit RGB: 16/32-bit and float scaled to their range, RGBA/LA composited on black,
    palette and CMYK converted."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        img = Image.fromarray(_grey8(np.asarray(img)), mode="L")
    if img.mode == "P":
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA"):
        background = Image.new("RGBA", img.size, (0, 0, 0, 255))
        img = Image.alpha_composite(background, img.convert("RGBA"))
    return img.convert("RGB") if img.mode != "RGB" else img


def _grey8(arr: np.ndarray, rows: int = 256) -> np.ndarray:
    """A 16-bit, 32-bit or float grey image as 8 bits: 16-bit divided by 257, others kept where they lie in
    [0, 255] and else scaled from their range; computed ``rows`` rows at a time (float64 of a whole 100 MP image
    would take 800 MB per copy)."""
    lo = hi = 0.0
    sixteen = arr.dtype.kind == "u" and arr.dtype.itemsize == 2
    if not sixteen and arr.size and not (arr.dtype.kind == "f" and np.isnan(arr).all()):
        lo, hi = float(np.nanmin(arr)), float(np.nanmax(arr))
    scaled = not sixteen and (hi > 255 or lo < 0)
    out = np.empty(arr.shape, dtype=np.uint8)
    with np.errstate(invalid="ignore", over="ignore"):  # NaN (a float TIFF's holes) becomes 0
        for start in range(0, arr.shape[0], rows):
            block = arr[start : start + rows].astype(np.float64)
            if sixteen:
                block /= 257.0
            elif scaled:
                block = (block - lo) / (hi - lo) * 255.0 if hi > lo else np.zeros_like(block)
            out[start : start + rows] = np.clip(np.nan_to_num(np.rint(block), nan=0.0), 0, 255)
    return out


def array_to_rgb(array) -> Image.Image:
    """An image given as an array, as 8-bit RGB.

    numpy: ``H x W`` (grey) or ``H x W x C`` (C = 1, 3 or 4), uint8 (0-255) or float (0-1). torch tensors: the
    same, or ``C x H x W`` (torchvision's layout, recognised by C in 1, 3, 4 first and not last).
    """
    if type(array).__module__.startswith("torch"):
        t = array.detach().cpu()
        if t.ndim == 3 and t.shape[0] in (1, 3, 4) and t.shape[-1] not in (1, 3, 4):
            t = t.permute(1, 2, 0)
        array = t.numpy()
    a = np.asarray(array)
    if a.ndim == 3 and a.shape[-1] == 1:
        a = a[..., 0]
    if not (a.ndim == 2 or (a.ndim == 3 and a.shape[-1] in (3, 4))):
        raise InputError(f"an image array must be H x W or H x W x 3 (or 4), got shape {a.shape}")
    if a.dtype != np.uint8:
        if a.dtype.kind == "f":
            if a.size and (np.nanmin(a) < 0 or np.nanmax(a) > 1):
                raise InputError("a float image array must hold values in [0, 1]")
            a = np.rint(np.nan_to_num(a) * 255)
        elif a.dtype.kind in "iub" and a.size and (a.min() < 0 or a.max() > 255):
            raise InputError(f"an integer image array must hold values in [0, 255], got dtype {a.dtype}")
        a = a.astype(np.uint8)
    return to_rgb8(Image.fromarray(a))


def thumbnails(images: list[Image.Image], side: int = 32):
    """``(N, side * side)`` float32 tensor of grey thumbnails (0-255), for near-duplicate detection."""
    import torch

    arrs = [np.asarray(img.convert("L").resize((side, side), Image.BILINEAR), dtype=np.float32) for img in images]
    return torch.from_numpy(np.stack(arrs).reshape(len(images), -1))


def pixel_digest(img: Image.Image) -> str:
    """SHA-256 of an image's decoded pixels, mode and size: equal for equal images, whatever file or listing
    they came from."""
    h = hashlib.sha256(f"{img.mode} {img.width}x{img.height}".encode())
    h.update(np.ascontiguousarray(np.asarray(img)).tobytes())
    return h.hexdigest()


def grey_spread(img: Image.Image) -> float:
    """Standard deviation of an image's grey levels (0-255): 0 for a blank frame."""
    return float(np.asarray(img.convert("L"), dtype=np.float32).std())


def file_fingerprint(path: str | os.PathLike) -> list | None:
    """``[size, mtime_ns, sha256 of the content]`` of a file (``None`` where it cannot be read): another file
    at the same path gives another fingerprint, even with the same size and modification time."""
    try:
        st = os.stat(path)
        h = hashlib.sha256()
        with open(path, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    except OSError:
        return None
    return [st.st_size, st.st_mtime_ns, h.hexdigest()]


_TRANSPOSED_ORIENTATIONS = (5, 6, 7, 8)  # EXIF orientations that swap width and height


def image_size(path: str | os.PathLike) -> tuple[int, int]:
    """``(width, height)`` of an image file as :func:`load_image` returns it (EXIF orientation applied), from
    its header alone."""
    with Image.open(path) as img:
        w, h = img.size
        return (h, w) if img.getexif().get(0x0112) in _TRANSPOSED_ORIENTATIONS else (w, h)


def load_image(
    path: str | os.PathLike, max_pixels: int | None = DEFAULT_MAX_PIXELS, max_side: int | None = None
) -> Image.Image:
    """Read an image as 8-bit RGB, EXIF orientation applied (animated files: the first frame).

    ``max_side``: decode at most this many pixels along the longer side (JPEG reduces while decoding, other
    formats right after it), keeping the aspect ratio. Raises :class:`ImageLoadError` for a missing, empty,
    truncated, non-image or over-large file.
    """
    p = Path(path)
    if not p.is_file():
        raise ImageLoadError(p, "file not found")
    if p.stat().st_size == 0:
        raise ImageLoadError(p, "empty file (0 bytes)")
    try:
        f = open(p, "rb")  # noqa: SIM115 - closed below
    except OSError as exc:
        raise ImageLoadError(p, f"cannot read the file: {exc}") from exc
    with f:
        return _decode(f, p, max_pixels, max_side)


def load_images(
    paths: list[str | os.PathLike], num_workers: int = 0, max_side: int | None = None, strict: bool = False
) -> list[Image.Image | ImageLoadError]:
    """:func:`load_image` over ``paths``, in ``num_workers`` threads (0: in this thread); in input order, each
    entry the image or the :class:`ImageLoadError` it raised (decoders release the GIL, so threads overlap).
    ``strict``: raise the first error (in input order) instead."""
    loaded = _load_images(paths, num_workers, max_side)
    if strict:
        bad = next((x for x in loaded if isinstance(x, ImageLoadError)), None)
        if bad is not None:
            raise bad
    return loaded


def _load_images(paths, num_workers: int, max_side: int | None) -> list[Image.Image | ImageLoadError]:

    def one(p) -> Image.Image | ImageLoadError:
        try:
            return load_image(p, max_side=max_side)
        except ImageLoadError as exc:
            return exc

    if num_workers <= 0 or len(paths) < 2:
        return [one(p) for p in paths]
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=num_workers, thread_name_prefix="dualclip-decode") as pool:
        return list(pool.map(one, paths))


def decode_image(
    data: bytes, name: str = "<upload>", max_pixels: int | None = DEFAULT_MAX_PIXELS, max_side: int | None = None
) -> Image.Image:
    """:func:`load_image` for an encoded image held in memory (an upload); ``name`` labels the errors."""
    if not data:
        raise ImageLoadError(name, "empty file (0 bytes)")
    return _decode(io.BytesIO(data), name, max_pixels, max_side)


def _decode(source, name, max_pixels: int | None, max_side: int | None) -> Image.Image:
    old = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = max_pixels
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(source) as img:
                if max_pixels is not None and img.width * img.height > max_pixels:
                    raise ImageLoadError(name, f"{img.width}x{img.height} pixels exceeds the limit of {max_pixels}")
                original = img.size
                if max_side is not None and max(img.size) > max_side:
                    img = _reduced(img, max_side)
                img.load()
                img = to_rgb8(ImageOps.exif_transpose(img))
                if img.size != original and img.size != original[::-1]:
                    img.info["original_size"] = original
                return img
    except ImageLoadError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageLoadError(name, f"too many pixels (decompression-bomb limit {max_pixels}): {exc}") from exc
    except UnidentifiedImageError as exc:
        raise ImageLoadError(name, "not an image file (format not recognised)") from exc
    except OSError as exc:
        raise ImageLoadError(name, f"corrupt or truncated image: {exc}") from exc
    except MemoryError:
        raise
    except Exception as exc:  # decoders raise many types on malformed data (ValueError, SyntaxError, ...)
        raise ImageLoadError(name, f"corrupt image ({type(exc).__name__}: {exc})") from exc
    finally:
        Image.MAX_IMAGE_PIXELS = old


def _reduced(img: Image.Image, max_side: int) -> Image.Image:
    """``img`` with its longer side at most ``max_side``: JPEG by DCT scaling while decoding, other formats by
    an integer ``reduce`` (box filter) right after decoding, then a resize to the exact bound."""
    scale = max_side / max(img.size)
    target = (max(1, round(img.width * scale)), max(1, round(img.height * scale)))
    if img.format == "JPEG":
        img.draft(img.mode if img.mode in ("RGB", "L") else None, target)
    img.load()
    if img.mode.startswith("I;16") or img.mode in ("I", "F"):  # 8-bit grey, made RGB after the reduction
        img = Image.fromarray(_grey8(np.asarray(img)), mode="L")
    factor = max(1, min(img.width // target[0], img.height // target[1]))
    if factor > 1:
        img = img.reduce(factor)
    if max(img.size) > max_side:
        img = img.resize(target, Image.BILINEAR)
    return img


@dataclass
class Expanded:
    """The files an input list names, and every path that was passed over with the reason why; ``masks``:
    the ``(mask, image)`` pairs among them whose mask was left out (:func:`paired_masks`), also in ``skipped``."""

    files: list[Path]
    skipped: list[tuple[str, str]]
    masks: list[tuple[Path, Path]] = field(default_factory=list)


def is_dualclip_output(folder: Path) -> bool:
    """A folder dualclip wrote (it holds the output marker) or is writing (a hidden staging sibling)."""
    return (folder / OUTPUT_MARKER).is_file() or (folder.name.startswith(".") and ".dualclip-" in folder.name)


def expand_paths(
    inputs: Iterable[str | os.PathLike],
    exclude: Iterable[str | os.PathLike] = (),
    exclude_patterns: Iterable[str] = (),
) -> Expanded:
    """Files, folders (recursively, image suffixes only) and glob patterns -> unique files in order.

    ``exclude_patterns`` (``--exclude``): glob patterns matched against each file's name and, from the
    right, its path (``*_mask.png``, ``ground_truth/*``); matching files are passed over with the pattern.

    A named file is kept whatever its suffix (so a bad file gets its own error later); an explicitly named
    folder is expanded like any folder (also one named ``x.png``). Passed over, each with its reason in
    ``skipped``: files without an image suffix inside folders, unreadable sub-folders, the folders under
    ``exclude`` (e.g. the output folder), and folders dualclip wrote (:func:`is_dualclip_output`), so that no
    output is ever read back as an input. Links to folders are followed, each real folder read once (a link
    to a folder already read, e.g. a loop, is passed over). A path that does not exist, or inputs that yield no file at all,
    raise ``FileNotFoundError``.
    """
    excluded = [Path(e).resolve() for e in exclude]

    def is_excluded(p: Path) -> bool:
        r = p.resolve()
        return any(r == e or e in r.parents for e in excluded)

    out: list[Path] = []
    skipped: list[tuple[str, str]] = []

    def walk(folder: Path) -> None:
        def onerror(exc: OSError) -> None:
            skipped.append((str(exc.filename or folder), f"folder cannot be read: {exc.strerror or exc}"))

        read = {os.path.realpath(folder): folder}  # folders read, by real path: each link followed once, no loop
        for dirpath, dirnames, filenames in os.walk(folder, onerror=onerror, followlinks=True):
            here = Path(dirpath)
            keep = []
            for d in sorted(dirnames):
                sub = here / d
                try:
                    written = is_dualclip_output(sub)
                except OSError as exc:  # a folder this user may not enter
                    skipped.append((str(sub), f"folder cannot be read: {exc.strerror or exc}"))
                    continue
                real = os.path.realpath(sub)
                if is_excluded(sub):
                    skipped.append((str(sub), "the output folder (never read as input)"))
                elif written:
                    skipped.append((str(sub), "a folder written by dualclip (never read as input)"))
                elif real in read:
                    link = "a link to " if sub.is_symlink() else ""
                    skipped.append((str(sub), f"{link}a folder already read ({read[real]})"))
                else:
                    read[real] = sub
                    keep.append(d)
            dirnames[:] = keep
            for name in sorted(filenames):
                f = here / name
                if name == OUTPUT_MARKER or (name.startswith(".") and name.endswith(OUTPUT_LOCK_SUFFIX)):
                    continue
                if f.suffix.lower() in IMAGE_SUFFIXES:
                    out.append(f)
                else:
                    skipped.append((str(f), f"not an image file name (suffixes: {' '.join(IMAGE_SUFFIXES)})"))

    for item in inputs:
        s = os.fsdecode(item)
        p = Path(s)
        if p.is_dir():
            try:
                written = is_dualclip_output(p)
            except OSError as exc:
                skipped.append((str(p), f"folder cannot be read: {exc.strerror or exc}"))
                continue
            if is_excluded(p) or written:
                skipped.append((str(p), "the output folder or a folder written by dualclip (never read as input)"))
            else:
                walk(p)
        elif p.is_file():
            out.append(p)
        elif any(ch in s for ch in "*?["):
            found = sorted(Path(f) for f in glob.glob(s, recursive=True))
            if not found:
                raise InputNotFoundError(f"no file matches pattern {s}")
            for f in found:
                if f.is_dir():
                    continue
                if is_excluded(f) or any(is_dualclip_output(d) for d in f.parents):
                    skipped.append((str(f), "inside the output folder or a folder written by dualclip"))
                else:
                    out.append(f)
        else:
            raise InputNotFoundError(f"no such file or folder: {s}")
    patterns = list(exclude_patterns)
    if patterns:
        kept = []
        for f in out:
            pat = next((q for q in patterns if fnmatch.fnmatch(f.name, q) or PurePath(f).match(q)), None)
            if pat is None:
                kept.append(f)
            else:
                skipped.append((str(f), f"excluded by exclude_patterns={pat}"))
        out = kept
    seen: set[Path] = set()
    unique = []
    for f in out:
        key = f.resolve()
        if key not in seen:
            seen.add(key)
            unique.append(f)
    masks = paired_masks(unique)
    if masks:
        left_out = {m for m, _ in masks}
        unique = [f for f in unique if f not in left_out]
        skipped += [(str(m), f"the ground-truth mask of {img.name} beside it (same name, binary)") for m, img in masks]
    if not unique:
        why = "; ".join(f"{p}: {r}" for p, r in skipped[:5])
        raise InputNotFoundError(f"no image files in the inputs{' (' + why + ')' if why else ''}")
    return Expanded(unique, skipped, masks)


BINARY_FRACTION = 0.9
"""A picture is binary (:func:`looks_binary`) when at least this fraction of its pixels hold its darkest or its
brightest grey value (anti-aliased 0/255 masks: >= 0.98 on magnetic_tile; its photographs: <= 0.18)."""


def looks_binary(path: Path) -> bool:
    """Whether the picture at ``path`` looks like a mask: nearly every pixel at its darkest or brightest grey
    value (:data:`BINARY_FRACTION`; an all-black mask too). Read at most 256 px wide; unreadable: False."""
    try:
        with Image.open(path) as img:
            if img.width * img.height > DEFAULT_MAX_PIXELS:  # never decoded (load_image refuses it too)
                return False
            if img.format == "JPEG":
                img.draft("L", (256, 256))
            grey = img.convert("L")
    except (OSError, ValueError, Image.DecompressionBombError):
        return False
    grey.thumbnail((256, 256), Image.NEAREST)  # nearest: no blending that would invent grey levels
    hist = np.asarray(grey.histogram())
    used = np.flatnonzero(hist)
    extremes = hist[used[0]] + (hist[used[-1]] if used[-1] != used[0] else 0)
    return bool(extremes >= BINARY_FRACTION * hist.sum())


def paired_masks(paths: list[Path]) -> list[tuple[Path, Path]]:
    """``(mask, image)`` for each file that is the ground-truth mask of an image beside it, as magnetic_tile
    keeps them (``x.jpg`` with its mask ``x.png``): the same folder and stem, another suffix, and the one binary
    picture (:func:`looks_binary`) of the pair. Pairs whose files are both binary, or neither, are kept."""
    groups: dict[tuple[Path, str], list[Path]] = {}
    for p in paths:
        groups.setdefault((p.parent, p.stem.lower()), []).append(p)
    found = []
    for group in groups.values():
        if len(group) < 2:
            continue
        binary = [p for p in group if looks_binary(p)]
        if 0 < len(binary) < len(group):
            image = next(p for p in group if p not in binary)
            found += [(m, image) for m in binary]
    return found


MASK_FOLDERS = ("ground_truth", "gt", "mask", "masks", "label", "labels")
MASK_SUFFIXES = ("_mask", "-mask", ".mask", "_gt", "-gt", "_label")


def mask_like(paths: Iterable[Path]) -> list[Path]:
    """The files that look like ground-truth masks rather than images to inspect: a stem ending in
    ``_mask``/``_gt``/... or a parent folder named ``ground_truth``/``masks``/... (checked by name only)."""
    found = []
    for p in paths:
        stem, parents = p.stem.lower(), {q.name.lower() for q in p.parents}
        if stem.endswith(MASK_SUFFIXES) or parents & set(MASK_FOLDERS):
            found.append(p)
    return found
