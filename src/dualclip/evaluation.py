"""The evaluation protocol (docs/method.md §8): per category, then the macro mean; resumable and atomic.

Maps are scored at the processing resolution S with ground-truth masks resized to S (nearest), the field's
custom. With several seeds every metric is reported as mean and standard deviation over the seeds.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import json
import platform
import resource
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from . import __version__
from .config import DetectorConfig
from .data.datasets import Category
from .data.images import file_fingerprint, load_image
from .detector import DualClipDetector
from .logs import log_line
from .metrics import all_metrics
from .output.eval_folder import EvalFolder, category_file
from .output.folder import output_lock
from .thresholds import Threshold

METRICS = ("image_auroc", "image_ap", "image_f1max", "pixel_auroc", "pixel_ap", "pixel_f1max", "pixel_aupro")


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MiB."""
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / 1024 / 1024 if sys.platform == "darwin" else r / 1024


def evaluate_category(
    config: DetectorConfig,
    category: Category,
    seeds: list[int],
    detector_cache: dict,
    fitted: DualClipDetector | None = None,
    threshold: Threshold | None = None,
) -> dict:
    """Metrics of one category for each seed, and their mean/std (against its golden references, if any).

    Anomalous images without a mask count in the image metrics and are left out of the pixel metrics
    (``n_without_mask``); metrics that are still undefined (``nan``, ``null`` in JSON) are reported by one note
    under ``warnings``, not as Python warnings.

    ``fitted``: a detector with a profile (:meth:`DualClipDetector.load`) that scores every image against its
    profile (one run: ``seeds`` are not used); the result then lists every image's score and verdict
    (``images``) and, at ``threshold`` (default: the profile's), the confusion counts (``at_threshold``,
    :func:`threshold_counts`).
    """
    images = category.images(config.num_workers)
    golden = [load_image(p) for p in category.references] or None
    with_mask = category.has_mask
    masks = None  # read once, at the processing size of the first run
    per_seed = []
    defects = category.defects if len(category.defects) > 1 else []
    per_defect_seed: dict[str, list[dict]] = {d: [] for d in defects}
    for seed in seeds:
        if fitted is not None:
            det = fitted
        else:
            det = DualClipDetector(dataclasses.replace(config, seed=seed), backbone=detector_cache.get("backbone"))
        start = time.perf_counter()
        result = det.score_images(images, class_name=None if fitted else category.name, golden=golden)
        elapsed = time.perf_counter() - start
        detector_cache["backbone"] = det.backbone
        size = result.maps.shape[-1]
        with warnings.catch_warnings():  # undefined metrics are nan, reported once below as a note
            warnings.filterwarnings("ignore", message=r".* is undefined: ", category=RuntimeWarning)
            m = all_metrics(category.labels, result.image_scores.numpy())
            if masks is None:
                masks = category.masks(size)[with_mask]
            m.update(pixel_metrics(masks, result.maps.numpy()[with_mask]))
            for d in defects:  # the field's per-defect rows: every normal image with this defect type's images
                per_defect_seed[d].append(_defect_metrics(category, d, result, masks, with_mask))
        m["ms_per_image"] = 1000 * elapsed / len(images)
        m["peak_rss_mb"] = peak_rss_mb()
        per_seed.append(m)
    out: dict = {
        "n_images": len(images),
        "n_anomalous": int(category.labels.sum()),
        "n_without_mask": int((~with_mask).sum()),
        "seeds": seeds,
    }
    if golden:
        out["n_references"] = len(golden)
        out["references"] = [str(p) for p in category.references]
    out.update(mean_over_seeds(per_seed))
    out["per_seed"] = per_seed
    if defects:
        out["per_defect"] = {
            d: {"n_anomalous": sum(1 for x in category.samples if x.defect == d), **mean_over_seeds(rows)}
            for d, rows in per_defect_seed.items()
        }
    undefined = [k for k in METRICS if not np.isfinite(out.get(k, np.nan))]
    if not category.labels.any():
        note = f"metrics undefined ({', '.join(undefined)}): every image is normal, there is nothing to detect"
    else:
        undefined = [k for k in undefined if k.startswith("pixel")]
        note = f"pixel metrics undefined ({', '.join(undefined)}): no mask with a defect pixel among the scored images"
    out["warnings"] = list(category.notes) + ([note] if undefined else [])
    if fitted is not None:
        threshold = threshold or fitted.threshold_
        scores = result.image_scores.numpy()
        out["images"] = [
            {
                "path": str(s.path),
                "label": s.label,
                "defect": s.defect,
                "score": float(v),
                "verdict": None if threshold is None else threshold.verdict(float(v)),
            }
            for s, v in zip(category.samples, scores, strict=True)
        ]
        if threshold is None:
            out["warnings"].append(
                "the profile has no threshold: no confusion counts (fit it with a threshold quantile or a "
                "validation set, or give a threshold)"
            )
        else:
            out["at_threshold"] = threshold_counts(category, scores, threshold)
    return out


def threshold_counts(category: Category, scores: np.ndarray, threshold: Threshold) -> dict:
    """What a threshold does on a labelled category: images flagged ``defective`` (``score >= value``, as
    :meth:`Threshold.verdict`) among the anomalous ones (``defects_caught``) and the normal ones
    (``false_alarms``), with the rates, and per defect type (``per_defect``: caught and missed)."""
    flagged = np.array([threshold.verdict(float(v)) == "defective" for v in scores], dtype=bool)
    labels = category.labels
    n_anomalous, n_normal = int(labels.sum()), int((labels == 0).sum())
    caught, alarms = int(flagged[labels == 1].sum()), int(flagged[labels == 0].sum())
    per_defect = {}
    for d in category.defects:
        of_d = np.array([s.label == 1 and s.defect == d for s in category.samples])
        per_defect[d] = {
            "n_anomalous": int(of_d.sum()),
            "caught": int(flagged[of_d].sum()),
            "missed": int((~flagged[of_d]).sum()),
        }
    return {
        **threshold.to_dict(),
        "n_normal": n_normal,
        "n_anomalous": n_anomalous,
        "defects_caught": caught,
        "defects_missed": n_anomalous - caught,
        "false_alarms": alarms,
        "normal_passed": n_normal - alarms,
        "recall": caught / n_anomalous if n_anomalous else None,
        "false_alarm_rate": alarms / n_normal if n_normal else None,
        "precision": caught / (caught + alarms) if caught + alarms else None,
        "per_defect": per_defect,
    }


def _defect_metrics(category: Category, defect: str, result, masks: np.ndarray, with_mask: np.ndarray) -> dict:
    """Image and pixel metrics on the normal images plus the anomalous images of one defect type."""
    keep = np.array([s.label == 0 or s.defect == defect for s in category.samples])
    m = all_metrics(category.labels[keep], result.image_scores.numpy()[keep])
    keep_px = keep[with_mask]  # masks hold the rows of the images with a mask, in order
    m.update(pixel_metrics(masks[keep_px], result.maps.numpy()[with_mask][keep_px]))
    return m


def pixel_metrics(masks: np.ndarray, maps: np.ndarray) -> dict[str, float]:
    """The four pixel metrics (``nan`` without both normal and anomalous pixels, without a warning: the
    caller reports undefined metrics itself)."""
    if masks.size == 0 or not masks.any() or masks.all():
        return {k: float("nan") for k in METRICS if k.startswith("pixel")}
    m = all_metrics(np.array([0, 1]), np.array([0.0, 1.0]), masks, maps)
    return {k: v for k, v in m.items() if k.startswith("pixel")}


def mean_over_seeds(per_seed: list[dict[str, float]]) -> dict[str, float]:
    """Every metric's mean over the seeds, and with several seeds its standard deviation (``<key>_std``,
    population std, ddof 0)."""
    out: dict[str, float] = {}
    for key in per_seed[0]:
        vals = np.array([m[key] for m in per_seed], dtype=np.float64)
        out[key] = float(vals.mean())
        if len(per_seed) > 1:
            out[f"{key}_std"] = float(vals.std(ddof=0))
    return out


def fingerprint(config: DetectorConfig, category: Category, seeds: list[int], fitted: dict | None = None) -> str:
    """What a saved category result depends on: the settings that change numbers
    (:meth:`~dualclip.config.DetectorConfig.numbers_key`), the weights (a local
    file by path, size and modification time), the data (paths, labels; every image, mask and golden reference
    file's size, modification time and content hash: :func:`~dualclip.data.images.file_fingerprint`), the
    seeds and the dualclip version. ``fitted``: the tested profile's
    identity and threshold. A saved result is reused only under the same fingerprint."""
    cfg = config.numbers_key()  # the method and the arithmetic: how it runs changes no saved number
    cfg["method"].pop("seed")  # the seeds are listed on their own
    weights = config.pretrained
    if isinstance(weights, str) and Path(weights).is_file():
        st = Path(weights).stat()
        weights = [str(Path(weights).resolve()), st.st_size, st.st_mtime_ns]
    from .backbone import matching_defaults

    payload = {
        "config": cfg,
        "matching_defaults": list(matching_defaults(config.backbone)),
        "weights": weights,
        "seeds": seeds,
        "version": __version__,
        "mask_threshold": category.mask_threshold,
        "samples": [
            [
                str(s.path.resolve()),
                file_fingerprint(s.path),
                s.label,
                str(s.mask.resolve()) if s.mask else None,
                file_fingerprint(s.mask) if s.mask else None,
            ]
            for s in category.samples
        ],
        "references": [[str(Path(p).resolve()), file_fingerprint(p)] for p in category.references],
    }
    if fitted is not None:
        payload["fitted"] = fitted
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def results_table(results: dict, fmt: str) -> str:
    """results.md (``fmt="md"``: percentages, ± std over several seeds, n/a where undefined, the warnings)
    or results.csv (``fmt="csv"``: percentages with two decimals, empty where undefined)."""
    rows = []
    for name, r in results["categories"].items():
        rows.append(((name, ""), r))
        rows += [((name, d), dr) for d, dr in (r.get("per_defect") or {}).items()]
    rows.append((("mean", ""), results["mean"]))
    multi = len(results["config"]["seeds"]) > 1

    def cell(r, k):
        if r.get(k) is None or np.isnan(r[k]):
            return "n/a"
        s = f"{100 * r[k]:.1f}"
        return f"{s} ± {100 * r[k + '_std']:.1f}" if multi and f"{k}_std" in r else s

    header = ["category", *[k.replace("_", " ") for k in METRICS], "ms/image"]

    def ms(r, fmt):
        v = r.get("ms_per_image")
        return "" if v is None or not np.isfinite(v) else format(v, fmt)

    body = [
        [f"↳ {d}" if d else name, *[cell(r, k) for k in METRICS], ms(r, ".0f") or ("" if d else "n/a")]
        for (name, d), r in rows
    ]
    if fmt == "csv":
        buf = io.StringIO()
        w = csv.writer(buf)
        w.writerow(["category", "defect", *METRICS, "ms_per_image"])
        for (name, d), r in rows:
            w.writerow(
                [
                    name,
                    d,
                    *[f"{100 * r[k]:.2f}" if r.get(k) is not None and np.isfinite(r[k]) else "" for k in METRICS],
                    ms(r, ".1f"),
                ]
            )
        return buf.getvalue()
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in body]
    seeds = results["config"]["seeds"]
    lines += ["", f"Metrics in %, {f'mean ± std over seeds {seeds}' if multi else f'seed {seeds[0]}'}."]
    if any(d for (_, d), _ in rows):
        lines += ["↳ rows: one defect type against every normal image of its category (not in the mean)."]
    shots = results["config"].get("shots")
    if shots:
        lines += [f"Few-shot: {shots} golden references per category from its normal training images."]
    lines += _threshold_table(results)
    notes = [f"- {name}: {w}" for name, ws in results.get("warnings", {}).items() for w in ws]
    if notes:
        lines += ["", f"**Warnings ({len(notes)})**", "", *notes]
    return "\n".join(lines) + "\n"


def _threshold_table(results: dict) -> list[str]:
    """results.md lines for a tested profile: per category (and defect type) what its threshold flags."""
    judged = {n: r["at_threshold"] for n, r in results["categories"].items() if r.get("at_threshold")}
    if not judged:
        return []
    sources = sorted({t["source"] for t in judged.values()})
    lines = ["", f"**Verdicts** at the threshold ({'; '.join(sources)}): defective iff score >= threshold.", ""]
    lines += ["| category | threshold | defects caught | defects missed | false alarms | normal passed |"]
    lines.append("|---|---|---|---|---|---|")
    for name, t in judged.items():
        lines.append(
            f"| {name} | {t['value']:.4g} | {t['defects_caught']} of {t['n_anomalous']} | {t['defects_missed']} | "
            f"{t['false_alarms']} of {t['n_normal']} | {t['normal_passed']} |"
        )
        if len(t["per_defect"]) > 1:
            lines += [
                f"| ↳ {d} | | {c['caught']} of {c['n_anomalous']} | {c['missed']} | | |"
                for d, c in t["per_defect"].items()
            ]
    return lines


def run_eval(
    config: DetectorConfig,
    categories: list[Category],
    seeds: list[int],
    out: str | Path,
    force: bool = False,
    extra: dict | None = None,
    require_masks: bool = False,
    warn=None,
    fitted: DualClipDetector | None = None,
    threshold: Threshold | None = None,
) -> dict:
    """Evaluate every category and write ``results.json``, ``results.md`` and ``results.csv``.

    Every category is checked (:meth:`Category.check`) before any is scored. A category saved under ``out``
    is reused only when its settings fingerprint (:func:`fingerprint`) matches; otherwise, or with
    ``force``, it is recomputed. ``warn`` (default: stderr) receives one line per recomputed category and
    per warning. ``fitted``, ``threshold``: test a profile (:func:`evaluate_category`).
    """
    warn = warn or log_line
    out = Path(out)
    folder = EvalFolder(out, [cat.name for cat in categories])  # before any image is read
    checked = {cat.name: cat.check(require_masks) for cat in categories}
    run_config = {
        **config.to_dict(),
        "seeds": seeds,
        "require_masks": require_masks,
        "protocol": "maps and masks at the processing resolution S (masks nearest-resized); AUPRO to FPR 0.3; "
        "anomalous images without a mask count in the image metrics only",
        "versions": {"dualclip": __version__, "torch": torch.__version__, "python": platform.python_version()},
        "machine": {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads()},
        **(extra or {}),
    }
    out.mkdir(parents=True, exist_ok=True)
    with output_lock(out):  # one run at a time writes a folder
        cache: dict = {}
        results: dict = {"config": run_config, "categories": {}}
        identity = None if fitted is None else _profile_identity(fitted, threshold)  # the bank hashed once
        bar = tqdm(categories, desc="categories", unit="cat", disable=not config.progress)
        for cat in bar:
            bar.set_postfix_str(cat.name)
            saved = category_file(cat.name)
            key = fingerprint(config, cat, seeds, identity)
            previous = _load_saved(out / saved)
            if previous is not None and not force:
                if previous.get("fingerprint") == key:
                    results["categories"][cat.name] = previous
                    warn(f"{cat.name}: saved with the same settings and data: reused; force=True recomputes it")
                    continue
                warn(f"{cat.name}: saved with other settings, data or version (fingerprint differs): recomputing")
            res = {"fingerprint": key, **evaluate_category(config, cat, seeds, cache, fitted, threshold)}
            res["warnings"] = list(dict.fromkeys(checked[cat.name] + res["warnings"]))
            folder.write_json(saved, res)
            results["categories"][cat.name] = res
        results["mean"] = macro_mean(list(results["categories"].values()))
        results["warnings"] = {n: r["warnings"] for n, r in results["categories"].items() if r.get("warnings")}
        results["n_warnings"] = sum(len(w) for w in results["warnings"].values())
        for name, ws in results["warnings"].items():
            for w in ws:
                warn(f"warning: {name}: {w}")
        folder.write_json("results.json", results)
        folder.write_text("results.md", results_table(results, "md"))
        folder.write_text("results.csv", results_table(results, "csv"))
    return results


def _profile_identity(fitted: DualClipDetector, threshold: Threshold | None) -> dict:
    """What a tested profile's results depend on beyond its settings: the profile itself and the threshold."""
    th = threshold or fitted.threshold_
    return {"profile": fitted.profile_fingerprint(), "threshold": th and th.to_dict()}


def macro_mean(rows: list[dict]) -> dict[str, float]:
    """The mean over categories of every metric (and its ``_std``), ignoring categories where it is undefined;
    ``nan`` where it is undefined everywhere."""
    out = {}
    for key in (*METRICS, "ms_per_image", "peak_rss_mb"):
        for k in (key, f"{key}_std"):
            if any(k in r for r in rows):
                vals = np.array([r[k] for r in rows if r.get(k) is not None], dtype=np.float64)
                finite = vals[np.isfinite(vals)]
                out[k] = float(finite.mean()) if finite.size else float("nan")
    return out


def _load_saved(path: Path) -> dict | None:
    """A saved category result, or None (absent, unreadable, or not a category result: its fingerprint, metrics
    and warnings of the wrong kind)."""
    if not path.is_file():
        return None
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return None

    def number(v) -> bool:
        return v is None or (isinstance(v, int | float) and not isinstance(v, bool))

    valid = (
        isinstance(doc, dict)
        and isinstance(doc.get("fingerprint"), str)
        and "image_auroc" in doc
        and all(number(doc[k]) for k in METRICS if k in doc)
        and isinstance(doc.get("warnings"), list)
        and all(isinstance(w, str) for w in doc["warnings"])
    )
    return doc if valid else None  # damaged or edited: recomputed
