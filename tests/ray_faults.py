"""Scorers that fail on purpose, for tests/test_distributed.py (imported by Ray workers: the test puts this
folder on their PYTHONPATH)."""

from __future__ import annotations

import os
from pathlib import Path

from dualclip.distributed.scorer import BlockScorer


class DiesOnceScorer(BlockScorer):
    """Kills its own worker process the first time it is given the block ``FAIL_BLOCK`` (a marker file beside
    the output folder remembers it): Ray must restart the actor and retry the block."""

    FAIL_BLOCK = "001-tile-00001"

    def __call__(self, block, decoded=None):
        marker = Path(self.spec.out).parent / f"{Path(self.spec.out).name}.died-once"
        if block.id == self.FAIL_BLOCK and not marker.exists():
            marker.write_text(str(os.getpid()))
            os._exit(17)  # the worker dies mid-block: nothing of this block is written
        return super().__call__(block, decoded)


class RaisesOnScorer(BlockScorer):
    """Raises on one block (an interrupted run): the blocks scored before it stay saved."""

    FAIL_BLOCK = "001-tile-00001"

    def __call__(self, block, decoded=None):
        if block.id == self.FAIL_BLOCK:
            raise RuntimeError("interrupted on purpose")
        return super().__call__(block, decoded)
