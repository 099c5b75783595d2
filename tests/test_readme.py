"""The README and docs/ as a newcomer meets them: every code block marked runnable runs as pasted, the quick
start is on the first screen, the pages hold no internal or historical language, every test and every source
name (module, function, class) they cite exists, and the settings tables are the ones the docstrings make."""

from __future__ import annotations

import ast
import dataclasses
import importlib
import re
import runpy
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
MARKER = "<!-- runnable -->"


def runnable_blocks(page: Path) -> list[tuple[int, str]]:
    """``(line number, code)`` of every fenced block that follows a ``<!-- runnable -->`` line; a marker that is
    not followed by a ```python block is an error (only Python blocks are run)."""
    lines = page.read_text().splitlines()
    blocks = []
    for i, line in enumerate(lines):
        if line.strip() != MARKER:
            continue
        j = i + 1
        while j < len(lines) and not lines[j].strip():
            j += 1
        if j == len(lines) or lines[j].strip() != "```python":
            raise AssertionError(f"{page.name}:{i + 1}: {MARKER} must be followed by a ```python block")
        end = next(k for k in range(j + 1, len(lines)) if lines[k].strip() == "```")
        blocks.append((j + 1, "\n".join(lines[j + 1 : end]) + "\n"))
    return blocks


BLOCKS = [(page, line, code) for page in PAGES for line, code in runnable_blocks(page)]


def test_the_readme_has_a_runnable_python_example():
    assert any(page.name == "README.md" for page, _, _ in BLOCKS)


@pytest.mark.parametrize(
    "page, line, code", BLOCKS, ids=[f"{page.relative_to(ROOT)}:{line}" for page, line, _ in BLOCKS]
)
def test_runnable_block_runs_as_pasted(page, line, code, tmp_path, monkeypatch):
    """Each block in an empty folder, in a fresh namespace, as a reader pasting it would run it."""
    monkeypatch.chdir(tmp_path)
    script = tmp_path / "block.py"
    script.write_text(code)
    runpy.run_path(str(script), run_name="__main__")


def test_a_marker_without_a_python_block_is_refused(tmp_path):
    page = tmp_path / "page.md"
    page.write_text(f"text\n{MARKER}\n\n```bash\nls\n```\n")
    with pytest.raises(AssertionError, match=r"page.md:2: <!-- runnable --> must be followed by a ```python block"):
        runnable_blocks(page)


def test_readme_is_short_and_opens_with_the_quick_start():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= 250
    first_screen = "\n".join(lines[:40])
    assert "## Quick start on your own folder" in first_screen
    for command in ("dualclip predict parts/", "dualclip fit ", "dualclip predict --profile", "dualclip serve"):
        assert command in first_screen, command


INTERNAL = [
    r"this project's (?:cpu )?machines?",
    r"this workplace",
    r"these sessions",
    r"issue ?#?\d",
    r"\bthe issue\b",
    r"the issue's",
    r"trustworthy-scores issue",
    r"before (?:this|the) matrix was fixed",
    r"was added after",
    r"offline cache",
]


@pytest.mark.parametrize("page", [*PAGES, ROOT / "BENCHMARKS.md"], ids=lambda p: p.name)
def test_docs_hold_no_internal_or_historical_language(page):
    text = page.read_text().lower()
    found = [m.group(0) for pattern in INTERNAL for m in re.finditer(pattern, text)]
    assert found == [], f"{page.name}: {found}"


def test_every_test_the_docs_name_exists():
    defined = set()
    for path in (ROOT / "tests").glob("test_*.py"):
        defined |= set(re.findall(r"^\s*(?:async )?def (test_\w+)", path.read_text(), re.M))
    cited = set()  # `test_name`, `test_prefix_*` or `tests/file.py::test_name` in inline code, outside code blocks
    for page in PAGES:
        prose = re.sub(r"^```.*?^```", "", page.read_text(), flags=re.M | re.S)
        for span in re.findall(r"`([^`\n]+)`", prose):
            if m := re.fullmatch(r"(?:\S+::)?(test_\w+\*?)", span):
                cited.add(m[1])
    assert len(cited) > 40  # the fault matrix and the planted-bug tables name their tests
    missing = sorted(
        name
        for name in cited
        if not (any(d.startswith(name[:-1]) for d in defined) if name.endswith("*") else name in defined)
    )
    assert missing == []


SRC = ROOT / "src" / "dualclip"
PACKAGES = "|".join(sorted(d.name for d in SRC.iterdir() if (d / "__init__.py").is_file()))
CITED = [  # group 1: a module path ("/" or "." between names), 2: a trailing ".py", 3: ".name"s after the module
    re.compile(r"src/dualclip/((?:\w+/)*\w+)(\.py)?((?:\.[A-Za-z_]\w*)*)"),
    re.compile(rf"(?<![\w./-])((?:{PACKAGES})(?:/\w+)+)(\.py)?((?:\.[A-Za-z_]\w*)*)"),
    re.compile(r"(?<![\w./-])dualclip((?:\.[A-Za-z_]\w*)+)()()"),  # dotted: names after the package itself
]
DOTTED = CITED[2]


def _has(obj, name: str) -> bool:
    """``obj.name`` exists: an attribute, or a field of a dataclass (a field without a default is no class
    attribute)."""
    fields = {f.name for f in dataclasses.fields(obj)} if dataclasses.is_dataclass(obj) else set()
    return hasattr(obj, name) or name in fields or name in getattr(obj, "__annotations__", {})


def _is_module(names: list[str]) -> bool:
    return SRC.joinpath(*names).with_suffix(".py").is_file() or SRC.joinpath(*names, "__init__.py").is_file()


def missing_source_names(text: str) -> list[str]:
    """The names ``text`` cites in the source that do not exist: ``src/dualclip/...`` paths, package-relative
    ones (``core/maps.py``, ``core/maps.fuse_branches``, ``output/writer.OutputWriter.add``) and dotted ones
    (``dualclip.scoring.sources.bank_scores``): the longest leading run of names that is a module, then each
    further name looked up on what the previous one gave."""
    missing = []
    for pattern in CITED:
        for m in pattern.finditer(text):
            names = [n for n in re.split(r"[/.]", m[1] + m[3]) if n]
            n = 0
            while n < len(names) and _is_module(names[: n + 1]):
                n += 1
            not_a_file = m[2] and not SRC.joinpath(*names[:n]).with_suffix(".py").is_file()
            if (n == 0 and pattern is not DOTTED) or not_a_file:
                missing.append(m[0])
                continue
            obj = importlib.import_module(".".join(["dualclip", *names[:n]]))
            for name in names[n:]:
                if not _has(obj, name):
                    missing.append(m[0])
                    break
                obj = getattr(obj, name, None)
    return sorted(missing)


def test_missing_source_names_are_found():
    real = (
        "`core/maps.fuse_branches`, `scoring/sources.py`, `src/dualclip/detector.py`, "
        "`output/writer.OutputWriter.add`, `scoring/sources.VisualScores.scores`, `dualclip.scoring.sources.bank_scores`, `dualclip.DetectorConfig`, "
        "`core/`, out/blocks/, .dualclip-output.json"
    )
    assert missing_source_names(real) == []
    bogus = (
        "`core/maps.fuse_all`, `scoring/source.py`, `src/dualclip/detectors.py`, `output/writer.OutputWriter.put`, "
        "`dualclip.scoring.source.bank_scores`, `scoring/sources.VisualScores.score`, `cli/run.py`, `dualclip.Detector`"
    )
    assert missing_source_names(bogus) == sorted(
        [
            "core/maps.fuse_all",
            "scoring/source.py",
            "src/dualclip/detectors.py",
            "output/writer.OutputWriter.put",
            "dualclip.scoring.source.bank_scores",
            "scoring/sources.VisualScores.score",
            "cli/run.py",
            "dualclip.Detector",
        ]
    )


def test_every_source_name_the_docs_cite_exists():
    cited = sum(1 for pattern in CITED for _ in pattern.finditer((ROOT / "docs" / "architecture.md").read_text()))
    assert cited > 40  # the architecture page names the function of every step
    assert {page.name: missing_source_names(page.read_text()) for page in PAGES} == {page.name: [] for page in PAGES}


def _marked_slow(path: Path) -> set[str]:
    """``file::test`` of each test function in ``path`` decorated with ``pytest.mark.slow``."""
    tree = ast.parse(path.read_text())
    return {
        f"{path.name}::{node.name}"
        for node in tree.body
        if isinstance(node, ast.FunctionDef) and any("pytest.mark.slow" in ast.unparse(d) for d in node.decorator_list)
    }


def test_testing_md_lists_every_slow_test():
    marked = set().union(*(_marked_slow(path) for path in (ROOT / "tests").glob("test_*.py")))
    section = (ROOT / "docs" / "testing.md").read_text().split("## Slow tests", 1)[1].split("\n## ", 1)[0]
    listed = set(re.findall(r"^\| `(test_\w+\.py::test_\w+)` \|", section, re.M))
    assert marked and listed == marked


def test_settings_tables_are_made_from_the_docstrings_and_document_every_setting():
    made = runpy.run_path(str(ROOT / "docs" / "make_config_table.py"))
    block = made["render"]()
    assert block in (ROOT / "docs" / "configuration.md").read_text(), "run: python docs/make_config_table.py"
    undocumented = [line for line in block.splitlines() if line.startswith("| `") and line.endswith("|  |")]
    assert undocumented == []
