"""Border treatments of a saved profile's visual patch scores, on the folds of ``profile_worst_folds.py``.

Every defect-free tile's hottest pixels lie mostly in a border band (72-81% of its top 1% with the profile
default, 57% with the golden baseline). This script fits the profile default
(``effnet-320-reflect / hybrid-robust / 3 / none``) once per (fold, N, seed) and rescores the same visual patch
scores ``V`` (``(images, positions)``, profile units) four ways, all from the fitting images' own leave-one-out
scores against each other (full bank; ring = distance from the grid's border, :func:`border_rings`):

* ``ring-additive``: ``V`` minus the ring's median normal score (the library's ``centring="ring"``);
* ``pad-damp``: ``V`` times the share of a 3 x 3 window inside the grid (2/3 on edges, 4/9 at corners), the
  factor by which the golden baseline's ``count_include_pad`` average shrinks border features;
* ``ring-scale-q99``: each ring's normal median and 99th percentile mapped onto the interior's (rings >= 2);
* ``ring-max-cap``: ``V`` minus how far the ring's 99th percentile exceeds the interior's.

Maps are smoothed and scored as the library does (sigma at the processing size, image score = max), metrics as
``profile_worst_folds.py``. A diagnostic: none of these is a library setting. Seed 0, N = 10 and 50.

    .venv/bin/python -m benchmarks.accuracy.profile_border_treatments --json runs/bench/profile_border.json
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
    fitting_images,
    pools_and_tests,
)
from benchmarks.common import SHARED

DEFAULT = "effnet-320-reflect / hybrid-robust / 3 / none"


def treatments(visual, normal, grid):
    """The rescored ``(N, P)`` visual scores by name, from the normal images' ``(R, P)`` leave-one-out scores."""
    import torch
    import torch.nn.functional as F

    from dualclip.scoring.position import border_rings

    rings = border_rings(grid)
    med, q99 = torch.zeros(rings.numel()), torch.zeros(rings.numel())
    for r in rings.unique():
        sel = rings == r
        med[sel] = normal[:, sel].median()
        q99[sel] = torch.quantile(normal[:, sel].reshape(-1).float(), 0.99)
    inner = rings >= 2
    q_in = torch.quantile(normal[:, inner].reshape(-1).float(), 0.99)
    med_in = normal[:, inner].median()
    inside = F.avg_pool2d(torch.ones(1, 1, *grid), 3, 1, 1, count_include_pad=True).reshape(-1)
    return {
        "none": visual,
        "ring-additive": visual - med,
        "pad-damp": visual * inside,
        "ring-scale-q99": med_in + (visual - med) * (q_in - med_in) / (q99 - med),
        "ring-max-cap": visual - torch.clamp(q99 - q_in, min=0),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", type=Path, required=True)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if not SHARED.is_dir():
        print(f"profile_border_treatments: skipped, {SHARED} is absent", file=sys.stderr)
        return
    import torch

    from dualclip import DualClipDetector
    from dualclip.atomic import write_json
    from dualclip.metrics import _region_labels
    from dualclip.scoring import upsample
    from dualclip.scoring.matching import combine_parts
    from dualclip.scoring.sources import bank_scores, flat_bank

    results = json.loads(args.json.read_text()) if args.json.is_file() else {}
    backbone = None
    for cat, pool in pools_and_tests():
        images = cat.images()
        regions = _region_labels(cat.masks(EVAL_SIZE)[cat.has_mask])
        for n in SIZES_N:
            key = f"{cat.name}, N = {n}|{args.seed}"
            if key in results:
                continue
            t = time.perf_counter()
            train = fitting_images(pool, n, args.seed)
            n_eff = len(train)
            det = DualClipDetector(config_of(DEFAULT, args.seed), backbone=backbone)
            backbone = det.backbone
            det.fit(train)
            matching, fusion = det.matching_settings(), det.fusion()
            feats = det.features(images)
            visual, _ = det.profile_visual(matching.spaces(feats.match_features, feats.grid), feats.grid)
            normal_feats = det.features(train)
            spaces = matching.spaces(normal_feats.match_features, feats.grid)
            ids = torch.arange(n_eff)
            owner = ids.repeat_interleave(feats.grid[0] * feats.grid[1])
            normal = combine_parts(bank_scores(spaces, flat_bank(spaces), ids, owner), det._profile_bank().parts)
            results[key] = {}
            for name, v in treatments(visual, normal, feats.grid).items():
                maps = at_eval_size(upsample(v, feats.grid, fusion.size, fusion.sigma))
                results[key][name] = evaluate_maps(cat, cat.labels, regions, maps)
            print(
                key,
                {k: round(100 * r["image_auroc"], 1) for k, r in results[key].items()},
                f"{time.perf_counter() - t:.0f} s",
                flush=True,
            )
            write_json(args.json, results)  # atomic: an interrupted run keeps the cells saved so far


if __name__ == "__main__":
    main()
