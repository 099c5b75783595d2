"""A saved profile's map averaged with the plain golden-reference nearest neighbour's, on the folds of
``profile_worst_folds.py`` (a diagnostic; not a library setting).

The profile default (``effnet-320-reflect / hybrid-robust / 3 / none``) loses image AUROC to the plain golden
baseline on magnetic_tile/Crack (its border response; ``profile_border_treatments.py``), and the baseline loses
pixel AUROC and AUPRO to it nearly everywhere. This script scores each (fold, N, seed) three ways from one fit:
the profile's map (profile units, smoothed), the baseline's map (EfficientNet-Lite0 224 px, 3 x 3 average
counting the zero padding, Euclidean to the nearest patch of the N fitting images), and their mean after the
baseline's distances are brought to the same units as the profile's patch scores: minus the mean and divided by
the standard deviation of the fitting images' leave-one-out distances (each fitting image against the other
N - 1), as a profile's ``Moments`` do. Weights 1/2 and 1/2, fixed before any run; designed after Crack was seen,
so it is judged on the other four folds.

    .venv/bin/python -m benchmarks.accuracy.profile_ensemble --json runs/bench/profile_ensemble.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from benchmarks.accuracy.profile_worst_folds import (
    EVAL_SIZE,
    SIZES_N,
    at_eval_size,
    config_of,
    evaluate_maps,
    extract,
    extractor,
    fitting_images,
    pools_and_tests,
)
from benchmarks.common import SHARED

DEFAULT = "effnet-320-reflect / hybrid-robust / 3 / none"


def pooled(layers, grid):
    """The baseline's patch features: layers concatenated, 3 x 3 average counting the zero padding."""
    import torch
    import torch.nn.functional as F

    n = layers[0].shape[0]
    x = torch.cat(layers, dim=-1).transpose(1, 2).reshape(n, -1, *grid)
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=True).flatten(2).transpose(1, 2)


def nearest(q, bank):
    """``(N, P)`` Euclidean distance of every query patch to its nearest bank patch."""
    import torch

    return torch.stack([torch.stack([torch.cdist(qi, b).amin(1) for b in bank.split(8192)]).amin(0) for qi in q])


def baseline_and_units(test_layers, train_layers, grid):
    """The baseline's ``(N, S, S)`` map at the metrics' size and the moments of its leave-one-out normal
    distances."""
    import torch
    import torch.nn.functional as F

    q, t = pooled(test_layers, grid), pooled(train_layers, grid)
    d = nearest(q, t.reshape(-1, t.shape[-1]))
    loo = torch.cat(
        [nearest(t[i : i + 1], torch.cat([t[:i], t[i + 1 :]]).reshape(-1, t.shape[-1])) for i in range(len(t))]
    )
    mu, sd = float(loo.double().mean()), float(loo.double().std(unbiased=False))
    up = F.interpolate(d.reshape(-1, 1, *grid), size=(EVAL_SIZE, EVAL_SIZE), mode="bilinear", align_corners=False)
    return up[:, 0], mu, sd


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", type=Path, required=True)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = ap.parse_args()
    if not SHARED.is_dir():
        print(f"profile_ensemble: skipped, {SHARED} is absent", file=sys.stderr)
        return
    from dualclip import DualClipDetector
    from dualclip.atomic import write_json
    from dualclip.metrics import _region_labels

    results = json.loads(args.json.read_text()) if args.json.is_file() else {}
    base_backbone, _ = extractor("baseline")
    backbone = None
    for cat, pool in pools_and_tests():
        images = cat.images()
        regions = _region_labels(cat.masks(EVAL_SIZE)[cat.has_mask])
        test_layers = grid = None
        for n in SIZES_N:
            for seed in args.seeds:
                key = f"{cat.name}, N = {n}|{seed}"
                if key in results:
                    continue
                t0 = time.perf_counter()
                train = fitting_images(pool, n, seed)
                if test_layers is None:
                    test_layers, grid = extract(base_backbone, images, 0)
                train_layers, _ = extract(base_backbone, train, 0)
                base, mu, sd = baseline_and_units(test_layers, train_layers, grid)
                det = DualClipDetector(config_of(DEFAULT, seed), backbone=backbone)
                backbone = det.backbone
                det.fit(train)
                prof = at_eval_size(det.score_images(images).maps)
                maps = {"profile": prof, "baseline": base, "mean of both": 0.5 * prof + 0.5 * (base - mu) / sd}
                results[key] = {k: evaluate_maps(cat, cat.labels, regions, m) for k, m in maps.items()}
                print(
                    key,
                    {
                        k: [round(100 * r[m], 1) for m in ("image_auroc", "pixel_auroc", "pixel_aupro")]
                        for k, r in results[key].items()
                    },
                    f"{time.perf_counter() - t0:.0f} s",
                    flush=True,
                )
                write_json(args.json, results)  # atomic: an interrupted run keeps the cells saved so far


if __name__ == "__main__":
    main()
