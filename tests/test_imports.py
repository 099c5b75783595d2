"""The package's import graph has no circle (every import counts, top-level or inside a function).

An edge goes from a module to each module it names: ``from ..backbone import X`` is an edge to
``dualclip.backbone`` (its ``__init__``), ``from ..backbone.base import X`` to ``dualclip.backbone.base``,
``from . import text`` to ``dualclip.text``. Edges to the root package (``from .. import __version__``) are left
out: Python runs its ``__init__`` before any submodule, and it imports the detector lazily (PEP 562). Imports under ``if TYPE_CHECKING:`` run for type checkers only and
are left out.
"""

from __future__ import annotations

import ast
from pathlib import Path

import dualclip

ROOT = Path(dualclip.__file__).parent
PACKAGE = "dualclip"


def _module_name(path: Path, root: Path = ROOT) -> str:
    parts = [PACKAGE, *path.relative_to(root).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(tree: ast.AST):
    """Every import node, outside ``if TYPE_CHECKING:`` blocks."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and _is_type_checking(node):
            stack.extend(node.orelse)
            continue
        if isinstance(node, ast.Import | ast.ImportFrom):
            yield node
        stack.extend(ast.iter_child_nodes(node))


def import_graph(root: Path = ROOT) -> dict[str, set[str]]:
    """``{module: modules it imports}`` within the package (``a.b`` for ``a/b.py`` and ``a/b/__init__.py``)."""
    files = {_module_name(p, root): p for p in root.rglob("*.py")}
    graph: dict[str, set[str]] = {name: set() for name in files}
    for name, path in files.items():
        is_package = path.name == "__init__.py"
        here = name if is_package else name.rpartition(".")[0]
        for node in _imports(ast.parse(path.read_text(), str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                base = node.module or ""
                if node.level:
                    anchor = here.split(".")
                    anchor = anchor[: len(anchor) - (node.level - 1)]
                    base = ".".join([*anchor, base] if base else anchor)
                targets = [base] + [f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in files]
            for target in targets:
                if target in files and target not in (name, PACKAGE):
                    graph[name].add(target)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One circle of ``graph`` as ``[a, b, ..., a]``, or ``None``."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_the_package_has_no_import_circle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import circle: " + " -> ".join(cycle)


def test_the_circle_finder_sees_a_circle_through_a_function_level_import(tmp_path):
    pkg = tmp_path / PACKAGE
    (pkg / "a").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "a" / "__init__.py").write_text("y = 2\n\n\ndef build():\n    from ..b import x\n")
    (pkg / "a" / "c.py").write_text("z = 3\n")
    (pkg / "b.py").write_text("from .a import y\nx = 1\n")
    assert find_cycle(import_graph(pkg)) == ["dualclip.a", "dualclip.b", "dualclip.a"]
    (pkg / "b.py").write_text("from .a.c import z\nx = 1\n")  # the submodule, not the package: no circle
    assert find_cycle(import_graph(pkg)) is None
    (pkg / "b.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .a import y\nx = 1\n")
    assert find_cycle(import_graph(pkg)) is None
