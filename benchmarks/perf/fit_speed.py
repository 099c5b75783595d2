"""Fit speed: fitting a profile against extracting the same images' features (effnet-lite0, magnetic_tile).

For each N, in one process: the features of N defect-free magnetic_tile images (``DualClipDetector.features``,
after a warm-up), then ``fit`` on the same images (features again, memory-bank coreset, leave-one-out
scores), and the profile's accuracy on 50 other defect-free and 50 defective images (pixel AUPRO, pixel and
image AUROC) and its scoring time per image; each N twice, with the plain view (the default) and without it
(``plain_weight=0``), on the same backbone. ``--before FILE``: the same script's results on other code (e.g. the main branch, run from a
checkout of it: ``python -m benchmarks.perf.fit_speed --json runs/bench/fit_speed_main.json``), shown beside
these; default ``runs/bench/fit_speed_main.json`` where it exists.

    python -m benchmarks.perf.fit_speed --json runs/bench/fit_speed.json [--n 50,150] [--quick]
    python -m benchmarks.perf.fit_speed --json runs/bench/fit_speed.json --measured runs/bench/fit_speed.json
        (no measuring: the table again from a results file, e.g. once the --before file exists)
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from benchmarks.common import ROOT, SHARED, write_section

DEFECTS = ("MT_Blowhole", "MT_Crack", "MT_Fray")


def test_category():
    """50 defect-free images that no fit uses (the last in name order) and 50 defective ones, taken in turn
    from the three defect classes; masks binarised at 127 (magnetic_tile's SOURCE.txt)."""
    from dualclip.data.datasets import Category, Sample

    root = SHARED / "magnetic_tile"
    free = sorted((root / "MT_Free" / "Imgs").glob("*.jpg"))[-50:]
    per_class = [sorted((root / c / "Imgs").glob("*.jpg")) for c in DEFECTS]
    bad = [p for i in range(max(map(len, per_class))) for p in (c[i] for c in per_class if i < len(c))][:50]
    samples = [Sample(p, 0) for p in free] + [Sample(p, 1, p.with_suffix(".png"), p.parts[-3]) for p in bad]
    return Category("magnetic_tile", samples=samples, mask_threshold=127)


def measure(n: int, test, plain_weight: float | None, backbone=None) -> dict:
    from dualclip import DetectorConfig, DualClipDetector
    from dualclip.data.images import load_images
    from dualclip.metrics import aupro, image_auroc, pixel_auroc

    files = sorted((SHARED / "magnetic_tile" / "MT_Free" / "Imgs").glob("*.jpg"))[:n]
    images = load_images(files, strict=True)
    cfg = DetectorConfig(backbone="effnet-lite0", seed=0, progress=False, device="cpu", plain_weight=plain_weight)
    det = DualClipDetector(cfg, backbone=backbone)
    det.features(images[:2])  # warm-up: weights loaded, first-call costs paid
    start = time.perf_counter()
    det.features(images)
    features_s = time.perf_counter() - start
    start = time.perf_counter()
    det.fit(images)
    fit_s = time.perf_counter() - start
    meta = det.profile_.meta
    test_images = test.images()
    start = time.perf_counter()
    result = det.score_images(test_images)
    score_s = time.perf_counter() - start
    masks = test.masks(result.maps.shape[-1])
    maps = result.maps.numpy()
    return {
        "n": n,
        "plain_weight": det.plain_weight(),
        "score_ms": 1000 * score_s / len(test_images),
        "backbone": det.backbone,
        "patches": meta["bank_patches_total"],
        "bank": meta["bank_patches"],
        "features_s": features_s,
        "fit_s": fit_s,
        "ratio": fit_s / features_s,
        "aupro": aupro(masks, maps),
        "pixel_auroc": pixel_auroc(masks, maps),
        "image_auroc": image_auroc(test.labels, result.image_scores.numpy()),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="N = 50 only")
    ap.add_argument("--json", type=Path, required=True)
    ap.add_argument("--n", default="50,150", help="comma-separated numbers of normal images to fit")
    ap.add_argument("--before", type=Path, default=ROOT / "runs" / "bench" / "fit_speed_main.json")
    ap.add_argument("--measured", type=Path, help="take the rows from this results file instead of measuring")
    args = ap.parse_args()
    if args.measured:
        rows = json.loads(args.measured.read_text())["raw"]["rows"]
    else:
        test, rows = test_category(), []
        backbone = None
        for n in [50] if args.quick else [int(x) for x in args.n.split(",")]:
            for plain in (None, 0.0):  # the default (the plain view), then without it
                row = measure(n, test, plain, backbone)
                backbone = row.pop("backbone")
                rows.append(row)
                write_section(args.json, "fit_speed", [], {"rows": rows})  # each row kept as soon as measured
    before = {}
    if args.before.is_file() and args.before.resolve() != args.json.resolve():
        # rows measured before the plain view existed are rows without it
        before = {(r["n"], r.get("plain_weight", 0.0)): r for r in json.loads(args.before.read_text())["raw"]["rows"]}

    def key(r: dict) -> tuple:
        return r["n"], r.get("plain_weight", 0.0)

    def was(r: dict, field: str, fmt: str) -> str:
        return format(before[key(r)][field], fmt) if key(r) in before else "—"

    without = {r["n"]: r for r in rows if r.get("plain_weight", 0.0) == 0.0}

    def against_without(r: dict, field: str) -> str:
        w = without.get(r["n"])
        return "—" if w is None or w is r or field not in r else f"{r[field] / w[field]:.2f}x"

    table = {
        "title": "Fit speed: profile fitting against feature extraction (effnet-lite0, CPU)",
        "headers": [
            "N",
            "plain view",
            "patches",
            "bank",
            "features s",
            "fit s",
            "fit / features",
            "fit: with / without the plain view",
            "score ms / image",
            "score: with / without",
            "before: fit / features",
            "AUPRO %",
            "before: AUPRO %",
            "pixel AUROC %",
            "image AUROC %",
        ],
        "rows": [
            [
                r["n"],
                f"{r.get('plain_weight', 0.0):g}",
                r["patches"],
                r["bank"],
                f"{r['features_s']:.1f}",
                f"{r['fit_s']:.1f}",
                f"{r['ratio']:.1f}x",
                against_without(r, "fit_s"),
                f"{r['score_ms']:.0f}" if "score_ms" in r else "—",
                against_without(r, "score_ms"),
                was(r, "ratio", ".1f") + ("x" if key(r) in before else ""),
                f"{100 * r['aupro']:.2f}",
                "—" if key(r) not in before else f"{100 * before[key(r)]['aupro']:.2f}",
                f"{100 * r['pixel_auroc']:.2f}",
                f"{100 * r['image_auroc']:.2f}",
            ]
            for r in rows
        ],
        "notes": [
            "N defect-free magnetic_tile images (the first in name order), default settings (hybrid matching, "
            "memory bank of 16384 patches; with and without the plain view, `plain_weight` 0.5 and 0, each its own "
            "profile on the same backbone in the same process); score: `score_images` of the 100 test images; features: `DualClipDetector.features` of the same images in the same "
            "process, before the fit; fit: `DualClipDetector.fit` (features, coreset, leave-one-out scores). "
            "Accuracy of each profile on 50 other defect-free and 50 defective images (masks > 127). 'before': "
            f"this script on the code before the change ({args.before.name}"
            + (f", run at {json.loads(args.before.read_text())['machine']['date']})" if before else ", absent)")
            + "; the machine was shared, so compare the ratios, which are measured within one process.",
        ],
    }
    write_section(args.json, "fit_speed", [table], {"rows": rows, "before": list(before.values())})


if __name__ == "__main__":
    main()
