"""The reliability line of BENCHMARKS.md: runs the fault-matrix tests (tests/test_faults.py) and counts the
matrix cases of docs/reliability.md tried and passing (a case passes when every ``test_row_NN_*`` test of it passes), plus
the property and kill tests.

    python benchmarks/reliability.py --json runs/bench/reliability.json
    python benchmarks/reliability.py --json runs/bench/reliability.json --update BENCHMARKS.md
        (--update rewrites only the block between the reliability markers of that file)
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
from common import markdown_table, write_section  # noqa: E402

START, END = "<!-- reliability -->", "<!-- /reliability -->"


def run_fault_tests() -> dict[str, bool]:
    with tempfile.TemporaryDirectory() as tmp:
        xml = Path(tmp) / "faults.xml"
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pytest",
                "-q",
                "-p",
                "no:cacheprovider",
                str(ROOT / "tests" / "test_faults.py"),
                f"--junitxml={xml}",
            ],
            cwd=ROOT,
            check=False,
        )
        outcome = {}
        for case in ET.parse(xml).getroot().iter("testcase"):
            failed = any(child.tag in ("failure", "error", "skipped") for child in case)
            outcome[case.get("name")] = not failed
    return outcome


def summarise(outcome: dict[str, bool]) -> tuple[dict, dict]:
    rows: dict[int, list[bool]] = {}
    other: dict[str, bool] = {}
    for name, ok in outcome.items():
        m = re.match(r"test_row_(\d+)_", name)
        if m:
            rows.setdefault(int(m.group(1)), []).append(ok)
        else:
            other[name] = ok
    tried = len(rows)
    passing = sum(all(v) for v in rows.values())
    table = {
        "title": "Reliability (docs/reliability.md, fault matrix)",
        "headers": ["matrix cases tried", "cases passing", "row tests passing", "property and kill tests passing"],
        "rows": [
            [
                tried,
                passing,
                f"{sum(sum(v) for v in rows.values())} / {sum(len(v) for v in rows.values())}",
                f"{sum(other.values())} / {len(other)}",
            ]
        ],
    }
    raw = {"rows": {str(k): v for k, v in sorted(rows.items())}, "other": other, "tried": tried, "passing": passing}
    return table, raw


def block(table: dict) -> str:
    from common import machine

    made = f"Made by `python benchmarks/reliability.py --json ... --update BENCHMARKS.md` on {machine()['date']}."
    return f"{START}\n{markdown_table(table)}\n{made}\n{END}"


def update(path: Path, table: dict) -> None:
    text = path.read_text(encoding="utf-8")
    new = block(table)
    if START in text and END in text:
        text = text[: text.index(START)] + new + text[text.index(END) + len(END) :]
    else:
        text = text.rstrip("\n") + "\n\n## reliability\n\n" + new + "\n"
    from dualclip.atomic import write_text

    write_text(path, text)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", type=Path, required=True)
    ap.add_argument("--quick", action="store_true", help="accepted for run.py; the full set always runs")
    ap.add_argument("--update", type=Path, help="rewrite the reliability block of this BENCHMARKS.md")
    args = ap.parse_args()
    table, raw = summarise(run_fault_tests())
    write_section(args.json, "reliability", [table], raw)
    if args.update:
        update(args.update, table)


if __name__ == "__main__":
    main()
