"""Accuracy on real defect data: effnet-lite0, the visual branch at k = 1 (the paper's
setting), k = 3, k = all (full mutual scoring) and golden normal references, each with and without
adaptation; image AUROC, pixel AUROC, AUPRO as mean ± std over seeds.

Data from ../shared/datasets (read in place; the section is skipped, with the reason, where it is absent):
- magnetic_tile: 100 defect-free + 100 defective images (the subset of docs/results.md); golden references: the next
  4 defect-free images in name order (not in the test set);
- mpdd_metal_plate: the ``test`` split (26 good + 21 defective); golden references: the first 4 defect-free
  images of the ``train`` split.
Settings without randomness (k = all and golden references without adaptation) run once.

    python -m benchmarks.accuracy.accuracy --json runs/bench/accuracy.json [--quick]
"""

from __future__ import annotations

import dataclasses
import sys

from benchmarks.common import SHARED, pm, section_args, write_section

SEEDS = (0, 1, 2)
N_GOLDEN = 4


def datasets():
    from dualclip.data import datasets as D

    mt, mp = SHARED / "magnetic_tile", SHARED / "mpdd_metal_plate" / "data_supervised" / "metal_plate"
    (magnetic,) = D.folder(
        "magnetic_tile",
        normal=[str(mt / "MT_Free" / "Imgs" / "*.jpg")],
        anomalous=[str(mt / c / "Imgs" / "*.jpg") for c in ("MT_Blowhole", "MT_Crack", "MT_Fray")],
        mask_suffix=".png",
        max_normal=100,
        max_anomalous=100,
        mask_threshold=127,  # anti-aliased 0/255 masks (SOURCE.txt)
    )
    (free,) = D.folder("free", normal=[str(mt / "MT_Free" / "Imgs" / "*.jpg")], max_normal=100 + N_GOLDEN)
    magnetic_golden = [s.path for s in free.samples[100:]]
    (plate,) = D.folder("metal_plate", images=[str(mp / "test" / "images")], mask_dirs=[str(mp / "test" / "masks")])
    (train,) = D.folder("train", images=[str(mp / "train" / "images")], mask_dirs=[str(mp / "train" / "masks")])
    plate_golden = [s.path for s in train.samples if s.label == 0][:N_GOLDEN]
    return [(magnetic, magnetic_golden), (plate, plate_golden)]


def main() -> None:
    args = section_args(__doc__.splitlines()[0])
    if not SHARED.is_dir():
        print(f"accuracy: skipped, {SHARED} is absent (real data lives in ../shared/datasets)", file=sys.stderr)
        write_section(args.json, "accuracy", [], {"skipped": f"{SHARED} is absent"})
        return
    from dualclip import DetectorConfig
    from dualclip.evaluation import evaluate_category

    seeds = list(SEEDS[:1] if args.quick else SEEDS)
    settings = [("k = 1 (random partner)", 1, False), ("k = 3", 3, False), ("k = all (full mutual)", "all", False)]
    settings.append((f"golden ({N_GOLDEN} normal references)", 1, True))
    cache: dict = {}
    rows, raw = [], {}
    for cat, golden in datasets():
        for label, k, use_golden in settings:
            if args.quick and k == "all" and len(cat.samples) > 100:
                continue  # 19,900 pairs of 1600 x 1600 patches: full mode only
            for tta in (False, True):
                deterministic = not tta and (k == "all" or use_golden)
                run_seeds = seeds[:1] if deterministic else seeds
                c = dataclasses.replace(cat, references=golden if use_golden else [])
                cfg = DetectorConfig(backbone="effnet-lite0", k=k, tta=tta, progress=False)
                r = evaluate_category(cfg, c, run_seeds, cache)
                per = r["per_seed"]
                raw[f"{cat.name}|{label}|tta={tta}"] = r
                rows.append(
                    [
                        cat.name,
                        label,
                        "on" if tta else "off",
                        pm([m["image_auroc"] for m in per]),
                        pm([m["pixel_auroc"] for m in per]),
                        pm([m["pixel_aupro"] for m in per]),
                        f"{sum(m['ms_per_image'] for m in per) / len(per):.0f}",
                        "—" if deterministic else len(run_seeds),
                    ]
                )
                print(" | ".join(str(x) for x in rows[-1]), file=sys.stderr, flush=True)
    table = {
        "title": "Accuracy on real data (effnet-lite0, S = 320, %)",
        "headers": ["dataset", "references", "adaptation", "image AUROC", "pixel AUROC", "AUPRO", "ms/image", "seeds"],
        "rows": rows,
        "notes": [
            f"Mean ± std over seeds {seeds} (population std); '—': no random choice, run once. Maps and masks at "
            "S = 320, AUPRO to FPR 0.3. Several references combine by the default `mean_low30` (the minimum for "
            "k <= 3; with k = all, the mean of the 30% closest). magnetic_tile: 100 + 100 images, golden references the next "
            f"{N_GOLDEN} defect-free ones; metal_plate: test split, golden references the first {N_GOLDEN} "
            "defect-free train images." + (" Quick mode: one seed, k = all only on metal_plate." if args.quick else "")
        ],
    }
    write_section(args.json, "accuracy", [table], raw)


if __name__ == "__main__":
    main()
