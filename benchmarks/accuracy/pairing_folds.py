"""Partner selection on the shared data, every defect type on its own.

Folds: magnetic_tile's three defect types (each with the first 100 defect-free images; masks > 127, as its
SOURCE.txt says) and metal_plate's test split. Strategies: `random` (default), `similar` (references drawn at
random among the more similar half) and the nearest partner alone (`similar` with a pool of one image: the
old `similar`). Only `random` is offered by the detector: `similar` was removed on this table's evidence, so
its rows are computed here (`similar_references`, this script's own) with the library's pieces (features once per fold, then
`pair_references` -> `match_spaces` -> `reference_scores` -> `upsample` -> `map_scores`: the detector's visual-only path,
checked equal to `DualClipDetector` for `random`). effnet-lite0, k = 1, no adaptation, seeds 0, 1, 2. Nothing
is chosen on these folds: the strategies were fixed before they were run, and every fold is reported.

    .venv/bin/python -m benchmarks.accuracy.pairing_folds --json runs/bench/pairing_folds.json
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from benchmarks.common import SHARED, write_section

STRATEGIES = {
    "random (offered)": ("random", 0.5),
    "similar, drawn from the more similar half (removed)": ("similar", 0.5),
    "nearest only (the old similar, removed)": ("similar", 1e-9),
}
METRICS = ("image_auroc", "pixel_auroc", "pixel_aupro")


def similar_references(n, k, seed, global_embeddings, forbidden, pool_fraction):
    """The research variant the detector does not offer: each image's ``k`` references drawn at random (seeded)
    from its ``ceil(pool_fraction * (n - 1))`` most cosine-similar other images by global embedding (a pool of
    one: the nearest image); never itself or a ``forbidden`` partner while another is left."""
    import math

    import numpy as np
    import torch
    import torch.nn.functional as F

    k_eff = min(int(k), n - 1)
    allowed = ~forbidden.bool()
    allowed.fill_diagonal_(False)
    rng = np.random.default_rng(seed)
    g = F.normalize(global_embeddings.float(), dim=-1)
    sim = (g @ g.T).masked_fill(~allowed, -math.inf)
    order = torch.sort(sim, dim=1, descending=True, stable=True).indices  # ties broken by index
    pool = max(k_eff, math.ceil(pool_fraction * (n - 1)))
    refs = []
    for i in range(n):
        cands = [j for j in order[i, :pool].tolist() if allowed[i, j]] or [j for j in range(n) if j != i]
        pick = rng.choice(len(cands), size=min(k_eff, len(cands)), replace=False)
        refs.append([cands[p] for p in sorted(pick.tolist())])
    return refs


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
    import dataclasses

    import torch

    from dualclip import DetectorConfig, DualClipDetector
    from dualclip.backbone import extract_features
    from dualclip.data.images import thumbnails
    from dualclip.evaluation import mean_over_seeds
    from dualclip.metrics import all_metrics
    from dualclip.scoring import map_scores, match_spaces, near_duplicates, pair_references, reference_scores, upsample

    seeds = [0] if args.quick else [0, 1, 2]
    cfg = DetectorConfig(backbone="effnet-lite0", k=1, tta=False, progress=False)
    det = DualClipDetector(cfg)
    raw, rows = {}, []
    for cat in folds():
        images = cat.images()
        feats = extract_features(det.backbone, images, cfg.batch_size, keep_patch_embeddings=False)
        dup = near_duplicates(thumbnails(images), cfg.duplicate_tolerance)
        distance, sizes = det.matching()
        spaces = match_spaces(feats.match_features, feats.grid, distance, sizes)
        size = det.backbone.image_size
        masks = cat.masks(size)
        for name, (strategy, pool) in STRATEGIES.items():
            per_seed = []
            for seed in seeds:
                if strategy == "random":
                    refs = pair_references(len(images), 1, seed, forbidden=dup)
                else:
                    refs = similar_references(len(images), 1, seed, feats.global_embedding, dup, pool)
                visual = torch.stack([reference_scores(s, refs, distance=distance) for s in spaces]).mean(0)
                maps = upsample(visual, feats.grid, size, cfg.sigma)
                scores = map_scores(maps, cfg.image_score)
                per_seed.append(all_metrics(cat.labels, scores.numpy(), masks, maps.numpy()))
                if strategy == "random" and seed == seeds[0]:  # the same numbers as the detector itself
                    direct = DualClipDetector(dataclasses.replace(cfg, seed=seed), backbone=det.backbone)
                    assert (direct.score_images(images).image_scores == scores).all()
            r = mean_over_seeds(per_seed)
            raw[f"{cat.name} | {name}"] = r
            cells = [
                f"{100 * r[m]:.1f}" + (f" ± {100 * r[m + '_std']:.1f}" if f"{m}_std" in r else "") for m in METRICS
            ]
            rows.append([cat.name, f"{len(images)} ({int(cat.labels.sum())} defective)", name, *cells])
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
