"""The one writer of a run's outputs: prediction rows, heat maps, masks, raw maps, tables and the report.

``dualclip predict`` (into its staging folder), archive runs (each block into the run's folder) and the service
(its heat maps) all write through here, so a row, a heat map and a mask mean the same thing everywhere.
"""

from __future__ import annotations

import importlib.util
import io
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from ..atomic import dumps, save_image, write_bytes, write_text
from ..thresholds import Threshold, score_error
from ..visualization import HeatmapScale, binary_mask, normal_scale, overlay, render_report, run_scale
from .rows import PredictionRow, display_path, output_stem, predictions_csv, table_columns

TABLE_FORMATS = ("json", "csv", "parquet")
"""The formats of the predictions table (predictions.json / .csv / .parquet)."""
MAP_FORMATS = ("npy", "tiff")
"""The formats of raw anomaly maps (float32, at the image's size)."""


class OutputFormatError(ValueError):
    """An output format that is unknown or whose library is not installed."""


def check_formats(tables: tuple[str, ...] = ("json", "csv"), maps: str | None = None) -> None:
    """Refuse, before any work, a table or map format that is unknown or cannot be written here (Parquet
    needs pyarrow)."""
    unknown = [t for t in tables if t not in TABLE_FORMATS]
    if unknown:
        raise OutputFormatError(f"tables: unknown format {unknown[0]!r} (one of {', '.join(TABLE_FORMATS)})")
    if "parquet" in tables and importlib.util.find_spec("pyarrow") is None:
        raise OutputFormatError("the parquet table needs pyarrow, which is not installed: pip install pyarrow")
    if maps is not None and maps not in MAP_FORMATS:
        raise OutputFormatError(f"maps: unknown format {maps!r} (one of {', '.join(MAP_FORMATS)})")


def heatmap_scale(maps: list[np.ndarray], normal_scores=None, threshold: float | None = None) -> HeatmapScale:
    """The colour scale of a run's heat maps: fixed by a fitted detector's ``normal_scores``
    (:meth:`~dualclip.DualClipDetector.normal_scores`; the same in every run, report and service:
    :func:`~dualclip.visualization.normal_scale`, around ``threshold``), else the run's own scale over ``maps``."""
    if normal_scores is not None:
        return normal_scale(normal_scores, threshold)
    return run_scale(maps)


def row_references(pairing: str, indices, names) -> str | list[str]:
    """What a row records as an image's references: the kind of a reference source every image of the run
    shares (``"profile"``, ``"golden"``: :attr:`~dualclip.detector.RunInfo.pairing`), else the ``names`` of
    the run's images at ``indices``, the ones it was paired with."""
    if pairing in ("profile", "golden"):
        return pairing
    return [names[j] for j in indices]


def heatmap_png(image: Image.Image, anomaly_map: np.ndarray, scale: HeatmapScale) -> bytes:
    """The heat map of one image as PNG bytes: the image with its map blended on ``scale``, at its size."""
    buf = io.BytesIO()
    overlay(image, anomaly_map, scale).save(buf, format="PNG")
    return buf.getvalue()


def save_map(anomaly_map: np.ndarray, path: Path, fmt: str) -> None:
    """The raw anomaly map (float32, ``(H, W)`` at the image's size) as ``.npy`` or a 32-bit float TIFF
    (tifffile where installed, else Pillow's mode ``F``); written atomically."""
    data = np.ascontiguousarray(anomaly_map, dtype=np.float32)
    buf = io.BytesIO()
    if fmt == "npy":
        np.save(buf, data, allow_pickle=False)
    elif fmt == "tiff":
        try:
            import tifffile
        except ImportError:
            Image.fromarray(data, mode="F").save(buf, format="TIFF")
        else:
            tifffile.imwrite(buf, data)
    else:
        raise OutputFormatError(f"maps: unknown format {fmt!r} (one of {', '.join(MAP_FORMATS)})")
    write_bytes(path, buf.getvalue())


def load_map(path: str | Path) -> np.ndarray:
    """A raw map written by :func:`save_map` (``.npy`` or ``.tiff``), as float32."""
    path = Path(path)
    if path.suffix == ".npy":
        return np.load(path, allow_pickle=False)
    with Image.open(path) as im:
        return np.asarray(im, dtype=np.float32)


@dataclass
class ReportEntry:
    """What the report shows of one scored image besides its row: the image, its heat map, and the outlines
    (predicted defect and, when known, the ground truth)."""

    row: PredictionRow
    image: Image.Image
    heat: Image.Image
    predicted: np.ndarray | None = None
    truth: np.ndarray | None = None


@dataclass
class OutputWriter:
    """Writes the outputs of one run (or one archive block) under ``folder``.

    ``scale``: the heat maps' colour scale (:func:`heatmap_scale`); ``threshold``: the verdicts' threshold;
    ``heatmaps``: write heat maps and masks; ``maps``: also write raw maps (``npy`` or ``tiff``);
    ``subfolder``: a folder level below ``heatmaps/``, ``masks/``, ``maps/`` (an archive block's id);
    ``report``: keep what :meth:`write_report` needs."""

    folder: Path
    scale: HeatmapScale
    threshold: Threshold
    heatmaps: bool = True
    maps: str | None = None
    subfolder: str | None = None
    report: bool = False
    rows: list[PredictionRow] = field(default_factory=list)
    entries: list[ReportEntry] = field(default_factory=list, repr=False)

    def __post_init__(self) -> None:
        self.folder = Path(self.folder)
        check_formats((), self.maps)

    def _rel(self, kind: str, stem: str, suffix: str) -> str:
        parts = [kind, *([self.subfolder] if self.subfolder else []), f"{stem}{suffix}"]
        return "/".join(parts)

    def add(
        self,
        index: int,
        path,
        image: Image.Image,
        prediction,
        truth: np.ndarray | None = None,
        **fields,
    ) -> PredictionRow:
        """The row of one scored image (an error row when its score is not a finite number), its heat map,
        mask and raw map written. ``path``: the file it came from; ``truth``: its ground-truth mask, if known
        (drawn in the report); ``fields``: the row's other fields (``class_name``, ``block``, ``references``)."""
        problem = score_error(prediction.score)
        if problem:  # an error of that image, never a verdict
            return self.failed(index, path, problem, **fields)
        th = self.threshold.value
        stem = output_stem(index, Path(path))
        row = PredictionRow(
            index=index,
            path=display_path(path),
            score=prediction.score,
            verdict=self.threshold.verdict(prediction.score, prediction.unusable),
            reason=prediction.unusable,
            threshold=th,
            branch_scores=dict(prediction.branch_scores),
            size=[image.width, image.height],
            original_size=list(image.info["original_size"]) if "original_size" in image.info else None,
            **fields,
        )
        amap = prediction.anomaly_map
        heat = overlay(image, amap, self.scale) if (self.heatmaps or self.report) else None
        if self.heatmaps:
            row.heatmap = self._rel("heatmaps", stem, ".png")
            save_image(heat, self.folder / row.heatmap)
            if th is not None:
                row.mask = self._rel("masks", stem, ".png")
                save_image(binary_mask(amap, th), self.folder / row.mask)
        if self.maps:
            row.map = self._rel("maps", stem, f".{self.maps}")
            save_map(amap, self.folder / row.map, self.maps)
        if self.report:
            predicted = None if th is None else amap >= th
            self.entries.append(ReportEntry(row, image, heat, predicted, truth))
        self.rows.append(row)
        return row

    def failed(self, index: int, path, error: str, **fields) -> PredictionRow:
        """The row of a file without a score: ``error`` says why."""
        row = PredictionRow(index=index, path=display_path(path), error=error, **fields)
        self.rows.append(row)
        return row

    def write_tables(self, doc: dict, tables: tuple[str, ...] = ("json", "csv")) -> list[str]:
        """predictions.json (``doc`` with the rows under ``predictions``), .csv and .parquet as ``tables``
        asks, rows in index order; returns the names written."""
        check_formats(tables)
        rows = sorted(self.rows, key=lambda r: r.index)
        return write_tables(self.folder, doc, rows, tables)

    def write_report(self, meta: dict) -> None:
        """report.html: every row (failed ones last), the counts, the colour bar of :attr:`scale`, the score
        histogram with the threshold, outlines, and a filter for flagged images."""
        shown = {e.row.index: e for e in self.entries}
        report_rows = []
        for r in sorted(self.rows, key=lambda r: r.index):
            e = shown.get(r.index)
            report_rows.append(
                {
                    **r.to_dict(),
                    "image": None if e is None else e.image,
                    "overlay": None if e is None else e.heat,
                    "predicted": None if e is None else e.predicted,
                    "truth": None if e is None else e.truth,
                }
            )
        meta = {**meta, "heatmap_scale": self.scale.to_dict(), "threshold": self.threshold.to_dict()}
        write_text(self.folder / "report.html", render_report(report_rows, meta))


def write_tables(folder: Path, doc: dict, rows: list[PredictionRow], tables: tuple[str, ...]) -> list[str]:
    """predictions.<format> for each of ``tables`` under ``folder`` (see :meth:`OutputWriter.write_tables`)."""
    check_formats(tables)
    folder = Path(folder)
    wrote = []
    if "json" in tables:
        write_text(folder / "predictions.json", dumps({**doc, "predictions": [r.to_dict() for r in rows]}) + "\n")
        wrote.append("predictions.json")
    if "csv" in tables:
        write_text(folder / "predictions.csv", predictions_csv(rows))
        wrote.append("predictions.csv")
    if "parquet" in tables:
        import pyarrow as pa
        import pyarrow.parquet as pq

        sink = pa.BufferOutputStream()
        pq.write_table(pa.table(table_columns(rows)), sink)
        write_bytes(folder / "predictions.parquet", sink.getvalue().to_pybytes())
        wrote.append("predictions.parquet")
    return wrote
