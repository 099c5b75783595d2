"""One prediction row: the same fields for ``dualclip predict``, archive runs and every table format."""

from __future__ import annotations

import csv
import io
import os
import re
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path


def display_path(p: str | os.PathLike) -> str:
    """A path as text for JSON, CSV and HTML: bytes that are not UTF-8 are shown as ``\\xNN``."""
    return os.fsencode(p).decode("utf-8", "backslashreplace")


def terminal_text(text: str) -> str:
    """Text safe to print on a terminal, one line: control characters (escape sequences, newlines, carriage
    returns, bells) shown as ``\\xNN`` / ``\\n`` instead of acting on the terminal."""
    return "".join(ch if ch.isprintable() else ascii(ch)[1:-1] for ch in text)


def output_stem(index: int, path: Path, max_len: int = 48) -> str:
    """A safe, unique output file stem: the input's index, then its stem reduced to ``[A-Za-z0-9._-]`` and
    shortened (any name the file system allows gives a valid, short output name)."""
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", display_path(Path(path).stem)).strip("._")[:max_len]
    return f"{index:05d}_{stem}" if stem else f"{index:05d}"


@dataclass
class PredictionRow:
    """The result for one input file, as every table of predictions holds it.

    Attributes
    ----------
    index:
        The file's place among the run's inputs (its output files are named after it).
    path:
        The file, as text (:func:`display_path`).
    class_name:
        The class the image was scored as (text prompts, or the profile's class), or ``None``.
    block:
        The archive block that scored it (``None`` outside archive runs).
    score, verdict, reason, threshold:
        The image score, ``defective`` / ``ok`` / ``unusable`` (``None`` without a threshold or a score), why
        the image is unusable, and the threshold of the verdict.
    branch_scores:
        Each branch's image score.
    references:
        What the image was compared with: ``profile``, ``golden``, or the paths of its partners in the run.
    heatmap, mask, map:
        The written heat map, binary mask and raw anomaly map, relative to the output folder (``None``: not
        written).
    size, original_size:
        ``[width, height]`` the image was scored at, and of the file when it was decoded reduced.
    error:
        Why the file has no score (``None`` for a scored file).
    """

    index: int
    path: str
    class_name: str | None = None
    block: str | None = None
    score: float | None = None
    verdict: str | None = None
    reason: str | None = None
    threshold: float | None = None
    branch_scores: dict[str, float] = field(default_factory=dict)
    references: str | list[str] | None = None
    heatmap: str | None = None
    mask: str | None = None
    map: str | None = None
    size: list[int] | None = None
    original_size: list[int] | None = None
    error: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> PredictionRow:
        """A row read back from a saved table (unknown keys are an error: a row of another schema)."""
        names = {f.name for f in fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown prediction row fields: {sorted(unknown)}")
        return cls(**d)


ROW_FIELDS = tuple(f.name for f in fields(PredictionRow))
"""Every field of a row, in order (the keys of each entry of predictions.json)."""

CSV_HEAD = ("path", "score", "verdict", "threshold")
CSV_TAIL = ("class_name", "index", "block", "heatmap", "mask", "map", "reason", "error", "size")
"""predictions.csv / .parquet: these columns, one ``score_<branch>`` column per branch between them."""

_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def csv_cell(value) -> object:
    """Text cells that a spreadsheet would run as a formula get a leading apostrophe; numbers stay numbers."""
    if isinstance(value, str) and value.startswith(_FORMULA_START):
        return "'" + value
    return value


def branch_keys(rows: list[PredictionRow]) -> list[str]:
    return sorted({k for r in rows for k in r.branch_scores})


def table_columns(rows: list[PredictionRow]) -> dict[str, list]:
    """The flat table of ``rows``: column name -> values (``size`` as ``WxH`` text)."""
    keys = branch_keys(rows)
    cols: dict[str, list] = {c: [getattr(r, c) for r in rows] for c in CSV_HEAD}
    cols |= {f"score_{k}": [r.branch_scores.get(k) for r in rows] for k in keys}
    cols |= {c: [getattr(r, c) for r in rows] for c in CSV_TAIL}
    cols["size"] = [None if s is None else f"{s[0]}x{s[1]}" for s in cols["size"]]
    return cols


def predictions_csv(rows: list[PredictionRow]) -> str:
    """predictions.csv: :func:`table_columns`, text cells guarded by :func:`csv_cell`."""
    cols = table_columns(rows)
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(list(cols))
    for i in range(len(rows)):
        w.writerow([csv_cell(v[i]) for v in cols.values()])
    return buf.getvalue()
