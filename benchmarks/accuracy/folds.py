"""The fold tables of docs/results.md, from one command: the zero-shot defaults chosen for the worst of five folds
over three products (``<!-- zero-shot-folds -->`` block), the profile default chosen the same way against a
plain golden-reference nearest neighbour of the same N (``<!-- profile-folds -->``), leave-one-defect-type-out matching (effnet-lite0,
dinov2-vits14), saved profiles and test-time adaptation (``<!-- folds -->`` block), every fold, 3 seeds.

    python -m benchmarks.run --folds              # runs the scripts, rewrites the blocks in docs/results.md (make folds)
    python -m benchmarks.run --folds --no-run     # only rewrites the blocks from runs/bench/*.json

Each script runs in its own process and writes its JSON under runs/bench/; the block between the
``<!-- folds -->`` markers of docs/results.md is then rewritten from those files (tables are never typed by hand).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.common import ROOT, SHARED, markdown_table

BLOCKS = {
    "zero-shot-folds": ("zero_shot_folds",),
    "profile-folds": ("profile_worst_folds",),
    "folds": ("matching_folds", "matching_folds_dinov2", "profile_folds", "adaptation_folds"),
}
"""Each marked block of the page and the runs whose tables it holds."""
RUNS = {
    "zero_shot_folds": ["benchmarks.accuracy.zero_shot_folds"],
    "profile_worst_folds": ["benchmarks.accuracy.profile_worst_folds"],
    "matching_folds": ["benchmarks.accuracy.matching_folds"],
    "matching_folds_dinov2": ["benchmarks.accuracy.matching_folds", "--backbone", "dinov2-vits14"],
    "profile_folds": ["benchmarks.accuracy.profile_folds"],
    "adaptation_folds": ["benchmarks.accuracy.adaptation_folds"],
}
"""Each run: the module and its arguments."""


def run(results: Path, names: list[str]) -> None:
    for name in names:
        args = RUNS[name]
        cmd = [sys.executable, "-m", *args, "--json", str(results / f"{name}.json")]
        print("==", " ".join(cmd), flush=True)
        start = time.perf_counter()
        subprocess.run(cmd, cwd=ROOT, check=True)
        print(f"== {name}: {time.perf_counter() - start:.0f} s", flush=True)


def render(results: Path, names: tuple[str, ...], start: str, end: str) -> str:
    parts = [start, ""]
    for name in names:
        args = RUNS[name]
        path = results / f"{name}.json"
        if not path.is_file():
            parts.append(f"({name}: not run yet)\n")
            continue
        data = json.loads(path.read_text())
        if not data["tables"]:
            parts.append(f"({name}: {data['raw'].get('skipped', 'no tables')})\n")
            continue
        cmd = " ".join(["python -m", *args])
        parts.append(f"Made by `{cmd}` on {data['machine']['date']} ({data['machine']['cpu']}).\n")
        # titles as bold lines, not headings: the page's table of contents stays short
        parts += [f"**{t['title']}**\n\n" + markdown_table({**t, "title": None}) for t in data["tables"]]
    parts.append(end)
    return "\n".join(parts)


def rewrite(page: Path, results: Path, block_names: list[str], no_run: bool) -> None:
    """Run the scripts of the named blocks (unless ``no_run``), then rewrite those blocks of ``page`` from
    ``results``. Skipped, with the reason, where the shared datasets are absent."""
    if not SHARED.is_dir():
        print(f"folds: skipped, {SHARED} is absent", file=sys.stderr)
        return
    results.mkdir(parents=True, exist_ok=True)
    blocks = {b: BLOCKS[b] for b in block_names}
    if not no_run:
        run(results, [name for names in blocks.values() for name in names])
    from dualclip.atomic import write_text

    text = page.read_text()
    for block, names in blocks.items():
        start, end = f"<!-- {block} -->", f"<!-- /{block} -->"
        # the markers stand on lines of their own (the page may name them in its text)
        block_re = re.compile(rf"^{re.escape(start)}$.*?^{re.escape(end)}$", re.S | re.M)
        if not block_re.search(text):
            raise SystemExit(f"{page} has no {start} ... {end} block (each marker on a line of its own)")
        rendered = render(results, names, start, end)
        m = block_re.search(text)
        text = text[: m.start()] + rendered + text[m.end() :]
    write_text(page, text)
    print(f"rewrote the fold blocks of {page}")
