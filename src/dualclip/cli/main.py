"""The `dualclip` command: predict, fit, eval, demo.

Every command turns a bad input or setting (a :class:`~dualclip.errors.DualclipError`) into one line on stderr
(no traceback unless ``--debug``) and exit code 2; any other exception is a bug: exit code 1 and a hint to
``--debug``; 130/143 when interrupted (see ``predict``). Warnings and progress text go through the ``dualclip``
logger, one line each on stderr (``-q``: warnings only; ``-v``: debug).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import re
import signal
from collections.abc import Iterator
from pathlib import Path

import typer
from typer.core import TyperCommand

from .. import __version__
from ..atomic import dumps
from ..config import BORDERS, CENTRINGS, DEFAULT, DISTANCES, HYBRID_NORMS, PRECISIONS, RUNTIMES, DetectorConfig
from ..errors import MissingDependencyError, UsageError

app = typer.Typer(
    help="Zero-shot visual anomaly detection and localization with CLIP.",
    # click's plain help: option names are never cut, the text wraps to the terminal (80 columns in a pipe)
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 120},
)

log = logging.getLogger("dualclip.cli")

EXIT_BUG, EXIT_USAGE, EXIT_SIGINT, EXIT_SIGTERM = 1, 2, 130, 143
DEMO_DATA_ENV = "DUALCLIP_DEMO_DATA"


def _version(value: bool) -> None:
    if value:
        typer.echo(f"dualclip {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
) -> None:
    """Zero-shot visual anomaly detection and localization with CLIP."""


class _Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C so that every clean-up path runs."""


def _on_sigterm(signum, frame):  # pragma: no cover - exercised by the kill test in a subprocess
    raise _Terminated()


class _CliFormatter(logging.Formatter):
    """One line per record: ``warning: ...`` / ``error: ...`` for problems, progress text as it is."""

    def format(self, record: logging.LogRecord) -> str:
        text = _flags(record.getMessage())
        if record.levelno >= logging.ERROR:
            return f"error: {text}"
        if record.levelno >= logging.WARNING:
            return f"warning: {text}"
        return f"debug: {text}" if record.levelno < logging.INFO else text


def configure_logging(quiet: bool = False, verbose: bool = False) -> logging.Handler:
    """Send the ``dualclip`` logger's records to stderr, one line each: progress text and warnings (default),
    warnings only (``quiet``) or everything down to debug (``verbose``). Returns the handler installed (it
    replaces one an earlier command installed)."""
    logger = logging.getLogger("dualclip")
    for h in [h for h in logger.handlers if getattr(h, "_dualclip_cli", False)]:
        logger.removeHandler(h)
    handler = logging.StreamHandler()  # sys.stderr at the time of each record (CliRunner swaps it)
    handler.setFormatter(_CliFormatter())
    handler._dualclip_cli = True  # type: ignore[attr-defined]
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO)
    return handler


def _command_flags() -> dict[str, str]:
    """``{parameter: flag}`` over every command's options (``memory_bank_size`` -> ``--memory-bank-size``)."""
    flags: dict[str, str] = {}
    group = typer.main.get_command(app)
    for command in getattr(group, "commands", {}).values():
        for param in command.params:
            longs = [o for o in param.opts if o.startswith("--")] if param.param_type_name == "option" else []
            if longs and param.name and param.name not in _FLAG_ALIASES:
                flags.setdefault(param.name, longs[0])
    return flags


def _flags(message: str) -> str:
    """A library message with its parameters named as flags: ``memory_bank_size=8`` -> ``--memory-bank-size 8``
    for every option of the commands (library messages speak of parameters)."""
    if "=" not in message:
        return message
    for name, flag in _command_flags().items():
        message = re.sub(rf"(?<![\w.(\-'\"]){re.escape(name)}=True\b", flag, message)  # a switch: no value
        message = re.sub(
            rf"(?<![\w.(\-'\"]){re.escape(name)}=(\S?)",
            lambda m, f=flag: f + (" " + m.group(1) if m.group(1) and m.group(1) not in ",;)" else m.group(1)),
            message,
        )
    for name, flag in _FLAG_ALIASES.items():
        message = re.sub(rf"(?<![\w.(\-'\"]){re.escape(name)}=(?=[,;)\s]|$)", flag, message)
    return message


_CLICK_ERROR = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException")
"""click's usage errors (typer ships its own copy of click)."""

_FLAG_ALIASES = {"api_key": "--api-key-file FILE"}
"""Parameters whose flag is not their name (the service's key is read from a file)."""

BUG_HINT = "this is a bug; rerun with --debug (or DUALCLIP_DEBUG=1) for the traceback"


@contextlib.contextmanager
def cli_errors(debug: bool, quiet: bool = False, verbose: bool = False) -> Iterator[None]:
    """Exit codes and messages of every command: a :class:`~dualclip.errors.DualclipError` (bad input, settings,
    profile, weights, output) is one ``error: ...`` line and exit code 2; any other exception is a bug (or an
    environment failure such as running out of memory): one line with a hint to ``--debug``, exit code 1;
    130/143 for an interrupt (SIGINT/SIGTERM). ``--debug`` or ``DUALCLIP_DEBUG=1`` shows the traceback instead.
    Also installs the stderr log handler (``quiet``: warnings only; ``verbose``: debug)."""
    from ..errors import DualclipError

    debug = debug or os.environ.get("DUALCLIP_DEBUG", "") not in ("", "0")
    configure_logging(quiet=quiet, verbose=verbose)
    previous = signal.signal(signal.SIGTERM, _on_sigterm) if _main_thread() else None
    try:
        yield
    except KeyboardInterrupt as exc:
        term = isinstance(exc, _Terminated)
        kept = exc.args[0] if exc.args and isinstance(exc.args[0], str) else None  # what an archive run kept
        kept = kept or "nothing written; earlier outputs are untouched"
        typer.echo(f"interrupted ({'SIGTERM' if term else 'SIGINT'}): {kept}", err=True)
        raise typer.Exit(EXIT_SIGTERM if term else EXIT_SIGINT) from None
    except (typer.Exit, typer.Abort, _CLICK_ERROR):  # click reports its own usage errors (exit 2)
        raise
    except DualclipError as exc:
        if debug:
            raise
        typer.echo(f"error: {_flags(str(exc))}", err=True)
        raise typer.Exit(EXIT_USAGE) from None
    except Exception as exc:
        if debug:
            raise
        first = str(exc).splitlines()[0] if str(exc) else ""
        typer.echo(f"error: {type(exc).__name__}{': ' + first if first else ''} ({BUG_HINT})", err=True)
        raise typer.Exit(EXIT_BUG) from None
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def _pretrained(value: str | None) -> str | None:
    if value is None:
        return DEFAULT
    return None if value.lower() in ("none", "random") else value


def _ints(text: str, flag: str) -> list[int]:
    """Comma-separated integers of a flag's value, or one usage error naming the flag."""
    try:
        return [int(s) for s in str(text).split(",")]
    except ValueError:
        raise UsageError(f"{flag} takes comma-separated integers, got {text!r}") from None


def _load_profile(profile, quiet, device, runtime, onnx_file, precision, num_workers, batch_size):
    """A saved profile for ``predict --profile`` and ``eval --profile``, run the way the flags say."""
    from ..detector import DualClipDetector

    return DualClipDetector.load(
        profile,
        device=device,
        runtime=runtime,
        onnx_file=onnx_file,
        precision=precision,
        num_workers=num_workers,
        batch_size=batch_size,
        progress=not quiet,
    )


def _config(backbone, pretrained, image_size, k, tta, seed, quiet, **extra) -> DetectorConfig:
    if str(k) != "all" and (len(_ints(k, "--k")) != 1):
        raise UsageError(f"--k takes one integer or 'all', got {k!r}")
    k_val = "all" if str(k) == "all" else _ints(k, "--k")[0]
    if extra.get("onnx_file") is not None:
        extra["onnx_file"] = str(extra["onnx_file"])
    return DetectorConfig(
        backbone=backbone,
        pretrained=_pretrained(pretrained),
        image_size=image_size,
        k=k_val,
        tta=tta,
        seed=seed,
        progress=not quiet,
        **extra,
    )


class _RecordArgs(TyperCommand):
    """Keeps the raw argument list (to spot paths that were meant for the option before them)."""

    def parse_args(self, ctx, args):
        ctx.meta["raw_args"] = list(args)
        return super().parse_args(ctx, args)


PATH_LIST_FLAGS = ("--reference", "--validation-normal", "--validation-anomalous")


def misplaced_paths(raw_args: list[str], flags: tuple[str, ...] = PATH_LIST_FLAGS) -> list[tuple[str, str]]:
    """``(path, flag)`` for every positional argument right after a path-list flag's value: in
    ``--reference a b c``, b and c become input images, which the user rarely means."""
    found, i, after = [], 0, None
    while i < len(raw_args):
        tok = raw_args[i]
        if tok in flags:
            after, i = tok, i + 2
            continue
        if any(tok.startswith(f + "=") for f in flags):
            after, i = tok.split("=", 1)[0], i + 1
            continue
        if tok.startswith("-"):
            after = None
        elif after is not None:
            found.append((tok, after))
        i += 1
    return found


def choices(values: tuple[str, ...]) -> str:
    """The metavar of a flag whose value is one of ``values`` (a settings ``Literal``'s; the library checks it)."""
    return "[" + "|".join(values) + "]"


BACKBONE = typer.Option(
    "ViT-B-16-plus-240", help="open_clip model name, or effnet-lite0 or dinov2-vits14 (vision-only)."
)
PRETRAINED = typer.Option(
    None, help="open_clip tag, a local checkpoint file, or 'random'. Default: the preset's weights."
)
DEBUG = typer.Option(False, "--debug", help="Show the full traceback of an error.")
DEVICE = typer.Option("auto", help="cpu, cuda, cuda:N, or auto (cuda where torch sees a GPU, else cpu).")
BATCH_SIZE = typer.Option(8, help="Images per backbone forward pass.")
QUIET = typer.Option(False, "--quiet", "-q", help="No progress bars or progress text: warnings and errors only.")
VERBOSE = typer.Option(False, "--verbose", "-v", help="Debug messages too.")
PRECISION = typer.Option(
    "auto", metavar=choices(PRECISIONS), help="auto: bf16 on a CUDA GPU that supports it, else fp32."
)
NUM_WORKERS = typer.Option(0, help="Threads decoding image files in parallel (0: none).")
RUNTIME = typer.Option(
    "torch",
    metavar=choices(RUNTIMES),
    help="onnxruntime: the backbone's ONNX export (made once into the cache, or --onnx-file).",
)
ONNX_FILE = typer.Option(None, help="With --runtime onnxruntime: a file made by `dualclip export`.")
EXCLUDE = typer.Option(
    None, help="Leave out files matching this glob (name or path end, e.g. '*_mask.png'); repeat for several."
)


@app.command(cls=_RecordArgs)
def predict(
    ctx: typer.Context,
    paths: list[str] = typer.Argument(
        None, help="Image files, folders (recursive) or glob patterns (optional with --manifest)."
    ),
    out: Path = typer.Option(..., "--out", "-o", help="Output folder (written by dualclip only)."),
    class_name: str = typer.Option(None, help="What the images show, e.g. 'metal nut' (text prompts)."),
    reference: list[str] = typer.Option(
        None, help="Golden normal images (file, folder or glob); repeat the flag for several."
    ),
    profile: Path = typer.Option(
        None, help="A profile made by `dualclip fit`: its model, settings, references, units and threshold."
    ),
    backbone: str = BACKBONE,
    pretrained: str = PRETRAINED,
    image_size: int = typer.Option(None, help="Processing size S."),
    k: str = typer.Option("1", help="References per image (int, or 'all')."),
    tta: bool = typer.Option(False, "--tta/--no-tta", help="Test-time adaptation on synthesized anomalies."),
    seed: int = typer.Option(0),
    threshold: float = typer.Option(None, help="Manual score threshold for verdicts (a finite number)."),
    threshold_quantile: float = typer.Option(None, help="Threshold = this quantile of the --reference images' scores."),
    validation_normal: list[str] = typer.Option(None, help="Labelled normal images to fit an F1-optimal threshold."),
    validation_anomalous: list[str] = typer.Option(None, help="Labelled anomalous images for the threshold fit."),
    overwrite: bool = typer.Option(False, help="Replace the outputs of an earlier dualclip run in --out."),
    exclude: list[str] = EXCLUDE,
    device: str = DEVICE,
    batch_size: int = BATCH_SIZE,
    precision: str = PRECISION,
    num_workers: int = NUM_WORKERS,
    runtime: str = RUNTIME,
    onnx_file: Path = ONNX_FILE,
    engine: str = typer.Option("local", help="local (one run, this process) or ray (blocks on a Ray cluster)."),
    manifest: Path = typer.Option(None, help="--engine ray: a CSV/Parquet file with a path and optional class column."),
    ray_address: str = typer.Option(None, help="--engine ray: the cluster to join (default: start a local one)."),
    block_size: int = typer.Option(200, help="--engine ray: images per block (each block is one run)."),
    num_actors: int = typer.Option(1, help="--engine ray: scoring actors (one model each)."),
    cpus_per_actor: float = typer.Option(1.0, help="--engine ray: CPUs per scoring actor (its torch threads)."),
    gpus_per_actor: float = typer.Option(0.0, help="--engine ray: GPUs per scoring actor (e.g. 1, or 0.5)."),
    quiet: bool = QUIET,
    verbose: bool = VERBOSE,
    json_out: bool = typer.Option(False, "--json", help="Print the predictions document as JSON on stdout."),
    save_maps: str = typer.Option(
        None, help="Also write each raw anomaly map (float32, the image's size) under maps/: npy or tiff."
    ),
    parquet: bool = typer.Option(False, "--parquet", help="Also write predictions.parquet (needs pyarrow)."),
    debug: bool = DEBUG,
) -> None:
    """Score images; write predictions.json/.csv, heatmaps/, masks/ and report.html under --out."""
    with cli_errors(debug, quiet, verbose):  # the first import of torch takes seconds: an interrupt there is clean too
        from .predict import run_predict

    if engine == "ray" or manifest is not None:
        with cli_errors(debug, quiet, verbose):
            code = _predict_archive(
                ctx,
                paths,
                out,
                class_name=class_name,
                profile=profile,
                threshold=threshold,
                exclude=exclude,
                engine=engine,
                quiet=quiet,
                maps=save_maps,
                refused={
                    "--reference": bool(reference),
                    "--threshold-quantile": threshold_quantile is not None,
                    "--validation-*": bool(validation_normal or validation_anomalous),
                    "--json": json_out,
                },
                ray=dict(
                    manifest=manifest,
                    ray_address=ray_address,
                    block_size=block_size,
                    num_actors=num_actors,
                    cpus_per_actor=cpus_per_actor,
                    gpus_per_actor=gpus_per_actor,
                ),
                model=dict(
                    backbone=backbone,
                    pretrained=pretrained,
                    image_size=image_size,
                    k=k,
                    tta=tta,
                    seed=seed,
                    device=device,
                    batch_size=batch_size,
                    runtime=runtime,
                    onnx_file=onnx_file,
                    precision=precision,
                    num_workers=num_workers,
                ),
            )
        raise typer.Exit(code)
    with cli_errors(debug, quiet, verbose):
        if engine != "local":
            raise UsageError(f"unknown --engine {engine!r}: local or ray")
        if not paths:
            raise UsageError("no input: give image files, folders or glob patterns")

    for path, flag in misplaced_paths(ctx.meta.get("raw_args", [])):
        log.warning(
            "%s follows the value of %s: it is scored as an input image; to give several, repeat the flag (%s a %s b)",
            path,
            flag,
            flag,
            flag,
        )
    with cli_errors(debug, quiet, verbose):
        detector = None
        if profile is not None:
            given = _model_options_given(ctx)
            if given:
                raise UsageError(f"--profile carries the model and settings: drop {', '.join(given)}")
            if reference or threshold_quantile is not None or validation_normal or validation_anomalous:
                raise UsageError(
                    "--profile brings its own references and threshold: drop --reference, --threshold-quantile and "
                    "--validation-* (fit the threshold with `dualclip fit`; --threshold overrides it)"
                )
            detector = _load_profile(profile, quiet, device, runtime, onnx_file, precision, num_workers, batch_size)
            cfg = detector.config
        else:
            cfg = _config(
                backbone,
                pretrained,
                image_size,
                k,
                tta,
                seed,
                quiet,
                device=device,
                batch_size=batch_size,
                runtime=runtime,
                onnx_file=onnx_file,
                precision=precision,
                num_workers=num_workers,
            )
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
            detector=detector,
            exclude=exclude or None,
            save_maps=save_maps,
            tables=("json", "csv", "parquet") if parquet else ("json", "csv"),
        )
    if json_out:
        typer.echo(dumps(doc))
    else:  # --quiet silences progress bars only, never the results
        from ..output.rows import terminal_text

        for p in doc["predictions"]:
            verdict = f" {p['verdict']}" if p.get("verdict") else ""
            s = "error: " + p["error"] if p.get("error") else f"{p['score']:.4f}{verdict}"
            typer.echo(f"{terminal_text(s)}\t{terminal_text(p['path'])}")
        typer.echo(f"wrote {out}/report.html", err=True)  # a result (also under -q), not a log record
    raise typer.Exit(code)


MODEL_OPTIONS = ("backbone", "pretrained", "image_size", "k", "tta", "seed")


def _predict_archive(
    ctx,
    paths: list[str] | None,
    out: Path,
    *,
    class_name: str | None,
    profile: Path | None,
    threshold: float | None,
    exclude: list[str] | None,
    engine: str,
    quiet: bool,
    maps: str | None,
    refused: dict[str, bool],
    ray: dict,
    model: dict,
) -> int:
    """``predict --engine ray``: the archive run (dualclip.distributed); returns the exit code.

    ``refused``: the local-only options and whether each was given; ``ray``: the engine's options;
    ``model``: the model options (ignored with a profile, which must then be left at their defaults)."""
    import math

    from ..data.images import expand_paths
    from .predict import EXIT_NOTHING, EXIT_OK, EXIT_SOME_FAILED, mask_warnings

    if engine != "ray":
        raise UsageError("--manifest is read by --engine ray")
    given_local = [flag for flag, given in refused.items() if given]
    if given_local:
        raise UsageError(
            f"--engine ray does not take {', '.join(given_local)}: fit a profile (`dualclip fit`, with its "
            "threshold) and pass --profile, or give --threshold"
        )
    if threshold is not None and not math.isfinite(threshold):
        raise UsageError(f"--threshold must be a finite number, got {threshold}")
    from ..output import MAP_FORMATS

    if maps is not None and maps not in MAP_FORMATS:
        raise UsageError(f"--save-maps must be one of {', '.join(MAP_FORMATS)}, got {maps!r}")
    try:
        from ..distributed import read_manifest, run_archive
    except ImportError as exc:
        raise MissingDependencyError(f"--engine ray needs the ray extra: pip install 'dualclip[ray]' ({exc})") from exc
    items: list[tuple[str, str | None]] = []
    if ray["manifest"] is not None:
        items += read_manifest(ray["manifest"])
    if paths:
        found = expand_paths(paths, exclude=[out], exclude_patterns=exclude or ())
        for note in mask_warnings(found):
            log.warning("%s", note)
        items += [(str(p), class_name) for p in found.files]
    if not items:
        raise UsageError("no input: give image paths or --manifest")
    config = None
    if profile is not None:
        given_opts = _model_options_given(ctx)
        if given_opts:
            raise UsageError(f"--profile carries the model and settings: drop {', '.join(given_opts)}")
    else:
        config = _config(**model, quiet=True).to_dict()
    if model.get("onnx_file") is not None:
        model["onnx_file"] = str(model["onnx_file"])
    run = run_archive(
        items,
        out,
        spec_config=config,
        profile=profile,
        threshold=threshold,
        engine="ray",
        block_size=ray["block_size"],
        seed=model["seed"],
        num_actors=ray["num_actors"],
        cpus_per_actor=ray["cpus_per_actor"],
        gpus_per_actor=ray["gpus_per_actor"],
        ray_address=ray["ray_address"],
        progress=not quiet,
        maps=maps,
        where={k: model[k] for k in ("device", "runtime", "onnx_file", "precision", "batch_size", "num_workers")},
    )
    typer.echo(  # a result (also under -q), not a log record
        f"scored {run.images - run.failed} of {run.images} images in {run.blocks} blocks "
        f"({run.scored_blocks} scored now, {run.reused_blocks} reused) in {run.seconds:.0f} s; "
        f"wrote {out}/predictions.json, .csv and .parquet",
        err=True,
    )
    if run.failed == run.images:
        return EXIT_NOTHING
    return EXIT_SOME_FAILED if run.failed else EXIT_OK


def _model_options_given(ctx: typer.Context) -> list[str]:
    """The model/settings options given on the command line (not left at their defaults)."""
    sources = {name: ctx.get_parameter_source(name) for name in MODEL_OPTIONS}
    return [
        "--" + name.replace("_", "-")
        for name, source in sources.items()
        if source is not None and source.name not in ("DEFAULT", "DEFAULT_MAP")
    ]


@app.command(cls=_RecordArgs)
def fit(
    ctx: typer.Context,
    paths: list[str] = typer.Argument(..., help="Normal (defect-free) images: files, folders or glob patterns."),
    out: Path = typer.Option(..., "--out", "-o", help="The profile folder to write (safetensors + JSON)."),
    class_name: str = typer.Option(None, help="What the images show, e.g. 'metal nut' (text prompts)."),
    backbone: str = BACKBONE,
    pretrained: str = PRETRAINED,
    image_size: int = typer.Option(None, help="Processing size S."),
    distance: str = typer.Option(None, metavar=choices(DISTANCES), help="Patch distance (default: the backbone's)."),
    neighbourhood: str = typer.Option(None, help="Neighbourhood size(s), e.g. 3 or 1,3,5 (default: the backbone's)."),
    hybrid_norm: str = typer.Option(
        None, metavar=choices(HYBRID_NORMS), help="How the hybrid distance's parts are scaled."
    ),
    border: str = typer.Option(None, metavar=choices(BORDERS), help="effnet-lite0's padding of the image border."),
    centring: str = typer.Option(
        None, metavar=choices(CENTRINGS), help="Subtract the normal images' score per place (none: off)."
    ),
    memory_bank_size: int = typer.Option(16384, help="Most golden patches kept (greedy coreset above); 0: all."),
    plain_weight: float = typer.Option(
        None, help="The plain nearest-neighbour view's share of the map, 0 to 1 (0: off; default: the backbone's)."
    ),
    plain_image_size: int = typer.Option(224, help="The plain view's processing size."),
    tta: bool = typer.Option(False, "--tta/--no-tta", help="Train the adaptation head on the normal images."),
    seed: int = typer.Option(0),
    threshold_quantile: float = typer.Option(None, help="Threshold = this quantile of the normal images' scores."),
    validation_normal: list[str] = typer.Option(None, help="Labelled normal images to fit an F1-optimal threshold."),
    validation_anomalous: list[str] = typer.Option(None, help="Labelled anomalous images for the threshold fit."),
    overwrite: bool = typer.Option(False, help="Replace an existing profile at --out."),
    exclude: list[str] = EXCLUDE,
    device: str = DEVICE,
    batch_size: int = BATCH_SIZE,
    precision: str = PRECISION,
    num_workers: int = NUM_WORKERS,
    runtime: str = RUNTIME,
    onnx_file: Path = ONNX_FILE,
    quiet: bool = QUIET,
    verbose: bool = VERBOSE,
    debug: bool = DEBUG,
) -> None:
    """Fit a profile on normal images: golden references, fixed score units, optional threshold."""
    from ..data.images import expand_paths, load_images
    from ..detector import DualClipDetector
    from ..output import check_parent, display_path
    from ..profile import ProfileError, check_destination, empty_folder
    from .predict import mask_warnings

    for path, flag in misplaced_paths(ctx.meta.get("raw_args", []), ("--validation-normal", "--validation-anomalous")):
        log.warning("%s follows the value of %s: it is used as a normal image", path, flag)
    with cli_errors(debug, quiet, verbose):
        if out.exists() and not overwrite and not empty_folder(out):
            raise UsageError(f"{out} exists: choose another --out or pass --overwrite")
        check_destination(out, overwrite)  # where the profile goes, before any image is read
        check_parent(out, created=True)
        sizes = None if neighbourhood is None else tuple(_ints(neighbourhood, "--neighbourhood"))
        cfg = _config(
            backbone,
            pretrained,
            image_size,
            "1",
            tta,
            seed,
            quiet,
            distance=distance,
            neighbourhood=sizes,
            hybrid_norm=hybrid_norm,
            border=border,
            centring=centring,
            memory_bank_size=memory_bank_size or None,
            plain_weight=plain_weight,
            plain_image_size=plain_image_size,
            device=device,
            batch_size=batch_size,
            runtime=runtime,
            onnx_file=onnx_file,
            precision=precision,
            num_workers=num_workers,
        )
        if bool(validation_normal) != bool(validation_anomalous):
            raise UsageError("give both --validation-normal and --validation-anomalous")

        def load(patterns: list[str]) -> tuple[list, list[Path]]:
            found = expand_paths(patterns, exclude=[out], exclude_patterns=exclude or ())
            summed_up = {str(m) for m, _ in found.masks}  # one warning for all of them
            for p, reason in found.skipped:
                if p not in summed_up:
                    log.info("skipped %s: %s", p, reason)
            for note in mask_warnings(found):
                log.warning("%s", note)
            return load_images(found.files, num_workers, strict=True), found.files

        normal, normal_files = load(paths)
        val_n = load(validation_normal)[0] if validation_normal else None
        val_a = load(validation_anomalous)[0] if validation_anomalous else None
        det = DualClipDetector(cfg)
        least = det.min_bank_size() if cfg.use_visual and cfg.memory_bank_size is not None else 0
        if cfg.memory_bank_size is not None and cfg.memory_bank_size < least:
            raise UsageError(
                f"--memory-bank-size {cfg.memory_bank_size} is too small: a bank must hold more than one image's "
                f"{least - 1} patches (leave-one-out); give at least {least}, or 0 to keep every patch"
            )
        if class_name and not det.backbone.has_text:
            log.warning(
                "--class-name %r is not used: %s is vision-only (no text tower); the profile records it as its class "
                "name only",
                class_name,
                det.backbone.name,
            )
        det = det.fit(
            normal,
            class_name=class_name,
            threshold_quantile=threshold_quantile,
            validation_normal=val_n,
            validation_anomalous=val_a,
            sources=[display_path(p) for p in normal_files],  # read here, handed over decoded
        )
        try:
            det.save(out, overwrite=overwrite)
        except ProfileError as exc:
            raise UsageError(str(exc)) from exc
    meta, th, plain = det.profile_meta(), det.threshold_, det.plain_summary()
    typer.echo(
        f"wrote profile {out}: {meta['n_normal']} normal images, {meta['bank_patches']} of "
        f"{meta['bank_patches_total']} patches kept"
        + ("" if plain is None else f" (plain view: {plain['bank_patches']} of {plain['bank_patches_total']})")
        + ", threshold "
        + ("none" if th is None else f"{th.value:.4f} ({th.source})")
    )


API_KEY_ENV = "DUALCLIP_API_KEY"


@app.command()
def serve(
    profile: Path = typer.Option(..., help="A profile made by `dualclip fit`."),
    host: str = typer.Option("127.0.0.1", help="Address to bind; any non-loopback address needs an API key."),
    port: int = typer.Option(8000, help="TCP port."),
    batch_size: int = typer.Option(8, help="Most concurrent requests scored in one batch."),
    max_wait_ms: float = typer.Option(5.0, help="Longest wait of a request for others to share its batch (ms)."),
    max_body_mb: float = typer.Option(32.0, help="Largest request body accepted (MiB); larger: 413."),
    max_pending_mb: float = typer.Option(
        256.0, help="Most MiB of request bodies held at once over all requests; beyond: 503 with Retry-After."
    ),
    api_key_file: Path = typer.Option(
        None, help=f"A file holding the API key required in the X-API-Key header (or set ${API_KEY_ENV})."
    ),
    body_timeout: float = typer.Option(
        30.0, help="Longest wait for the next bytes of a request body (s); a stalled upload gets 408."
    ),
    min_body_rate: float = typer.Option(
        64.0, help="After --body-timeout seconds a body must have come at this average rate (KiB/s), else 408."
    ),
    device: str = DEVICE,
    runtime: str = RUNTIME,
    onnx_file: Path = ONNX_FILE,
    debug: bool = DEBUG,
) -> None:
    """Serve a profile over HTTP: POST /v1/score, GET /v1/info, GET /healthz (needs the serve extra)."""
    import os

    with cli_errors(debug):
        try:
            from ..serve import ServeSettings, create_app
            from ..serve.app import serve as run_service
        except ImportError as exc:
            raise MissingDependencyError(
                f"the service needs the serve extra: pip install 'dualclip[serve]' ({exc})"
            ) from exc
        from ..detector import DualClipDetector

        key = os.environ.get(API_KEY_ENV) or None
        if api_key_file is not None:
            try:
                key = api_key_file.read_text(encoding="utf-8").strip()
            except (OSError, UnicodeDecodeError) as exc:
                why = "not UTF-8 text" if isinstance(exc, UnicodeDecodeError) else exc.strerror or str(exc)
                raise UsageError(f"--api-key-file {api_key_file} cannot be read: {why}") from None
            if not key:
                raise UsageError(f"--api-key-file {api_key_file} is empty")
        for flag, mb in (("--max-body-mb", max_body_mb), ("--max-pending-mb", max_pending_mb)):
            if not math.isfinite(mb) or not 0 < mb <= 2**20:
                raise UsageError(f"{flag} must be a positive number of MiB up to {2**20}, got {mb:g}")
        if max_pending_mb < max_body_mb:
            raise UsageError(f"--max-pending-mb {max_pending_mb:g} must be at least --max-body-mb {max_body_mb:g}")
        if not 0 < body_timeout <= 3600:
            raise UsageError(f"--body-timeout must lie in (0, 3600] seconds, got {body_timeout}")
        if not math.isfinite(min_body_rate) or min_body_rate * 2**10 < 1:
            raise UsageError(f"--min-body-rate must be a positive number of KiB/s, got {min_body_rate}")
        settings = ServeSettings(
            host=host,
            port=port,
            batch_size=batch_size,
            max_wait_ms=max_wait_ms,
            max_body_bytes=int(max_body_mb * 2**20),
            max_pending_bytes=int(max_pending_mb * 2**20),
            api_key=key,
            body_timeout_s=body_timeout,
            min_body_bytes_per_s=int(min_body_rate * 2**10),
        )
        detector = DualClipDetector.load(
            profile, device=device, runtime=runtime, onnx_file=onnx_file, batch_size=batch_size, progress=False
        )
        app_ = create_app(detector, settings, profile_path=profile)
        log.info(
            "serving %s (%s, %s) on http://%s:%s (API key %s); Ctrl-C stops",
            profile,
            detector.config.backbone,
            runtime,
            host,
            port,
            "required" if key else "off",
        )
    run_service(app_, settings)


@app.command("export")
def export(
    out: Path = typer.Option(..., "--out", "-o", help="The file to write (e.g. model.onnx)."),
    format: str = typer.Option("onnx", "--format", help="onnx (the only format)."),
    profile: Path = typer.Option(None, help="Export the model of this profile (instead of the model options)."),
    what: str = typer.Option(
        None,
        help="model: the profile's whole scoring, image to score and anomaly map (default with --profile); "
        "encoder: the backbone's image path alone, for --runtime onnxruntime (default without).",
    ),
    backbone: str = BACKBONE,
    pretrained: str = PRETRAINED,
    image_size: int = typer.Option(None, help="Processing size S (fixed in the graph)."),
    overwrite: bool = typer.Option(False, help="Replace an existing file at --out."),
    quiet: bool = QUIET,
    verbose: bool = VERBOSE,
    debug: bool = DEBUG,
) -> None:
    """Export a profile's whole model (image to score and anomaly map), or the one-pass image encoder, to ONNX."""
    from ..output import check_parent

    with cli_errors(debug, quiet, verbose):
        if format != "onnx":
            raise UsageError(f"unknown --format {format!r}: onnx is the only export format")
        what = what or ("model" if profile is not None else "encoder")
        if what not in ("model", "encoder"):
            raise UsageError(f"unknown --what {what!r}: choose model or encoder")
        if what == "model" and profile is None:
            raise UsageError("--what model exports a fitted profile's scoring: give --profile (dualclip fit makes one)")
        if out.exists() and not overwrite:
            raise UsageError(f"{out} exists: choose another --out or pass --overwrite")
        if out.exists() and not out.is_file():
            raise UsageError(f"--out {out} is not a file")
        check_parent(out)  # before the model is built and exported
        try:
            from ..export import export_model, export_onnx, onnx_metadata
        except ImportError as exc:
            raise MissingDependencyError(f"export needs onnx: pip install 'dualclip[convert]' ({exc})") from exc
        from ..detector import DualClipDetector

        if profile is not None:
            det = DualClipDetector.load(profile, device="cpu", runtime="torch", precision="fp32")
        else:
            det = DualClipDetector(_config(backbone, pretrained, image_size, "1", False, 0, True, device="cpu"))
        if what == "model":
            export_model(det, out, profile_path=profile)
        else:
            export_onnx(det.backbone, out)
        meta = onnx_metadata(out)
    head = f"wrote {out}: {meta['backbone']} at {meta['image_size']} px, weights {meta['weights']} "
    if what == "model":
        threshold = "none" if meta["threshold"] is None else f"{meta['threshold']['value']:.4g}"
        typer.echo(
            head + f"(fingerprint {meta['weights_fingerprint']}), profile {meta['profile']['fingerprint']}; "
            f"{', '.join(meta['inputs'])} -> {', '.join(meta['outputs'])} ({', '.join(meta['branches'])}), "
            f"threshold {threshold}"
        )
    else:
        typer.echo(head + f"(fingerprint {meta['weights_fingerprint']}), outputs {', '.join(meta['outputs'])}")


@app.command("eval")
def eval_(
    ctx: typer.Context,
    dataset: str = typer.Option(..., help="mvtec | visa | mpdd | btad | folder"),
    root: Path = typer.Option(None, help="Dataset root (not for folder)."),
    out: Path = typer.Option(..., "--out", "-o"),
    categories: str = typer.Option(None, help="Comma-separated categories (default: all found)."),
    backbone: str = BACKBONE,
    pretrained: str = PRETRAINED,
    image_size: int = typer.Option(None),
    k: str = typer.Option("1"),
    tta: bool = typer.Option(False, "--tta/--no-tta"),
    seeds: str = typer.Option("0", help="Comma-separated seeds; metrics are reported as mean ± std."),
    force: bool = typer.Option(False, help="Recompute categories already saved under --out."),
    require_masks: bool = typer.Option(
        False, help="Every anomalous image must have a mask (default: those without count in image metrics only)."
    ),
    shots: int = typer.Option(
        0, help="Few-shot: N normal training images (train/good) per category as golden references; 0: zero-shot."
    ),
    shots_seed: int = typer.Option(0, help="Seeds the choice of the --shots images (recorded in the results)."),
    json_out: bool = typer.Option(False, "--json", help="Print results.json on stdout instead of the table."),
    profile: Path = typer.Option(
        None, help="Test a profile made by `dualclip fit`: its scores, and its verdicts counted at its threshold."
    ),
    threshold: float = typer.Option(None, help="With --profile: count the verdicts at this threshold instead."),
    quiet: bool = QUIET,
    verbose: bool = VERBOSE,
    name: str = typer.Option("folder", help="folder layout: the category name."),
    normal: list[str] = typer.Option(None, help="folder layout: normal image folders/globs."),
    anomalous: list[str] = typer.Option(None, help="folder layout: anomalous image folders/globs."),
    images: list[str] = typer.Option(None, help="folder layout: images labelled by their masks."),
    masks: list[str] = typer.Option(None, help="folder layout: mask folders (default: beside each image)."),
    mask_suffix: str = typer.Option(None, help="folder layout: mask file = <stem><suffix>."),
    mask_threshold: int = typer.Option(
        0, help="folder layout: a mask pixel is a defect above this value (0: nonzero; 127 for anti-aliased 0/255)."
    ),
    max_normal: int = typer.Option(None, help="folder layout: keep the first N normal images."),
    max_anomalous: int = typer.Option(None, help="folder layout: keep the first N anomalous images."),
    device: str = DEVICE,
    batch_size: int = BATCH_SIZE,
    precision: str = PRECISION,
    num_workers: int = NUM_WORKERS,
    runtime: str = RUNTIME,
    onnx_file: Path = ONNX_FILE,
    debug: bool = DEBUG,
) -> None:
    """Evaluate on a dataset with the field's protocol; writes results.json/.md/.csv under --out."""
    from ..data import datasets as D
    from ..evaluation import run_eval

    with cli_errors(debug, quiet, verbose):
        wanted = [c.strip() for c in categories.split(",")] if categories else None
        if dataset == "folder":
            cats = D.folder(
                name, normal, anomalous, images, masks, mask_suffix, max_normal, max_anomalous, mask_threshold
            )
        elif dataset in D.LAYOUTS:
            if root is None:
                raise UsageError(f"--root is required for --dataset {dataset}")
            cats = D.LAYOUTS[dataset](root, wanted)
        else:
            raise UsageError(f"unknown dataset {dataset!r}; choose mvtec, visa, mpdd, btad or folder")
        from ..output.eval_folder import EvalFolder

        EvalFolder(out, [c.name for c in cats])  # refused before any model is built (run_eval checks again)
        extra = {"dataset": dataset, "root": str(root) if root else None}
        fitted = verdicts = None
        if profile is not None:
            given = _model_options_given(ctx) + [f for f, v in (("--seeds", seeds != "0"), ("--shots", shots > 0)) if v]
            if given:
                raise UsageError(f"--profile carries the model, settings and references: drop {', '.join(given)}")
            from ..thresholds import manual_threshold

            fitted = _load_profile(profile, quiet, device, runtime, onnx_file, precision, num_workers, batch_size)
            cfg, seed_list = fitted.config, [fitted.config.seed]
            verdicts = None if threshold is None else manual_threshold(threshold)
            extra["profile"] = str(profile)
        else:
            if threshold is not None:
                raise UsageError("--threshold judges a profile's verdicts: give --profile too")
            cfg = _config(
                backbone,
                pretrained,
                image_size,
                k,
                tta,
                0,
                quiet,
                device=device,
                batch_size=batch_size,
                runtime=runtime,
                onnx_file=onnx_file,
                precision=precision,
                num_workers=num_workers,
            )
            seed_list = _ints(seeds, "--seeds")
        if shots:
            cats = D.with_shots(cats, shots, shots_seed)
            extra.update(shots=shots, shots_seed=shots_seed)
        run_eval(
            cfg,
            cats,
            seed_list,
            out,
            force=force,
            extra=extra,
            require_masks=require_masks,
            fitted=fitted,
            threshold=verdicts,
        )
    typer.echo((out / ("results.json" if json_out else "results.md")).read_text())


def _demo_inputs(data: Path | None, tmp: Path) -> tuple[list[str], str]:
    if data is not None and (data / "MT_Free" / "Imgs").is_dir():
        free = sorted((data / "MT_Free" / "Imgs").glob("*.jpg"))[:6]
        bad = [sorted((data / c / "Imgs").glob("*.jpg"))[0] for c in ("MT_Blowhole", "MT_Crack", "MT_Fray")]
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
def demo(
    out: Path = typer.Option(Path("runs/demo"), "--out", "-o"),
    data: Path = typer.Option(
        None,
        envvar=DEMO_DATA_ENV,
        help="The magnetic_tile dataset folder (MT_Free/Imgs, ...); default: generated textures with defects.",
    ),
    overwrite: bool = typer.Option(
        False, help="Replace the outputs of an earlier predict run in --out (an earlier demo's are always replaced)."
    ),
    quiet: bool = QUIET,
    verbose: bool = VERBOSE,
    debug: bool = DEBUG,
) -> None:
    """Run the detector on an embedded default; falls back to effnet-lite0 where CLIP weights are unavailable."""
    from ..detector import DualClipDetector
    from ..errors import WeightsUnavailableError
    from ..output.folder import check_output_folder, written_by
    from .predict import run_predict

    with cli_errors(debug, quiet, verbose):
        overwrite = overwrite or written_by(out) == "demo"
        out.absolute().parent.mkdir(parents=True, exist_ok=True)
        check_output_folder(out, [], overwrite)  # before any model is built
        cfg = DetectorConfig(progress=not quiet)
        log.info("trying the default CLIP weights of %s (cache, then download) ...", cfg.backbone)
        try:
            det = DualClipDetector(cfg)
            _ = det.backbone
        except WeightsUnavailableError as exc:
            log.warning(
                "CLIP weights unavailable (%s...). Running the dual-image visual branch with effnet-lite0 instead.",
                str(exc).splitlines()[0][:160],
            )
            cfg = DetectorConfig(backbone="effnet-lite0", progress=not quiet)
            det = DualClipDetector(cfg)
        inputs, class_name = _demo_inputs(data, out.parent / f".{out.name}-inputs")
        log.info("scoring %d images (%s) with %s ...", len(inputs), class_name, cfg.backbone)
        if not det.backbone.has_text:
            class_name = None  # the demo chose it, not the user: nothing to warn of
        code, doc = run_predict(
            inputs, out, cfg, class_name=class_name, overwrite=overwrite, detector=det, quiet=quiet, command="demo"
        )
    from ..output.rows import terminal_text

    for p in doc["predictions"]:
        typer.echo(f"{p['score']:.4f}\t{terminal_text(p['path'])}")
    typer.echo(f"heat maps in {out}/heatmaps, report {out}/report.html", err=True)  # a result, not a log record
    raise typer.Exit(code)
