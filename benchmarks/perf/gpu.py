"""The GPU table: encode_image and predict per preset, fp32 and bf16, k = 1, 3 and all, with
and without adaptation, and peak device memory. Random CLIP weights (speed does not depend on their values).

Skipped, with the reason written to its section, where torch sees no CUDA GPU (``--device cpu --quick``
runs the same code small on a CPU, to check the script before a GPU session). Runnable alone in under 5
minutes on an H100/H200:

    python -m benchmarks.perf.gpu --json runs/bench/gpu.json [--quick] [--device cuda] [--budget-s 240]

The GPU machine of this workplace has torch but not open_clip: carry the wheels. Here,
``pip download --no-deps -d wheels open_clip_torch ftfy regex timm huggingface_hub safetensors wcwidth``
(plus any other missing dependency); there,
``pip install --no-index --find-links wheels open_clip_torch && pip install --no-deps -e .``.
Rows are measured in order of importance; once ``--budget-s`` seconds have passed the rest are skipped and
listed as skipped.
"""

from __future__ import annotations

import argparse
import time
import warnings
from pathlib import Path

from benchmarks.common import fmt, write_section

PRESETS = {"ViT-B-16-plus-240": 240, "ViT-L-14-336": 518}


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _timed(fn, device: str, repeats: int, warmup: bool = True) -> float:
    """Median seconds of ``fn()`` (after one warm-up run), the device synchronised around each run."""
    import statistics

    if warmup:
        fn()
        _sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", type=Path, required=True)
    ap.add_argument("--quick", action="store_true", help="small batches and N (a CPU check of the script)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--budget-s", type=float, default=240.0)
    args = ap.parse_args()
    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        write_section(
            args.json,
            "gpu",
            [],
            {"skipped": "torch sees no CUDA GPU here; run on a GPU machine (see the script's docstring)"},
        )
        return
    from dualclip import DetectorConfig, DualClipDetector
    from dualclip.backbone.preprocess import to_tensor
    from dualclip.data.synthetic import make_texture_set

    start_all = time.perf_counter()
    card = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else "CPU (script check)"
    batch = 4 if args.quick else 32
    ns = (8,) if args.quick else (50, 200)
    repeats = 1 if args.quick else 3
    rows, raw, skipped = [], [], []

    def budget_left() -> bool:
        return time.perf_counter() - start_all < args.budget_s

    for name, size in PRESETS.items():
        if args.quick:
            size = 64 if name.startswith("ViT-B") else 96
        det0 = DualClipDetector(
            DetectorConfig(backbone=name, pretrained=None, image_size=size, device=args.device, progress=False)
        )
        bb = det0.backbone
        images = make_texture_set(max(batch, max(ns)), 0, size, seed=0)[0]
        x = to_tensor(images[:batch], bb.image_size, bb.mean, bb.std).to(args.device)
        row = {"model": name, "size": size, "batch": batch}
        with torch.inference_mode():
            row["encode_fp32_ms"] = (
                1000 * _timed(lambda bb=bb, x=x: bb.model.encode_image(x), args.device, repeats) / batch
            )
            with torch.autocast(args.device.split(":")[0], dtype=torch.bfloat16):
                row["encode_bf16_ms"] = (
                    1000 * _timed(lambda bb=bb, x=x: bb.model.encode_image(x), args.device, repeats) / batch
                )
        for precision in ("fp32", "bf16"):
            for k, tta in ((1, False), (3, False), (1, True)):
                if not budget_left():
                    skipped.append(f"{name} {precision} k={k}{' tta' if tta else ''}")
                    continue
                cfg = DetectorConfig(
                    backbone=name,
                    pretrained=None,
                    image_size=size,
                    device=args.device,
                    progress=False,
                    batch_size=batch,
                    k=k,
                    tta=tta,
                    precision=precision,
                )
                det = DualClipDetector(cfg, backbone=bb)
                if args.device.startswith("cuda"):
                    torch.cuda.reset_peak_memory_stats()
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    s = _timed(
                        lambda det=det, images=images: det.score_images(images[:batch], class_name="bottle"),
                        args.device,
                        repeats,
                    )
                key = f"predict_{precision}_k{k}{'_tta' if tta else ''}"
                row[f"{key}_ms"] = 1000 * s / batch
                if args.device.startswith("cuda"):
                    row[f"{key}_peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
        for n in ns:
            if not budget_left():
                skipped.append(f"{name} k=all N={n}")
                continue
            cfg = DetectorConfig(
                backbone=name, pretrained=None, image_size=size, device=args.device, progress=False, k="all"
            )
            det = DualClipDetector(cfg, backbone=bb)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                s = _timed(
                    lambda det=det, n=n, images=images: det.score_images(images[:n], class_name="bottle"),
                    args.device,
                    1,
                    warmup=False,
                )
            row[f"mutual_N{n}_ms"] = 1000 * s / n
        raw.append(row)
        det0 = bb = None  # free this preset before the next is built
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()

    def cell(r, key):
        v = r.get(key)
        return "—" if v is None else fmt(v, 2)

    for r in raw:
        rows.append(
            [
                r["model"],
                r["size"],
                cell(r, "encode_fp32_ms"),
                cell(r, "encode_bf16_ms"),
                cell(r, "predict_fp32_k1_ms"),
                cell(r, "predict_bf16_k1_ms"),
                cell(r, "predict_bf16_k3_ms"),
                cell(r, "predict_bf16_k1_tta_ms"),
                *[cell(r, f"mutual_N{n}_ms") for n in ns],
                "—" if r.get("predict_bf16_k1_ms") is None else f"{r['predict_bf16_k1_ms'] / r['encode_bf16_ms']:.1f}x",
                cell(r, "predict_bf16_k1_peak_gib"),
            ]
        )
    table = {
        "title": f"GPU: {card}, random weights, batch {batch} (ms per image)",
        "headers": [
            "model",
            "S",
            "encode_image fp32",
            "encode_image bf16",
            "predict k=1 fp32",
            "predict k=1 bf16",
            "predict k=3 bf16",
            "predict k=1 bf16 + adaptation",
            *[f"full mutual N={n} (fp32)" for n in ns],
            "predict k=1 bf16 / encode bf16",
            "peak GiB (k=1 bf16)",
        ],
        "rows": rows,
        "notes": [
            "Targets: predict k=1 within 1.5x of bf16 encode_image; full mutual ViT-L at 518 px, N=200, "
            "<= 100 ms per image; adaptation adds at most 50%. Matching, fusion and adaptation run on the "
            "device with the backbone (matchings in blocks of at most match_memory_mb, 512 MiB).",
            "Skipped for the time budget or by design: " + ("; ".join(skipped) if skipped else "none"),
            f"Whole script: {time.perf_counter() - start_all:.0f} s.",
        ],
    }
    write_section(args.json, "gpu", [table], {"card": card, "rows": raw, "skipped": skipped})


if __name__ == "__main__":
    main()
