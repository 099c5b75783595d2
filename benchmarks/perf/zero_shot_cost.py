"""What the zero-shot default costs per image against the paper's dual-image setting (k = 1, the network's own
padding, no centring, z-scored hybrid), for N = 200 images in one run, in the same process (ms per image,
the faster of 2 runs after a warm-up), and k = 3 and k = 'all' (on 40 images) for scale.

    .venv/bin/python -m benchmarks.perf.zero_shot_cost --json runs/bench/zero_shot_cost.json
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from benchmarks.common import SHARED, write_section

N = 200


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", type=Path, required=True)
    ap.add_argument("--n", type=int, default=N)
    ap.add_argument("--quick", action="store_true", help="40 images")
    args = ap.parse_args()
    if args.quick:
        args.n = 40
    from dualclip import DetectorConfig, DualClipDetector
    from dualclip.data.images import load_image

    if (SHARED / "magnetic_tile").is_dir():
        paths = sorted((SHARED / "magnetic_tile" / "MT_Free" / "Imgs").glob("*.jpg"))[: args.n]
        images = [load_image(p) for p in paths]
    else:  # generated textures where the shared data is absent
        from dualclip.data.synthetic import make_texture_set

        images = make_texture_set(n_normal=args.n, n_anomalous=0, size=256, seed=0)[0]
    base = {"backbone": "effnet-lite0", "progress": False}
    settings = {
        "paper's k = 1 (zero padding, z-scored hybrid, no centring)": dict(
            k=1, border="zero", hybrid_norm="zscore", centring="none"
        ),
        "default (the backbone's defaults)": {},
        "default with k = 3": {"k": 3},
        "default with k = 'all' (N = 40: its cost grows with N)": {"k": "all"},
    }
    times = {}
    for label, kw in settings.items():
        det = DualClipDetector(DetectorConfig(**base, **kw))
        det.score_images(images[:8])  # warm-up
        run = images[:40] if kw.get("k") == "all" else images
        runs = []
        for _ in range(2):
            t = time.perf_counter()
            det.score_images(run)
            runs.append(time.perf_counter() - t)
        times[label] = 1000 * min(runs) / len(run)
        print(label, f"{times[label]:.1f} ms/image", flush=True)
    ref = next(iter(times.values()))
    rows = [[label, f"{ms:.1f}", f"{ms / ref:.2f}x"] for label, ms in times.items()]
    write_section(
        args.json,
        "zero_shot_cost",
        [
            {
                "title": f"Zero-shot cost per image, N = {len(images)} images in one run (effnet-lite0, this machine)",
                "headers": ["setting", "ms / image", "ratio to the paper's k = 1"],
                "rows": rows,
            }
        ],
        {"ms_per_image": times},
    )


if __name__ == "__main__":
    main()
