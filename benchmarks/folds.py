"""The fold tables of docs/results.md, from one command: the zero-shot defaults chosen for the worst of five folds
over three products (``<!-- zero-shot-folds -->`` block), the profile default chosen the same way against a
plain golden-reference nearest neighbour of the same N (``<!-- profile-folds -->``), leave-one-defect-type-out matching (effnet-lite0,
dinov2-vits14), saved profiles and test-time adaptation (``<!-- folds -->`` block), every fold, 3 seeds.

    .venv/bin/python benchmarks/folds.py              # runs the scripts, rewrites the block in docs/results.md
    .venv/bin/python benchmarks/folds.py --no-run     # only rewrites the block from runs/bench/*.json

Each script runs in its own process and writes its JSON under runs/bench/; the block between the
``<!-- folds -->`` markers of docs/results.md is then rewritten from those files (tables are never typed by hand).
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from common import ROOT, SHARED, markdown_table  # noqa: E402

BLOCKS = {
    "zero-shot-folds": ("zero_shot_folds",),
    "profile-folds": ("profile_worst_folds",),
    "folds": ("matching_folds", "matching_folds_dinov2", "profile_folds", "adaptation_folds"),
}
"""Each marked block of the page and the runs whose tables it holds."""
RUNS = {
    "zero_shot_folds": ["zero_shot_folds.py"],
    "profile_worst_folds": ["profile_worst_folds.py"],
    "matching_folds": ["matching_folds.py"],
    "matching_folds_dinov2": ["matching_folds.py", "--backbone", "dinov2-vits14"],
    "profile_folds": ["profile_folds.py"],
    "adaptation_folds": ["adaptation_folds.py"],
}


def run(results: Path, names: list[str]) -> None:
    for name in names:
        args = RUNS[name]
        cmd = [sys.executable, str(HERE / args[0]), *args[1:], "--json", str(results / f"{name}.json")]
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
        cmd = " ".join(["python benchmarks/" + args[0], *args[1:]])
        parts.append(f"Made by `{cmd}` on {data['machine']['date']} ({data['machine']['cpu']}).\n")
        # titles as bold lines, not headings: the page's table of contents stays short
        parts += [f"**{t['title']}**\n\n" + markdown_table({**t, "title": None}) for t in data["tables"]]
    parts.append(end)
    return "\n".join(parts)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--results", type=Path, default=ROOT / "runs" / "bench")
    ap.add_argument("--page", type=Path, default=ROOT / "docs" / "results.md")
    ap.add_argument("--no-run", action="store_true", help="only rewrite the block from existing results")
    ap.add_argument("--blocks", default=",".join(BLOCKS), help="the blocks to run and rewrite (comma-separated)")
    args = ap.parse_args()
    if not SHARED.is_dir():
        print(f"folds: skipped, {SHARED} is absent", file=sys.stderr)
        return
    args.results.mkdir(parents=True, exist_ok=True)
    blocks = {b: BLOCKS[b] for b in args.blocks.split(",")}
    if not args.no_run:
        run(args.results, [name for names in blocks.values() for name in names])
    from dualclip.atomic import write_text

    text = args.page.read_text()
    for block, names in blocks.items():
        start, end = f"<!-- {block} -->", f"<!-- /{block} -->"
        # the markers stand on lines of their own (the page may name them in its text)
        block_re = re.compile(rf"^{re.escape(start)}$.*?^{re.escape(end)}$", re.S | re.M)
        if not block_re.search(text):
            raise SystemExit(f"{args.page} has no {start} ... {end} block (each marker on a line of its own)")
        rendered = render(args.results, names, start, end)
        m = block_re.search(text)
        text = text[: m.start()] + rendered + text[m.end() :]
    write_text(args.page, text)
    print(f"rewrote the fold blocks of {args.page}")


if __name__ == "__main__":
    main()
