"""Everything a run writes: prediction rows (:mod:`.rows`), the one writer of heat maps, masks, raw maps,
tables and the report (:mod:`.writer`), and the output folder's staging, marker and lock (:mod:`.folder`)."""

from .folder import OutputFolderError, check_output_folder, check_parent, lies_outside, output_lock, staged_output
from .rows import ROW_FIELDS, PredictionRow, csv_cell, display_path, output_stem, predictions_csv
from .writer import (
    MAP_FORMATS,
    TABLE_FORMATS,
    OutputFormatError,
    OutputWriter,
    check_formats,
    heatmap_png,
    heatmap_scale,
    load_map,
    row_references,
    save_map,
    write_tables,
)

__all__ = [
    "MAP_FORMATS",
    "ROW_FIELDS",
    "TABLE_FORMATS",
    "OutputFolderError",
    "OutputFormatError",
    "OutputWriter",
    "PredictionRow",
    "check_formats",
    "check_output_folder",
    "check_parent",
    "csv_cell",
    "display_path",
    "heatmap_png",
    "heatmap_scale",
    "lies_outside",
    "load_map",
    "output_lock",
    "output_stem",
    "predictions_csv",
    "row_references",
    "save_map",
    "staged_output",
    "write_tables",
]
