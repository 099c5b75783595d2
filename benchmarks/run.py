"""The one benchmark driver: runs the benchmark sections and writes BENCHMARKS.md from their results, or the
fold tables of docs/results.md (never typed by hand).

    python -m benchmarks.run            # full (make bench)
    python -m benchmarks.run --quick    # reduced settings, under 10 minutes on a 2-core CPU (make bench-quick)
    python -m benchmarks.run --sections scaling,accuracy   # rerun some; the others are read from --results
    python -m benchmarks.run --folds              # the fold blocks of docs/results.md (make folds)
    python -m benchmarks.run --folds --no-run     # only rewrite them from --results

Run from the repository root. Each section is a module of its own (``benchmarks.<group>.<section>``, groups in
benchmarks/README.md), run in a fresh process (so its peak memory is its own) that writes
``<results>/<section>.json``; ``side_by_side`` runs in anomalib's environment (benchmarks/.venv-anomalib,
made by ``make bench-env``) and is skipped, with the reason, where that is missing.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.accuracy import folds
from benchmarks.common import ANOMALIB_PY, ROOT, markdown_table

SECTIONS = {  # section: its module, in the order of BENCHMARKS.md
    "throughput": "benchmarks.perf.throughput",
    "adaptation_cost": "benchmarks.perf.adaptation_cost",
    "side_by_side": "benchmarks.perf.side_by_side",
    "scaling": "benchmarks.perf.scaling",
    "metrics_speed": "benchmarks.perf.metrics_speed",
    "accuracy": "benchmarks.accuracy.accuracy",
    "reliability": "benchmarks.reliability",
    "serve_load": "benchmarks.perf.serve_load",
    "onnx_speed": "benchmarks.perf.onnx_speed",
    "model_export": "benchmarks.perf.model_export",
    "zero_shot_cost": "benchmarks.perf.zero_shot_cost",
    "ray_scale": "benchmarks.perf.ray_scale",
    "precision_parity": "benchmarks.parity.precision_parity",
    "gpu": "benchmarks.perf.gpu",
    "fit_speed": "benchmarks.perf.fit_speed",
}


def run_section(name: str, quick: bool, results: Path, command: str) -> dict:
    py = str(ANOMALIB_PY) if name == "side_by_side" else sys.executable
    out = results / f"{name}.json"
    if name == "side_by_side" and not ANOMALIB_PY.exists():
        return {"section": name, "error": f"skipped: {ANOMALIB_PY} is missing (make bench-env creates it)"}
    cmd = [py, "-m", SECTIONS[name], "--json", str(out)] + (["--quick"] if quick else [])
    print(f"== {name}: {' '.join(cmd)}", flush=True)
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, stderr=subprocess.PIPE, text=True)
    elapsed = time.perf_counter() - start
    print(f"== {name}: {elapsed:.0f} s, exit {proc.returncode}", flush=True)
    if proc.returncode != 0:
        tail = "\n".join(proc.stderr.strip().splitlines()[-5:])
        return {"section": name, "error": f"failed (exit {proc.returncode}):\n```\n{tail}\n```"}
    data = json.loads(out.read_text())
    data["seconds"] = elapsed
    data["quick"] = quick
    data["command"] = command
    out.write_text(json.dumps(data, indent=1))
    return data


def headline(data: dict[str, dict]) -> list[str]:
    """The ratios docs/results.md quotes, computed from the results."""
    lines = []
    tp = data.get("throughput", {}).get("raw", {}).get("rows", [])
    for r in tp:
        if r.get("encode_image_ms") and r["model"] == "ViT-B-16-plus-240":
            lines.append(
                f"- {r['model']} batch {r['batch']}: whole prediction (no adaptation) "
                f"{r['total_ms'] / r['encode_image_ms']:.2f}x plain `encode_image`"
            )
    sbs = data.get("side_by_side", {}).get("raw", {})
    for r in sbs.get("winclip", {}).get("rows", []):
        lines.append(f"- dualclip {r['speedup']:.1f}x faster per image than anomalib WinCLIP (batch {r['batch']})")
    if "aupro" in sbs:
        a = sbs["aupro"]
        lines.append(
            f"- `aupro` {a['anomalib_s'] / a['ours_s']:.1f}x faster than anomalib's AUPRO, same value to {abs(a['ours'] - a['anomalib']):.1e}"
        )
    sc = data.get("scaling", {}).get("raw", {})
    if sc:
        t1 = sc["times_s"]["k=1"]
        n = max(t1, key=int)
        lines.append(
            f"- reference matching at k = 1, N = {n}: {100 * t1[n] / (sc['backbone_s_per_image'] * int(n)):.2f}% of the "
            f"backbone's time; growth exponents k=1 {sc['exponents']['k=1']:.2f}, k=3 {sc['exponents']['k=3']:.2f}, "
            f"full mutual {sc['exponents']['all']:.2f}"
        )
    for r in data.get("adaptation_cost", {}).get("raw", {}).get("rows", []):
        if "on_s" in r:
            lines.append(
                f"- adaptation, {r['model']}, {r['n']} images: {r['on_s'] / r['off_s']:.2f}x the category without it"
            )
    ms = data.get("metrics_speed", {}).get("raw", {})
    if ms:
        lines.append(f"- all seven metrics, 200 maps of 518 x 518: {ms['all_metrics_s']:.2f} s")
    sv = data.get("serve_load", {}).get("raw", {})
    if sv.get("runs"):
        first = sv["runs"][0]
        lines.append(
            f"- `dualclip serve`: {sum(r['errors'] for r in sv['runs'])} errors in "
            f"{sum(r['requests'] for r in sv['runs'])} requests; one client p50 {first['p50_ms']:.0f} ms against "
            f"{sv['direct_ms']:.0f} ms in-process"
        )
    for r in data.get("onnx_speed", {}).get("raw", {}).get("rows", []):
        if r["batch"] == 8:
            lines.append(
                f"- onnxruntime, {r['model']} batch 8: {r['torch_ms'] / r['ort_ms']:.2f}x torch's speed, outputs "
                f"within {r['max_abs_diff']:.0e}"
            )
    for r in data.get("model_export", {}).get("raw", {}).get("rows", []):
        lines.append(
            f"- whole-model ONNX export, effnet-lite0 batch {r['batch']}: {r['predict_ms'] / r['ort_ms']:.2f}x the "
            f"speed of `predict --profile`, scores within {r['max_score_diff']:.0e}, maps within {r['max_map_diff']:.0e}"
        )
    for r in data.get("ray_scale", {}).get("raw", {}).get("runs", []):
        lines.append(
            f"- `--engine ray`, {r['images']} images: {r['ray_s'] / r['inline_s']:.2f}x the in-process time"
            + (", one actor killed and its block retried" if r["killed_actor_pids"] else "")
            + ("; every image exactly once" if r["rows_unique"] else "; ROWS LOST OR DUPLICATED")
        )
    fs = data.get("fit_speed", {}).get("raw", {})
    before = {(r["n"], r.get("plain_weight", 0.0)): r for r in fs.get("before", [])}
    rows = fs.get("rows", [])
    without = {r["n"]: r for r in rows if r.get("plain_weight", 0.0) == 0.0}
    for r in rows:
        plain = r.get("plain_weight", 0.0)
        if not plain and "score_ms" in r:
            continue  # measured beside a row with the plain view: its numbers are in that row's line
        b, w = before.get((r["n"], plain)), without.get(r["n"])
        cost = ""
        if plain and w is not None and "score_ms" in r:
            cost = (
                f"; the plain view {r['fit_s'] / w['fit_s']:.2f}x the fit and {r['score_ms'] / w['score_ms']:.2f}x "
                f"the scoring time without it (AUPRO {100 * w['aupro']:.2f} without)"
            )
        lines.append(
            f"- `fit`, {r['n']} magnetic_tile images{', plain view' if plain else ''}: {r['ratio']:.1f}x the "
            "feature extraction"
            + (f" (before: {b['ratio']:.1f}x)" if b else "")
            + f"; AUPRO {100 * r['aupro']:.2f}"
            + (f" (before: {100 * b['aupro']:.2f})" if b else "")
            + cost
        )
    return lines


HEADLINE_MARKS = {  # how a headline line names its section (to carry it over with the section)
    "serve_load": "`dualclip serve`",
    "onnx_speed": "- onnxruntime,",
    "model_export": "- whole-model ONNX export,",
    "ray_scale": "`--engine ray`",
    "throughput": "plain `encode_image`",
    "side_by_side": ("WinCLIP", "`aupro`"),
    "scaling": "reference matching at",
    "adaptation_cost": "- adaptation,",
    "metrics_speed": "all seven metrics",
    "fit_speed": "- `fit`,",
}


def previous_blocks(text: str) -> tuple[dict[str, list[str]], dict[str, str], dict[str, list[str]]]:
    """The index rows (as cells), the ``## section`` blocks and the headline lines of an earlier
    BENCHMARKS.md, by section name: a section whose results file is gone (``runs/`` is not kept in git) is
    carried over as it was, never dropped."""
    rows, blocks, heads, current, lines = {}, {}, {}, None, []
    titles = {name.replace("_", " "): name for name in SECTIONS}
    old_machine = "—"
    for line in text.splitlines():
        if line.startswith("Machine: "):
            old_machine = line[len("Machine: ") :].split(", torch")[0]
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| ") and cells and cells[0] in SECTIONS and current is None:
            rows[cells[0]] = cells if len(cells) >= 5 else [*cells, old_machine]
        for name, marks in HEADLINE_MARKS.items():
            if line.startswith("- ") and any(m in line for m in ((marks,) if isinstance(marks, str) else marks)):
                heads.setdefault(name, []).append(line)
        if line.startswith("## "):
            if current is not None:
                blocks[current] = "\n".join(lines).strip() + "\n"
            current, lines = titles.get(line[3:].strip()), []
            continue
        if current is not None:
            lines.append(line)
    if current is not None:
        blocks[current] = "\n".join(lines).strip() + "\n"
    return rows, blocks, heads


def render(data: dict[str, dict], command: str, previous: str = "") -> str:
    out = [
        "# dualclip benchmarks",
        "",
        f"Generated from the section results in `runs/bench/` by `{command}`; do not edit by hand. Each "
        "section below ran at the time, on the machine and with the command its row gives (`make bench` runs "
        "them all); a section whose results file is not in `runs/bench/` is carried over from the previous "
        "BENCHMARKS.md unchanged.",
        "",
        "| section | run at | command | seconds | machine |",
        "|---|---|---|---|---|",
    ]
    old_rows, old_blocks, old_heads = previous_blocks(previous)
    carried = [n for n in SECTIONS if n not in data and n in old_rows and n in old_blocks]
    for name in SECTIONS:
        d = data.get(name)
        if d is None:
            if name in carried:
                out.append("| " + " | ".join(old_rows[name]) + " |")
            continue
        m = d.get("machine", {})
        when = m.get("date", "—")
        secs = f"{d['seconds']:.0f}" if "seconds" in d else "—"
        how = d.get("command") or ("python -m benchmarks.run" + (" --quick" if d.get("quick") else ""))
        where = f"{m.get('cpu', '?')}, {m.get('cores', '?')} cores, torch {m.get('torch', '?')}" if m else "—"
        out.append(f"| {name} | {when} | `{how}` | {secs} | {where} |")
    heads = headline(data) + [line for n in carried for line in old_heads.get(n, [])]
    out += ["", "## Headline", ""] + heads + [""]
    for name in SECTIONS:
        d = data.get(name)
        if d is None:
            if name in carried:  # carried over from the previous file, as it was
                out += [f"## {name.replace('_', ' ')}\n", old_blocks[name]]
            continue
        out.append(f"## {name.replace('_', ' ')}\n")
        if "error" in d:
            out.append(d["error"] + "\n")
            continue
        tables = [markdown_table(t) for t in d["tables"]] or ["(no table: " + json.dumps(d.get("raw", {})) + ")\n"]
        if name == "reliability":  # between markers, so benchmarks/reliability.py --update can refresh it alone
            tables = ["<!-- reliability -->", *tables, "<!-- /reliability -->"]
        out += tables
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--sections", default=",".join(SECTIONS), help="comma-separated; the rest are read from --results")
    ap.add_argument("--results", type=Path, default=ROOT / "runs" / "bench")
    ap.add_argument("--out", type=Path, default=ROOT / "BENCHMARKS.md")
    ap.add_argument("--render-only", action="store_true", help="run nothing; rewrite --out from --results")
    ap.add_argument("--folds", action="store_true", help="the fold blocks of --page instead of BENCHMARKS.md")
    ap.add_argument("--page", type=Path, default=ROOT / "docs" / "results.md", help="with --folds")
    ap.add_argument("--no-run", action="store_true", help="with --folds: only rewrite the blocks from --results")
    ap.add_argument("--blocks", default=",".join(folds.BLOCKS), help="with --folds: the blocks (comma-separated)")
    args = ap.parse_args()
    if args.folds:
        blocks = [b.strip() for b in args.blocks.split(",") if b.strip()]
        if unknown := sorted(set(blocks) - set(folds.BLOCKS)):
            ap.error(f"unknown fold blocks {unknown}; choose from {', '.join(folds.BLOCKS)}")
        folds.rewrite(args.page, args.results, blocks, args.no_run)
        return
    wanted = [] if args.render_only else [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = set(wanted) - set(SECTIONS)
    if unknown:
        ap.error(f"unknown sections {sorted(unknown)}; choose from {', '.join(SECTIONS)}")
    args.results = args.results.resolve()
    args.results.mkdir(parents=True, exist_ok=True)
    command = "python -m benchmarks.run" + (" --quick" if args.quick else "")
    if set(wanted) != set(SECTIONS):
        command += " --render-only" if not wanted else f" --sections {','.join(wanted)}"
    data: dict[str, dict] = {}
    for name in SECTIONS:
        if name in wanted:
            data[name] = run_section(name, args.quick, args.results, command)
        elif (args.results / f"{name}.json").is_file():
            data[name] = json.loads((args.results / f"{name}.json").read_text())
    text = render(data, command, args.out.read_text() if args.out.is_file() else "")
    args.out.write_text(text)
    print(text)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
