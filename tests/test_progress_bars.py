"""The matching's progress bars: drawn on stderr only when asked, with their label, their unit and the number of
steps in all, counted up to that number, and cleared when done (a finished bar leaves no line behind)."""

from __future__ import annotations

import itertools
import re

import pytest
import torch

from dualclip.scoring import bank_distances
from dualclip.scoring.sources import Matching, MutualPairs

# one state of a tqdm bar: "label:  50%|#####     | 4/8 [00:00<00:00, 3404.71pair/s]" (or "1.25s/pair" when slow)
STATE = re.compile(
    r"(?P<label>.+?): +\d+%\|[^|]*\| (?P<done>\d+)/(?P<total>\d+) \[[^\]]*?(?:(?P<unit>[a-z]+)/s|s/(?P<slow>[a-z]+))\]"
)


@pytest.fixture(autouse=True)
def every_step_drawn(monkeypatch):
    """tqdm draws a bar at most every 0.1 s of its clock: a clock that advances a second at each reading has it
    draw every step, the last one too."""
    ticks = itertools.count()
    monkeypatch.setattr("tqdm.std.time", lambda: float(next(ticks)))


def _states(err: str) -> list[tuple[str, int, int, str]]:
    """``(label, done, total, unit)`` of each state a bar drew on ``err``, which it left with its line blank."""
    assert err.endswith("\r") and "\n" not in err, repr(err[-80:])
    *states, cleared, _ = err.split("\r")
    assert not cleared.strip(), repr(cleared)
    out = []
    for state in filter(str.strip, states):
        m = STATE.fullmatch(state.rstrip())
        assert m, repr(state)
        out.append((m["label"], int(m["done"]), int(m["total"]), m["unit"] or m["slow"]))
    return out


def test_a_bank_search_counts_its_query_images_under_the_callers_label(capsys):
    query, bank = [torch.randn(3, 4, 2)], [torch.randn(5, 2)]
    bank_distances(query, bank, "euclidean")
    assert capsys.readouterr().err == ""
    bank_distances(query, bank, "euclidean", progress="leave-one-out")
    states = _states(capsys.readouterr().err)
    assert states[0] == ("leave-one-out", 0, 3, "img") and states[-1] == ("leave-one-out", 3, 3, "img")


def test_mutual_pairs_count_every_pair_matching_of_every_part_and_size(capsys):
    """Four images, k = 1: two pairs, each matched once per neighbourhood size (two) and hybrid part (two)."""
    matching = Matching("hybrid", (1, 3))
    spaces = matching.spaces([torch.randn(4, 9, 3, generator=torch.Generator().manual_seed(0))], (3, 3))
    source = MutualPairs(1, "min", 0, torch.zeros(4, 4, dtype=torch.bool))
    source.visual_scores(spaces, (3, 3), matching)
    source.visual_scores(spaces, (3, 3), matching, progress=False)
    assert capsys.readouterr().err == ""
    source.visual_scores(spaces, (3, 3), matching, progress=True)
    states = _states(capsys.readouterr().err)
    assert states[0] == ("matching", 0, 8, "pair") and states[-1] == ("matching", 8, 8, "pair")
