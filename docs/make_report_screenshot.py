"""Makes docs/report.png, the README's screenshot of report.html, rendered in headless Chromium.

Runs `dualclip predict` with effnet-lite0 on generated textures with synthetic defects (no dataset image
is copied into the repository), each defect's mask beside its image (outlined in green), golden references
and a threshold at their highest score, then renders the report. Needs Debian's chromium and the dev extra (playwright).

    .venv/bin/python docs/make_report_screenshot.py
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from dualclip import DetectorConfig
from dualclip.cli.predict import run_predict
from dualclip.data.synthetic import make_texture_set

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))  # the headless-Chromium helper lives with the browser test

from browser import screenshot  # noqa: E402


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        images, masks, labels = make_texture_set(6, 4, 256, seed=3)
        refs, _, _ = make_texture_set(4, 0, 256, seed=4)
        for i, (img, mask, y) in enumerate(zip(images, masks, labels, strict=True)):
            (tmp / "parts").mkdir(exist_ok=True)
            name = tmp / "parts" / f"part_{i:02d}{'_defect' if y else ''}"
            img.save(name.with_suffix(".jpg"), quality=95)
            if y:  # its ground truth beside it: left out of the inputs, outlined in the report
                Image.fromarray(mask.astype(np.uint8) * 255).save(name.with_suffix(".png"))
        for i, img in enumerate(refs):
            (tmp / "golden").mkdir(exist_ok=True)
            img.save(tmp / "golden" / f"golden_{i}.png")
        cfg = DetectorConfig(backbone="effnet-lite0", progress=False, seed=0)
        code, doc = run_predict(
            [str(tmp / "parts")],
            tmp / "out",
            cfg,
            class_name="texture",
            references=[str(tmp / "golden")],
            threshold_quantile=1.0,
            quiet=True,
        )
        png = screenshot(tmp / "out" / "report.html", HERE / "report.png", width=1000, height=900)
        print(f"exit {code}; threshold {doc['threshold']}; wrote {png}")


if __name__ == "__main__":
    main()
