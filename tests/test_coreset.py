"""The memory bank's greedy k-center coreset (``greedy_coreset``) against a plain one-pick-at-a-time reference."""

from __future__ import annotations

import io
import re
import sys

import numpy as np
import pytest
import torch
import tqdm.auto

from dualclip.scoring import coreset
from dualclip.scoring.coreset import greedy_coreset


def _greedy_reference(x: np.ndarray, size: int, first: int) -> list[int]:
    """One pick at a time, squared distances by their definition (float64); ties go to the lowest index."""
    chosen = [first]
    nearest = ((x - x[first]) ** 2).sum(-1)
    while len(chosen) < size:
        chosen.append(int(np.argmax(nearest)))
        nearest = np.minimum(nearest, ((x - x[chosen[-1]]) ** 2).sum(-1))
    return sorted(chosen)


def _reference(features: torch.Tensor, size: int, seed: int, projection: int | None) -> list[int]:
    """The documented contract: a generator seeded with ``seed`` draws the Gaussian projection (``C x projection``,
    scaled by ``1/sqrt(projection)``, only when ``projection < C``), then the first patch; farthest-first after."""
    m, c = features.shape
    gen = torch.Generator().manual_seed(seed)
    x = features.float()
    if projection is not None and projection < c:
        x = x @ (torch.randn(c, projection, generator=gen) / projection**0.5)
    first = int(torch.randint(m, (1,), generator=gen))
    return _greedy_reference(x.double().numpy(), size, first)


def _randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def test_picks_are_the_farthest_first_greedy_from_the_seeded_patch_at_any_scale():
    x = _randn(60, 5, seed=3)
    got = greedy_coreset(x, 12, seed=4, projection=None)
    assert got.dtype == torch.int64 and got.tolist() == _reference(x, 12, 4, None)
    # the picks do not depend on the features' scale (powers of two keep float32 exact): squared distances far
    # below 1 or far above it are compared as they are
    for scale in (2.0**-12, 2.0**12):
        assert greedy_coreset(x * scale, 12, seed=4, projection=None).tolist() == got.tolist(), scale
    # ties (a 6 x 6 integer grid, exact distances) go to the lowest index, as one argmax over all patches does
    grid = torch.cartesian_prod(torch.arange(6.0), torch.arange(6.0))
    for seed in range(4):
        assert greedy_coreset(grid, 9, seed=seed, projection=None).tolist() == _reference(grid, 9, seed, None)
    # float64 features pick as their float32 values do
    assert greedy_coreset(x.double(), 12, seed=4, projection=None).tolist() == got.tolist()


def test_defaults_are_seed_0_and_a_128_dimensional_projection_and_a_wide_projection_is_none():
    x = _randn(400, 152, seed=1)
    assert greedy_coreset(x, 40).tolist() == _reference(x, 40, 0, 128)
    assert greedy_coreset(x, 40, seed=2, projection=16).tolist() == _reference(x, 40, 2, 16)
    # projection >= C works on the features themselves, like None
    raw = _reference(x, 40, 2, None)
    for projection in (None, 152, 200):
        assert greedy_coreset(x, 40, seed=2, projection=projection).tolist() == raw, projection


def test_projected_coreset_in_blocks_picks_the_one_at_a_time_greedy_coreset():
    """Clustered features (2400 patches of 152 channels, as effnet-lite0's): 300 picks take several candidate
    blocks; they are the one-at-a-time greedy's picks on the same seeded projection, each patch once."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(48, 152, generator=gen).repeat_interleave(50, 0) + 0.3 * torch.randn(2400, 152, generator=gen)
    got = greedy_coreset(x, 300, seed=5, projection=128)
    assert got.tolist() == _reference(x, 300, 5, 128)
    assert len(set(got.tolist())) == 300 and 0 <= got.min() and got.max() < 2400
    # more picks than distinct patches: every distinct patch, then others, never one twice
    dup = torch.randn(5, 8, generator=gen).repeat(40, 1)
    got = greedy_coreset(dup, 30, projection=None)
    assert len(set(got.tolist())) == 30 and {int(i) % 5 for i in got} == set(range(5))


def test_every_patch_lies_within_the_smallest_gap_between_picks():
    """The k-center property of farthest-first picks: the covering radius (farthest patch from its nearest pick)
    is at most the smallest distance between two picks, and the picks come sorted, each once."""
    x = _randn(300, 6, seed=7)
    got = greedy_coreset(x, 25, seed=1, projection=None)
    assert got.tolist() == sorted(set(got.tolist())) and len(got) == 25
    d = torch.cdist(x.double(), x.double())
    radius = d[:, got].min(dim=1).values.max()
    gaps = d[got][:, got] + torch.eye(25, dtype=torch.float64) * 1e9
    assert 0 < radius <= gaps.min() * (1 + 1e-6)
    assert radius < torch.cdist(x.double(), x[:25].double()).min(dim=1).values.max()  # better than any 25


def test_the_same_seed_picks_the_same_patches_and_other_seeds_other_ones():
    x = _randn(200, 32, seed=2)
    picks = [greedy_coreset(x, 20, seed=s, projection=8).tolist() for s in range(4)]
    assert greedy_coreset(x, 20, seed=3, projection=8).tolist() == picks[3]
    assert len({tuple(p) for p in picks}) == 4


def test_a_size_of_m_or_more_keeps_every_patch_and_a_size_below_1_is_refused():
    x = _randn(10, 4, seed=5)
    first = int(torch.randint(10, (1,), generator=torch.Generator().manual_seed(6)))
    assert greedy_coreset(x, 1, seed=6).tolist() == [first]  # the seeded patch alone
    assert greedy_coreset(x, 10).tolist() == greedy_coreset(x, 11).tolist() == list(range(10))
    assert greedy_coreset(torch.empty(0, 4), 0).tolist() == []  # no patches: every one of them, none
    for size in (0, -3):
        with pytest.raises(ValueError, match=rf"^coreset size must be >= 1, got {size}$"):
            greedy_coreset(x, size)


def test_candidate_blocks_hold_16_to_256_patches_within_block_elements_and_keep_the_picks(monkeypatch):
    """A block's distances (B x M) stay within BLOCK_ELEMENTS where 16 rows fit, B in [16, 256]."""
    rows: list[int] = []
    addmm = torch.addmm

    def spy(*args, **kwargs):
        out = addmm(*args, **kwargs)
        rows.append(out.shape[0])
        return out

    monkeypatch.setattr(coreset, "BLOCK_ELEMENTS", 100_000)
    monkeypatch.setattr(torch, "addmm", spy)
    for m, block in ((300, 256), (10_000, 16)):  # 100_000 // 300 = 333, 100_000 // 10_000 = 10
        x = _randn(m, 3, seed=m)
        rows.clear()
        assert greedy_coreset(x, 60, projection=None).tolist() == _reference(x, 60, 0, None), m
        assert rows and set(rows) == {block}, m


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


class _DrawnAtEveryUpdate(tqdm.auto.tqdm):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, mininterval=0, miniters=1, **kwargs)


def test_the_progress_bar_counts_every_pick_shows_only_when_asked_and_clears(monkeypatch):
    monkeypatch.setattr(tqdm.auto, "tqdm", _DrawnAtEveryUpdate)
    x = _randn(2000, 3, seed=8)
    quiet = _Terminal()
    monkeypatch.setattr(sys, "stderr", quiet)
    picks = greedy_coreset(x, 300, projection=None).tolist()
    assert greedy_coreset(x, 300, projection=None, progress=False).tolist() == picks
    assert quiet.getvalue() == ""  # not even on a terminal
    shown = _Terminal()
    monkeypatch.setattr(sys, "stderr", shown)
    assert greedy_coreset(x, 300, projection=None, progress=True).tolist() == picks
    err = shown.getvalue()
    counts = [int(n) for n in re.findall(r"\rcoreset: +\d+%\|[^|]*\| (\d+)/300 ", err)]
    assert counts[0] == 1 and counts[-1] == 300 and counts == sorted(counts) and len(counts) > 2, counts
    assert re.search(r"300/300 \[[^\]]*patch/s\]", err)  # counted in patches
    assert "\n" not in err and err.endswith("\r")  # a finished phase leaves no line behind


def _reference_with_duplicates(x: np.ndarray, size: int, first: int) -> list[int]:
    """Farthest-first while some patch lies away from every pick; once every patch left coincides with a pick,
    the lowest indices not picked fill the coreset."""
    chosen = [first]
    nearest = ((x - x[first]) ** 2).sum(-1)
    while len(chosen) < size and nearest.max() > 0:
        chosen.append(int(np.argmax(nearest)))
        nearest = np.minimum(nearest, ((x - x[chosen[-1]]) ** 2).sum(-1))
    chosen += [i for i in range(len(x)) if i not in chosen][: size - len(chosen)]
    return sorted(chosen)


def test_duplicate_patches_fill_the_coreset_with_the_lowest_unpicked_indices_and_the_bar_counts_them(monkeypatch):
    distinct = _randn(3, 4, seed=5)
    x = distinct.repeat(4, 1)  # 12 patches, 3 distinct points
    for seed in range(4):
        first = int(torch.randint(12, (1,), generator=torch.Generator().manual_seed(seed)))
        want = _reference_with_duplicates(x.double().numpy(), 7, first)
        got = greedy_coreset(x, 7, seed=seed, projection=None).tolist()
        assert got == want and len(set(got)) == 7, (seed, got, want)
        assert {tuple(r) for r in x[got].tolist()} == {tuple(r) for r in distinct.tolist()}  # every point kept
    monkeypatch.setattr(tqdm.auto, "tqdm", _DrawnAtEveryUpdate)
    shown = _Terminal()
    monkeypatch.setattr(sys, "stderr", shown)
    greedy_coreset(x, 7, projection=None, progress=True)
    counts = [int(n) for n in re.findall(r"\rcoreset: +\d+%\|[^|]*\| (\d+)/7 ", shown.getvalue())]
    assert counts[-1] == 7, counts  # the filled picks are counted too


def test_non_finite_features_and_a_projection_below_1_are_refused():
    x = _randn(20, 4, seed=1)
    for bad in (float("nan"), float("inf")):
        y = x.clone()
        y[3, 1] = bad
        with pytest.raises(
            ValueError, match="^the features hold NaN or infinite values: no distance between them is defined$"
        ):
            greedy_coreset(y, 5)
    for projection in (0, -3):
        with pytest.raises(ValueError, match=f"^projection must be None or >= 1, got {projection}$"):
            greedy_coreset(x, 5, projection=projection)
    assert greedy_coreset(x, 5, projection=1).tolist() == _reference(x, 5, 0, 1)  # a 1-D projection is one
