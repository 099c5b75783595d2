"""Micro-batching: concurrent requests are gathered into one call of a batch function.

The batch function (the detector) runs in one worker thread, one batch at a time: a model is not shared
between threads, and the event loop stays free to accept requests while a batch is scored.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from ..errors import ConfigError

T = TypeVar("T")
R = TypeVar("R")


@dataclass
class BatchStats:
    """What the batcher has done so far (reported by ``GET /v1/info``)."""

    batches: int = 0
    items: int = 0
    largest: int = 0
    failed_batches: int = 0
    sizes: dict[int, int] = field(default_factory=dict)

    def record(self, size: int, ok: bool) -> None:
        self.batches += 1
        self.items += size
        self.largest = max(self.largest, size)
        self.sizes[size] = self.sizes.get(size, 0) + 1
        self.failed_batches += 0 if ok else 1

    def to_dict(self) -> dict:
        return {
            "batches": self.batches,
            "items": self.items,
            "largest": self.largest,
            "failed_batches": self.failed_batches,
            "mean_size": self.items / self.batches if self.batches else None,
            "sizes": {str(k): v for k, v in sorted(self.sizes.items())},
        }


class MicroBatcher(Generic[T, R]):
    """Gathers items submitted concurrently into batches for ``score_batch``.

    A batch is closed when it holds ``max_batch`` items, or ``max_wait_ms`` after its first item arrived,
    whichever comes first; ``score_batch(items)`` must return one result per item, in order. An exception in
    ``score_batch`` is raised to every submitter of that batch.

    Parameters
    ----------
    score_batch:
        The function that scores a list of items (called in the worker thread).
    max_batch:
        Most items per call (the detector's batch size).
    max_wait_ms:
        Longest time the first item of a batch waits for others.
    """

    def __init__(self, score_batch: Callable[[list[T]], Sequence[R]], max_batch: int = 8, max_wait_ms: float = 5.0):
        if max_batch < 1:
            raise ConfigError(f"max_batch must be >= 1, got {max_batch}")
        if max_wait_ms < 0:
            raise ConfigError(f"max_wait_ms must be >= 0, got {max_wait_ms}")
        self.score_batch = score_batch
        self.max_batch = max_batch
        self.max_wait_ms = max_wait_ms
        self.stats = BatchStats()
        self._queue: asyncio.Queue | None = None
        self._task: asyncio.Task | None = None
        self._executor: ThreadPoolExecutor | None = None

    async def start(self) -> None:
        """Start the batching loop on the running event loop."""
        self._queue = asyncio.Queue()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dualclip-scorer")
        self._task = asyncio.get_running_loop().create_task(self._loop())

    async def stop(self) -> None:
        """Stop the loop; pending submitters get a ``RuntimeError``."""
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        if self._queue is not None:
            while not self._queue.empty():
                _, fut = self._queue.get_nowait()
                if not fut.done():
                    fut.set_exception(RuntimeError("the service is shutting down"))
        if self._executor is not None:
            self._executor.shutdown(wait=True)
        self._task = self._queue = self._executor = None

    async def submit(self, item: T) -> R:
        """Score one item with others that arrive close in time; returns its result."""
        if self._queue is None:
            raise RuntimeError("the batcher is not running (call start() first)")
        fut = asyncio.get_running_loop().create_future()
        await self._queue.put((item, fut))
        return await fut

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self._queue.get()]
            deadline = time.monotonic() + self.max_wait_ms / 1000.0
            while len(batch) < self.max_batch:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    if self._queue.empty():
                        break
                    batch.append(self._queue.get_nowait())
                    continue
                try:
                    batch.append(await asyncio.wait_for(self._queue.get(), remaining))
                except asyncio.TimeoutError:
                    break
            batch = [(item, fut) for item, fut in batch if not fut.cancelled()]  # clients that went away
            if not batch:
                continue
            items = [item for item, _ in batch]
            try:
                results = await loop.run_in_executor(self._executor, self.score_batch, items)
                if len(results) != len(items):
                    raise RuntimeError(f"score_batch returned {len(results)} results for {len(items)} items")
            except Exception as exc:  # every submitter of the batch gets the error
                self.stats.record(len(items), ok=False)
                for _, fut in batch:
                    if not fut.done():
                        fut.set_exception(exc)
                continue
            self.stats.record(len(items), ok=True)
            for (_, fut), res in zip(batch, results, strict=True):
                if not fut.done():
                    fut.set_result(res)
