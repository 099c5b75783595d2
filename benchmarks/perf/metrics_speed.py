"""All seven metrics of one category: 200 maps of 518 x 518 (the budget: at most 10 s).

python -m benchmarks.perf.metrics_speed --json runs/bench/metrics_speed.json [--quick]
"""

from __future__ import annotations

import numpy as np

from benchmarks.common import fmt, section_args, timed, write_section


def main() -> None:
    args = section_args(__doc__.splitlines()[0])
    from dualclip.metrics import all_metrics, aupro

    rng = np.random.default_rng(0)
    masks = np.zeros((200, 518, 518), bool)
    for i in range(100, 200):
        y, x = rng.integers(0, 450, 2)
        masks[i, y : y + 60, x : x + 40] = True
    maps = (rng.random(masks.shape, dtype=np.float32) + 0.5 * masks).astype(np.float32)
    labels, scores = np.r_[np.zeros(100), np.ones(100)], rng.random(200)
    repeats = 1 if args.quick else 3
    t_all = timed(lambda: all_metrics(labels, scores, masks, maps), repeats)
    t_aupro = timed(lambda: aupro(masks, maps), repeats)
    table = {
        "title": "Metrics speed: one category of 200 maps at 518 x 518",
        "headers": ["what", "seconds"],
        "rows": [["all seven metrics (`all_metrics`)", fmt(t_all, 2)], ["`aupro` alone", fmt(t_aupro, 2)]],
        "notes": [
            f"Median of {repeats} after a warm-up (the first call also pays for fresh memory pages). Target: <= 10 s."
        ],
    }
    write_section(args.json, "metrics_speed", [table], {"all_metrics_s": t_all, "aupro_s": t_aupro})


if __name__ == "__main__":
    main()
