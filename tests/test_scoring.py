"""Scoring formulas against brute force: text, visual reference, pairing, fusion."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.ndimage import gaussian_filter

from dualclip import DetectorConfig
from dualclip.scoring import (
    aggregate,
    fuse,
    gaussian_blur,
    golden_reference_scores,
    map_scores,
    near_duplicates,
    normalize_branch,
    pair_references,
    reference_scores,
    text_anomaly_scores,
)


def _feats(n, p, c=(8, 5), seed=0):
    g = torch.Generator().manual_seed(seed)
    return [F.normalize(torch.randn(n, p, ci, generator=g), dim=-1) for ci in c]


def test_text_score_is_two_way_softmax():
    g = torch.Generator().manual_seed(0)
    f = torch.randn(7, 16, generator=g)
    t = F.normalize(torch.randn(2, 16, generator=g), dim=-1)
    got = text_anomaly_scores(f, t, 100.0)
    fn = F.normalize(f, dim=-1)
    expected = torch.sigmoid(100.0 * (fn @ t[1] - fn @ t[0]))
    torch.testing.assert_close(got, expected)
    assert ((got >= 0) & (got <= 1)).all()


def _brute_distance(features, a, b):
    total = torch.zeros(features[0].shape[1])
    for f in features:
        for i in range(f.shape[1]):
            total[i] += min((1 - float(f[a, i] @ f[b, j])) / 2 for j in range(f.shape[1]))
    return total / len(features)


@pytest.mark.parametrize("k", [1, 2, 3, "all"])
def test_reference_scores_match_brute_force(k):
    feats = _feats(5, 6)
    refs = pair_references(5, k, seed=3)
    got = reference_scores(feats, refs, "min")
    for a in range(5):
        expected = torch.stack([_brute_distance(feats, a, b) for b in refs[a]]).min(0).values
        torch.testing.assert_close(got[a], expected, rtol=1e-5, atol=1e-6)
    assert ((got >= 0) & (got <= 1)).all()


def test_mutual_pair_consistency():
    feats = _feats(2, 9)
    refs = pair_references(2, 1, seed=0)
    assert refs == [[1], [0]]
    both = reference_scores(feats, refs)
    # b scored against a in the same pass equals scoring b alone with a as its reference
    swapped = [f.flip(0) for f in feats]
    torch.testing.assert_close(both[1], reference_scores(swapped, [[1], [0]])[0])
    torch.testing.assert_close(both[0], _brute_distance(feats, 0, 1), rtol=1e-5, atol=1e-6)


def test_identical_image_scores_zero_and_chunking_is_exact():
    feats = _feats(4, 7)
    feats = [torch.cat([f[:1], f[:1], f[2:]]) for f in feats]  # images 0 and 1 identical
    got = reference_scores(feats, [[1], [0], [3], [2]])
    torch.testing.assert_close(got[0], torch.zeros(7), atol=1e-6, rtol=0)
    one_pair = 49 * 4 / 2**20  # MiB of one 7 x 7 matrix: one pair per batch
    torch.testing.assert_close(reference_scores(feats, [[1], [0], [3], [2]], memory_mb=one_pair), got)


def test_golden_reference_scores_match_brute_force():
    feats = _feats(3, 5, seed=1)
    golden = _feats(4, 6, seed=2)
    got = golden_reference_scores(feats, golden)
    for a in range(3):
        expected = torch.zeros(5)
        for fq, fr in zip(feats, golden, strict=True):
            bank = fr.reshape(-1, fr.shape[-1])
            expected += (1 - (fq[a] @ bank.T).max(dim=1).values) / 2
        torch.testing.assert_close(got[a], expected / 2, rtol=1e-5, atol=1e-6)


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(2, 40),
    k=st.integers(1, 6),
    seed=st.integers(0, 2**31),
)
def test_pairing_properties(n, k, seed):
    refs = pair_references(n, k, seed)
    assert len(refs) == n
    for i, r in enumerate(refs):
        assert i not in r
        assert len(r) == len(set(r)) == min(k, n - 1)
        assert all(0 <= j < n for j in r)
    assert refs == pair_references(n, k, seed)  # deterministic per seed


def test_random_k1_is_mutual_derangement_and_seed_matters():
    refs = pair_references(10, 1, seed=0)
    partner = [r[0] for r in refs]
    assert all(partner[partner[i]] == i for i in range(10))
    assert any(pair_references(10, 1, seed=s) != refs for s in range(1, 5))
    odd = pair_references(7, 1, seed=1)
    assert sum(odd[odd[i][0]][0] == i for i in range(7)) >= 6


def test_pairing_needs_two_images():
    with pytest.raises(ValueError, match="at least 2 images"):
        pair_references(1)


def test_near_duplicates_match_brute_force():
    t = torch.tensor([[0.0, 0.0, 0.0, 0.0], [1.0, 1.0, 0.0, 0.0], [0.0, 0.0, 0.0, 8.0], [0.5, 0.5, 0.5, 0.5]])
    got = near_duplicates(t, 0.5)
    want = torch.tensor([[float((a - b).abs().mean()) <= 0.5 for b in t] for a in t])
    want.fill_diagonal_(False)
    assert torch.equal(got, want) and got[0, 1] and got[0, 3] and not got[0, 2]
    assert not near_duplicates(t, -1).any()


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(2, 30),
    k=st.integers(1, 4),
    seed=st.integers(0, 1000),
)
def test_pairing_never_uses_a_forbidden_partner(n, k, seed):
    g = torch.Generator().manual_seed(seed)
    forbidden = torch.rand(n, n, generator=g) < 0.3
    forbidden = forbidden | forbidden.T
    forbidden.fill_diagonal_(False)
    refs = pair_references(n, k, seed, forbidden=forbidden)
    for i, r in enumerate(refs):
        assert r and i not in r and len(r) == len(set(r))
        allowed = [j for j in range(n) if j != i and not forbidden[i, j]]
        if allowed:
            assert all(not forbidden[i, j] for j in r)
            assert len(r) == min(k, len(allowed)) or k > 1


def test_aggregation():
    d = torch.tensor([[0.1, 0.5], [0.3, 0.2], [0.2, 0.9], [0.4, 0.4]])
    torch.testing.assert_close(aggregate(d, "min"), torch.tensor([0.1, 0.2]))
    # lowest 30% of 4 -> ceil(1.2) = 2 values
    torch.testing.assert_close(aggregate(d, "mean_low30"), torch.tensor([0.15, 0.3]))


@settings(max_examples=30, deadline=None)
@given(k=st.integers(1, 3), seed=st.integers(0, 1000))
def test_default_aggregation_is_the_minimum_for_up_to_three_references(k, seed):
    """mean_low30 (the default) keeps the paper's minimum for k <= 3 and differs only for larger k."""
    d = torch.rand(k, 50, generator=torch.Generator().manual_seed(seed))
    assert torch.equal(aggregate(d, "mean_low30"), aggregate(d, "min"))
    assert DetectorConfig().k_aggregation == "mean_low30"


def test_mean_low30_resists_references_that_share_the_defect():
    """A defect that recurs in some references: the minimum erases it, the low-30% mean keeps it."""
    clean = torch.full((10, 1), 0.05)  # a normal patch: close to every reference
    defect = torch.cat([torch.full((2, 1), 0.05), torch.full((8, 1), 0.6)])  # matched by 2 defective refs
    assert aggregate(defect, "min") == aggregate(clean, "min")
    assert aggregate(defect, "mean_low30") > aggregate(clean, "mean_low30") + 0.1


def test_fusion_normalisation_and_weights():
    a = torch.tensor([[0.0, 1.0], [2.0, 3.0]])
    z = normalize_branch(a, "zscore")
    assert abs(float(z.mean())) < 1e-6 and abs(float(z.std(unbiased=False)) - 1) < 1e-6
    r = normalize_branch(a, "rank")
    torch.testing.assert_close(r, torch.tensor([[0.0, 1 / 3], [2 / 3, 1.0]]))
    assert torch.equal(normalize_branch(torch.ones(3), "zscore"), torch.zeros(3))
    b = torch.tensor([[3.0, 2.0], [1.0, 0.0]])
    torch.testing.assert_close(fuse([(a, 0.5), (b, 0.5)], "zscore"), torch.zeros(2, 2))
    assert torch.equal(fuse([(a, 0.3)], "zscore"), a)  # one branch keeps its own units


@pytest.mark.parametrize("sigma", [1.0, 4.0])
def test_gaussian_blur_matches_scipy(sigma):
    x = torch.rand(2, 40, 33, generator=torch.Generator().manual_seed(0))
    got = gaussian_blur(x, sigma)
    expected = np.stack([gaussian_filter(m, sigma, mode="mirror", truncate=4.0) for m in x.numpy().astype(np.float64)])
    np.testing.assert_allclose(got.numpy(), expected, atol=1e-5)


def test_gaussian_blur_of_many_maps_is_bit_equal_to_the_single_channel_convolution():
    """The depthwise smoothing (rows as channels) sums the same products in the same order as a plain
    single-channel 2-D convolution of each map: the same bits, at the size and sigma a fit smooths 50 maps at."""
    import torch.nn.functional as F

    from dualclip.scoring.fusion import gaussian_kernel1d

    x = torch.randn(50, 320, 320, generator=torch.Generator().manual_seed(0))
    k = gaussian_kernel1d(4.0)
    r = k.numel() // 2
    ref = F.conv2d(F.pad(x.unsqueeze(1), (r, r, 0, 0), mode="reflect"), k.view(1, 1, 1, -1))
    ref = F.conv2d(F.pad(ref, (0, 0, r, r), mode="reflect"), k.view(1, 1, -1, 1)).squeeze(1)
    got = gaussian_blur(x, 4.0)
    assert got.is_contiguous() and got.shape == (50, 320, 320)
    assert torch.equal(got, ref)


def test_map_scores():
    m = torch.zeros(1, 10, 10)
    m[0, 0, 0] = 5
    assert float(map_scores(m, "max")[0]) == 5
    assert float(map_scores(m, "top1pct")[0]) == 5  # top 1% of 100 pixels = 1 pixel
