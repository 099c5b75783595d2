"""ONNX export: onnxruntime against torch on this CPU, per backbone, with the features' parity.

For each backbone the image path is exported once (``dualclip.export.export_onnx``), then torch
(``inference_mode``) and onnxruntime (:class:`dualclip.export.OnnxBackbone`, the same number of threads)
each run the same batches in the same process; reported: ms per image (median of repeats), the ratio, and
the largest absolute difference over every output.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import fmt, section_args, timed, write_section
from dualclip.backbone import EffNetLite0Backbone, build_clip_backbone
from dualclip.export import OnnxBackbone, export_onnx


def _outputs(out) -> list[torch.Tensor]:
    head = [out.global_embedding] + ([out.patch_embeddings] if out.patch_embeddings is not None else [])
    return head + list(out.match_features)


def main() -> None:
    args = section_args(__doc__.splitlines()[0])
    models = [("effnet-lite0", "ImageNet (bundled)", lambda: EffNetLite0Backbone())]
    models.append(("ViT-B-16-plus-240", "random", lambda: build_clip_backbone("ViT-B-16-plus-240", None, None)))
    if not args.quick:
        models.append(("ViT-L-14-336 @ 336", "random", lambda: build_clip_backbone("ViT-L-14-336", None, 336)))
    batches = [1, 8]
    repeats = 2 if args.quick else 3
    rows, raw = [], []
    for name, weights, build in models:
        torch.manual_seed(0)
        model = build().eval()
        with tempfile.TemporaryDirectory() as tmp:
            t = time.perf_counter()
            path = export_onnx(model, Path(tmp) / "m.onnx")
            export_s = time.perf_counter() - t
            size_mb = path.stat().st_size / 2**20
            runner = OnnxBackbone(model, path)
            for b in batches:
                x = torch.randn(b, 3, model.image_size, model.image_size, generator=torch.Generator().manual_seed(b))
                with torch.inference_mode():
                    torch_s = timed(lambda: model(x), repeats)  # noqa: B023 - called here, in this iteration
                    ort_s = timed(lambda: runner(x), repeats)  # noqa: B023
                    diff = max(
                        float((a - c).abs().max()) for a, c in zip(_outputs(model(x)), _outputs(runner(x)), strict=True)
                    )
                row = {
                    "model": name,
                    "weights": weights,
                    "size": model.image_size,
                    "batch": b,
                    "torch_ms": torch_s / b * 1000,
                    "ort_ms": ort_s / b * 1000,
                    "max_abs_diff": diff,
                    "export_s": export_s,
                    "file_mb": size_mb,
                }
                raw.append(row)
                rows.append(
                    [
                        name,
                        weights,
                        model.image_size,
                        b,
                        fmt(row["torch_ms"], 1),
                        fmt(row["ort_ms"], 1),
                        f"{row['torch_ms'] / row['ort_ms']:.2f}x",
                        f"{diff:.1e}",
                        f"{export_s:.0f} s, {size_mb:.0f} MiB",
                    ]
                )
        model = runner = None  # free both before the next model is built
    table = {
        "title": "ONNX export: onnxruntime vs torch, image path (CPU)",
        "headers": [
            "model",
            "weights",
            "S",
            "batch",
            "torch ms/img",
            "onnxruntime ms/img",
            "speed-up",
            "max |diff|",
            "export",
        ],
        "rows": rows,
        "notes": [
            "Both runtimes in the same process with the same thread count; median of "
            f"{repeats} repeats after a warm-up. max |diff|: over every output (global embedding, V-V patch "
            "embeddings, every matching layer) of the same batch; the tests require <= 1e-4."
        ],
    }
    write_section(args.json, "onnx_speed", [table], {"rows": raw})


if __name__ == "__main__":
    main()
