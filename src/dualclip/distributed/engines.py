"""Engines that run a list of blocks: ``inline`` (this process, one block after another) and ``ray`` (Ray
Data: images decoded in CPU tasks, blocks scored in a pool of actors, one model per actor)."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator

from ..errors import ConfigError
from .plan import Block
from .scorer import BlockScorer, ScorerSpec, decode_block, pack, unpack


def run_inline(blocks: list[Block], spec: ScorerSpec, scorer_cls: type = BlockScorer) -> Iterator[dict]:
    """Score ``blocks`` one after another in this process; yields each block's result as it finishes."""
    if not blocks:
        return
    scorer = scorer_cls(spec)
    for block in blocks:
        yield scorer(block)


class _RayBlockScorer:
    """The actor of the Ray engine: one detector per actor, one block per call."""

    def __init__(self, spec: dict, scorer_cls: type) -> None:
        self.scorer = scorer_cls(ScorerSpec(**spec))

    def __call__(self, batch: dict) -> dict:
        results = []
        for block_json, data in zip(batch["block"], batch["decoded"], strict=True):
            block = Block.from_dict(json.loads(block_json))
            results.append(json.dumps(self.scorer(block, unpack(data))))
        return {"result": results}


def _decode_row(row: dict) -> dict:
    block = Block.from_dict(json.loads(row["block"]))
    return {"block": row["block"], "decoded": pack(decode_block(block))}


def check_pool(num_actors: int, cpus_per_actor: float, gpus_per_actor: float) -> None:
    """Refuse pool settings that no cluster can run (checked before anything is written)."""
    if num_actors < 1:
        raise ConfigError(f"num_actors must be >= 1, got {num_actors}")
    if not cpus_per_actor > 0:
        raise ConfigError(f"cpus_per_actor must be > 0, got {cpus_per_actor}")
    if not gpus_per_actor >= 0:
        raise ConfigError(f"gpus_per_actor must be >= 0, got {gpus_per_actor}")


def check_resources(
    cluster: dict, num_actors: int, cpus_per_actor: float, gpus_per_actor: float, decode_cpus: float
) -> None:
    """Refuse, before anything runs, a pool that cannot start on ``cluster`` (``ray.cluster_resources()``):
    the actors and one decoding task must fit, else Ray Data would wait for resources forever."""
    check_pool(num_actors, cpus_per_actor, gpus_per_actor)
    cpus, gpus = float(cluster.get("CPU", 0)), float(cluster.get("GPU", 0))
    need_cpu = num_actors * cpus_per_actor + decode_cpus
    if need_cpu > cpus:
        raise ConfigError(
            f"{num_actors} actor(s) x {cpus_per_actor} CPU + {decode_cpus} CPU for decoding need {need_cpu:g} CPUs; "
            f"the cluster has {cpus:g}: use fewer actors (num_actors=) or fewer CPUs per actor (cpus_per_actor=)"
        )
    if num_actors * gpus_per_actor > gpus:
        raise ConfigError(
            f"{num_actors} actor(s) x {gpus_per_actor} GPU need {num_actors * gpus_per_actor:g} GPUs; the cluster has "
            f"{gpus:g}"
        )


def run_ray(
    blocks: list[Block],
    spec: ScorerSpec,
    num_actors: int = 1,
    cpus_per_actor: float = 1.0,
    gpus_per_actor: float = 0.0,
    decode_cpus: float = 0.5,
    address: str | None = None,
    scorer_cls: type = BlockScorer,
    init: Callable[..., object] | None = None,
) -> Iterator[dict]:
    """Score ``blocks`` on a Ray cluster with Ray Data; returns an iterator of each block's result as it
    finishes. The cluster is joined and its resources checked when this is called, before any block runs
    (so a pool that cannot start is refused before the caller writes anything).

    Decoding runs in CPU tasks (``decode_cpus`` each), scoring in ``num_actors`` actors (each with
    ``cpus_per_actor`` CPUs and ``gpus_per_actor`` GPUs, one detector each). Ray Data restarts an actor that
    dies and retries its block, so no block is lost; a block's outputs are written under fixed names, so a
    retried block is never duplicated. ``address``: a cluster to connect to (``ray.init(address=...)``);
    ``None`` joins the running instance or starts a local one."""
    import ray

    check_pool(num_actors, cpus_per_actor, gpus_per_actor)
    if not blocks:
        return iter(())
    if not ray.is_initialized():
        (init or ray.init)(address=address, include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False  # the caller shows one bar over the blocks
    context.print_on_execution_start = False
    check_resources(ray.cluster_resources(), num_actors, cpus_per_actor, gpus_per_actor, decode_cpus)
    ds = ray.data.from_items([{"block": json.dumps(b.to_dict())} for b in blocks], override_num_blocks=len(blocks))
    ds = ds.map(_decode_row, num_cpus=decode_cpus)
    ds = ds.map_batches(  # Ray Data's actor pools restart dead actors and retry their blocks by default
        _RayBlockScorer,
        fn_constructor_kwargs={"spec": spec.to_dict(), "scorer_cls": scorer_cls},
        batch_size=1,
        compute=ray.data.ActorPoolStrategy(size=num_actors),
        num_cpus=cpus_per_actor,
        num_gpus=gpus_per_actor,
    )
    return (json.loads(row["result"]) for row in ds.iter_rows())
