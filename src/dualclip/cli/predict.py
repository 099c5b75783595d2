"""`dualclip predict`: files/folders/globs in; scores, verdicts, heat maps, masks and a report out.

Exit codes (:data:`EXIT_CODES`): 0 every file scored; 1 some files failed (each has an error entry);
2 usage or configuration error (nothing was run); 3 no input image could be read; 130 / 143 interrupted
(SIGINT / SIGTERM).
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

from ..config import DetectorConfig
from ..data.datasets import read_mask
from ..data.images import DEFAULT_MAX_SIDE, Expanded, ImageLoadError, expand_paths, load_images, mask_like
from ..detector import DualClipDetector
from ..errors import UsageError
from ..logs import log_line
from ..output import (
    MAP_FORMATS,
    OutputFolderError,
    OutputFormatError,
    OutputWriter,
    check_formats,
    check_output_folder,
    display_path,
    heatmap_scale,
    output_lock,
    row_references,
    staged_output,
)
from ..thresholds import NO_THRESHOLD, Threshold, fit_threshold, manual_threshold

EXIT_OK, EXIT_SOME_FAILED, EXIT_USAGE, EXIT_NOTHING, EXIT_INTERRUPTED = 0, 1, 2, 3, 130
EXIT_CODES = {
    "0": "every file scored",
    "1": "some files failed (see their error entries)",
    "2": "usage or configuration error (nothing was run)",
    "3": "no input image could be read",
    "130": "interrupted (SIGINT; 143 for SIGTERM): --out left as it was",
}


def _load_all(
    paths: list[Path], warn: Callable[[str], None], num_workers: int = 0
) -> tuple[list[tuple[int, Path, Image.Image]], list[tuple[int, Path, str]]]:
    """The images of ``paths`` that could be read, and the others with the reason, each with its index."""
    ok, errors = [], []
    for i, (p, img) in enumerate(zip(paths, load_images(paths, num_workers, max_side=DEFAULT_MAX_SIDE), strict=True)):
        if isinstance(img, ImageLoadError):
            errors.append((i, p, img.reason))
            warn(f"error: {display_path(p)}: {img.reason}")
        else:
            ok.append((i, p, img))
    return ok, errors


def ground_truth(found: Expanded, image: Path, size: tuple[int, int]) -> np.ndarray | None:
    """The ground-truth mask of ``image`` when one lies beside it (``found.masks``), at ``size`` (width,
    height: the size the image was scored at), else ``None``; an unreadable mask is ``None`` too."""
    for mask, img in found.masks:
        if img == image:
            try:
                m = read_mask(mask)
            except (OSError, ValueError):
                return None
            if m.shape[::-1] != tuple(size):
                m = np.asarray(Image.fromarray(m).resize(size, Image.NEAREST))
            return m
    return None


def mask_warnings(found: Expanded) -> list[str]:
    """Inputs that are ground-truth masks: those beside their image (left out by :func:`expand_paths`), and
    those that look like masks by name (read as images: ``--exclude`` leaves them out)."""
    notes = []
    if found.masks:
        mask, image = found.masks[0]
        notes.append(
            f"{len(found.masks)} input file(s) are ground-truth masks beside an image of the same name "
            f"(binary pictures, e.g. {display_path(mask)} beside {display_path(image.name)}): left out"
        )
    masks = mask_like(found.files)
    if masks:
        shown = display_path(masks[0])
        notes.append(
            f"{len(masks)} input file(s) look like ground-truth masks (e.g. {shown}): they are read as images; "
            "leave them out with --exclude, e.g. --exclude '*_mask.png' or --exclude 'ground_truth/*'"
        )
    return notes


def input_warnings(found: Expanded, class_name: str | None, det: DualClipDetector) -> list[str]:
    """What is worth a warning before scoring: inputs that are or look like masks, a class name that a
    vision-only backbone or a profile cannot use (recorded in the outputs too)."""
    notes = mask_warnings(found)
    used = det.scoring_class(class_name)  # a fitted detector's own class (another is refused where it matters)
    if class_name and class_name != used:
        notes.append(
            f"--class-name {class_name!r} has no effect: "
            + (
                "the profile was fitted without a class name (none is used or recorded)"
                if used is None
                else f"the profile was fitted for class {used!r}, which is used and recorded"
            )
        )
    elif class_name and not det.backbone.has_text:
        notes.append(
            f"--class-name {class_name!r} is not used: {det.backbone.name} is vision-only (no text tower), so the "
            "text branch is off and the scores come from the visual reference alone"
        )
    return notes


def _text_branch(det: DualClipDetector, config: DetectorConfig) -> str:
    """Whether the text branch runs, and why not (recorded in predictions.json)."""
    if not det.backbone.has_text:
        return f"off: {det.backbone.name} is vision-only (no text tower)"
    return "on" if config.use_text else "off: use_text=False"


def decide_threshold(
    det: DualClipDetector,
    threshold: float | None,
    reference_images: list | None,
    reference_quantile: float | None,
    validation: tuple[list[Path], list[Path]] | None,
    class_name: str | None,
    warn: Callable[[str], None],
) -> Threshold:
    """Manual value, a fitted profile's threshold, a quantile of the golden references' scores (scored among
    themselves), or the F1-optimal threshold on a labelled validation set; never fitted on the images being
    judged."""
    if threshold is not None:
        return manual_threshold(threshold)
    if det.normal_scores() is not None:  # fitted: its units are the profile's, and so is its threshold (or none)
        return det.threshold_ or NO_THRESHOLD
    if reference_quantile is not None:
        if not reference_images or len(reference_images) < 2:
            raise UsageError("--threshold-quantile needs at least 2 --reference images")
        return fit_threshold(det, reference_images, quantile=reference_quantile, class_name=class_name)
    if validation is not None:
        imgs_n, _ = _load_all(validation[0], warn)
        imgs_a, _ = _load_all(validation[1], warn)
        try:
            return fit_threshold(det, [i for *_, i in imgs_n], [i for *_, i in imgs_a], class_name=class_name)
        except ValueError as exc:
            raise UsageError(str(exc)) from exc
    return NO_THRESHOLD


def _check_threshold_options(threshold: float | None, quantile: float | None) -> None:
    if threshold is not None and not np.isfinite(threshold):
        raise UsageError(f"--threshold must be a finite number, got {threshold}")
    if quantile is not None and not (np.isfinite(quantile) and 0.0 <= quantile <= 1.0):
        raise UsageError(f"--threshold-quantile must lie in [0, 1], got {quantile}")


def _check_output_formats(save_maps: str | None, tables: tuple[str, ...]) -> None:
    if save_maps is not None and save_maps not in MAP_FORMATS:
        raise UsageError(f"--save-maps must be one of {', '.join(MAP_FORMATS)}, got {save_maps!r}")
    try:
        check_formats(tables, save_maps)
    except OutputFormatError as exc:
        raise UsageError(f"--parquet: {exc}" if "parquet" in str(exc) else str(exc)) from exc


def _given_paths(inputs, references, validation) -> list[Path]:
    """Every path the command line names as something to read."""
    return [Path(os.fsdecode(p)) for group in (inputs, references or [], *(validation or ())) for p in group]


def _holding_the_output_lock(run: Callable[..., tuple[int, dict]]) -> Callable[..., tuple[int, dict]]:
    """``run`` holding the lock of its ``out`` throughout: a second run into the same folder is a usage error,
    refused before it reads anything. The output folder is checked first, so that a refused run writes
    nothing, not even the lock file; ``run`` checks it again, holding the lock."""
    signature = inspect.signature(run)

    @functools.wraps(run)
    def locked(*args, **kwargs):
        given = signature.bind(*args, **kwargs)
        given.apply_defaults()
        a = given.arguments
        out = Path(a["out"])
        with contextlib.ExitStack() as stack:
            try:
                check_output_folder(out, _given_paths(a["inputs"], a["references"], a["validation"]), a["overwrite"])
                stack.enter_context(output_lock(out))
            except OutputFolderError as exc:
                raise UsageError(str(exc)) from exc
            return run(*args, **kwargs)

    return locked


@_holding_the_output_lock
def run_predict(
    inputs: list[str],
    out: Path,
    config: DetectorConfig,
    class_name: str | None = None,
    references: list[str] | None = None,
    threshold: float | None = None,
    threshold_quantile: float | None = None,
    validation: tuple[list[str], list[str]] | None = None,
    overwrite: bool = False,
    quiet: bool = False,
    detector: DualClipDetector | None = None,
    warn: Callable[[str], None] | None = None,
    exclude: list[str] | None = None,
    command: str = "predict",
    save_maps: str | None = None,
    tables: tuple[str, ...] = ("json", "csv"),
) -> tuple[int, dict]:
    """Run the whole command; returns (exit code, the predictions document).

    Everything that can be checked is checked before scoring (output folder, thresholds, output formats,
    inputs); outputs are written in a staging folder and replace ``out`` only when complete; ``out`` is locked
    meanwhile. ``command``: the command recorded in the output marker (``demo`` replaces its own output);
    ``save_maps``: also write each raw anomaly map (``npy`` or ``tiff``); ``tables``: the formats of the
    predictions table (``json``, ``csv``, ``parquet``).
    """
    warn = warn or log_line
    out = Path(out)
    _check_threshold_options(threshold, threshold_quantile)
    _check_output_formats(save_maps, tables)
    try:
        check_output_folder(out, _given_paths(inputs, references, validation), overwrite)
    except OutputFolderError as exc:
        raise UsageError(str(exc)) from exc
    try:
        patterns = exclude or []
        expanded = expand_paths(inputs, exclude=[out], exclude_patterns=patterns)
        ref_exp = expand_paths(references, exclude=[out], exclude_patterns=patterns) if references else None
        val_exp = (
            (expand_paths(validation[0], exclude=[out]), expand_paths(validation[1], exclude=[out]))
            if validation is not None
            else None
        )
    except FileNotFoundError as exc:
        raise UsageError(str(exc)) from exc
    skipped = [{"path": display_path(p), "reason": r} for e in (expanded, ref_exp) if e for p, r in e.skipped]
    det = detector or DualClipDetector(config)
    _ = det.backbone  # weights first: a bad backbone or checkpoint fails before any image is read
    notes = input_warnings(expanded, class_name, det)
    for note in notes:
        warn(f"warning: {note}")
    loaded, errors = _load_all(expanded.files, warn, config.num_workers)
    refs = None
    if ref_exp is not None:
        ref_loaded, _ = _load_all(ref_exp.files, warn, config.num_workers)
        if not ref_loaded:
            raise UsageError("none of the --reference images could be read")
        refs = [img for *_, img in ref_loaded]
    val = (val_exp[0].files, val_exp[1].files) if val_exp else None
    th = decide_threshold(det, threshold, refs, threshold_quantile, val, class_name, warn)
    # a profile's class (another one given was warned of, or refused, above)
    class_name = det.scoring_class(class_name, strict=False)
    doc: dict = {
        "config": config.to_dict(),
        "class_name": class_name,
        "threshold": th.to_dict(),
        "exit_codes": EXIT_CODES,
        "skipped": skipped,
        "warnings": notes,
        "text_branch": _text_branch(det, config),
    }
    preds = []
    if loaded:
        preds = det.predict([img for *_, img in loaded], class_name=class_name, references=refs)
        run = preds.run
        if config.k != "all" and run.k_effective is not None and refs is None and (run.k_effective < int(config.k)):
            warn(f"warning: k={config.k} asked for, but {len(loaded)} images allow at most k={run.k_effective}")
        doc["run"] = run.to_dict(with_references=False)
    else:
        warn("error: no image could be read")
    scale = heatmap_scale([pred.anomaly_map for pred in preds], det.normal_scores(), th.value)
    doc["heatmap_scale"] = scale.to_dict()
    profile = det.profile_summary()
    if profile is not None:
        doc["profile"] = profile
    from tqdm.auto import tqdm

    with staged_output(out, warn, command) as stage:
        writer = OutputWriter(stage, scale, th, maps=save_maps, report=True)
        names = [display_path(path) for _, path, _ in loaded]
        for (i, path, img), pred in tqdm(
            list(zip(loaded, preds, strict=True)), desc="writing", unit="img", disable=quiet, leave=False
        ):
            references = row_references(preds.run.pairing, pred.references, names)
            row = writer.add(
                i, path, img, pred, ground_truth(expanded, path, img.size), class_name=class_name, references=references
            )
            if row.error:
                warn(f"error: {row.path}: {row.error}")
        for i, path, reason in errors:
            writer.failed(i, path, reason, class_name=class_name)
        writer.write_tables(doc, tables)
        writer.write_report({"class_name": class_name, "backbone": config.backbone, "seed": config.seed})
    doc["predictions"] = [r.to_dict() for r in sorted(writer.rows, key=lambda r: r.index)]
    if not loaded:
        return EXIT_NOTHING, doc
    return (EXIT_SOME_FAILED if any(r.error for r in writer.rows) else EXIT_OK), doc
