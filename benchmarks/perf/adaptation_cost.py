"""Cost of test-time adaptation: a whole category with and without it, per category and per image,
at the default budget, for the CLIP preset (random weights) and effnet-lite0; plus the per-image scope.

    python -m benchmarks.perf.adaptation_cost --json runs/bench/adaptation_cost.json [--quick]
"""

from __future__ import annotations

import dataclasses
import warnings

from benchmarks.common import fmt, section_args, timed, write_section

MODELS = ("ViT-B-16-plus-240", "effnet-lite0")


def main() -> None:
    args = section_args(__doc__.splitlines()[0])
    import torch

    from dualclip import AdaptationConfig, DetectorConfig, DualClipDetector
    from dualclip.data.synthetic import make_texture_set
    from dualclip.text import text_embeddings

    sizes = (40,) if args.quick else (40, 100)
    repeats = 1 if args.quick else 2
    rows, raw = [], []
    for name in MODELS:
        torch.manual_seed(0)
        base = DetectorConfig(backbone=name, pretrained="default" if name == "effnet-lite0" else None, progress=False)
        bb = DualClipDetector(base).backbone
        if bb.has_text:  # the prompt ensemble's one-time encoding is not part of either timing
            text_embeddings(bb, "bottle")
        for n in sizes:
            images = make_texture_set(n - n // 4, n // 4, 256, seed=0)[0]
            off = DualClipDetector(base, backbone=bb)
            on = DualClipDetector(dataclasses.replace(base, tta=True, adaptation=AdaptationConfig()), backbone=bb)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                # quick mode: no warm-up run (the model is already warm from building; one run each)
                t_off = timed(lambda d=off, i=images: d.score_images(i, class_name="bottle"), repeats, not args.quick)
                runs: list = []  # each run's result: its RunInfo holds the stage seconds
                t_on = timed(
                    lambda d=on, i=images, r=runs: r.append(d.score_images(i, class_name="bottle")),
                    repeats,
                    not args.quick,
                )
            adapt_s = runs[-1].run.timings_s["adaptation"]
            r = {"model": name, "S": bb.image_size, "n": n, "off_s": t_off, "on_s": t_on, "adaptation_s": adapt_s}
            r["synthetic_images"] = runs[-1].run.synthetic_images
            raw.append(r)
            rows.append(
                [name, bb.image_size, n, r["synthetic_images"], fmt(t_off, 2), fmt(t_on, 2), f"{t_on / t_off:.2f}x",
                 fmt(1000 * adapt_s / n, 0), fmt(1000 * t_on / n, 0)]
            )  # fmt: skip
        # scope="image": a fresh head per image, trained on its own synthetic copies
        images = make_texture_set(3, 1, 256, seed=1)[0]
        per_image = DualClipDetector(
            dataclasses.replace(base, tta=True, adaptation=AdaptationConfig(scope="image")), backbone=bb
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            per_image_run = per_image.score_images(images, class_name="bottle").run
        s = per_image_run.timings_s["adaptation"] / len(images)
        raw.append({"model": name, "scope": "image", "adaptation_s_per_image": s})
        rows.append(
            [
                name,
                bb.image_size,
                "scope=image",
                per_image_run.synthetic_images,
                "",
                "",
                "",
                fmt(1000 * s, 0),
                "",
            ]
        )
    table = {
        "title": "Adaptation cost per category (CPU, default budget)",
        "headers": [
            "backbone",
            "S",
            "images",
            "synthetic images",
            "off s",
            "on s",
            "on / off",
            "adaptation ms/image",
            "on ms/image",
        ],
        "rows": rows,
        "notes": [
            "Generated 256 px textures (3/4 normal). Default budget: ceil(N/2) synthetic images, at least 8 and at "
            f"most 32, 60 AdamW steps, linear head. Median of {repeats}{'' if args.quick else ' after a warm-up'}. The last row per "
            "backbone is `scope='image'` (a fresh head per image on 8 synthetic copies of it), adaptation time "
            "per image. Target: on / off <= 2."
        ],
    }
    write_section(args.json, "adaptation_cost", [table], {"rows": raw})


if __name__ == "__main__":
    main()
