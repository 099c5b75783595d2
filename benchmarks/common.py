"""Helpers shared by the benchmark scripts: timing, memory, the machine, Markdown tables, JSON results.

Every section script writes one JSON file (``--json PATH``) of the form::

    {"section": str, "tables": [{"title": str, "headers": [...], "rows": [[...]], "notes": [str]}],
     "raw": {...}}

and ``run.py`` turns those files into ``BENCHMARKS.md``.
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

from dualclip.atomic import write_json

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "datasets"
ANOMALIB_PY = ROOT / "benchmarks" / ".venv-anomalib" / "bin" / "python"
"""anomalib's own environment (``make bench-env``), for the sections that compare with it."""


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MiB (each section measures in its own process)."""
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / 1024 / 1024 if sys.platform == "darwin" else r / 1024


def timed(fn: Callable[[], object], repeats: int, warmup: bool = True) -> float:
    """Median wall-clock seconds of ``fn()`` over ``repeats`` runs, after one warm-up run."""
    if warmup:
        fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict:
    import torch

    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }


def section_args(description: str) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--quick", action="store_true", help="the reduced settings of `make bench-quick`")
    ap.add_argument("--json", type=Path, required=True, help="where to write this section's results")
    return ap.parse_args()


def write_section(path: Path, section: str, tables: list[dict], raw: dict | None = None) -> None:
    payload = {"section": section, "tables": tables, "raw": raw or {}, "machine": machine()}
    write_json(path, payload)
    for t in tables:  # also readable when a script is run by hand
        print(markdown_table(t), flush=True)


def markdown_table(table: dict) -> str:
    lines = [f"### {table['title']}", ""] if table.get("title") else []
    lines.append("| " + " | ".join(table["headers"]) + " |")
    lines.append("|" + "---|" * len(table["headers"]))
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in table["rows"]]
    lines += [""] + [f"{n}" for n in table.get("notes", [])]
    return "\n".join(lines) + "\n"


def fmt(x: float, digits: int = 1) -> str:
    return f"{x:.{digits}f}"


def pm(values: list[float], scale: float = 100.0, digits: int = 1) -> str:
    """``mean ± std`` (population std) of fractions, as percentages."""
    import numpy as np

    v = np.asarray(values, dtype=float) * scale
    return f"{v.mean():.{digits}f} ± {v.std():.{digits}f}" if len(v) > 1 else f"{v.mean():.{digits}f}"
