"""Docstrings cite documents the repository holds: the method is docs/method.md, by its section numbers."""

from __future__ import annotations

import re
from pathlib import Path

import dualclip

SRC = Path(dualclip.__file__).parent
METHOD = Path(__file__).resolve().parents[1] / "docs" / "method.md"


def test_docstrings_cite_docs_method_md_and_its_existing_sections():
    sections = set(re.findall(r"^## (\d+)(?:-(\d+))?\.", METHOD.read_text(), flags=re.M))
    numbers = {int(n) for pair in sections for n in pair if n}
    numbers |= set(range(3, 5))  # "## 3-4." covers both
    for path in SRC.rglob("*.py"):
        text = path.read_text()
        assert "METHOD.md" not in text and "METHOD §" not in text, f"{path}: cite docs/method.md"
        for cited in re.findall(r"docs/method\.md §(\d+)", text):
            assert int(cited) in numbers, f"{path}: docs/method.md has no section {cited}"
