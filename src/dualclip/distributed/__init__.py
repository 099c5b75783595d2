"""Scoring an archive in blocks: a plan of blocks, a block scorer, and engines that run it (in-process, or
on a Ray cluster with Ray Data), resumable block by block. ``dualclip predict --engine ray``."""

from .plan import Block, ManifestError, plan_blocks, read_manifest
from .run import ArchiveRun, run_archive

__all__ = ["ArchiveRun", "Block", "ManifestError", "plan_blocks", "read_manifest", "run_archive"]
