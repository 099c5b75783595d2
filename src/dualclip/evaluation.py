"""The evaluation protocol (METHOD.md §8): per category, then the macro mean; resumable and atomic.

Maps are scored at the processing resolution S with ground-truth masks resized to S (nearest), the field's
custom. With several seeds every metric is reported as mean and standard deviation over the seeds.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import os
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from . import __version__
from .config import DetectorConfig
from .data.datasets import Category
from .data.images import load_image
from .detector import DualClipDetector
from .metrics import all_metrics

METRICS = ("image_auroc", "image_ap", "image_f1max", "pixel_auroc", "pixel_ap", "pixel_f1max", "pixel_aupro")


def write_atomic(path: Path, text: str) -> None:
    """Write a file so that readers see the old or the new content, never a partial one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MiB."""
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / 1024 / 1024 if sys.platform == "darwin" else r / 1024


def evaluate_category(config: DetectorConfig, category: Category, seeds: list[int], detector_cache: dict) -> dict:
    """Metrics of one category for each seed, and their mean/std (against its golden references, if any)."""
    images = category.images()
    golden = [load_image(p) for p in category.references] or None
    per_seed = []
    for seed in seeds:
        cfg = dataclasses.replace(config, seed=seed)
        det = DualClipDetector(cfg, backbone=detector_cache.get("backbone"))
        start = time.perf_counter()
        result = det.score_images(images, class_name=category.name, golden=golden)
        elapsed = time.perf_counter() - start
        detector_cache["backbone"] = det.backbone
        size = result["maps"].shape[-1]
        m = all_metrics(category.labels, result["image_scores"].numpy(), category.masks(size), result["maps"].numpy())
        m["ms_per_image"] = 1000 * elapsed / len(images)
        m["peak_rss_mb"] = peak_rss_mb()
        per_seed.append(m)
    out: dict = {"n_images": len(images), "n_anomalous": int(category.labels.sum()), "seeds": seeds}
    if golden:
        out["n_references"] = len(golden)
    for key in per_seed[0]:
        vals = np.array([m[key] for m in per_seed], dtype=np.float64)
        out[key] = float(vals.mean())
        if len(seeds) > 1:
            out[f"{key}_std"] = float(vals.std(ddof=0))
    out["per_seed"] = per_seed
    return out


def _table(results: dict, fmt: str) -> str:
    rows = list(results["categories"].items()) + [("mean", results["mean"])]
    multi = len(results["config"]["seeds"]) > 1

    def cell(r, k):
        if k not in r or r[k] is None or np.isnan(r[k]):
            return "n/a"
        s = f"{100 * r[k]:.1f}"
        return f"{s} ± {100 * r[k + '_std']:.1f}" if multi and f"{k}_std" in r else s

    header = ["category", *[k.replace("_", " ") for k in METRICS], "ms/image"]
    body = [[name, *[cell(r, k) for k in METRICS], f"{r.get('ms_per_image', float('nan')):.0f}"] for name, r in rows]
    if fmt == "csv":
        buf = io.StringIO()
        w = csv.writer(buf)
        w.writerow(["category", *METRICS, "ms_per_image"])
        for name, r in rows:
            w.writerow(
                [name, *[f"{100 * r[k]:.2f}" if k in r else "" for k in METRICS], f"{r.get('ms_per_image', 0):.1f}"]
            )
        return buf.getvalue()
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in body]
    return (
        "\n".join(lines)
        + "\n\nMetrics in %, "
        + (
            "mean ± std over seeds " + str(results["config"]["seeds"])
            if multi
            else f"seed {results['config']['seeds'][0]}"
        )
        + ".\n"
    )


def run_eval(
    config: DetectorConfig,
    categories: list[Category],
    seeds: list[int],
    out: str | Path,
    force: bool = False,
    extra: dict | None = None,
) -> dict:
    """Evaluate every category (skipping those already saved under ``out`` unless ``force``) and write
    ``results.json``, ``results.md`` and ``results.csv``."""
    out = Path(out)
    cat_dir = out / "categories"
    cat_dir.mkdir(parents=True, exist_ok=True)
    run_config = {
        **config.to_dict(),
        "seeds": seeds,
        "protocol": "maps and masks at the processing resolution S (masks nearest-resized); AUPRO to FPR 0.3",
        "versions": {"dualclip": __version__, "torch": torch.__version__, "python": platform.python_version()},
        "machine": {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads()},
        **(extra or {}),
    }
    cache: dict = {}
    results: dict = {"config": run_config, "categories": {}}
    bar = tqdm(categories, desc="categories", unit="cat", disable=not config.progress)
    for cat in bar:
        bar.set_postfix_str(cat.name)
        saved = cat_dir / f"{cat.name}.json"
        if saved.is_file() and not force:
            results["categories"][cat.name] = json.loads(saved.read_text())
            continue
        res = evaluate_category(config, cat, seeds, cache)
        write_atomic(saved, json.dumps(res, indent=2))
        results["categories"][cat.name] = res
    keys = [k for k in next(iter(results["categories"].values())) if k not in ("per_seed", "seeds")]
    results["mean"] = {k: float(np.nanmean([r[k] for r in results["categories"].values() if k in r])) for k in keys}
    write_atomic(out / "results.json", json.dumps(results, indent=2))
    write_atomic(out / "results.md", _table(results, "md"))
    write_atomic(out / "results.csv", _table(results, "csv"))
    return results
