"""The whole-model ONNX export against `predict --profile`: parity and ms per image, in the same process.

An effnet-lite0 profile (the bundled weights, its defaults: S = 320, hybrid distance, the plain view at 224 px,
a second input of the graph) is fitted on the first
10 magnetic_tile MT_Free images (sorted by name, from ../shared/datasets) and exported with
``dualclip.export.export_model``. Scored: the next 10 MT_Free images and the first 5 of each defect class.
Parity: the largest difference of the image scores and of the maps at S x S between onnxruntime and
:meth:`DualClipDetector.score_images` of the loaded profile (what `predict --profile` computes), at batch 1
and 8. Speed: ms per image, median of repeats, of ``DualClipDetector.predict`` on decoded images (resize,
scoring, maps resized to the image) against onnxruntime from the same decoded images (PIL bicubic resize,
normalisation, the graph), onnxruntime with as many threads as torch.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from benchmarks.common import SHARED, section_args, timed, write_section
from dualclip import DetectorConfig, DualClipDetector
from dualclip.data.images import load_image
from dualclip.export import export_model, onnx_metadata

N_FIT = 10
DEFECTS = ("MT_Blowhole", "MT_Crack", "MT_Fray")


def _preprocess(images: list[Image.Image], meta: dict) -> dict[str, np.ndarray]:
    """What the docs' example does, for every input of the model (``images`` at S, ``plain_images`` at the plain
    view's size): bicubic resize, [0, 1], (x - mean) / std, channels first."""
    prep = meta["preprocess"]
    mean, std = np.float32(prep["mean"]), np.float32(prep["std"])
    feeds = {}
    for name, shape in meta["inputs"].items():
        size = shape[2]
        arrays = [
            np.asarray(im.resize((size, size), Image.Resampling.BICUBIC), dtype=np.float32) / 255.0 for im in images
        ]
        feeds[name] = ((np.stack(arrays) - mean) / std).transpose(0, 3, 1, 2)
    return feeds


def main() -> None:
    import onnxruntime as ort

    args = section_args(__doc__.splitlines()[0])
    root = SHARED / "magnetic_tile"
    if not root.is_dir():
        write_section(args.json, "model_export", [], {"skipped": f"{root} is absent (real data lives in ../shared)"})
        return
    free = sorted((root / "MT_Free" / "Imgs").glob("*.jpg"))
    fit_paths = free[:N_FIT]
    test_paths = free[N_FIT : 2 * N_FIT] + [p for d in DEFECTS for p in sorted((root / d / "Imgs").glob("*.jpg"))[:5]]
    fit_images = [load_image(p) for p in fit_paths]
    test_images = [load_image(p) for p in test_paths]
    cfg = DetectorConfig(backbone="effnet-lite0", progress=False, device="cpu")
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        profile = DualClipDetector(cfg).fit(fit_images, threshold_quantile=0.99).save(Path(tmp) / "profile")
        fit_s = time.perf_counter() - t
        det = DualClipDetector.load(profile)  # what `predict --profile` scores with
        t = time.perf_counter()
        path = export_model(det, Path(tmp) / "model.onnx", profile_path=profile)
        export_s = time.perf_counter() - t
        size_mb = path.stat().st_size / 2**20
        meta = onnx_metadata(path)
        options = ort.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    def run(images: list[Image.Image]) -> tuple[np.ndarray, np.ndarray]:
        return tuple(session.run(["score", "anomaly_map"], _preprocess(images, meta)))

    want = det.score_images(test_images)
    load = os.getloadavg()[0]
    rows, raw = [], []
    repeats = 1 if args.quick else 3
    for batch in (1, 8):
        chunks = [test_images[i : i + batch] for i in range(0, len(test_images), batch)]
        got = [run(c) for c in chunks]
        scores = np.concatenate([g[0] for g in got])
        maps = np.concatenate([g[1] for g in got])
        score_diff = float(np.abs(scores - want.image_scores.numpy()).max())
        map_diff = float(np.abs(maps - want.maps.numpy()).max())
        torch_s = timed(lambda: [det.predict(c) for c in chunks], repeats)  # noqa: B023 - called here
        ort_s = timed(lambda: [run(c) for c in chunks], repeats)  # noqa: B023
        n = len(test_images)
        row = {
            "batch": batch,
            "images": n,
            "predict_ms": torch_s / n * 1000,
            "ort_ms": ort_s / n * 1000,
            "max_score_diff": score_diff,
            "max_map_diff": map_diff,
            "score_range": [float(want.image_scores.min()), float(want.image_scores.max())],
        }
        raw.append(row)
        rows.append(
            [
                batch,
                n,
                f"{row['predict_ms']:.1f}",
                f"{row['ort_ms']:.1f}",
                f"{row['predict_ms'] / row['ort_ms']:.2f}x",
                f"{score_diff:.1e}",
                f"{map_diff:.1e}",
            ]
        )
    table = {
        "title": "Whole-model ONNX export vs predict --profile (effnet-lite0, S = 320, CPU)",
        "headers": [
            "batch",
            "images",
            "predict --profile ms/img",
            "onnxruntime ms/img",
            "speed-up",
            "max score diff",
            "max map diff",
        ],
        "rows": rows,
        "notes": [
            f"Profile fitted on the first {N_FIT} magnetic_tile MT_Free images ({fit_s:.0f} s), exported in "
            f"{export_s:.1f} s ({size_mb:.1f} MiB, bank of {det.profile_.meta['bank_patches']} patches); scored: "
            f"the next {N_FIT} MT_Free images and 5 of each of {', '.join(DEFECTS)}. Scores in profile units "
            f"(here {min(want.image_scores):.2f} to {max(want.image_scores):.2f}); score and map diff: the largest "
            "absolute difference, maps at S x S. "
            f"Both runtimes in one process with {torch.get_num_threads()} threads, from decoded images, median of "
            f"{repeats} repeats after a warm-up; predict scores a profile image by image at any batch size. The "
            f"machine was shared (load average {load:.1f} on {os.cpu_count()} cores at the start): the ratio, "
            "measured in one process, is more telling than the absolute times."
        ],
    }
    raw = {"rows": raw, "fit_s": fit_s, "export_s": export_s, "load_average": load}
    write_section(args.json, "model_export", [table], raw)


if __name__ == "__main__":
    main()
