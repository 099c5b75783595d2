"""Which reference source a detector scores with is the core's business: the layers above it (command line,
archive runs, service, output writer, evaluation) ask the detector what they need and never read its fitted
profile. (The whole-model export is the one reader outside the core: it writes the profile itself into a graph.)"""

from __future__ import annotations

import ast
from pathlib import Path

import dualclip

ROOT = Path(dualclip.__file__).parent
OUTSIDE_THE_CORE = ("cli", "distributed", "serve", "output", "evaluation.py")


def profile_reads(source: str) -> list[int]:
    """The lines of ``source`` that read a ``profile_`` attribute (``det.profile_``, ``self.detector.profile_``)."""
    return sorted(
        node.lineno
        for node in ast.walk(ast.parse(source))
        if isinstance(node, ast.Attribute) and node.attr == "profile_"
    )


def test_profile_reads_are_found():
    assert profile_reads("a = det.profile_\nif x.detector.profile_ is None:\n    pass\n") == [1, 2]
    assert profile_reads("profile_path = 1\nprofile_scale(p)\ndet.profile_meta()\n") == []


def test_no_module_outside_the_core_reads_the_detectors_profile():
    found = [
        f"{path.relative_to(ROOT)}:{line}"
        for package in OUTSIDE_THE_CORE
        for path in ([ROOT / package] if package.endswith(".py") else sorted((ROOT / package).rglob("*.py")))
        for line in profile_reads(path.read_text(encoding="utf-8"))
    ]
    assert found == [], "ask the detector (scoring_class, normal_scores, profile_summary, profile_meta, threshold_)"
