"""The `dualclip` command: predict, eval, demo."""

from __future__ import annotations

import json
import socket
import sys
from pathlib import Path

import typer

from ..config import DEFAULT, DetectorConfig

app = typer.Typer(add_completion=False, help="Zero-shot visual anomaly detection and localization with CLIP.")


def _pretrained(value: str | None) -> str | None:
    if value is None:
        return DEFAULT
    return None if value.lower() in ("none", "random") else value


def _config(backbone, pretrained, image_size, pairing, k, tta, seed, quiet, **extra) -> DetectorConfig:
    k_val = "all" if str(k) == "all" else int(k)
    return DetectorConfig(
        backbone=backbone,
        pretrained=_pretrained(pretrained),
        image_size=image_size,
        pairing=pairing,
        k=k_val,
        tta=tta,
        seed=seed,
        progress=not quiet,
        **extra,
    )


BACKBONE = typer.Option("ViT-B-16-plus-240", help="open_clip model name, or effnet-lite0 (vision-only).")
PRETRAINED = typer.Option(
    None, help="open_clip tag, a local checkpoint file, or 'random'. Default: the preset's weights."
)


@app.command()
def predict(
    paths: list[str] = typer.Argument(..., help="Image files, folders (recursive) or glob patterns."),
    out: Path = typer.Option(..., "--out", help="Output folder."),
    class_name: str = typer.Option(None, help="What the images show, e.g. 'metal nut' (text prompts)."),
    reference: list[str] = typer.Option(None, help="Golden normal images (files, folders, globs) used as references."),
    backbone: str = BACKBONE,
    pretrained: str = PRETRAINED,
    image_size: int = typer.Option(None, help="Processing size S."),
    pairing: str = typer.Option("random", help="random | similar"),
    k: str = typer.Option("1", help="References per image (int, or 'all')."),
    tta: bool = typer.Option(False, "--tta/--no-tta", help="Test-time adaptation on synthesized anomalies."),
    seed: int = typer.Option(0),
    threshold: float = typer.Option(None, help="Manual score threshold for verdicts."),
    threshold_quantile: float = typer.Option(None, help="Threshold = this quantile of the --reference images' scores."),
    validation_normal: list[str] = typer.Option(None, help="Labelled normal images to fit an F1-optimal threshold."),
    validation_anomalous: list[str] = typer.Option(None, help="Labelled anomalous images for the threshold fit."),
    overwrite: bool = typer.Option(False, help="Replace an existing, non-empty output folder."),
    quiet: bool = typer.Option(False, help="No progress bars."),
    json_out: bool = typer.Option(False, "--json", help="Print the predictions document as JSON on stdout."),
) -> None:
    """Score images; write predictions.json/.csv, heatmaps/, masks/ and report.html under --out."""
    from ..data.images import ImageLoadError
    from .predict import UsageError, run_predict

    try:
        cfg = _config(backbone, pretrained, image_size, pairing, k, tta, seed, quiet)
        validation = None
        if validation_normal or validation_anomalous:
            if not (validation_normal and validation_anomalous):
                raise UsageError("give both --validation-normal and --validation-anomalous")
            validation = (validation_normal, validation_anomalous)
        code, doc = run_predict(
            paths,
            out,
            cfg,
            class_name=class_name,
            references=reference or None,
            threshold=threshold,
            threshold_quantile=threshold_quantile,
            validation=validation,
            overwrite=overwrite,
            quiet=quiet,
        )
    except (UsageError, FileNotFoundError, ValueError, ImageLoadError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc
    if json_out:
        typer.echo(json.dumps(doc, indent=2))
    elif not quiet:
        for p in doc["predictions"]:
            s = "error: " + p["error"] if p.get("error") else f"{p['score']:.4f} {p.get('verdict') or ''}"
            typer.echo(f"{s}\t{p['path']}")
        typer.echo(f"wrote {out}/report.html", err=True)
    raise typer.Exit(code)


@app.command("eval")
def eval_(
    dataset: str = typer.Option(..., help="mvtec | visa | mpdd | btad | folder"),
    root: Path = typer.Option(None, help="Dataset root (not for folder)."),
    out: Path = typer.Option(..., "--out"),
    categories: str = typer.Option(None, help="Comma-separated categories (default: all found)."),
    backbone: str = BACKBONE,
    pretrained: str = PRETRAINED,
    image_size: int = typer.Option(None),
    pairing: str = typer.Option("random"),
    k: str = typer.Option("1"),
    tta: bool = typer.Option(False, "--tta/--no-tta"),
    seeds: str = typer.Option("0", help="Comma-separated seeds; metrics are reported as mean ± std."),
    force: bool = typer.Option(False, help="Recompute categories already saved under --out."),
    quiet: bool = typer.Option(False),
    name: str = typer.Option("folder", help="folder layout: the category name."),
    normal: list[str] = typer.Option(None, help="folder layout: normal image folders/globs."),
    anomalous: list[str] = typer.Option(None, help="folder layout: anomalous image folders/globs."),
    images: list[str] = typer.Option(None, help="folder layout: images labelled by their masks."),
    masks: list[str] = typer.Option(None, help="folder layout: mask folders (default: beside each image)."),
    mask_suffix: str = typer.Option(None, help="folder layout: mask file = <stem><suffix>."),
    max_normal: int = typer.Option(None, help="folder layout: keep the first N normal images."),
    max_anomalous: int = typer.Option(None, help="folder layout: keep the first N anomalous images."),
) -> None:
    """Evaluate on a dataset with the field's protocol; writes results.json/.md/.csv under --out."""
    from ..data import datasets as D
    from ..evaluation import run_eval

    try:
        wanted = [c.strip() for c in categories.split(",")] if categories else None
        if dataset == "folder":
            cats = D.folder(name, normal, anomalous, images, masks, mask_suffix, max_normal, max_anomalous)
        elif dataset in D.LAYOUTS:
            if root is None:
                raise ValueError(f"--root is required for --dataset {dataset}")
            cats = D.LAYOUTS[dataset](root, wanted)
        else:
            raise ValueError(f"unknown dataset {dataset!r}; choose mvtec, visa, mpdd, btad or folder")
        cfg = _config(backbone, pretrained, image_size, pairing, k, tta, 0, quiet)
        seed_list = [int(s) for s in seeds.split(",")]
    except ValueError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc
    run_eval(cfg, cats, seed_list, out, force=force, extra={"dataset": dataset, "root": str(root) if root else None})
    typer.echo((out / "results.md").read_text())


def _network_reachable(host: str = "huggingface.co", timeout: float = 3.0) -> bool:
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _demo_inputs(tmp: Path) -> tuple[list[str], str]:
    shared = Path(__file__).resolve().parents[4] / "shared" / "datasets" / "magnetic_tile"
    if shared.is_dir():
        free = sorted((shared / "MT_Free" / "Imgs").glob("*.jpg"))[:6]
        bad = [sorted((shared / c / "Imgs").glob("*.jpg"))[0] for c in ("MT_Blowhole", "MT_Crack", "MT_Fray")]
        return [str(p) for p in free + bad], "magnetic tile"
    from ..data.synthetic import make_texture_set

    tmp.mkdir(parents=True, exist_ok=True)
    imgs, _, labels = make_texture_set(6, 3, 192, seed=0)
    paths = []
    for i, (img, y) in enumerate(zip(imgs, labels, strict=True)):
        p = tmp / f"{i:02d}_{'defect' if y else 'good'}.png"
        img.save(p)
        paths.append(str(p))
    return paths, "texture"


@app.command()
def demo(out: Path = typer.Option(Path("runs/demo"), "--out"), quiet: bool = typer.Option(False)) -> None:
    """Run the detector on an embedded default; falls back to effnet-lite0 where CLIP weights are unavailable."""
    from ..backbone import WeightsUnavailableError
    from .predict import run_predict

    cfg = DetectorConfig(progress=not quiet)
    det = None
    from ..detector import DualClipDetector

    typer.echo(f"trying CLIP weights {cfg.backbone} / laion400m_e32 (cache, then download) ...", err=True)
    try:
        import open_clip

        hub = (open_clip.get_pretrained_cfg(cfg.backbone, "laion400m_e32") or {}).get("hf_hub", "").rstrip("/")
        from huggingface_hub import try_to_load_from_cache

        cached = any(
            isinstance(try_to_load_from_cache(hub, f), str)
            for f in ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
        )
        if not cached and not _network_reachable():
            raise WeightsUnavailableError("not in the cache and no network connection to the Hugging Face hub")
        det = DualClipDetector(cfg)
        _ = det.backbone
    except (WeightsUnavailableError, OSError) as exc:
        typer.echo(f"CLIP weights unavailable ({str(exc).splitlines()[0]}).", err=True)
        typer.echo("Running the dual-image visual branch with effnet-lite0 instead.", err=True)
        cfg = DetectorConfig(backbone="effnet-lite0", progress=not quiet)
        det = DualClipDetector(cfg)
    inputs, class_name = _demo_inputs(out.parent / f".{out.name}-inputs")
    typer.echo(f"scoring {len(inputs)} images ({class_name}) with {cfg.backbone} ...", err=True)
    code, doc = run_predict(inputs, out, cfg, class_name=class_name, overwrite=True, detector=det, quiet=quiet)
    for p in doc["predictions"]:
        typer.echo(f"{p['score']:.4f}\t{p['path']}")
    typer.echo(f"heat maps in {out}/heatmaps, report {out}/report.html", err=True)
    raise typer.Exit(code)


def main() -> None:  # pragma: no cover
    sys.exit(app())
