"""Partner selection on the shared data, every defect type on its own (the pairing issue's table).

Folds: magnetic_tile's three defect types (each with the first 100 defect-free images; masks > 127, as its
SOURCE.txt says) and metal_plate's test split. Strategies: `random` (default), `similar` (references drawn at
random among the more similar half) and, for the record, the nearest partner alone (`similar` with a pool of
one image: the old `similar`, now not offered). effnet-lite0, k = 1, no adaptation, seeds 0, 1, 2. Nothing is
chosen on these folds: the strategies were fixed before they were run, and every fold is reported.

    .venv/bin/python benchmarks/pairing_folds.py --json runs/bench/pairing_folds.json
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from common import SHARED, write_section  # noqa: E402

STRATEGIES = {
    "random": {"pairing": "random"},
    "similar (pool: more similar half)": {"pairing": "similar"},
    "nearest only (old similar, removed)": {"pairing": "similar", "similar_pool": 1e-9},
}
METRICS = ("image_auroc", "pixel_auroc", "pixel_aupro")


def folds():
    from dualclip.data import datasets as D

    mt = SHARED / "magnetic_tile"
    mp = SHARED / "mpdd_metal_plate" / "data_supervised" / "metal_plate"
    out = []
    for defect in ("MT_Blowhole", "MT_Crack", "MT_Fray"):
        (cat,) = D.folder(
            f"magnetic_tile/{defect[3:]}",
            normal=[str(mt / "MT_Free" / "Imgs" / "*.jpg")],
            anomalous=[str(mt / defect / "Imgs" / "*.jpg")],
            mask_suffix=".png",
            max_normal=100,
            mask_threshold=127,
        )
        out.append(cat)
    (plate,) = D.folder("metal_plate", images=[str(mp / "test" / "images")], mask_dirs=[str(mp / "test" / "masks")])
    out.append(plate)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", type=Path, required=True)
    ap.add_argument("--quick", action="store_true", help="seed 0 only")
    args = ap.parse_args()
    if not SHARED.is_dir():
        print(f"pairing_folds: skipped, {SHARED} is absent", file=sys.stderr)
        write_section(args.json, "pairing_folds", [], {"skipped": f"{SHARED} is absent"})
        return
    from dualclip import DetectorConfig
    from dualclip.evaluation import evaluate_category

    seeds = [0] if args.quick else [0, 1, 2]
    base = DetectorConfig(backbone="effnet-lite0", k=1, tta=False, progress=False)
    cache: dict = {}
    raw, rows = {}, []
    for cat in folds():
        for name, settings in STRATEGIES.items():
            r = evaluate_category(dataclasses.replace(base, **settings), cat, seeds, cache)
            raw[f"{cat.name} | {name}"] = {k: r[k] for k in r if k != "per_seed"}
            cells = []
            for m in METRICS:
                std = f" ± {100 * r[m + '_std']:.1f}" if f"{m}_std" in r else ""
                cells.append(f"{100 * r[m]:.1f}{std}")
            rows.append([cat.name, f"{r['n_images']} ({r['n_anomalous']} defective)", name, *cells])
            print(rows[-1], flush=True)
    table = {
        "title": "Pairing strategies per defect type (effnet-lite0, k = 1, no adaptation; mean ± std over seeds "
        + ", ".join(map(str, seeds))
        + "; %)",
        "headers": ["fold", "images", "pairing", "image AUROC", "pixel AUROC", "AUPRO"],
        "rows": rows,
    }
    write_section(args.json, "pairing_folds", [table], raw)


if __name__ == "__main__":
    main()
