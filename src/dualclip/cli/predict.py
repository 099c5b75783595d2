"""`dualclip predict`: files/folders/globs in; scores, verdicts, heat maps, masks and a report out.

Exit codes (:data:`EXIT_CODES`): 0 every file scored; 1 some files failed (each has an error entry);
2 usage or configuration error (nothing was run); 3 no input image could be read; 130 / 143 interrupted
(SIGINT / SIGTERM).
"""

from __future__ import annotations

import contextlib
import csv
import functools
import inspect
import io
import os
import re
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

from ..atomic import dumps, save_image, write_text
from ..config import DetectorConfig
from ..data.images import DEFAULT_MAX_SIDE, Expanded, ImageLoadError, expand_paths, load_images, mask_like
from ..detector import DualClipDetector, Prediction
from ..errors import UsageError
from ..logs import log_line
from ..thresholds import NO_THRESHOLD, Threshold, fit_threshold, manual_threshold, score_error
from ..visualization import binary_mask, outline, overlay, render_report, run_scale
from .output_folder import OutputFolderError, check_output_folder, output_lock, staged_output

EXIT_OK, EXIT_SOME_FAILED, EXIT_USAGE, EXIT_NOTHING, EXIT_INTERRUPTED = 0, 1, 2, 3, 130
EXIT_CODES = {
    "0": "every file scored",
    "1": "some files failed (see their error entries)",
    "2": "usage or configuration error (nothing was run)",
    "3": "no input image could be read",
    "130": "interrupted (SIGINT; 143 for SIGTERM): --out left as it was",
}


def display_path(p: str | os.PathLike) -> str:
    """A path as text for JSON, CSV and HTML: bytes that are not UTF-8 are shown as ``\\xNN``."""
    return os.fsencode(p).decode("utf-8", "backslashreplace")


def output_stem(index: int, path: Path, max_len: int = 48) -> str:
    """A safe, unique output file stem: the input's index, then its stem reduced to ``[A-Za-z0-9._-]`` and
    shortened (any name the file system allows gives a valid, short output name)."""
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", display_path(path.stem)).strip("._")[:max_len]
    return f"{index:05d}_{stem}" if stem else f"{index:05d}"


_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def csv_cell(value) -> object:
    """Text cells that a spreadsheet would run as a formula get a leading apostrophe; numbers stay numbers."""
    if isinstance(value, str) and value.startswith(_FORMULA_START):
        return "'" + value
    return value


def predictions_csv(rows: list[dict], head: tuple[str, ...], tail: tuple[str, ...] = ()) -> str:
    """predictions.csv: the ``head`` columns, one ``score_<branch>`` column per branch that any row has, then the
    ``tail`` columns; text cells guarded by :func:`csv_cell`."""
    branch_keys = sorted({k for r in rows for k in (r.get("branch_scores") or {})})
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow([*head, *[f"score_{k}" for k in branch_keys], *tail])
    for r in rows:
        bs = r.get("branch_scores") or {}
        cells = [r.get(c) for c in head] + [bs.get(k) for k in branch_keys] + [r.get(c) for c in tail]
        w.writerow([csv_cell(c) for c in cells])
    return buf.getvalue()


def _load_all(
    paths: list[Path], warn: Callable[[str], None], num_workers: int = 0
) -> tuple[list[tuple[Path, Image.Image]], list[dict]]:
    ok, errors = [], []
    for p, img in zip(paths, load_images(paths, num_workers, max_side=DEFAULT_MAX_SIDE), strict=True):
        if isinstance(img, ImageLoadError):
            errors.append({"path": display_path(p), "error": img.reason})
            warn(f"error: {display_path(p)}: {img.reason}")
        else:
            ok.append((p, img))
    return ok, errors


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
    fitted = det.profile_class(class_name) if det.profile_ is not None else None
    if det.profile_ is not None and class_name and class_name != fitted:
        notes.append(
            f"--class-name {class_name!r} has no effect: the profile was fitted for class {fitted!r}, which is "
            "used and recorded"
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
    if det.profile_ is not None:
        return det.threshold_ or NO_THRESHOLD
    if reference_quantile is not None:
        if not reference_images or len(reference_images) < 2:
            raise UsageError("--threshold-quantile needs at least 2 --reference images")
        return fit_threshold(det, reference_images, quantile=reference_quantile, class_name=class_name)
    if validation is not None:
        imgs_n, _ = _load_all(validation[0], warn)
        imgs_a, _ = _load_all(validation[1], warn)
        try:
            return fit_threshold(det, [i for _, i in imgs_n], [i for _, i in imgs_a], class_name=class_name)
        except ValueError as exc:
            raise UsageError(str(exc)) from exc
    return NO_THRESHOLD


def _check_threshold_options(threshold: float | None, quantile: float | None) -> None:
    if threshold is not None and not np.isfinite(threshold):
        raise UsageError(f"--threshold must be a finite number, got {threshold}")
    if quantile is not None and not (np.isfinite(quantile) and 0.0 <= quantile <= 1.0):
        raise UsageError(f"--threshold-quantile must lie in [0, 1], got {quantile}")


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
) -> tuple[int, dict]:
    """Run the whole command; returns (exit code, the predictions document).

    Everything that can be checked is checked before scoring (output folder, thresholds, inputs); outputs are
    written in a staging folder and replace ``out`` only when complete; ``out`` is locked meanwhile.
    ``command``: the command recorded in the output marker (``demo`` replaces its own output).
    """
    warn = warn or log_line
    out = Path(out)
    _check_threshold_options(threshold, threshold_quantile)
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
        refs = [img for _, img in ref_loaded]
    val = (val_exp[0].files, val_exp[1].files) if val_exp else None
    th = decide_threshold(det, threshold, refs, threshold_quantile, val, class_name, warn)
    if det.profile_ is not None:  # the profile's class (another one given was warned of, or refused, above)
        class_name = det.profile_.meta.get("class_name")
    doc: dict = {
        "config": config.to_dict(),
        "class_name": class_name,
        "threshold": th.to_dict(),
        "exit_codes": EXIT_CODES,
        "skipped": skipped,
        "warnings": notes,
        "text_branch": _text_branch(det, config),
    }
    if not loaded:
        warn("error: no image could be read")
        doc["predictions"] = [dict(e, score=None, verdict=None) for e in errors]
        with staged_output(out, warn, command) as stage:
            _write_outputs(stage, doc, [], None)
        return EXIT_NOTHING, doc
    images = [img for _, img in loaded]
    preds = det.predict(images, class_name=class_name, references=refs)
    run = preds.run
    if (
        det.profile_ is None
        and config.k != "all"
        and run.k_effective is not None
        and refs is None
        and (run.k_effective < int(config.k))
    ):
        warn(f"warning: k={config.k} asked for, but {len(images)} images allow at most k={run.k_effective}")
    scored = []
    for i, ((path, img), pred) in enumerate(zip(loaded, preds, strict=True)):
        problem = score_error(pred.score)
        if problem:  # an error of that image, never a verdict
            errors.append({"path": display_path(path), "error": problem})
            warn(f"error: {display_path(path)}: {problem}")
        else:
            scored.append((i, path, img, pred))
    scale = run_scale([pred.anomaly_map for *_, pred in scored])
    doc["heatmap_scale"] = scale.to_dict()
    doc["run"] = run.to_dict(with_references=False)
    if det.profile_ is not None:
        meta = det.profile_.meta
        doc["profile"] = {
            "units": "normal spreads above the normal mean (0: a typical normal image)",
            **{k: meta.get(k) for k in ("n_normal", "bank_patches", "weights_fingerprint", "created_by", "class_name")},
            "ood_guard": det.profile_.guard(),
        }
    rows = []
    for i, path, img, pred in scored:
        stem = output_stem(i, path)
        row = {
            "path": display_path(path),
            "score": pred.score,
            "verdict": th.verdict(pred.score, pred.unusable),
            "reason": pred.unusable,
            "threshold": th.value,
            "branch_scores": pred.branch_scores,
            "references": "profile"
            if det.profile_ is not None
            else [display_path(loaded[j][0]) for j in pred.references]
            if refs is None
            else "golden",
            "heatmap": f"heatmaps/{stem}.png",
            "mask": f"masks/{stem}.png" if th.value is not None else None,
            "size": list(img.size),
            "error": None,
        }
        if "original_size" in img.info:
            row["original_size"] = list(img.info["original_size"])
        rows.append((row, img, pred))
    doc["predictions"] = [r for r, _, _ in rows] + [dict(e, score=None, verdict=None) for e in errors]
    with staged_output(out, warn, command) as stage:
        _write_outputs(stage, doc, rows, scale, progress=not quiet)
    return (EXIT_SOME_FAILED if errors else EXIT_OK), doc


def _write_outputs(
    out: Path, doc: dict, rows: list[tuple[dict, Image.Image, Prediction]], scale, progress: bool = False
) -> None:
    from tqdm.auto import tqdm

    report_rows = []
    for row, img, pred in tqdm(rows, desc="writing", unit="img", disable=not progress, leave=False):
        ov = overlay(img, pred.anomaly_map, scale)
        save_image(ov, out / row["heatmap"])
        if row["mask"]:
            save_image(binary_mask(pred.anomaly_map, row["threshold"]), out / row["mask"])
            ov = outline(ov, pred.anomaly_map >= row["threshold"])  # the report shows the defect's outline
        report_rows.append({**row, "image": img, "overlay": ov})
    for p in doc["predictions"]:
        if p.get("error"):
            report_rows.append({**p, "image": None, "overlay": None})
    write_text(out / "predictions.json", dumps(doc) + "\n")
    write_text(
        out / "predictions.csv",
        predictions_csv(
            doc["predictions"], ("path", "score", "verdict", "threshold"), ("heatmap", "mask", "reason", "error")
        ),
    )
    meta = {k: doc.get(k) for k in ("class_name", "threshold", "heatmap_scale")}
    meta["backbone"] = doc["config"]["backbone"]
    meta["seed"] = doc["config"]["seed"]
    write_text(out / "report.html", render_report(report_rows, meta))
