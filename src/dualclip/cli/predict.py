"""`dualclip predict`: files/folders/globs in; scores, verdicts, heat maps, masks and a report out.

Exit codes: 0 every file scored; 1 some files failed (each has an error entry); 2 nothing could be scored
or the command was used wrongly (bad option, existing output folder without --overwrite).
"""

from __future__ import annotations

import csv
import io
import json
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..config import DetectorConfig
from ..data.images import ImageLoadError, expand_paths, load_image
from ..detector import DualClipDetector
from ..evaluation import write_atomic
from ..metrics import best_f1_threshold
from ..scoring import resize_map
from ..visualization import binary_mask, overlay, render_report, run_scale

EXIT_OK, EXIT_SOME_FAILED, EXIT_NOTHING = 0, 1, 2


class UsageError(ValueError):
    """Wrong use of the command (exit code 2)."""


@dataclass
class Threshold:
    value: float | None
    source: str

    def to_dict(self) -> dict:
        return {"value": self.value, "source": self.source}


def f1_optimal_threshold(labels: np.ndarray, scores: np.ndarray) -> float:
    """The score threshold with the best F1 on labelled data (exact, over all distinct scores)."""
    if labels.min() == labels.max():
        raise UsageError("the validation set needs both normal and anomalous images to fit a threshold")
    return best_f1_threshold(labels, scores)


def _load_all(paths: list[Path], warn) -> tuple[list, list[dict]]:
    ok, errors = [], []
    for p in paths:
        try:
            ok.append((p, load_image(p)))
        except ImageLoadError as exc:
            errors.append({"path": str(p), "error": exc.reason})
            warn(f"error: {p}: {exc.reason}")
    return ok, errors


def decide_threshold(
    det: DualClipDetector,
    threshold: float | None,
    reference_images: list | None,
    reference_quantile: float | None,
    validation: tuple[list[Path], list[Path]] | None,
    class_name: str | None,
    warn,
) -> Threshold:
    """Manual value, a quantile of the golden references' scores (scored among themselves), or the
    F1-optimal threshold on a labelled validation set; never fitted on the images being judged."""
    if threshold is not None:
        return Threshold(float(threshold), "manual")
    if reference_quantile is not None:
        if not reference_images or len(reference_images) < 2:
            raise UsageError("--threshold-quantile needs at least 2 --reference images")
        scores = det.score_images(reference_images, class_name=class_name)["image_scores"].numpy()
        return Threshold(
            float(np.quantile(scores, reference_quantile)),
            f"quantile {reference_quantile} of {len(scores)} reference scores",
        )
    if validation is not None:
        normal, anomalous = validation
        imgs_n, _ = _load_all(normal, warn)
        imgs_a, _ = _load_all(anomalous, warn)
        imgs = [i for _, i in imgs_n + imgs_a]
        labels = np.array([0] * len(imgs_n) + [1] * len(imgs_a))
        scores = det.score_images(imgs, class_name=class_name)["image_scores"].numpy()
        return Threshold(
            f1_optimal_threshold(labels, scores),
            f"F1-optimal on validation ({len(imgs_n)} normal, {len(imgs_a)} anomalous)",
        )
    return Threshold(None, "none (no verdicts: give --threshold, --threshold-quantile or --validation)")


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
) -> tuple[int, dict]:
    """Run the whole command; returns (exit code, the predictions document)."""

    def warn(msg: str) -> None:
        print(msg, file=sys.stderr)

    out = Path(out)
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise UsageError(f"output folder {out} exists and is not empty; pass --overwrite to replace it")
        shutil.rmtree(out)
    paths = expand_paths(inputs)
    loaded, errors = _load_all(paths, warn)
    det = detector or DualClipDetector(config)
    refs = None
    if references:
        ref_loaded, ref_errors = _load_all(expand_paths(references), warn)
        if not ref_loaded:
            raise UsageError("none of the --reference images could be read")
        refs = [img for _, img in ref_loaded]
    val = None
    if validation is not None:
        val = (expand_paths(validation[0]), expand_paths(validation[1]))
    th = decide_threshold(det, threshold, refs, threshold_quantile, val, class_name, warn)
    doc: dict = {
        "config": config.to_dict(),
        "class_name": class_name,
        "threshold": th.to_dict(),
        "exit_codes": {"0": "all files scored", "1": "some files failed", "2": "nothing scored / usage error"},
    }
    if not loaded:
        warn("error: no image could be read")
        doc["predictions"] = [dict(e, score=None, verdict=None) for e in errors]
        _write_outputs(out, doc, [], None)
        return EXIT_NOTHING, doc
    images = [img for _, img in loaded]
    result = det.score_images(images, class_name=class_name, golden=refs)
    maps = [resize_map(result["maps"][i], img.height, img.width) for i, img in enumerate(images)]
    vmin, vmax = run_scale(maps)
    doc["heatmap_scale"] = {
        "vmin": vmin,
        "vmax": vmax,
        "colormap": "jet",
        "note": "one scale for the whole run (1st-99.9th percentile of all map pixels), in anomaly-score units",
    }
    doc["run"] = {k: v for k, v in det.run_info_.items() if k != "references"}
    rows = []
    for i, ((path, img), m) in enumerate(zip(loaded, maps, strict=True)):
        score = float(result["image_scores"][i])
        stem = f"{i:05d}_{path.stem}"
        row = {
            "path": str(path),
            "score": score,
            "verdict": None if th.value is None else ("defective" if score >= th.value else "ok"),
            "threshold": th.value,
            "branch_scores": {k: float(v[i]) for k, v in result["branch_scores"].items()},
            "references": [str(loaded[j][0]) for j in result["references"][i]] if refs is None else "golden",
            "heatmap": f"heatmaps/{stem}.png",
            "mask": f"masks/{stem}.png" if th.value is not None else None,
            "error": None,
        }
        rows.append((row, img, m))
    doc["predictions"] = [r for r, _, _ in rows] + [dict(e, score=None, verdict=None) for e in errors]
    _write_outputs(out, doc, rows, (vmin, vmax))
    return (EXIT_SOME_FAILED if errors else EXIT_OK), doc


def _save_png_atomic(img, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    img.save(tmp, format="PNG")
    tmp.replace(path)


def _write_outputs(out: Path, doc: dict, rows: list, scale) -> None:
    out.mkdir(parents=True, exist_ok=True)
    report_rows = []
    overlays = {}
    for row, img, m in rows:
        ov = overlay(img, m, *scale)
        _save_png_atomic(ov, out / row["heatmap"])
        overlays[row["path"]] = ov
        if row["mask"]:
            _save_png_atomic(binary_mask(m, row["threshold"]), out / row["mask"])
        report_rows.append({**row, "image": img, "overlay": ov})
    for p in doc["predictions"]:
        if p.get("error"):
            report_rows.append({**p, "image": None, "overlay": None})
    write_atomic(out / "predictions.json", json.dumps(doc, indent=2))
    buf = io.StringIO()
    w = csv.writer(buf)
    branch_keys = sorted({k for p in doc["predictions"] for k in (p.get("branch_scores") or {})})
    w.writerow(
        ["path", "score", "verdict", "threshold", *[f"score_{k}" for k in branch_keys], "heatmap", "mask", "error"]
    )
    for p in doc["predictions"]:
        bs = p.get("branch_scores") or {}
        w.writerow(
            [
                p["path"],
                p.get("score"),
                p.get("verdict"),
                p.get("threshold"),
                *[bs.get(k) for k in branch_keys],
                p.get("heatmap"),
                p.get("mask"),
                p.get("error"),
            ]
        )
    write_atomic(out / "predictions.csv", buf.getvalue())
    meta = {k: doc.get(k) for k in ("class_name", "threshold", "heatmap_scale")}
    meta["backbone"] = doc["config"]["backbone"]
    meta["seed"] = doc["config"]["seed"]
    write_atomic(out / "report.html", render_report(report_rows, meta))
