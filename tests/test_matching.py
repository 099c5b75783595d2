"""The matching space (cosine / euclidean / layernorm, neighbourhood sizes) against brute-force references."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dualclip import DetectorConfig, DualClipDetector
from dualclip.scoring import bank_distances, match_spaces, nearest_distances, reference_scores, to_match_space


def _layers(g, p, dims=(5, 7), seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(g, p, c, generator=gen) * (1 + i) for i, c in enumerate(dims)]


def _space(layers, distance, grid=None, size=1):
    return [to_match_space(t, grid or (1, t.shape[1]), distance, size) for t in layers]


def test_euclidean_is_the_distance_of_the_concatenated_raw_features():
    a, b = _layers(3, 6, seed=1), _layers(3, 4, seed=2)
    da, db = nearest_distances(_space(a, "euclidean"), _space(b, "euclidean"), "euclidean")
    full = torch.cdist(torch.cat(a, -1).double(), torch.cat(b, -1).double())  # (3, 6, 4)
    torch.testing.assert_close(da.double(), full.amin(dim=2), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(db.double(), full.amin(dim=1), rtol=1e-4, atol=1e-4)


def test_layernorm_is_musc_per_layer_euclidean_after_layer_norm():
    a, b = _layers(2, 5, seed=3), _layers(2, 6, seed=4)
    da, db = nearest_distances(_space(a, "layernorm"), _space(b, "layernorm"), "layernorm")
    ea = eb = 0
    for x, y in zip(a, b, strict=True):
        d = torch.cdist(F.layer_norm(x, x.shape[-1:]).double(), F.layer_norm(y, y.shape[-1:]).double())
        ea, eb = ea + d.amin(dim=2) / 2, eb + d.amin(dim=1) / 2
    torch.testing.assert_close(da.double(), ea, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(db.double(), eb, rtol=1e-4, atol=1e-4)


def test_cosine_is_the_papers_per_layer_distance():
    a, b = _layers(2, 5, seed=5), _layers(2, 3, seed=6)
    da, _ = nearest_distances(_space(a, "cosine"), _space(b, "cosine"), "cosine")
    want = sum(
        (1 - (F.normalize(x, dim=-1) @ F.normalize(y, dim=-1).transpose(1, 2)).amax(dim=2)) / 2
        for x, y in zip(a, b, strict=True)
    )
    torch.testing.assert_close(da, want / 2)


def test_only_euclidean_and_layernorm_see_magnitude():
    # b's patch is a's patch scaled by 3: the same direction, three times the activation
    a = [torch.tensor([[[1.0, 2.0, 0.5, -1.0]]])]
    b = [3 * a[0]]
    cos, _ = nearest_distances(_space(a, "cosine"), _space(b, "cosine"), "cosine")
    euc, _ = nearest_distances(_space(a, "euclidean"), _space(b, "euclidean"), "euclidean")
    assert float(cos) == pytest.approx(0.0, abs=1e-6)
    assert float(euc) == pytest.approx(2 * a[0].norm().item(), rel=1e-5)


@pytest.mark.parametrize("distance", ["cosine", "euclidean", "layernorm"])
def test_bank_distances_match_brute_force_in_chunks(distance):
    query = _space(_layers(3, 5, seed=7), distance)
    bank3 = _space(_layers(4, 6, seed=8), distance)
    bank = [t.reshape(-1, t.shape[-1]) for t in bank3]
    got = bank_distances(query, bank, distance, chunk=7)  # 24 bank patches in 4 chunks
    for i in range(3):
        # the bank as one big reference image: the pair path gives the same distances
        want, _ = nearest_distances([q[i : i + 1] for q in query], [b[None] for b in bank], distance)
        torch.testing.assert_close(got[i], want[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("distance", ["cosine", "euclidean", "layernorm"])
def test_chunked_leave_one_out_equals_the_brute_force(distance):
    """Each query image against the bank without its own patches: bank owners in any order, runs of one owner
    cut by the chunk boundaries (chunk 5), an owner with no patch left in the bank."""
    query = _space(_layers(4, 6, seed=9), distance)
    keep = torch.randperm(18, generator=torch.Generator().manual_seed(1))[:15]  # image 3: no patch kept
    bank = [q.reshape(-1, q.shape[-1])[keep] for q in query]  # 15 of the images' own patches, shuffled
    owner = keep // 6
    got = bank_distances(query, bank, distance, chunk=5, query_owner=torch.arange(4), bank_owner=owner)
    for i in range(4):
        others = [b[owner != i] for b in bank]
        want, _ = nearest_distances([q[i : i + 1] for q in query], [b[None] for b in others], distance)
        torch.testing.assert_close(got[i], want[0], rtol=1e-5, atol=1e-5)
        assert (got[i] > 1e-4).all()  # no patch found itself
    whole = bank_distances(query, bank, distance, chunk=5)
    assert (whole < got + 1e-6).all() and (whole[:3] < got[:3] - 1e-4).any()


def test_neighbourhood_sizes_are_averaged():
    layers = _layers(4, 9, seed=9)
    refs = [[1], [0], [3], [2]]
    spaces = match_spaces(layers, (3, 3), "euclidean", (1, 3))
    one = reference_scores(match_spaces(layers, (3, 3), "euclidean", (1,))[0], refs, distance="euclidean")
    three = reference_scores(match_spaces(layers, (3, 3), "euclidean", (3,))[0], refs, distance="euclidean")
    torch.testing.assert_close(spaces[1][0], to_match_space(layers[0], (3, 3), "euclidean", 3))
    # the detector averages the sizes' scores
    assert not torch.allclose(one, three)
    both = torch.stack([reference_scores(s, refs, distance="euclidean") for s in spaces]).mean(0)
    torch.testing.assert_close(both, (one + three) / 2)


def test_detector_uses_the_distance_and_sizes_it_is_given(tiny_backbone, texture_set):
    rgb_images = texture_set[0][:4]
    cfg = DetectorConfig(backbone="tiny", pretrained=None, use_text=False, progress=False, sigma=0.0)
    runs = {}
    for distance, sizes in [("euclidean", 1), ("euclidean", 3), ("euclidean", (1, 3)), ("cosine", 1)]:
        det = DualClipDetector(dataclasses.replace(cfg, distance=distance, neighbourhood=sizes), backbone=tiny_backbone)
        res = det.score_images(rgb_images)
        runs[(distance, sizes)] = res.branches.visual
        assert res.run.distance == distance
        assert res.run.neighbourhood == ([sizes] if isinstance(sizes, int) else list(sizes))
    torch.testing.assert_close(runs[("euclidean", (1, 3))], (runs[("euclidean", 1)] + runs[("euclidean", 3)]) / 2)
    assert not torch.allclose(runs[("euclidean", 1)], runs[("cosine", 1)])


def test_neighbourhood_setting_is_validated():
    with pytest.raises(ValueError, match="odd number"):
        DetectorConfig(neighbourhood=(1, 2))
    with pytest.raises(ValueError, match="distance must be one of"):
        DetectorConfig(distance="manhattan")
    assert DetectorConfig(neighbourhood=[3]).neighbourhood == 3


def test_hybrid_averages_the_standardised_cosine_and_euclidean_scores(tiny_backbone, texture_set):
    images = texture_set[0][:4]
    cfg = DetectorConfig(backbone="tiny", pretrained=None, use_text=False, progress=False, neighbourhood=1)
    runs = {
        d: DualClipDetector(dataclasses.replace(cfg, distance=d), backbone=tiny_backbone).score_images(images)
        for d in ("cosine", "euclidean", "hybrid")
    }

    def z(x):
        x = x.double()
        return (x - x.mean()) / x.std(unbiased=False)

    want = (z(runs["cosine"].branches.visual) + z(runs["euclidean"].branches.visual)) / 2
    torch.testing.assert_close(runs["hybrid"].branches.visual.double(), want, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="no matching space of its own"):
        to_match_space(torch.randn(1, 4, 3), (2, 2), "hybrid", 1)


def test_robust_hybrid_parts_are_standardised_by_median_and_mad():
    from dualclip.profile import Moments
    from dualclip.scoring import combine_parts

    g = torch.Generator().manual_seed(1)
    cos, euc = torch.rand(5, 12, generator=g), 10 * torch.rand(5, 12, generator=g)
    euc[0, :6] = 1000.0  # a run with a few huge defect responses: they must not set the units

    def robust(x):
        v = np.sort(x.numpy().astype(np.float64).reshape(-1))
        med = v[(v.size - 1) // 2]  # the lower median
        dev = np.sort(np.abs(v - med))
        return (x.numpy().astype(np.float64) - med) / (1.4826 * dev[(dev.size - 1) // 2])

    got = combine_parts({"cosine": cos, "euclidean": euc}, robust=True)
    np.testing.assert_allclose(got.numpy(), (robust(cos) + robust(euc)) / 2, rtol=1e-5, atol=1e-5)
    m = Moments.of(euc, robust=True)
    np.testing.assert_allclose(m.standardize(euc).numpy(), robust(euc), rtol=1e-5, atol=1e-5)
    # z-scores are still the default, and the huge responses squash the others there
    z = combine_parts({"cosine": cos, "euclidean": euc})
    assert float(z[1:].std()) < float(got[1:].std())


def test_an_empty_bank_leaves_every_patch_at_infinite_distance():
    query = [torch.randn(2, 5, 3)]
    got = bank_distances(query, [torch.zeros(0, 3)], "euclidean")
    assert got.shape == (2, 5) and torch.isinf(got).all()


def _recording(real, shapes: list):
    """``real`` (a torch function), appending the shape of each result it gives to ``shapes``."""

    def spy(*args, **kwargs):
        out = real(*args, **kwargs)
        shapes.append(tuple(out.shape))
        return out

    return spy


@pytest.mark.parametrize("distance", ["cosine", "euclidean"])
def test_nearest_distances_keep_each_block_of_distances_within_the_memory_budget(distance, monkeypatch):
    """Two pairs of 300 x 150 patches (two layers of 4 and 3 channels) under a budget of 30000 distances: a's
    patches are matched 100 at a time, 2 x 100 x 150 distances per block and per distance matrix (one per layer,
    or one of the concatenated layers), whatever the channels; the distances equal the unblocked ones."""
    a, b = (
        _space(_layers(2, 300, dims=(4, 3), seed=10), distance),
        _space(_layers(2, 150, dims=(4, 3), seed=11), distance),
    )
    whole = nearest_distances(a, b, distance)
    shapes = []
    for name in ("bmm", "baddbmm"):
        monkeypatch.setattr(torch, name, _recording(getattr(torch, name), shapes))
    budget = 30000 * 4 / 2**20  # MiB of 30000 float32 distances
    blocked = nearest_distances(a, b, distance, memory_mb=budget)
    assert shapes == [(2, 100, 150)] * 3 * (2 if distance == "cosine" else 1)
    for got, want in zip(blocked, whole, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


@pytest.mark.parametrize("distance", ["cosine", "euclidean"])
def test_bank_distances_are_computed_on_the_querys_device(distance):
    """The ``meta`` device stands in for an accelerator: a bank on the host is searched on the query's device and
    the distances come back there, with owners (kept on the host) too."""
    query = [torch.randn(2, 5, 3, device="meta")]
    bank = [torch.randn(7, 3)]
    owners = {"query_owner": torch.arange(2), "bank_owner": torch.tensor([0, 0, 1, 1, 2, 2, 2])}
    for kwargs in ({}, owners):
        got = bank_distances(query, bank, distance, **kwargs)
        assert got.device.type == "meta" and got.shape == (2, 5)


def test_part_moments_put_several_parts_on_one_scale_and_leave_a_single_part_alone():
    """Two parts: each part's mean and population standard deviation, or (robust) its lower median and 1.4826
    times its median absolute deviation; a single part needs no common scale (``None``), robust or not."""
    from dualclip.scoring.sources import part_moments

    g = torch.Generator().manual_seed(2)
    parts = {"cosine": torch.rand(3, 8, generator=g), "euclidean": 5 * torch.rand(3, 8, generator=g)}
    parts["euclidean"][0, :3] = 100.0  # a few huge responses: the robust moments ignore them
    for robust in (False, True):
        assert part_moments({"cosine": parts["cosine"]}, robust) is None
    plain, robust = part_moments(parts, False), part_moments(parts, True)
    assert set(plain) == set(robust) == {"cosine", "euclidean"}
    for name, x in parts.items():
        v = np.sort(x.double().numpy().reshape(-1))
        med = v[(v.size - 1) // 2]
        mad = np.sort(np.abs(v - med))[(v.size - 1) // 2]
        assert (plain[name].mean, plain[name].std) == pytest.approx((v.mean(), v.std()), rel=1e-12)
        assert (robust[name].mean, robust[name].std) == pytest.approx((med, 1.4826 * mad), rel=1e-12)
    assert robust["euclidean"].std < plain["euclidean"].std / 5


def test_memory_blocks_at_their_smallest_and_a_budget_of_one_element():
    from dualclip.scoring.matching import block_elements, block_side, blocks

    assert block_elements(0.0) == 1 and block_elements(1.0) == 2**20 // 4
    assert block_side(512.0, 10, 1) == 1  # at most `most`, even 1
    assert block_side(1.0, 1, 10**9) == 2**20 // 4  # one column: the whole budget along the other side
    assert blocks(5, 1) == [(0, 1), (1, 2), (2, 3), (3, 4), (4, 5)]


def test_an_unknown_distance_is_named_with_the_distances_there_are():
    from dualclip.scoring.matching import distance_parts

    said = r"^unknown distance 'manhattan'; choose one of cosine, euclidean, layernorm, hybrid$"
    with pytest.raises(ValueError, match=said):
        distance_parts("manhattan")
    with pytest.raises(ValueError, match=said):
        bank_distances([torch.zeros(1, 2, 3)], [torch.zeros(4, 3)], "manhattan")


def test_combining_parts_over_the_run_keeps_their_dtype_and_a_constant_part_is_only_centred():
    from dualclip.scoring.matching import combine_parts

    x = torch.tensor([[1.0, 2.0, 4.0, 5.0]])
    flat = torch.full((1, 4), 7.0)  # no spread: centred, never divided by 0
    got = combine_parts({"cosine": x, "euclidean": flat})
    want = ((x - 3.0) / x.std(unbiased=False) + (flat - 7.0)) / 2
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


def test_neighbourhood_means_of_size_5_on_a_grid_that_is_not_square_equal_a_brute_force():
    """The mean over the size x size square around each patch, only patches inside the grid counted."""
    from dualclip.scoring.matching import neighbourhood_mean

    g = torch.Generator().manual_seed(3)
    h, w, c = 4, 7, 3
    tokens = torch.randn(2, h * w, c, generator=g)
    got = neighbourhood_mean(tokens, (h, w), 5)
    grid = tokens.reshape(2, h, w, c)
    for i in range(h):
        for j in range(w):
            window = grid[:, max(0, i - 2) : i + 3, max(0, j - 2) : j + 3].reshape(2, -1, c)
            torch.testing.assert_close(got[:, i * w + j], window.mean(1), rtol=0, atol=1e-6)
    assert torch.equal(neighbourhood_mean(tokens, (h, w), 1), tokens)


def test_neighbourhood_sizes_and_distances_that_do_not_exist_are_named():
    from dualclip.errors import ConfigError
    from dualclip.scoring.matching import neighbourhood_mean

    tokens = torch.zeros(1, 15, 2)
    for size in (2, 7):
        with pytest.raises(
            ConfigError,
            match=rf"^neighbourhood={size} does not fit the feature grid \(3 x 5\): choose an odd size at most 5$",
        ):
            neighbourhood_mean(tokens, (3, 5), size)
    with pytest.raises(ValueError, match=r"^unknown distance 'manhattan'; choose one of cosine, euclidean, layernorm"):
        to_match_space(tokens, (3, 5), "manhattan", 1)
    with pytest.raises(
        ValueError, match=r"^'hybrid' has no matching space of its own: use distance_parts\(\) for its parts$"
    ):
        to_match_space(tokens, (3, 5), "hybrid", 1)
