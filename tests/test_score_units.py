"""The units of scores: the moments that standardise a branch, a profile's scale and how it is read back.

Each value is checked against a plain recomputation; each refusal by its exact message."""

from __future__ import annotations

import re

import pytest
import torch

from dualclip.profile import MAX_MOMENT, Moments, ScoreScale
from dualclip.scoring.matching import MAD_TO_STD, centre_and_spread


def test_centre_and_spread_are_mean_and_population_std_unless_robust():
    assert centre_and_spread(torch.tensor([1.0, 3.0])) == (2.0, 1.0)
    assert centre_and_spread(torch.tensor([[1.0, 3.0], [5.0, 7.0]])) == (4.0, pytest.approx(5**0.5))
    assert centre_and_spread(torch.tensor([5.0])) == (5.0, 0.0)  # one value: no spread
    # robust: the lower median and 1.4826 x the median absolute deviation
    centre, spread = centre_and_spread(torch.tensor([1.0, 2.0, 10.0, 3.0]), robust=True)
    assert centre == 2.0 and spread == pytest.approx(1.0 * MAD_TO_STD)


def test_moments_standardise_in_the_input_dtype_and_only_subtract_without_a_spread():
    x = torch.tensor([1.0, 2.0, 4.0])
    got = Moments(1.0, 2.0).standardize(x)
    assert got.dtype == torch.float32 and torch.equal(got, torch.tensor([0.0, 0.5, 1.5]))
    assert Moments(1.0, 2.0).standardize(x.half()).dtype == torch.float16
    assert Moments(1.0, 1e-9).degenerate
    assert torch.equal(Moments(1.0, 1e-9).standardize(x), torch.tensor([0.0, 1.0, 3.0]))


def test_moments_say_why_they_cannot_be_a_profiles_units():
    assert Moments(1.0, 2.0).problem() is None
    assert Moments(-MAX_MOMENT, MAX_MOMENT).problem() is None  # the bound itself is allowed
    for bad, name in (
        (Moments(float("nan"), 1.0), "mean"),
        (Moments(1e300, 1.0), "mean"),
        (Moments(0.0, float("inf")), "std"),
        (Moments(0.0, 2 * MAX_MOMENT), "std"),
        (Moments("1", 1.0), "mean"),
    ):
        assert bad.problem() == f"{name} must be a finite number of magnitude at most 1e+06, got {getattr(bad, name)!r}"
    assert Moments(5.0, 0.0).problem() == "std must be a spread above 1e-06 x max(1, |mean|), got 0.0"


def test_moments_and_scales_are_read_back_only_from_their_own_shape():
    assert Moments.from_dict({"mean": 1.0, "std": 2.0}) == Moments(1.0, 2.0)
    for bad in ({"mean": 1.0}, ["mean", "std"], {"mean": 1.0, "std": 2.0, "n": 3}):
        message = f"moments must be {{'mean': number, 'std': number}}, got {bad!r}"
        with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
            Moments.from_dict(bad)
    unit = {"mean": 0.0, "std": 1.0}
    scale = ScoreScale.from_dict({"score": unit})  # the optional groups absent: empty
    assert (scale.patch, scale.image, scale.parts, scale.score, scale.position) == ({}, {}, {}, Moments(0.0, 1.0), None)
    with pytest.raises(ValueError, match=r"^scale\.image must be an object, got \[1\]$"):
        ScoreScale.from_dict({"score": unit, "image": [1]})
    with pytest.raises(ValueError, match=r"^scale must be an object, got 3$"):
        ScoreScale.from_dict(3)


def test_a_scale_names_every_moment_by_its_place_in_the_profile():
    a, b, c, d = (Moments(float(i), 1.0) for i in range(4))
    scale = ScoreScale(patch={"visual": a}, image={"map": b}, score=c, parts={"cosine": d})
    assert scale.named() == {"patch.visual": a, "image.map": b, "score": c, "parts.cosine": d}
    assert ScoreScale.from_dict(scale.to_dict()) == scale
