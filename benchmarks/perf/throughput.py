"""Throughput and memory per model and batch, split by pipeline stage.

For each backbone (one subprocess each, so that peak RSS is that model's own) and batch size 1 and 8:
plain ``encode_image`` (CLIP only: the baseline of the ratios), then ``score_images`` without adaptation,
with the seconds of each stage taken from each run's ``run.timings_s`` (median over repeats), then one run
with adaptation at the default budget. Random CLIP weights (speed does not depend on their values);
effnet-lite0 with its real weights.

    python -m benchmarks.perf.throughput --json runs/bench/throughput.json [--quick]
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
import warnings

from benchmarks.common import ROOT, fmt, peak_rss_mb, section_args, timed, write_section

MODELS = {"ViT-B-16-plus-240": 240, "ViT-L-14-336": 518, "effnet-lite0": 320}
STAGES = ("backbone", "text", "reference", "fusion")


def measure_model(name: str, quick: bool) -> list[dict]:
    import torch

    from dualclip import AdaptationConfig, DetectorConfig, DualClipDetector
    from dualclip.backbone.preprocess import to_tensor
    from dualclip.data.synthetic import make_texture_set
    from dualclip.text import text_embeddings

    large = name == "ViT-L-14-336"
    repeats = 1 if large else (2 if quick else 3)
    torch.manual_seed(0)
    pretrained = "default" if name == "effnet-lite0" else None
    det = DualClipDetector(DetectorConfig(backbone=name, pretrained=pretrained, progress=False))
    bb = det.backbone
    rows = []
    for batch in (1, 8):
        n = max(2, batch) if large else 2 * max(2, batch)
        images = make_texture_set(n - n // 4, n // 4, MODELS[name], seed=batch)[0]
        cfg = DetectorConfig(backbone=name, pretrained=pretrained, progress=False, batch_size=batch)
        det = DualClipDetector(cfg, backbone=bb)
        encode_ms = None
        if bb.has_text:
            x = to_tensor(images[:batch], bb.image_size, bb.mean, bb.std)
            with torch.inference_mode():
                encode_ms = 1000 * timed(lambda x=x: bb.model.encode_image(x), repeats) / batch
            if batch == 1:  # the prompt ensemble's encoding, once per process (then cached)
                start = time.perf_counter()
                text_embeddings(bb, "bottle")
                text_first_ms = 1000 * (time.perf_counter() - start)
        stage_runs: list[dict] = []

        def run(det=det, images=images, stage_runs=stage_runs):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                result = det.score_images(images, class_name="bottle")
            stage_runs.append(dict(result.run.timings_s))

        total = timed(run, repeats)
        stage_runs = stage_runs[1:]  # drop the warm-up
        stages = {s: statistics.median(r.get(s, 0.0) for r in stage_runs) for s in STAGES}
        on = DualClipDetector(
            DetectorConfig(**{**cfg.__dict__, "tta": True, "adaptation": AdaptationConfig()}), backbone=bb
        )
        start = time.perf_counter()
        on_run = on.score_images(images, class_name="bottle").run
        tta_total = time.perf_counter() - start
        rows.append(
            {
                "model": name,
                "image_size": bb.image_size,
                "batch": batch,
                "n_images": n,
                "repeats": repeats,
                "encode_image_ms": encode_ms,
                "text_first_call_ms": text_first_ms if bb.has_text else None,
                "stage_ms": {s: 1000 * v / n for s, v in stages.items()},
                "total_ms": 1000 * total / n,
                "adaptation_ms": 1000 * on_run.timings_s["adaptation"] / n,
                "total_with_adaptation_ms": 1000 * tta_total / n,
                "synthetic_images": on_run.synthetic_images,
                "peak_rss_mb": peak_rss_mb(),
            }
        )
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    return rows


def main() -> None:
    args = section_args(__doc__.splitlines()[0])
    models = ["ViT-B-16-plus-240", "effnet-lite0"] + ([] if args.quick else ["ViT-L-14-336"])
    rows = []
    for name in models:
        out = args.json.with_name(f"throughput-{name}.json")
        cmd = [sys.executable, "-m", "benchmarks.perf.throughput", "--json", str(out), "--one", name]
        subprocess.run(cmd + (["--quick"] if args.quick else []), cwd=ROOT, check=True)
        rows += json.loads(out.read_text())
    table_rows = []
    for r in rows:
        enc = r["encode_image_ms"]
        st = r["stage_ms"]
        table_rows.append(
            [
                r["model"],
                r["image_size"],
                r["batch"],
                fmt(enc) if enc else "—",
                fmt(st["backbone"]),
                fmt(st["text"], 2),
                fmt(st["reference"], 2),
                fmt(st["fusion"], 2),
                fmt(r["total_ms"]),
                f"{r['total_ms'] / enc:.2f}x" if enc else "—",
                fmt(1000 / r["total_ms"], 2),
                f"{fmt(r['adaptation_ms'])} ({r['synthetic_images']})",
                f"{r['total_with_adaptation_ms'] / r['total_ms']:.2f}x",
                f"{r['peak_rss_mb']:.0f}",
            ]
        )
    notes = [
        "ms per image; stages from each run's `run.timings_s`, median over the repeats; the ratio is the whole "
        "prediction without adaptation against plain `encode_image` at the same batch; adaptation at the default "
        "budget (synthetic images in brackets), one run, its ratio is the whole prediction with it against "
        "without. Text embeddings are cached after the first call of a process (first call: "
        + ", ".join(
            f"{r['model']} {r['text_first_call_ms']:.0f} ms"
            for r in rows
            if r["text_first_call_ms"] and r["batch"] == 1
        )
        + "). Peak RSS of the model's own process, after that row. Images: generated textures, "
        f"{', '.join(sorted({str(r['n_images']) + ' (' + r['model'] + ', batch ' + str(r['batch']) + ')' for r in rows}))}.",
    ]
    headers = [
        "model", "S", "batch", "encode_image", "backbone", "text", "reference", "fusion", "total",
        "total / encode_image", "images/s", "adaptation", "with / without adaptation", "peak RSS MB",
    ]  # fmt: skip
    table = {
        "title": "Throughput and memory by stage (CPU, random CLIP weights)",
        "headers": headers,
        "rows": table_rows,
        "notes": notes,
    }
    write_section(args.json, "throughput", [table], {"rows": rows})


if __name__ == "__main__":
    if "--one" in sys.argv:
        i = sys.argv.index("--one")
        model = sys.argv[i + 1]
        del sys.argv[i : i + 2]
        a = section_args("one model")
        rows = measure_model(model, a.quick)
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(rows))
    else:
        main()
