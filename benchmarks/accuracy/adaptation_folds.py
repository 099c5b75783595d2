"""Test-time adaptation per defect type: is it on by default?

Folds as in `matching_folds.py`. The detector's defaults (matching chosen by leave-one-defect-type-out), k = 1,
adaptation off and on (its default budget), seeds 0, 1, 2. Adaptation would be on by default only if it
helped on every fold (mean of image AUROC, pixel AUROC and AUPRO, beyond one seed spread).

    .venv/bin/python -m benchmarks.accuracy.adaptation_folds --json runs/bench/adaptation_folds.json
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

from benchmarks.accuracy.pairing_folds import folds
from benchmarks.common import SHARED, write_section

METRICS = ("image_auroc", "pixel_auroc", "pixel_aupro")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", type=Path, required=True)
    ap.add_argument("--quick", action="store_true", help="seed 0 only")
    ap.add_argument("--backbone", default="effnet-lite0")
    ap.add_argument("--pretrained", default="default")
    args = ap.parse_args()
    if not SHARED.is_dir():
        print(f"adaptation_folds: skipped, {SHARED} is absent", file=sys.stderr)
        write_section(args.json, "adaptation_folds", [], {"skipped": f"{SHARED} is absent"})
        return
    import dataclasses

    from dualclip import DetectorConfig, DualClipDetector
    from dualclip.metrics import all_metrics

    seeds = [0] if args.quick else [0, 1, 2]
    base = DetectorConfig(backbone=args.backbone, pretrained=args.pretrained, progress=False)
    backbone = DualClipDetector(base).backbone
    results: dict[str, dict[str, list[dict]]] = {}
    for cat in folds():
        images = cat.images()
        masks = cat.masks(backbone.image_size)
        for tta in (False, True):
            for seed in seeds:
                det = DualClipDetector(dataclasses.replace(base, tta=tta, seed=seed), backbone=backbone)
                r = det.score_images(images)
                results.setdefault(cat.name, {}).setdefault("on" if tta else "off", []).append(
                    all_metrics(cat.labels, r.image_scores.numpy(), masks, r.maps.numpy())
                )
        print(f"{cat.name}: done", flush=True)

    def mean3(r):
        return statistics.fmean(r[m] for m in METRICS)

    rows, helps = [], {}
    for fold, by in results.items():
        for mode in ("off", "on"):
            rs = by[mode]
            cells = []
            for m in METRICS:
                vals = [100 * r[m] for r in rs]
                cells.append(f"{statistics.fmean(vals):.1f} ± {statistics.pstdev(vals):.1f}")
            rows.append([fold, mode, *cells, f"{100 * statistics.fmean(mean3(r) for r in rs):.1f}"])
        off = [mean3(r) for r in by["off"]]
        on = [mean3(r) for r in by["on"]]
        spread = max(statistics.pstdev(off), statistics.pstdev(on))
        helps[fold] = statistics.fmean(on) - statistics.fmean(off) > spread
    table = {
        "title": f"Test-time adaptation per defect type ({args.backbone} defaults, k = 1; mean ± std over seeds "
        f"{', '.join(map(str, seeds))}; %). Helps beyond one seed spread on: "
        + (", ".join(f for f, h in helps.items() if h) or "no fold"),
        "headers": ["fold", "adaptation", *METRICS, "mean of the three"],
        "rows": rows,
    }
    print(table["title"])
    for row in rows:
        print("  ", row)
    write_section(args.json, "adaptation_folds", [table], {"results": results, "helps": helps})


if __name__ == "__main__":
    main()
