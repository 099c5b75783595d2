"""The field's dataset layouts (docs/method.md §8): MVTec AD, VisA, MPDD, BTAD and a generic folder layout.

Images are loaded lazily. Masks are binarised as the datasets' own tools do (``!= 0`` on one channel; palette
masks by index, not by grey level; see :func:`read_mask`), then resized with nearest neighbour. Anomalous images
without a mask are kept: they count in the image-level metrics and are left out of the pixel metrics
(``require_masks=True`` makes a missing mask an error instead). Every problem a loader can see is reported
before any scoring starts, all at once, with file and line.
"""

from __future__ import annotations

import csv
import dataclasses
import glob
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from ..errors import ConfigError, InputError
from .images import IMAGE_SUFFIXES, MASK_FOLDERS, image_size, load_images, paired_masks


class DatasetLayoutError(InputError):
    """A dataset root does not match the expected layout."""


def read_mask(path: str | Path, threshold: int = 0) -> np.ndarray:
    """A ground-truth mask file as a boolean ``(H, W)`` array: ``True`` where the defect is.

    A pixel is a defect where its value on one channel exceeds ``threshold`` (default 0: ``!= 0``, as the
    official VisA ``prepare_data.py`` and anomalib's datamodules do; raw VisA masks store defects as small
    integers 1, 2, ...). Palette images are read by palette index (index 0 = background), never through
    their colours' grey level; colour masks by their brightest channel; 1-bit and 16-bit masks as they are.
    """
    with Image.open(path) as m:
        if m.mode in ("P", "PA"):
            arr = np.asarray(m if m.mode == "P" else m.convert("P"))
        elif m.mode in ("RGB", "RGBA", "CMYK", "YCbCr", "LAB", "HSV"):
            arr = np.asarray(m.convert("RGB")).max(axis=-1)
        elif m.mode == "LA":
            arr = np.asarray(m.getchannel(0))
        else:  # "1", "L", "I;16*", "I", "F"
            arr = np.asarray(m)
    return np.asarray(arr > threshold)


def _resize_mask(mask: np.ndarray, size: int) -> np.ndarray:
    img = Image.fromarray(mask.astype(np.uint8) * 255)
    return np.asarray(img.resize((size, size), Image.NEAREST)) > 0


@dataclass
class Sample:
    path: Path
    label: int  # 0 normal, 1 anomalous
    mask: Path | None = None  # None for a normal image (all False) or an anomalous image without a mask
    defect: str = "good"


@dataclass
class Category:
    """The test samples of one category; ``references``: optional golden normal images (few-shot
    evaluation compares every test image with them instead of with the other test images)."""

    name: str
    samples: list[Sample] = field(default_factory=list)
    references: list[Path] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    """What the loader noticed that is no error (e.g. ``1cls.csv line 12: anomaly without a mask``)."""
    mask_threshold: int = 0
    """A mask pixel is a defect where its value exceeds this (:func:`read_mask`); 0 = any nonzero value."""
    train: list[Path] = field(default_factory=list)
    """The layout's normal training images (MVTec ``train/good``, BTAD ``train/ok``, VisA's train split):
    where :func:`with_shots` draws few-shot golden references from."""

    @property
    def defects(self) -> list[str]:
        """The defect types of the anomalous samples, sorted."""
        return sorted({s.defect for s in self.samples if s.label == 1})

    @property
    def labels(self) -> np.ndarray:
        return np.array([s.label for s in self.samples], dtype=np.int64)

    @property
    def has_mask(self) -> np.ndarray:
        """``(N,)`` bool: the sample takes part in the pixel metrics (normal, or anomalous with a mask)."""
        return np.array([s.label == 0 or s.mask is not None for s in self.samples], dtype=bool)

    def images(self, num_workers: int = 0):
        """The test images, decoded in ``num_workers`` threads (0: in this thread); the first bad file raises."""
        return load_images([s.path for s in self.samples], num_workers, strict=True)

    def masks(self, size: int) -> np.ndarray:
        """``(N, size, size)`` boolean masks; normal samples without a mask, and anomalous samples without
        one (see :attr:`has_mask`), are all False."""
        out = np.zeros((len(self.samples), size, size), dtype=bool)
        for i, s in enumerate(self.samples):
            if s.mask is not None:
                out[i] = _resize_mask(read_mask(s.mask, self.mask_threshold), size)
        return out

    def check(self, require_masks: bool = False) -> list[str]:
        """Validate before scoring: every image and mask file exists, every mask reads and has its image's size
        (a mask of another size, or turned, would be stretched onto it), and (where masks are given) at least
        one of them marks a defect. Raises :class:`DatasetLayoutError` listing every
        problem at once; returns the warnings (anomalous images without a mask, counted).
        """
        problems, missing_mask = [], []
        any_defect_pixel = False
        if not self.samples:
            problems.append("no test image in this category")
        elif not any(s.label == 0 for s in self.samples):
            problems.append(
                "no normal (defect-free) test image: the metrics compare normal with anomalous images "
                "(MVTec/MPDD: test/good, BTAD: test/ok, folder layout: normal images or all-zero masks)"
            )
        for s in self.samples:
            problem = _image_problem(s.path)
            if problem:
                problems.append(f"{problem}: {s.path}")
            if s.mask is not None:
                if not s.mask.is_file():
                    problems.append(f"mask file not found: {s.mask} (for {s.path})")
                    continue
                try:
                    mask = read_mask(s.mask, self.mask_threshold)
                except OSError as exc:
                    problems.append(f"mask file cannot be read: {s.mask}: {exc}")
                    continue
                if not problem:
                    (iw, ih), (mh, mw) = image_size(s.path), mask.shape
                    if (mw, mh) != (iw, ih):
                        problems.append(
                            f"mask {s.mask} is {mw} x {mh} pixels but its image {s.path} is {iw} x {ih} (width x "
                            "height): a mask must have its image's size"
                        )
                        continue
                any_defect_pixel |= bool(mask.any())
            elif s.label == 1:
                missing_mask.append(s.path)
        if require_masks:
            problems += [f"anomalous image without a mask: {p}" for p in missing_mask]
        with_masks = [s for s in self.samples if s.mask is not None]
        if with_masks and not any_defect_pixel and not problems:
            problems.append(
                f"all {len(with_masks)} masks of category {self.name!r} are empty (no pixel above "
                f"{self.mask_threshold}): pixel metrics would be undefined; check the mask files and the mask threshold"
            )
        if problems:
            raise DatasetLayoutError(_problems(f"category {self.name!r}", problems))
        warnings_ = list(self.notes)
        if missing_mask:
            warnings_.append(
                f"{len(missing_mask)} anomalous image(s) without a mask: scored and counted in the image metrics, "
                "left out of the pixel metrics"
            )
        return warnings_


def _problems(where: str, problems: list[str]) -> str:
    """One line for one problem; a count and one indented line each for several (all reported at once)."""
    if len(problems) == 1:
        return f"{where}: {problems[0]}"
    return f"{where}: {len(problems)} problems:\n  " + "\n  ".join(problems)


def _image_problem(path: Path) -> str | None:
    """Why an image file cannot be used, from its header alone (cheap: nothing is decoded), or None."""
    if not path.is_file():
        return "image file not found"
    if path.stat().st_size == 0:
        return "empty image file (0 bytes)"
    try:
        with Image.open(path):
            return None
    except Exception as exc:  # any decoder error on the header
        return f"not a readable image ({type(exc).__name__})"


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def _pick(categories: list[str], wanted: list[str] | None, root: Path, expected: str) -> list[str]:
    if not categories:
        raise DatasetLayoutError(f"{root}: no category found; expected {expected}")
    if wanted:
        missing = [c for c in wanted if c not in categories]
        if missing:
            raise DatasetLayoutError(f"{root}: categories {missing} not found; available: {categories}")
        return list(wanted)
    return categories


def mvtec(root: str | Path, categories: list[str] | None = None) -> list[Category]:
    """MVTec AD layout (also MPDD): ``<root>/<category>/test/<good|defect>/*.png`` and
    ``<root>/<category>/ground_truth/<defect>/<name>_mask.png``."""
    root = Path(root)
    expected = "<root>/<category>/test/<good|defect>/*.png with <root>/<category>/ground_truth/<defect>/<name>_mask.png"
    if not root.is_dir():
        raise DatasetLayoutError(f"dataset root {root} is not a folder; expected {expected}")
    found = sorted(p.name for p in root.iterdir() if (p / "test").is_dir())
    out = []
    for name in _pick(found, categories, root, expected):
        cat = Category(name)
        mask_dirs = []
        for defect_dir in sorted((root / name / "test").iterdir()):
            if not defect_dir.is_dir():
                continue
            if defect_dir.name.lower() in MASK_FOLDERS:  # masks live in ground_truth/, never read as images
                mask_dirs.append(defect_dir)
                cat.notes.append(f"{defect_dir} is a mask folder: not read as images")
                continue
            for img in _images_in(defect_dir):
                if defect_dir.name == "good":
                    cat.samples.append(Sample(img, 0))
                    continue
                gt_dir = root / name / "ground_truth" / defect_dir.name
                cands = [gt_dir / f"{img.stem}_mask.png", gt_dir / f"{img.stem}.png", gt_dir / f"{img.stem}.bmp"]
                mask = next((c for c in cands if c.is_file()), None)  # None: image-level only (Category.check)
                cat.samples.append(Sample(img, 1, mask, defect_dir.name))
        if mask_dirs and not any(s.label == 0 for s in cat.samples):
            test = root / name / "test"
            images = [d.name for d in sorted(test.iterdir()) if d.is_dir() and d not in mask_dirs]
            raise DatasetLayoutError(
                f"{test} holds {', '.join(f'{d}/' for d in images) or 'no image folder'} and the mask folder "
                f"{mask_dirs[0].name}/, not {expected}: images labelled by masks of the same name are read by the "
                f"folder layout: dataset=folder images={test / (images[0] if images else 'images')} "
                f"masks={mask_dirs[0]}"
            )
        train = root / name / "train" / "good"
        cat.train = _images_in(train) if train.is_dir() else []
        out.append(cat)
    return out


def btad(root: str | Path, categories: list[str] | None = None) -> list[Category]:
    """BTAD layout: ``<root>/<category>/test/{ok,ko}/*`` with ``<root>/<category>/ground_truth/ko/<name>.*``."""
    root = Path(root)
    expected = "<root>/<category>/test/{ok,ko}/* with <root>/<category>/ground_truth/ko/<name>.png|bmp"
    if not root.is_dir():
        raise DatasetLayoutError(f"dataset root {root} is not a folder; expected {expected}")
    found = sorted(p.name for p in root.iterdir() if (p / "test" / "ok").is_dir())
    out = []
    for name in _pick(found, categories, root, expected):
        cat = Category(name)
        for img in _images_in(root / name / "test" / "ok"):
            cat.samples.append(Sample(img, 0))
        ko = root / name / "test" / "ko"
        for img in _images_in(ko) if ko.is_dir() else []:
            gt = root / name / "ground_truth" / "ko"
            found = sorted(gt.glob(f"{img.stem}.*")) if gt.is_dir() else []
            mask = next((c for c in found if c.suffix.lower() in IMAGE_SUFFIXES), None)
            cat.samples.append(Sample(img, 1, mask, "ko"))
        train = root / name / "train" / "ok"
        cat.train = _images_in(train) if train.is_dir() else []
        out.append(cat)
    return out


VISA_COLUMNS = ("object", "split", "label", "image", "mask")
_VISA_LABELS = {"normal": 0, "good": 0, "0": 0, "anomaly": 1, "bad": 1, "1": 1}


def visa(root: str | Path, categories: list[str] | None = None) -> list[Category]:
    """VisA with the official ``<root>/split_csv/1cls.csv`` (columns object, split, label, image, mask);
    the test split is used.

    Fields and header names are stripped of whitespace and a UTF-8 byte-order mark. Every test row is checked
    before anything is scored (unknown label, missing image file, missing mask file); all problems are raised
    at once with their line numbers. An anomalous row with an empty mask field is kept for the image metrics
    and noted (``Category.notes``).
    """
    root = Path(root)
    csv_path = root / "split_csv" / "1cls.csv"
    if not csv_path.is_file():
        raise DatasetLayoutError(
            f"{root}: expected the VisA split file {csv_path} (columns object,split,label,image,mask)"
        )
    cats: dict[str, Category] = {}
    train: dict[str, list[Path]] = {}
    problems: list[str] = []
    with open(csv_path, newline="", encoding="utf-8-sig") as fh:
        reader = csv.reader(fh)
        header = [h.strip().lower() for h in next(reader, [])]
        missing = [c for c in VISA_COLUMNS if c not in header]
        if missing:
            raise DatasetLayoutError(f"{csv_path}: header {header} lacks the column(s) {missing}")
        col = {c: header.index(c) for c in VISA_COLUMNS}
        for line, raw in enumerate(reader, start=2):
            if not any(f.strip() for f in raw):
                continue
            fields = [f.strip() for f in raw] + [""] * (len(header) - len(raw))
            row = {c: fields[i] for c, i in col.items()}
            if row["split"].lower() == "train" and _VISA_LABELS.get(row["label"].lower()) == 0 and row["image"]:
                train.setdefault(row["object"], []).append(root / row["image"])
            if row["split"].lower() != "test":
                continue
            where = f"{csv_path.name} line {line}"
            label = _VISA_LABELS.get(row["label"].lower())
            if label is None:
                problems.append(f"{where}: unknown label {row['label']!r} (expected normal or anomaly)")
                continue
            image = root / row["image"]
            if not row["image"] or not image.is_file():
                problems.append(f"{where}: image file not found: {image}")
            mask = None
            if label and row["mask"]:
                mask = root / row["mask"]
                if not mask.is_file():
                    problems.append(f"{where}: mask file not found: {mask}")
            cat = cats.setdefault(row["object"], Category(row["object"]))
            if label and not row["mask"]:
                cat.notes.append(f"{where}: anomalous image without a mask field: {image}")
            cat.samples.append(Sample(image, label, mask, "anomaly" if label else "good"))
    if problems:
        raise DatasetLayoutError(_problems(str(csv_path), problems))
    names = _pick(sorted(cats), categories, root, "rows of split_csv/1cls.csv")
    for n in names:
        cats[n].train = train.get(n, [])
    return [cats[n] for n in names]


def with_shots(categories: list[Category], shots: int, seed: int = 0) -> list[Category]:
    """Few-shot evaluation: each category gets ``shots`` of its normal training images as golden references,
    drawn without replacement by a generator seeded with ``seed`` (recorded with the results)."""
    if shots < 1:
        raise ConfigError(f"shots must be >= 1, got {shots}")
    out = []
    for cat in categories:
        if len(cat.train) < shots:
            raise DatasetLayoutError(
                f"category {cat.name!r}: shots={shots} needs {shots} normal training images "
                f"(train/good, train/ok or VisA's train split); found {len(cat.train)}"
            )
        pick = np.random.default_rng(seed).choice(len(cat.train), size=shots, replace=False)
        out.append(dataclasses.replace(cat, references=[cat.train[i] for i in sorted(pick)]))
    return out


def _glob_all(patterns: list[str], notes: list[str] | None = None) -> list[list[Path]]:
    """The files of each folder or glob pattern, sorted; the ground-truth masks kept beside their images
    (``x.jpg`` with its mask ``x.png``, :func:`~dualclip.data.images.paired_masks`) left out and counted in
    ``notes``."""
    groups = []
    for pat in patterns:
        p = Path(pat)
        files = (
            _images_in(p)
            if p.is_dir()
            else sorted(Path(f) for f in glob.glob(pat, recursive=True) if Path(f).is_file())
        )
        masks = {m for m, _ in paired_masks(files)}
        if masks and notes is not None:
            notes.append(
                f"{pat}: {len(masks)} mask file(s) beside their images (same name, binary) left out of the images, "
                f"e.g. {min(masks).name}"
            )
        files = [f for f in files if f not in masks]
        if not files:
            raise DatasetLayoutError(f"no image matches {pat}")
        groups.append(files)
    return groups


def _round_robin(groups: list[list[Path]], limit: int | None) -> list[Path]:
    out, i = [], 0
    while any(i < len(g) for g in groups):
        out += [g[i] for g in groups if i < len(g)]
        i += 1
    return out[:limit] if limit else out


def _find_mask(img: Path, mask_dirs: list[Path], suffix: str | None) -> Path | None:
    for d in mask_dirs or [img.parent]:
        for cand in [d / f"{img.stem}{suffix}"] if suffix else [d / f"{img.stem}_mask.png", d / f"{img.stem}.png"]:
            if cand.is_file() and cand.resolve() != img.resolve():
                return cand
    return None


def folder(
    name: str,
    normal: list[str] | None = None,
    anomalous: list[str] | None = None,
    images: list[str] | None = None,
    mask_dirs: list[str] | None = None,
    mask_suffix: str | None = None,
    max_normal: int | None = None,
    max_anomalous: int | None = None,
    mask_threshold: int = 0,
) -> list[Category]:
    """A generic layout: folders or glob patterns of normal and of anomalous images, masks matched by file
    stem (``<stem><mask_suffix>``, default ``<stem>_mask.png`` or ``<stem>.png``) in ``mask_dirs`` (default:
    beside each image). With ``images`` instead, labels come from the masks (all-zero or no mask = normal).
    ``max_*`` keep the first N in name order, taken in turn from each pattern (so classes stay balanced).
    ``mask_threshold``: a mask pixel is a defect above this value (0: nonzero; e.g. 127 for anti-aliased
    0/255 masks such as magnetic_tile's, as its SOURCE.txt advises).
    """
    dirs = [Path(d) for d in mask_dirs or []]
    cat = Category(name, mask_threshold=mask_threshold)
    if images:
        for img in _round_robin(_glob_all(images, cat.notes), None):
            mask = _find_mask(img, dirs, mask_suffix)
            label = 0
            if mask is not None:
                label = int(read_mask(mask, mask_threshold).any())
            cat.samples.append(Sample(img, label, mask if label else None, "anomaly" if label else "good"))
        normal_s = [s for s in cat.samples if s.label == 0][:max_normal]
        anomalous_s = [s for s in cat.samples if s.label == 1][:max_anomalous]
        cat.samples = normal_s + anomalous_s
    else:
        if not normal and not anomalous:
            raise DatasetLayoutError(
                "folder layout: give normal and/or anomalous image folders or patterns (or images)"
            )
        for img in _round_robin(_glob_all(normal or [], cat.notes), max_normal):
            cat.samples.append(Sample(img, 0))
        for img in _round_robin(_glob_all(anomalous or [], cat.notes), max_anomalous):
            mask = _find_mask(img, dirs, mask_suffix)  # None: image-level only (Category.check)
            cat.samples.append(Sample(img, 1, mask, defect_type(img)))
    return [cat]


PLAIN_IMAGE_FOLDERS = ("imgs", "images", "img", "image")
"""Folder names that say only that a folder holds images: the defect type is the folder above."""


def defect_type(image: Path) -> str:
    """The defect type of an anomalous image of the folder layout: its folder's name, or, where that folder
    is a plain image folder (``MT_Crack/Imgs/``), the first folder above it with another name."""
    for folder in image.parents:
        if folder.name and folder.name.lower() not in PLAIN_IMAGE_FOLDERS:
            return folder.name
    return image.parent.name


LAYOUTS = {"mvtec": mvtec, "mpdd": mvtec, "btad": btad, "visa": visa}
