"""The reliability line of BENCHMARKS.md: runs the fault-matrix tests and counts the matrix cases of
docs/reliability.md tried and passing (a case passes when every test its row names passes), plus the property
and kill tests (the tests of the fault files that no row names).

    python -m benchmarks.reliability --json runs/bench/reliability.json
    python -m benchmarks.reliability --json runs/bench/reliability.json --update BENCHMARKS.md
        (--update rewrites only the block between the reliability markers of that file)
"""

from __future__ import annotations

import argparse
import fnmatch
import re
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from pathlib import Path

from benchmarks.common import ROOT, machine, markdown_table, write_section

START, END = "<!-- reliability -->", "<!-- /reliability -->"
# the files of the fault matrix; a row may name tests of other files as `file.py::test_name`
FAULT_FILES = ("test_cli_faults.py", "test_output_safety.py", "test_score_integrity.py")


def matrix_rows(doc: Path = ROOT / "docs" / "reliability.md") -> dict[int, list[tuple[str, str]]]:
    """Each row of the fault matrix: its (file or "", test name or pattern) pairs, from the row's last cell.

    ``::test_x`` takes the file of the name before it; a name without a file is in one of ``FAULT_FILES``."""
    rows = {}
    for line in doc.read_text(encoding="utf-8").splitlines():
        if m := re.match(r"\|\s*(\d+)\s*\|.*\|([^|]*)\|\s*$", line):
            named, file = [], ""
            for prefix, name in re.findall(r"`(\S*::)?(test_[\w*]+)`", m[2]):
                file = (prefix[:-2] or file) if prefix else ""
                named.append((file, name))
            rows[int(m[1])] = named
    return rows


def _file_of(classname: str) -> str:
    return classname.rsplit(".", 1)[-1] + ".py"


def run_fault_tests(rows: dict[int, list[tuple[str, str]]]) -> dict[tuple[str, str], bool]:
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
                *sorted(
                    {str(ROOT / "tests" / f) for f in FAULT_FILES}
                    | {str(ROOT / "tests" / f) for named in rows.values() for f, _ in named if f}
                ),
                f"--junitxml={xml}",
            ],
            cwd=ROOT,
            check=False,
        )
        outcome = {}
        for case in ET.parse(xml).getroot().iter("testcase"):
            failed = any(child.tag in ("failure", "error", "skipped") for child in case)
            name = re.sub(r"\[.*\]$", "", case.get("name"))  # one outcome per test: every parameter must pass
            key = (_file_of(case.get("classname", "")), name)
            outcome[key] = outcome.get(key, True) and not failed
    return outcome


def summarise(named_rows: dict[int, list[tuple[str, str]]], outcome: dict[tuple[str, str], bool]) -> tuple[dict, dict]:
    rows: dict[int, list[bool]] = {}
    claimed: set[tuple[str, str]] = set()
    for row, named in sorted(named_rows.items()):
        for file, pattern in named:
            hits = [
                key
                for key in outcome
                if fnmatch.fnmatchcase(key[1], pattern) and (key[0] == file if file else key[0] in FAULT_FILES)
            ]
            claimed |= set(hits)
            if hits:
                rows.setdefault(row, []).extend(outcome[k] for k in hits)
    other = {name: ok for (file, name), ok in outcome.items() if file in FAULT_FILES and (file, name) not in claimed}
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
    made = f"Made by `python -m benchmarks.reliability --json ... --update BENCHMARKS.md` on {machine()['date']}."
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
    named = matrix_rows()
    table, raw = summarise(named, run_fault_tests(named))
    write_section(args.json, "reliability", [table], raw)
    if args.update:
        update(args.update, table)


if __name__ == "__main__":
    main()
