"""Engines that run a list of blocks: ``inline`` (this process, one block after another) and ``ray`` (Ray
Data: images decoded in CPU tasks, blocks scored in a pool of actors, one model per actor)."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator

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


def run_ray(
    blocks: list[Block],
    spec: ScorerSpec,
    num_actors: int = 1,
    cpus_per_actor: float = 1.0,
    gpus_per_actor: float = 0.0,
    decode_cpus: float = 1.0,
    address: str | None = None,
    scorer_cls: type = BlockScorer,
    init: Callable[..., object] | None = None,
) -> Iterator[dict]:
    """Score ``blocks`` on a Ray cluster with Ray Data; yields each block's result as it finishes.

    Decoding runs in CPU tasks (``decode_cpus`` each), scoring in ``num_actors`` actors (each with
    ``cpus_per_actor`` CPUs and ``gpus_per_actor`` GPUs, one detector each). Ray Data restarts an actor that
    dies and retries its block, so no block is lost; a block's outputs are written under fixed names, so a
    retried block is never duplicated. ``address``: a cluster to connect to (``ray.init(address=...)``);
    ``None`` joins the running instance or starts a local one."""
    import ray

    if not blocks:
        return
    if not ray.is_initialized():
        (init or ray.init)(address=address, include_dashboard=False, log_to_driver=False)
    ds = ray.data.from_items([{"block": json.dumps(b.to_dict())} for b in blocks], override_num_blocks=len(blocks))
    ds = ds.map(_decode_row, num_cpus=decode_cpus)
    ds = ds.map_batches(
        _RayBlockScorer,
        fn_constructor_kwargs={"spec": spec.to_dict(), "scorer_cls": scorer_cls},
        batch_size=1,
        concurrency=num_actors,
        num_cpus=cpus_per_actor,
        num_gpus=gpus_per_actor,
        max_restarts=-1,
        max_task_retries=-1,
    )
    for row in ds.iter_rows():
        yield json.loads(row["result"])
