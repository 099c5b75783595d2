"""The plan of an archive run: which images, of which class, are scored together in which block.

Zero-shot scoring needs other images of the same class as references, so the images of each class are
shuffled with the run's seed and cut into blocks of ``block_size``; each block is scored as one run (its
images are each other's references). With a saved profile every image is scored on its own, and blocks only
set the unit of work and of resumption. The plan is a pure function of the inputs, the seed and the block
size: a rerun finds the same blocks under the same ids.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ..errors import ConfigError, InputError

PATH_COLUMN, CLASS_COLUMN = "path", "class"


class ManifestError(InputError):
    """A manifest file that cannot be used (a usage error)."""


@dataclass(frozen=True)
class Block:
    """One unit of work: ``paths`` of one class, scored together.

    ``index``: the position of each path in the whole run (output names use it, so they are unique).
    ``content``: a digest of what the block is scored from (its files' contents, the profile's); a saved block
    is reused only under the same fingerprint and the same content (see ``run.content_key``)."""

    id: str
    class_name: str | None
    paths: tuple[str, ...]
    index: tuple[int, ...]
    content: str | None = None

    @property
    def fingerprint(self) -> str:
        """Identifies the block's content (a finished block is reused only under the same fingerprint)."""
        payload = json.dumps([self.class_name, list(self.paths), list(self.index)])
        return hashlib.sha256(payload.encode()).hexdigest()[:16]

    def to_dict(self) -> dict:
        return {**asdict(self), "paths": list(self.paths), "index": list(self.index), "fingerprint": self.fingerprint}

    @classmethod
    def from_dict(cls, d: dict) -> Block:
        return cls(d["id"], d["class_name"], tuple(d["paths"]), tuple(d["index"]), d.get("content"))


def read_manifest(path: str | os.PathLike) -> list[tuple[str, str | None]]:
    """``(path, class)`` rows of a CSV or Parquet manifest with a ``path`` column and an optional ``class``
    column; relative paths are taken relative to the manifest's folder."""
    path = Path(path)
    if not path.is_file():
        raise ManifestError(f"manifest not found: {path}")
    if path.suffix.lower() == ".parquet":
        import pyarrow.parquet as pq

        table = pq.read_table(path)
        columns = table.column_names
        rows = table.to_pylist()
    else:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            columns = [c.strip() for c in reader.fieldnames or []]
            rows = [{k.strip(): v for k, v in row.items() if k is not None} for row in reader]
    if PATH_COLUMN not in columns:
        raise ManifestError(f"{path}: no '{PATH_COLUMN}' column (columns: {', '.join(columns) or 'none'})")
    out, empty = [], []
    for line, row in enumerate(rows, start=2):
        p = str(row.get(PATH_COLUMN) or "").strip()
        if not p:
            empty.append(line)
            continue
        full = p if os.path.isabs(p) else str(path.parent / p)
        cls = row.get(CLASS_COLUMN)
        out.append((full, str(cls).strip() if cls not in (None, "") else None))
    if empty:
        shown = ", ".join(map(str, empty[:5])) + (" ..." if len(empty) > 5 else "")
        raise ManifestError(f"{path}: {len(empty)} row(s) without a path (rows {shown})")
    if not out:
        raise ManifestError(f"{path}: no rows")
    return out


def plan_blocks(
    items: Iterable[tuple[str, str | None]], block_size: int = 200, seed: int = 0, shuffle: bool = True
) -> list[Block]:
    """Cut ``(path, class)`` items into blocks of at most ``block_size`` images of one class.

    Each class's images are shuffled with a generator seeded by ``seed`` (``shuffle=False``: input order), then
    split into ``ceil(n / block_size)`` blocks of near-equal size (never a lone image when the class has more).
    Classes are taken in order of first appearance; duplicate paths are kept once."""
    if block_size < 2:
        raise ConfigError(f"block_size must be >= 2 (a block's images are each other's references), got {block_size}")
    seen: set[str] = set()
    by_class: dict[str | None, list[tuple[int, str]]] = {}
    n = 0
    for p, cls in items:
        if p in seen:
            continue
        seen.add(p)
        by_class.setdefault(cls, []).append((n, p))
        n += 1
    blocks = []
    for c, (cls, members) in enumerate(by_class.items()):
        order = np.arange(len(members))
        if shuffle:
            order = np.random.default_rng([seed, c]).permutation(len(members))
        chunks = max(1, -(-len(members) // block_size))
        for b, part in enumerate(np.array_split(order, chunks)):
            chosen = [members[i] for i in part]
            slug = "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in (cls or "all"))[:40]
            blocks.append(
                Block(
                    id=f"{c:03d}-{slug}-{b:05d}",
                    class_name=cls,
                    paths=tuple(p for _, p in chosen),
                    index=tuple(i for i, _ in chosen),
                )
            )
    return blocks
