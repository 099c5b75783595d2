"""Scaling with the number of images per category, N = 10 ... 400.

Cost of our reference scoring (pairing + mutual nearest-neighbour matching) at k = 1 and k = 3 against
full mutual scoring (every image against all others, as MuSc does: ``k="all"``), on matching features of
the ViT-B-16-plus-240 preset's shape (4 layers x 225 patches x 896 channels; random unit vectors: the cost
does not depend on their values), with growth exponents fitted by least squares on log(time) vs log(N).
The backbone's time for N images is N times its measured per-image time at batch 8.

    python -m benchmarks.perf.scaling --json runs/bench/scaling.json [--quick] [--mutual-max N]
"""

from __future__ import annotations

import sys

import numpy as np

from benchmarks.common import fmt, section_args, timed, write_section

NS = (10, 25, 50, 100, 200, 400)
SHAPE = (4, 225, 896)  # ViT-B-16-plus-240 at 240 px: 4 matching layers, 15 x 15 patches, width 896


def exponent(ns: list[int], ts: list[float]) -> float:
    return float(np.polyfit(np.log(ns), np.log(ts), 1)[0])


def main() -> None:
    mutual_max = 400  # quick mode: 100
    if "--mutual-max" in sys.argv:
        i = sys.argv.index("--mutual-max")
        mutual_max = int(sys.argv[i + 1])
        del sys.argv[i : i + 2]
    args = section_args(__doc__.splitlines()[0])
    import torch
    import torch.nn.functional as F

    from dualclip.backbone import build_clip_backbone, extract_features
    from dualclip.data.synthetic import make_texture_set
    from dualclip.scoring import pair_references, reference_scores

    if args.quick:
        mutual_max = min(mutual_max, 100)
    torch.manual_seed(0)
    bb = build_clip_backbone("ViT-B-16-plus-240", pretrained=None, image_size=240)
    images = make_texture_set(6, 2, 240, seed=0)[0]
    backbone_s = timed(lambda: extract_features(bb, images, 8), 1 if args.quick else 3) / len(images)
    bb = None  # free the model before the matching runs

    gen = torch.Generator().manual_seed(0)
    all_feats = [F.normalize(torch.randn(max(NS), SHAPE[1], SHAPE[2], generator=gen), dim=-1) for _ in range(SHAPE[0])]
    times: dict[str, dict[int, float]] = {"k=1": {}, "k=3": {}, "all": {}}
    for n in NS:
        feats = [f[:n] for f in all_feats]
        for label, k in (("k=1", 1), ("k=3", 3), ("all", "all")):
            if label == "all" and n > mutual_max:
                continue
            repeats = 1 if (label == "all" and n >= 100) or args.quick else 3

            def run(n=n, k=k, feats=feats):
                reference_scores(feats, pair_references(n, k, 0))

            times[label][n] = timed(run, repeats, warmup=n <= 50)
            print(f"N={n} {label}: {times[label][n]:.3f} s", file=sys.stderr, flush=True)

    exps = {label: exponent(list(t), list(t.values())) for label, t in times.items()}
    rows = []
    for n in NS:
        bt = backbone_s * n
        cells = [n, fmt(bt, 1)]
        for label in ("k=1", "k=3", "all"):
            t = times[label].get(n)
            if t is None:  # beyond --mutual-max: extrapolated from the fitted power law, marked
                ns_, ts_ = list(times[label]), list(times[label].values())
                t = ts_[-1] * (n / ns_[-1]) ** exps[label]
                cells.append(f"~{fmt(t, 2)} (extrapolated)")
            else:
                cells.append(fmt(t, 3))
        cells.append(f"{100 * times['k=1'][n] / bt:.2f}%")
        rows.append(cells)
    rows.append(["growth exponent", "1 (linear)", f"{exps['k=1']:.2f}", f"{exps['k=3']:.2f}", f"{exps['all']:.2f}", ""])
    table = {
        "title": "Scaling with N: reference scoring vs full mutual scoring (seconds per category)",
        "headers": ["N", "backbone", "ours k=1", "ours k=3", "full mutual (k=all)", "k=1 / backbone"],
        "rows": rows,
        "notes": [
            f"Backbone: ViT-B-16-plus-240 at 240 px, batch 8, {1000 * backbone_s:.0f} ms per image measured here, "
            f"times N. Matching features {SHAPE[0]} x {SHAPE[1]} x {SHAPE[2]} per image. Full mutual scoring "
            f"measured up to N = {mutual_max} (`--mutual-max` sets it; quick mode: 100); exponents fitted on the measured points."
        ],
    }
    write_section(
        args.json, "scaling", [table], {"times_s": times, "backbone_s_per_image": backbone_s, "exponents": exps}
    )


if __name__ == "__main__":
    main()
