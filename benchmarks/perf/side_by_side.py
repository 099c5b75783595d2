"""dualclip beside anomalib, in one process of anomalib's own environment.

1. WinCLIP (anomalib's zero-shot ``WinClipModel``) vs dualclip (dual-image: text + visual reference,
   k = 1, no adaptation) on the same generated images, the same backbone ``ViT-B-16-plus-240`` at 240 px
   with the same random weights in both (seeded; checked equal), same CPU, same batch; ms per image
   including preprocessing of the PIL images, median over repeats after a warm-up.
2. AUPRO: ``dualclip.metrics.aupro`` vs ``anomalib.metrics.AUPRO`` (fpr_limit 0.3) on the same 200 maps
   of 518 x 518 (random scores, rectangular defects in half the maps): seconds and both values.

anomalib lives only in this benchmark's environment (``make bench-env``: benchmarks/.venv-anomalib).

    benchmarks/.venv-anomalib/bin/python -m benchmarks.perf.side_by_side --json runs/bench/side_by_side.json [--quick]
"""

from __future__ import annotations

import time
import warnings

import numpy as np

from benchmarks.common import fmt, section_args, timed, write_section

BACKBONE = "ViT-B-16-plus-240"


def _offline_random_open_clip():
    """Make anomalib build its CLIP without downloading: random weights (seeded by the caller)."""
    import open_clip

    real = open_clip.create_model_and_transforms

    def random_weights(name, *args, **kwargs):
        kwargs["pretrained"] = None
        return real(name, *args, **kwargs)

    open_clip.create_model_and_transforms = random_weights


def winclip_vs_dualclip(quick: bool) -> tuple[dict, dict]:
    import torch
    from anomalib.models.image.winclip.torch_model import WinClipModel

    from dualclip import DetectorConfig, DualClipDetector
    from dualclip.backbone import build_clip_backbone
    from dualclip.backbone.preprocess import to_tensor
    from dualclip.data.synthetic import make_texture_set

    _offline_random_open_clip()
    torch.manual_seed(0)
    winclip = WinClipModel(class_name="bottle").eval()
    torch.manual_seed(0)
    bb = build_clip_backbone(BACKBONE, pretrained=None, image_size=240)
    same = all(
        torch.equal(a, b)
        for a, b in zip(winclip.clip.visual.state_dict().values(), bb.model.visual.state_dict().values(), strict=True)
    )
    repeats = 1 if quick else 3
    rows = []
    for batch in (4,) if quick else (1, 8):
        n = 4 if quick else 8  # images per run
        images = make_texture_set(n - n // 4, n // 4, 240, seed=batch)[0]
        det = DualClipDetector(
            DetectorConfig(backbone=BACKBONE, pretrained=None, progress=False, batch_size=batch), backbone=bb
        )

        def run_winclip(images=images, batch=batch):
            with torch.inference_mode():
                for s in range(0, len(images), batch):
                    winclip(to_tensor(images[s : s + batch], 240, bb.mean, bb.std))

        def run_ours(det=det, images=images):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                det.score_images(images, class_name="bottle")

        t_w = timed(run_winclip, repeats) / n
        t_o = timed(run_ours, repeats) / n
        rows.append({"batch": batch, "winclip_ms": 1000 * t_w, "dualclip_ms": 1000 * t_o, "speedup": t_w / t_o})
    import anomalib

    table = {
        "title": "dualclip vs anomalib WinCLIP, zero-shot, same backbone and weights (CPU)",
        "headers": ["batch", "WinCLIP ms/image", "dualclip ms/image", "dualclip speed-up"],
        "rows": [[r["batch"], fmt(r["winclip_ms"]), fmt(r["dualclip_ms"]), f"{r['speedup']:.1f}x"] for r in rows],
        "notes": [
            f"anomalib {anomalib.__version__} `WinClipModel` (scales 2 and 3 plus the full image) vs dualclip "
            f"(text + dual-image visual reference, k = 1, no adaptation); {BACKBONE} at 240 px, random weights "
            f"seeded identically in both (visual weights equal: {same}); {n} generated images, median of {repeats} "
            "after a warm-up, preprocessing of the PIL images included in both."
        ],
    }
    return table, {"rows": rows, "same_weights": same, "anomalib": anomalib.__version__}


def aupro_vs_anomalib(quick: bool) -> tuple[dict, dict]:
    import torch
    from anomalib.metrics.aupro import _AUPRO  # the computation behind anomalib.metrics.AUPRO, minus batch fields

    from dualclip.metrics import aupro

    n, size = 200, 518
    rng = np.random.default_rng(0)
    masks = np.zeros((n, size, size), bool)
    for i in range(n // 2, n):
        for _ in range(int(rng.integers(1, 4))):
            y, x = rng.integers(0, size - 80, 2)
            h, w = rng.integers(10, 80, 2)
            masks[i, y : y + h, x : x + w] = True
    maps = (rng.random(masks.shape, dtype=np.float32) + 0.7 * masks).astype(np.float32)
    repeats = 1 if quick else 3

    def ours():
        return aupro(masks, maps, 0.3)

    tm, tp = torch.from_numpy(masks.astype(np.int64)), torch.from_numpy(maps)

    def theirs():
        metric = _AUPRO(fpr_limit=0.3)
        metric.update(tp, tm)
        return float(metric.compute())

    t_ours = timed(ours, repeats)
    t_theirs = timed(theirs, repeats)
    v_ours, v_theirs = ours(), theirs()
    table = {
        "title": "AUPRO: dualclip.metrics.aupro vs anomalib.metrics.AUPRO (200 maps of 518 x 518)",
        "headers": ["implementation", "seconds", "AUPRO", "speed-up"],
        "rows": [
            ["anomalib AUPRO", fmt(t_theirs, 2), f"{v_theirs:.6f}", "1.0x"],
            ["dualclip aupro", fmt(t_ours, 2), f"{v_ours:.6f}", f"{t_theirs / t_ours:.1f}x"],
        ],
        "notes": [
            f"Same maps and masks (1-3 rectangular regions in half of the maps), fpr_limit 0.3, median of {repeats} "
            "after a warm-up. Both are exact (every distinct threshold, 8-connected regions: anomalib labels them "
            f"with OpenCV); the values differ by {abs(v_ours - v_theirs):.1e} (float rounding)."
        ],
    }
    return table, {"ours_s": t_ours, "anomalib_s": t_theirs, "ours": v_ours, "anomalib": v_theirs}


def main() -> None:
    args = section_args(__doc__.splitlines()[0])
    start = time.perf_counter()
    t1, raw1 = winclip_vs_dualclip(args.quick)
    t2, raw2 = aupro_vs_anomalib(args.quick)
    write_section(
        args.json, "side_by_side", [t1, t2], {"winclip": raw1, "aupro": raw2, "seconds": time.perf_counter() - start}
    )


if __name__ == "__main__":
    main()
