"""Speed and memory benchmarks; prints Markdown tables (ratios against a baseline run in the same process).

    python benchmarks/run.py            # full
    python benchmarks/run.py --quick    # fewer repeats, ViT-B only

Random weights (speed does not depend on their values). Tables:
1. feature extraction: plain open_clip ``encode_image`` vs our one pass (global + V-V tokens), and the full
   ``score_images`` without adaptation, batch 1 and 8, ms per image and the ratio to ``encode_image``;
2. adaptation cost per category (on vs off) for the CLIP preset and effnet-lite0;
3. all seven metrics on 200 maps at 518 x 518.
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import statistics
import sys
import time
import warnings

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))

from dualclip import AdaptationConfig, DetectorConfig, DualClipDetector  # noqa: E402
from dualclip.backbone import build_clip_backbone  # noqa: E402
from dualclip.backbone.preprocess import to_tensor  # noqa: E402
from dualclip.data.synthetic import make_texture_set  # noqa: E402
from dualclip.metrics import all_metrics  # noqa: E402


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def timed(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def bench_extraction(models, repeats, batches=(1, 8)):
    print(f"\n### Feature extraction and predict (CPU, random weights, median of {repeats} runs)\n")
    print(
        "| model | S | batch | encode_image ms/img | ours (global + V-V) ms/img | ratio | full score_images ms/img | ratio | peak RSS MB |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for name, size in models:
        torch.manual_seed(0)
        bb = build_clip_backbone(name, pretrained=None, image_size=size)
        for batch in batches:
            imgs, _, _ = make_texture_set(batch, 0, size, seed=1) if batch > 1 else make_texture_set(1, 0, size)
            x = to_tensor(imgs, bb.image_size, bb.mean, bb.std)
            with torch.inference_mode():
                t_plain = timed(lambda bb=bb, x=x: bb.model.encode_image(x), repeats)
                t_ours = timed(lambda bb=bb, x=x: bb(x), repeats)
            det = DualClipDetector(
                DetectorConfig(backbone=name, pretrained=None, progress=False, batch_size=batch), backbone=bb
            )
            n = max(batch, 2)
            imgs2 = (imgs * 2)[:n]
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                t_full = timed(lambda d=det, i=imgs2: d.score_images(i, class_name="bottle"), repeats) * batch / n
            print(
                f"| {name} | {bb.image_size} | {batch} | {1000 * t_plain / batch:.1f} | {1000 * t_ours / batch:.1f} | "
                f"{t_ours / t_plain:.2f}x | {1000 * t_full / batch:.1f} | {t_full / t_plain:.2f}x | {rss_mb():.0f} |",
                flush=True,
            )


def bench_adaptation(n_images, repeats):
    print(f"\n### Adaptation cost per category ({n_images} images, default budget)\n")
    print("| backbone | S | off s/category | on s/category | ratio | on ms/image |")
    print("|---|---|---|---|---|---|")
    imgs, _, _ = make_texture_set(n_images - n_images // 4, n_images // 4, 256, seed=0)
    for name in ("ViT-B-16-plus-240", "effnet-lite0"):
        torch.manual_seed(0)
        base = DetectorConfig(backbone=name, pretrained=None if name != "effnet-lite0" else "default", progress=False)
        det_off = DualClipDetector(base)
        bb = det_off.backbone
        det_on = DualClipDetector(
            DetectorConfig(**{**base.__dict__, "tta": True, "adaptation": AdaptationConfig()}), backbone=bb
        )
        t_off = timed(lambda d=det_off: d.score_images(imgs, class_name="bottle"), repeats)
        t_on = timed(lambda d=det_on: d.score_images(imgs, class_name="bottle"), repeats)
        print(
            f"| {name} | {bb.image_size} | {t_off:.2f} | {t_on:.2f} | {t_on / t_off:.2f}x | {1000 * t_on / n_images:.0f} |",
            flush=True,
        )


def bench_metrics():
    print("\n### All seven metrics, 200 maps at 518 x 518\n")
    rng = np.random.default_rng(0)
    masks = np.zeros((200, 518, 518), bool)
    for i in range(100, 200):
        y, x = rng.integers(0, 450, 2)
        masks[i, y : y + 60, x : x + 40] = True
    maps = (rng.random(masks.shape, dtype=np.float32) + 0.5 * masks).astype(np.float32)
    labels = np.r_[np.zeros(100), np.ones(100)]
    t = time.perf_counter()
    all_metrics(labels, rng.random(200), masks, maps)
    print(f"| maps | seconds |\n|---|---|\n| 200 x 518 x 518 | {time.perf_counter() - t:.2f} |")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--only-large", action="store_true", help="only ViT-L-14-336 at 518 px, batch 1, one run")
    args = ap.parse_args()
    if args.only_large:
        bench_extraction([("ViT-L-14-336", 518)], 1, batches=(1,))
        return
    print(
        f"# dualclip benchmarks\n\nCPU: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"torch {torch.__version__} ({torch.get_num_threads()} threads), {time.strftime('%Y-%m-%d')}, "
        f"command: python benchmarks/run.py{' --quick' if args.quick else ''}"
    )
    models = [("ViT-B-16-plus-240", 240)] + ([] if args.quick else [("ViT-L-14-336", 518)])
    bench_extraction(models, 3 if args.quick else 5)
    bench_adaptation(40 if args.quick else 100, 1 if args.quick else 2)
    bench_metrics()


if __name__ == "__main__":
    main()
