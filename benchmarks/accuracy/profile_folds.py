"""Saved profiles on the shared data: fit on N normal images that are not in the test set, score the fold.

Folds as in `matching_folds.py` (magnetic_tile's three defect types with the first 100 defect-free images as
test normals; metal_plate's test split). The N fitting images are drawn (seeded) from the normal images no
fold tests on: magnetic_tile's defect-free images after the first 100 (552), metal_plate's good train + val
images (54, so N = 150 is not possible there). Rows: the zero-shot default (images scored among
themselves, k = 1), the profile with the detector's defaults (effnet-lite0, fitted units, greedy coreset of
at most `memory_bank_size` patches), the profile keeping every patch (metal_plate, N = 50: the coreset's
effect; a full bank of magnetic_tile's 80,000-240,000 patches costs too much CPU time here), and a PatchCore-style golden-reference
baseline computed here with torch.cdist on the same features: raw blocks 4 + 10, 3 x 3 local average, a
greedy-coreset memory bank of the same size, Euclidean distance to the nearest bank patch, image score = max
of the map smoothed like the detector's (sigma 4). Seeds 0, 1, 2 draw the N images (and seed the coresets).

    .venv/bin/python -m benchmarks.accuracy.profile_folds --json runs/bench/profile_folds.json
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

from benchmarks.accuracy.pairing_folds import folds
from benchmarks.accuracy.profile_worst_folds import fitting_images
from benchmarks.common import SHARED, write_section

METRICS = ("image_auroc", "pixel_auroc", "pixel_aupro")
SIZES_N = (10, 50, 150)


def fit_pools():
    """Normal images no fold tests on, per product."""
    from dualclip.data.images import load_image

    mt = sorted((SHARED / "magnetic_tile" / "MT_Free" / "Imgs").glob("*.jpg"))[100:]
    mp_root = SHARED / "mpdd_metal_plate" / "data_supervised" / "metal_plate"
    mp = []
    for split in ("train", "val"):
        for img in sorted((mp_root / split / "images").glob("*.png")):
            mask = load_image(mp_root / split / "masks" / img.name).convert("L")
            if mask.getextrema()[1] == 0:  # good <=> mask all zero (SOURCE.txt)
                mp.append(img)
    return {"magnetic_tile": mt, "metal_plate": mp}


def patchcore_baseline(det, train, test, sigma, bank_size, seed):
    """PatchCore-style: raw 3 x 3-averaged features, a greedy-coreset bank, nearest-neighbour distance."""
    import torch
    import torch.nn.functional as F

    from dualclip.backbone import extract_features
    from dualclip.scoring import gaussian_blur
    from dualclip.scoring.coreset import greedy_coreset
    from dualclip.scoring.matching import neighbourhood_mean

    def feats(images):
        out = extract_features(det.backbone, images, 16, keep_patch_embeddings=False)
        return torch.cat([neighbourhood_mean(t, out.grid, 3) for t in out.match_features], -1), out.grid

    bank, _ = feats(train)
    bank = bank.reshape(-1, bank.shape[-1])
    bank = bank[greedy_coreset(bank, bank_size, seed)]
    q, grid = feats(test)
    d = torch.stack([torch.stack([torch.cdist(qi, b).amin(1) for b in bank.split(4096)]).amin(0) for qi in q])
    size = det.backbone.image_size
    maps = F.interpolate(d.reshape(-1, 1, *grid), size=(size, size), mode="bilinear", align_corners=False)[:, 0]
    return gaussian_blur(maps, sigma)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", type=Path, required=True)
    ap.add_argument("--quick", action="store_true", help="seed 0, N = 10 only")
    ap.add_argument("--folds", default=None, help="only the folds whose names contain one of these (comma-separated)")
    ap.add_argument("--merge", action="store_true", help="add these folds' results to those already in --json")
    ap.add_argument("--seeds", default=None, help="comma-separated seeds (default 0,1,2; --quick: 0)")
    ap.add_argument("--combine", type=Path, nargs="+", help="only write --json from these runs' JSON files")
    args = ap.parse_args()
    if args.combine:
        merge_files(args.json, args.combine)
        return
    if not SHARED.is_dir():
        print(f"profile_folds: skipped, {SHARED} is absent", file=sys.stderr)
        write_section(args.json, "profile_folds", [], {"skipped": f"{SHARED} is absent"})
        return
    import dataclasses

    from dualclip import DetectorConfig, DualClipDetector
    from dualclip.metrics import all_metrics
    from dualclip.scoring import map_scores

    seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else [0] if args.quick else [0, 1, 2]
    sizes_n = (10,) if args.quick else SIZES_N
    base = DetectorConfig(backbone="effnet-lite0", progress=False)
    pools = fit_pools()
    results: dict[str, dict[str, list[dict]]] = {}
    timings: dict[str, list[float]] = {}
    wanted = args.folds.split(",") if args.folds else None
    for cat in folds():
        if wanted and not any(w in cat.name for w in wanted):
            continue
        images = cat.images()
        pool = pools["metal_plate" if cat.name == "metal_plate" else "magnetic_tile"]
        size = DualClipDetector(base).backbone.image_size
        masks = cat.masks(size)
        fold = results.setdefault(cat.name, {})

        for seed in seeds:
            zs = DualClipDetector(dataclasses.replace(base, seed=seed)).score_images(images)
            fold.setdefault("zero-shot (k = 1)", []).append(
                all_metrics(cat.labels, zs.image_scores.numpy(), masks, zs.maps.numpy())
            )
        det = DualClipDetector(base)
        for n in sizes_n:
            if n > len(pool):
                continue
            for seed in seeds:
                train = fitting_images(pool, n, seed)
                variants = [("profile", base.memory_bank_size)]
                if n == 50 and cat.name == "metal_plate":
                    variants.append(("profile, every patch kept", None))
                for label, bank_size in variants:
                    det = DualClipDetector(
                        dataclasses.replace(base, seed=seed, memory_bank_size=bank_size), backbone=det.backbone
                    )
                    t = time.perf_counter()
                    det.fit(train)
                    fit_s = time.perf_counter() - t
                    t = time.perf_counter()
                    r = det.score_images(images)
                    timings.setdefault(f"{label}, N = {n}", []).append(
                        {"fit_s": fit_s, "score_ms_per_image": 1000 * (time.perf_counter() - t) / len(images)}
                    )
                    fold.setdefault(f"{label}, N = {n}", []).append(
                        all_metrics(cat.labels, r.image_scores.numpy(), masks, r.maps.numpy())
                    )
                maps = patchcore_baseline(det, train, images, base.sigma, base.memory_bank_size, seed)
                fold.setdefault(f"PatchCore-style baseline, N = {n}", []).append(
                    all_metrics(cat.labels, map_scores(maps).numpy(), masks, maps.numpy())
                )
            print(f"{cat.name}: N = {n} done", flush=True)

    if args.merge and args.json.is_file():
        import json

        old = json.loads(args.json.read_text())["raw"]
        results = {**old["results"], **results}
        timings = {k: old["timings"].get(k, []) + timings.get(k, []) for k in {*old["timings"], *timings}}

    tables = render(results, timings)
    for t in tables:
        print(t["title"])
        for row in t["rows"]:
            print("  ", row)
    write_section(args.json, "profile_folds", tables, {"results": results, "timings": timings})


def render(results: dict, timings: dict) -> list[dict]:
    """The tables of per-fold results (each fold with the seeds it was run with)."""

    def cell(rs, m):
        vals = [100 * r[m] for r in rs]
        return f"{statistics.fmean(vals):.1f} ± {statistics.pstdev(vals):.1f}" if len(vals) > 1 else f"{vals[0]:.1f}"

    rows = [[f, name, len(rs), *(cell(rs, m) for m in METRICS)] for f, by in results.items() for name, rs in by.items()]
    names = list(dict.fromkeys(n for by in results.values() for n in by))
    for name in names:
        have = [f for f in results if name in results[f]]
        rows.append(
            [
                f"mean of {len(have)} folds",
                name,
                "",
                *(
                    f"{statistics.fmean(100 * statistics.fmean(r[m] for r in results[f][name]) for f in have):.1f}"
                    for m in METRICS
                ),
            ]
        )
    cost = [
        [
            name,
            f"{statistics.fmean(t['fit_s'] for t in ts):.1f}",
            f"{statistics.fmean(t['score_ms_per_image'] for t in ts):.0f}",
        ]
        for name, ts in timings.items()
    ]
    return [
        {
            "title": "Saved profiles vs zero-shot vs a PatchCore-style baseline (effnet-lite0 defaults; mean ± std over "
            "the seeds, which draw the N fitting images; %)",
            "headers": ["fold", "mode", "seeds", *METRICS],
            "rows": rows,
        },
        {
            "title": "Profile cost on this machine, one core (mean over folds and seeds)",
            "headers": ["mode", "fit (s)", "scoring (ms / image)"],
            "rows": cost,
        },
    ]


def merge_files(out: Path, inputs: list[Path]) -> None:
    """One section from several runs' JSON files (e.g. folds run in parallel processes)."""
    import json

    results, timings = {}, {}
    for path in inputs:
        raw = json.loads(path.read_text())["raw"]
        results.update(raw["results"])
        for k, v in raw["timings"].items():
            timings.setdefault(k, []).extend(v)
    write_section(out, "profile_folds", render(results, timings), {"results": results, "timings": timings})


if __name__ == "__main__":
    main()
