"""The field's dataset layouts (METHOD.md §8): MVTec AD, VisA, MPDD, BTAD and a generic folder layout.

Images are loaded lazily; masks are resized with nearest neighbour and binarised (> 127).
"""

from __future__ import annotations

import csv
import glob
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from .images import IMAGE_SUFFIXES, load_image


class DatasetLayoutError(ValueError):
    """A dataset root does not match the expected layout."""


@dataclass
class Sample:
    path: Path
    label: int  # 0 normal, 1 anomalous
    mask: Path | None = None
    defect: str = "good"


@dataclass
class Category:
    """The test samples of one category; ``references``: optional golden normal images (few-shot
    evaluation compares every test image with them instead of with the other test images)."""

    name: str
    samples: list[Sample] = field(default_factory=list)
    references: list[Path] = field(default_factory=list)

    @property
    def labels(self) -> np.ndarray:
        return np.array([s.label for s in self.samples], dtype=np.int64)

    def images(self):
        return [load_image(s.path) for s in self.samples]

    def masks(self, size: int) -> np.ndarray:
        """``(N, size, size)`` boolean masks; normal samples without a mask are all False."""
        out = np.zeros((len(self.samples), size, size), dtype=bool)
        for i, s in enumerate(self.samples):
            if s.mask is not None:
                with Image.open(s.mask) as m:
                    out[i] = np.asarray(m.convert("L").resize((size, size), Image.NEAREST)) > 127
            elif s.label == 1:
                raise DatasetLayoutError(f"anomalous image without a mask: {s.path}")
        return out


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
        for defect_dir in sorted((root / name / "test").iterdir()):
            if not defect_dir.is_dir():
                continue
            for img in _images_in(defect_dir):
                if defect_dir.name == "good":
                    cat.samples.append(Sample(img, 0))
                    continue
                gt_dir = root / name / "ground_truth" / defect_dir.name
                cands = [gt_dir / f"{img.stem}_mask.png", gt_dir / f"{img.stem}.png", gt_dir / f"{img.stem}.bmp"]
                mask = next((c for c in cands if c.is_file()), None)
                if mask is None:
                    raise DatasetLayoutError(f"no mask for {img}; expected {cands[0]}")
                cat.samples.append(Sample(img, 1, mask, defect_dir.name))
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
            mask = next((c for c in sorted(gt.glob(f"{img.stem}.*")) if c.suffix.lower() in IMAGE_SUFFIXES), None)
            if mask is None:
                raise DatasetLayoutError(f"no mask for {img} under {gt}")
            cat.samples.append(Sample(img, 1, mask, "ko"))
        out.append(cat)
    return out


def visa(root: str | Path, categories: list[str] | None = None) -> list[Category]:
    """VisA with the official ``<root>/split_csv/1cls.csv`` (columns object, split, label, image, mask);
    the test split is used."""
    root = Path(root)
    csv_path = root / "split_csv" / "1cls.csv"
    if not csv_path.is_file():
        raise DatasetLayoutError(
            f"{root}: expected the VisA split file {csv_path} (columns object,split,label,image,mask)"
        )
    cats: dict[str, Category] = {}
    with open(csv_path, newline="") as fh:
        for row in csv.DictReader(fh):
            if row.get("split") != "test":
                continue
            label = 1 if row["label"].strip().lower() in ("anomaly", "1", "bad") else 0
            mask = root / row["mask"] if label and row.get("mask") else None
            cats.setdefault(row["object"], Category(row["object"])).samples.append(
                Sample(root / row["image"], label, mask, "anomaly" if label else "good")
            )
    names = _pick(sorted(cats), categories, root, "rows of split_csv/1cls.csv")
    return [cats[n] for n in names]


def _glob_all(patterns: list[str]) -> list[list[Path]]:
    groups = []
    for pat in patterns:
        p = Path(pat)
        files = (
            _images_in(p)
            if p.is_dir()
            else sorted(Path(f) for f in glob.glob(pat, recursive=True) if Path(f).is_file())
        )
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
) -> list[Category]:
    """A generic layout: folders or glob patterns of normal and of anomalous images, masks matched by file
    stem (``<stem><mask_suffix>``, default ``<stem>_mask.png`` or ``<stem>.png``) in ``mask_dirs`` (default:
    beside each image). With ``images`` instead, labels come from the masks (all-zero or no mask = normal).
    ``max_*`` keep the first N in name order, taken in turn from each pattern (so classes stay balanced).
    """
    dirs = [Path(d) for d in mask_dirs or []]
    cat = Category(name)
    if images:
        for img in _round_robin(_glob_all(images), None):
            mask = _find_mask(img, dirs, mask_suffix)
            label = 0
            if mask is not None:
                with Image.open(mask) as m:
                    label = int((np.asarray(m.convert("L")) > 127).any())
            cat.samples.append(Sample(img, label, mask if label else None, "anomaly" if label else "good"))
        normal_s = [s for s in cat.samples if s.label == 0][:max_normal]
        anomalous_s = [s for s in cat.samples if s.label == 1][:max_anomalous]
        cat.samples = normal_s + anomalous_s
    else:
        if not normal and not anomalous:
            raise DatasetLayoutError(
                "folder layout: give normal and/or anomalous image folders or patterns (or images)"
            )
        for img in _round_robin(_glob_all(normal or []), max_normal):
            cat.samples.append(Sample(img, 0))
        for img in _round_robin(_glob_all(anomalous or []), max_anomalous):
            mask = _find_mask(img, dirs, mask_suffix)
            if mask is None:
                raise DatasetLayoutError(
                    f"no mask for anomalous image {img} (looked for <stem>{mask_suffix or '_mask.png'})"
                )
            cat.samples.append(Sample(img, 1, mask, img.parent.name))
    return [cat]


LAYOUTS = {"mvtec": mvtec, "mpdd": mvtec, "btad": btad, "visa": visa}
