"""The kill rate of `make mutate`: counts mutmut's results by status, takes out the mutants listed as
equivalent in ``benchmarks/equivalent_mutants.txt`` (one ``name  # reason`` per line: a mutant no test can
kill because it does not change behaviour), and lists every other survivor.

    .venv/bin/python -m benchmarks.mutation_score     (after `mutmut run`; `make mutate` runs both)
"""

from __future__ import annotations

import collections
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EQUIVALENT = ROOT / "benchmarks" / "equivalent_mutants.txt"


def equivalents() -> dict[str, str]:
    out = {}
    for line in EQUIVALENT.read_text(encoding="utf-8").splitlines() if EQUIVALENT.is_file() else []:
        name, _, reason = line.partition("#")
        if name.strip():
            out[name.strip()] = reason.strip()
    return out


def main() -> int:
    mutmut = Path(sys.executable).parent / "mutmut"
    text = subprocess.run(
        [str(mutmut), "results", "--all", "true"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout
    status = {}
    for line in text.splitlines():
        name, sep, st = line.strip().rpartition(": ")
        if sep:
            status[name] = st
    eq = equivalents()
    counts = collections.Counter(status.values())
    survivors = sorted(n for n, s in status.items() if s == "survived" and n not in eq)
    declared = sorted(n for n, s in status.items() if s == "survived" and n in eq)
    killed = counts["killed"] + counts["timeout"]
    tested = killed + counts["survived"]
    print(f"mutants: {len(status)}; " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
    if tested:
        print(f"kill rate: {killed}/{tested} = {100 * killed / tested:.1f}% of the mutants the tests ran against")
        kept = tested - len(declared)
        print(f"kill rate without the {len(declared)} equivalent mutants: {killed}/{kept} = {100 * killed / kept:.1f}%")
    for n in survivors:
        print(f"survived, not declared equivalent: {n}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
