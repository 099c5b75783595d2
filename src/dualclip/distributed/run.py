"""An archive run: plan the blocks, skip those already finished, score the rest with an engine, and merge
every block's rows into predictions.json / .csv / .parquet.

The output folder holds ``run.json`` (the settings and the plan), ``blocks/<id>.json`` (each finished
block, written atomically by whoever scored it), ``heatmaps/<block>/`` and ``masks/<block>/``, then the
merged predictions. A rerun with the same inputs and settings resumes: finished blocks are read back, not
scored again, unless what they were scored from changed (an image replaced at the same path, the profile fitted
again: :func:`content_key`). A folder holding anything else is never used; one run at a time writes it (a lock
file beside it), and pool settings and the cluster's resources are checked before anything is written there.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from .. import __version__
from ..atomic import write_json
from ..config import DetectorConfig, ExecutionSettings
from ..data.images import OUTPUT_MARKER, file_fingerprint
from ..errors import ConfigError, IncompleteRunError, OutputError
from ..output import check_formats, lies_outside, output_lock, write_tables
from .engines import check_pool
from .plan import Block, plan_blocks
from .scorer import BLOCKS_DIR, ScorerSpec, block_rows, load_block_result

RUN_FILE = "run.json"
ENGINES = ("ray", "inline")
TABLES = ("json", "csv", "parquet")
"""The merged predictions are written in every table format (Parquet needs pyarrow, in the ray extra)."""


class ArchiveFolderError(OutputError):
    """The output folder of an archive run cannot be used (a usage error)."""


@dataclass
class ArchiveRun:
    """What an archive run did: blocks scored now and reused from an earlier run, rows, files."""

    out: Path
    engine: str
    blocks: int
    scored_blocks: int
    reused_blocks: int
    images: int
    failed: int
    seconds: float
    rows: list[dict] = field(repr=False, default_factory=list)


def _settings_key(spec: ScorerSpec, block_size: int, seed: int, blocks: list[Block]) -> str:
    """What the run computes: the method and the arithmetic (:meth:`DetectorConfig.numbers_key`; with a profile,
    its path and the arithmetic), the threshold, the outputs and the plan. How the workers run is left out."""
    numbers = {"method": spec.config, **ExecutionSettings(**spec.where).arithmetic()}  # numbers_key's form
    settings = spec.to_dict() | {"config": numbers, "out": None, "where": None, "block_size": block_size, "seed": seed}
    payload = json.dumps([settings, [b.fingerprint for b in blocks], __version__], sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def content_key(block: Block, fingerprints: dict[str, list | None], profile: str | None) -> str:
    """What a block's scores are computed from: each of its files' fingerprint (size, modification time, SHA-256
    of the content: :func:`~dualclip.data.images.file_fingerprint`) and the profile's digest (``None`` without
    one). A saved block is reused only under the same key."""
    payload = json.dumps([profile, [fingerprints[p] for p in block.paths]])
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def _with_content(blocks: list[Block], profile: str | os.PathLike | None) -> list[Block]:
    """``blocks`` with their :func:`content_key` (files read in a few threads)."""
    from ..profile import profile_digest

    digest = None if profile is None else profile_digest(profile)
    paths = [p for b in blocks for p in b.paths]
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        fingerprints = dict(zip(paths, pool.map(file_fingerprint, paths), strict=True))
    return [dataclasses.replace(b, content=content_key(b, fingerprints, digest)) for b in blocks]


def _check_folder(out: Path, key: str) -> bool:
    """Accept ``out`` (writing nothing): True when it holds an earlier run of the same plan to resume, False
    when it is missing or empty; anything else is an :class:`ArchiveFolderError`."""
    if out.exists() and not out.is_dir():
        raise ArchiveFolderError(f"out={out} exists and is a file, not a folder")
    if not out.exists() or not any(out.iterdir()):
        return False
    run_file = out / RUN_FILE
    try:
        previous = json.loads(run_file.read_text(encoding="utf-8")) if run_file.is_file() else None
    except (OSError, ValueError, RecursionError):
        previous = None
    if not previous or previous.get("kind") != "dualclip archive run":
        raise ArchiveFolderError(
            f"out={out} is not empty and holds no dualclip archive run ({RUN_FILE}): choose another folder"
        )
    if previous.get("key") != key:
        raise ArchiveFolderError(
            f"out={out} holds an archive run of other inputs or settings (key {previous.get('key')}, this run "
            f"{key}): it is never replaced; choose another folder to start a new run"
        )
    return True


def run_archive(
    items: list[tuple[str, str | None]],
    out: str | os.PathLike,
    spec_config: dict | None = None,
    profile: str | os.PathLike | None = None,
    threshold: float | None = None,
    engine: str = "ray",
    block_size: int = 200,
    seed: int = 0,
    heatmaps: bool = True,
    num_actors: int = 1,
    cpus_per_actor: float = 1.0,
    gpus_per_actor: float = 0.0,
    ray_address: str | None = None,
    progress: bool = True,
    scorer_cls: type | None = None,
    where: dict | None = None,
    maps: str | None = None,
) -> ArchiveRun:
    """Score ``items`` (``(path, class)`` pairs) in blocks and write the merged predictions under ``out``.

    ``spec_config``: :meth:`DetectorConfig.to_dict` for zero-shot runs (each block one run, seeded by
    ``seed``), or ``profile``: a saved profile (every image scored on its own). ``engine``: ``"ray"`` or
    ``"inline"`` (this process). See :func:`~dualclip.distributed.engines.run_ray` for the Ray settings.
    ``where``: execution settings for the workers (:class:`~dualclip.config.ExecutionSettings`: ``device``,
    ``runtime``, ``precision``, ...; also with a profile), over those in ``spec_config``. Only the method settings
    and the arithmetic make the resume key: a run resumed with another device, batch size or decoding threads
    reuses its finished blocks. ``maps``: also write each raw anomaly map (``npy`` or ``tiff``).
    predictions.parquet needs pyarrow (checked first)."""
    from tqdm.auto import tqdm

    from .engines import run_inline, run_ray
    from .scorer import BlockScorer

    if engine not in ENGINES:
        raise ConfigError(f"engine must be one of {ENGINES}, got {engine!r}")
    if (spec_config is None) == (profile is None):
        raise ConfigError("give either a detector configuration or a profile")
    check_formats(TABLES, maps)
    if engine == "ray":
        check_pool(num_actors, cpus_per_actor, gpus_per_actor)
    out = Path(out)
    start = time.perf_counter()
    blocks = plan_blocks(items, block_size=block_size, seed=seed)
    where = {k: (str(v) if k == "onnx_file" else v) for k, v in (where or {}).items() if v is not None}
    where["progress"] = False  # the run's own bar counts the images
    if spec_config is None:
        execution, method = ExecutionSettings(**where), None
    else:  # the flat settings, split: what the workers compute, and how they run
        config = DetectorConfig(**{**spec_config, "seed": seed, **where})
        execution, method = config.execution, config.method_key()
    spec = ScorerSpec(
        out=str(out),
        config=method,
        profile=None if profile is None else str(profile),
        threshold=threshold,
        heatmaps=heatmaps,
        maps=maps,
        where=execution.to_dict(),
    )
    key = _settings_key(spec, block_size, seed, blocks)
    _check_folder(out, key)  # a refused run writes nothing, not even the lock file
    with output_lock(out):
        resumed = _check_folder(out, key)  # again, as the run holding the lock finds it
        blocks = _with_content(blocks, profile)
        results: dict[str, dict] = {}
        for b in blocks if resumed else []:
            saved = load_block_result(out, b)
            if saved is not None:
                results[b.id] = saved
        todo = [b for b in blocks if b.id not in results]
        scorer_cls = scorer_cls or BlockScorer
        if engine == "ray":  # joins the cluster and checks its resources now, before anything is written
            stream = run_ray(
                todo,
                spec,
                num_actors=num_actors,
                cpus_per_actor=cpus_per_actor,
                gpus_per_actor=gpus_per_actor,
                address=ray_address,
                scorer_cls=scorer_cls,
            )
        else:
            stream = run_inline(todo, spec, scorer_cls=scorer_cls)
        out.mkdir(parents=True, exist_ok=True)
        if not resumed:
            write_json(out / OUTPUT_MARKER, {"tool": "dualclip", "version": __version__, "files": [], "archive": True})
        write_json(
            out / RUN_FILE,
            {
                "kind": "dualclip archive run",
                "version": __version__,
                "key": key,
                "engine": engine,
                "settings": spec.to_dict(),
                "block_size": block_size,
                "seed": seed,
                "n_images": sum(len(b.paths) for b in blocks),
                "blocks": [
                    {"id": b.id, "class": b.class_name, "n": len(b.paths), "fingerprint": b.fingerprint} for b in blocks
                ],
            },
        )
        n_todo = sum(len(b.paths) for b in todo)
        try:
            with tqdm(total=n_todo, desc=f"scoring ({engine})", unit="img", disable=not progress) as bar:
                for result in stream:
                    results[result["block"]["id"]] = result
                    bar.update(len(result["block"]["paths"]))
        except KeyboardInterrupt as exc:  # say what is kept (the CLI prints it): finished blocks stay saved
            exc.args = (
                f"{len(results)} of {len(blocks)} block(s) finished and kept in {out / BLOCKS_DIR}; no predictions "
                "merged yet: run the same command again to resume",
            )
            raise
        missing = [b.id for b in blocks if b.id not in results]
        if missing:
            raise IncompleteRunError(
                f"{len(missing)} block(s) returned no result (first: {missing[0]}); rerun to resume"
            )
        rows = sorted((r for b in blocks for r in block_rows(results[b.id])), key=lambda r: r.index)
        _write_predictions(out, rows, spec, blocks, engine, key)
    return ArchiveRun(
        out=out,
        engine=engine,
        blocks=len(blocks),
        scored_blocks=len(todo),
        reused_blocks=len(blocks) - len(todo),
        images=len(rows),
        failed=sum(1 for r in rows if r.error),
        seconds=time.perf_counter() - start,
        rows=[r.to_dict() for r in rows],
    )


def _write_predictions(out: Path, rows: list, spec: ScorerSpec, blocks, engine: str, key: str) -> None:
    doc = {
        "settings": spec.to_dict(),
        "engine": engine,
        "key": key,
        "blocks": len(blocks),
        "n_images": len(rows),
        "n_failed": sum(1 for r in rows if r.error),
    }
    wrote = set(write_tables(out, doc, rows, TABLES))
    # the marker lists what this run wrote (what a later --overwrite may remove), never anything else in out
    wrote |= {RUN_FILE}
    wrote |= {f"{BLOCKS_DIR}/{b.id}.json" for b in blocks}
    wrote |= {f for r in rows for f in (r.heatmap, r.mask, r.map) if isinstance(f, str)}
    files = sorted(f for f in wrote if not lies_outside(out, f) and (out / f).is_file())
    write_json(out / OUTPUT_MARKER, {"tool": "dualclip", "version": __version__, "files": files, "archive": True})


__all__ = ["ArchiveFolderError", "ArchiveRun", "BLOCKS_DIR", "run_archive"]
