"""bf16 against fp32: how far the backbone's reduced precision moves the maps and the scores (CPU autocast).

effnet-lite0 (real weights) on generated textures with defects, at 128 and 320 px: the Spearman rank
correlation of each image's map under ``precision="bf16"`` with its fp32 map, and the largest change of an
image score in units of the run's score spread. The tests hold the documented tolerance
(``test_bf16_backbone_keeps_the_pixel_ranking_within_the_documented_tolerance``).
"""

from __future__ import annotations

import numpy as np
from scipy.stats import spearmanr

from benchmarks.common import section_args, write_section
from dualclip import DetectorConfig, DualClipDetector
from dualclip.data.synthetic import make_texture_set


def main() -> None:
    args = section_args(__doc__.splitlines()[0])
    images = make_texture_set(6, 4, 96, seed=0)[0]
    rows, raw = [], []
    for size in (128, 320):
        kw = dict(backbone="effnet-lite0", image_size=size, progress=False, device="cpu")
        a = DualClipDetector(DetectorConfig(**kw, precision="fp32")).score_images(images)
        b = DualClipDetector(DetectorConfig(**kw, precision="bf16")).score_images(images)
        rho = [float(spearmanr(x.ravel(), y.ravel()).statistic) for x, y in zip(a.maps, b.maps, strict=True)]
        shift = float((a.image_scores - b.image_scores).abs().max() / a.image_scores.std())
        raw.append({"size": size, "spearman": rho, "score_shift_spreads": shift})
        rows.append([size, len(images), f"{min(rho):.4f}", f"{np.mean(rho):.4f}", f"{shift:.3f}"])
    table = {
        "title": "bf16 backbone against fp32 (effnet-lite0, CPU autocast)",
        "headers": ["S", "images", "min Spearman (per image)", "mean Spearman", "max score shift (run spreads)"],
        "rows": rows,
        "notes": ["Everything after the backbone runs in fp32 in both runs; the same images and seed."],
    }
    write_section(args.json, "precision_parity", [table], {"rows": raw})


if __name__ == "__main__":
    main()
