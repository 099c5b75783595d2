"""The visual reference's three sources (mutual pairs, golden references, a profile's bank) behind one interface:
each mode's scores equal a direct recomputation, fit and scoring share one bank search, and the matching
gives the same scores under any memory budget."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dualclip import DetectorConfig, DualClipDetector
from dualclip.profile import Moments, Profile, ProfileError, ScoreScale
from dualclip.scoring import (
    bank_distances,
    bank_distances_batched,
    match_spaces,
    nearest_distances,
    reference_scores,
    upsample,
)
from dualclip.scoring.reference import aggregate
from dualclip.scoring.sources import (
    GoldenReferences,
    Matching,
    MutualPairs,
    ProfileBank,
    bank_scores,
    flat_bank,
)

# visual branch alone, euclidean distance on the raw tokens: the brute force below is one cdist per image
VISUAL = dict(pretrained=None, progress=False, use_text=False, beta=0.0, distance="euclidean", neighbourhood=1)


@pytest.fixture
def images(texture_set):
    return texture_set[0][:6]


def _tokens(det: DualClipDetector, imgs) -> tuple[torch.Tensor, tuple[int, int]]:
    """Each image's matching tokens, layers concatenated: ``(N, P, C)`` (the euclidean space at size 1)."""
    feats = det.features(imgs)
    return torch.cat(feats.match_features, dim=-1), feats.grid


def _brute(query: torch.Tensor, bank: torch.Tensor) -> torch.Tensor:
    """``(P,)`` distance of each query patch to its nearest bank patch."""
    return torch.cdist(query.double(), bank.double()).amin(dim=1).float()


def test_mutual_pairs_score_each_image_by_its_partners(tiny_backbone, images):
    det = DualClipDetector(DetectorConfig(k=3, **VISUAL), backbone=tiny_backbone)
    r = det.score_images(images)
    assert r.run.pairing == "random"
    tokens, grid = _tokens(det, images)
    for i, refs in enumerate(r.run.references):
        want = aggregate(torch.stack([_brute(tokens[i], tokens[j]) for j in refs]), "mean_low30")
        torch.testing.assert_close(r.branches.visual[i], want, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(r.maps, upsample(r.branches.visual, grid, tiny_backbone.image_size, 4.0))


def test_golden_references_score_against_every_golden_patch(tiny_backbone, images):
    det = DualClipDetector(DetectorConfig(**VISUAL), backbone=tiny_backbone)
    r = det.score_images(images[:4], golden=images[4:])
    assert r.run.pairing == "golden" and r.run.references == [[0, 1]] * 4
    tokens, _ = _tokens(det, images)
    bank = tokens[4:].reshape(-1, tokens.shape[-1])
    want = torch.stack([_brute(tokens[i], bank) for i in range(4)])
    torch.testing.assert_close(r.branches.visual, want, rtol=1e-4, atol=1e-4)


def test_profile_bank_scores_in_the_profiles_fixed_units(tiny_backbone, images):
    det = DualClipDetector(DetectorConfig(memory_bank_size=None, **VISUAL), backbone=tiny_backbone).fit(images[:4])
    r = det.score_images(images[4:])
    assert r.run.pairing == "profile"
    tokens, grid = _tokens(det, images)
    bank = tokens[:4].reshape(-1, tokens.shape[-1])
    visual = torch.stack([_brute(tokens[i], bank) for i in (4, 5)])
    torch.testing.assert_close(r.branches.visual, visual, rtol=1e-4, atol=1e-4)
    maps = upsample(r.branches.visual, grid, tiny_backbone.image_size, 4.0)  # a branch alone keeps its units
    scale = det.profile_.scale
    torch.testing.assert_close(r.maps, scale.score.standardize(maps))
    torch.testing.assert_close(r.image_scores, scale.score.standardize(maps.flatten(1).amax(dim=1)))


def test_fit_leave_one_out_uses_the_scoring_bank_search(tiny_backbone, images, monkeypatch):
    """The normal images' leave-one-out scores are profile scoring against the bank without their own patches:
    the same search, here checked against a brute force of each image against the other images."""
    import dualclip.detector as detector_module

    calls = []
    real = detector_module.bank_scores
    monkeypatch.setattr(
        detector_module, "bank_scores", lambda *a, **kw: calls.append(kw.get("memory_mb")) or real(*a, **kw)
    )
    det = DualClipDetector(DetectorConfig(memory_bank_size=None, **VISUAL), backbone=tiny_backbone).fit(images[:4])
    assert calls == [det.config.match_memory_mb]
    tokens, grid = _tokens(det, images[:4])
    loo = torch.stack([_brute(tokens[i], torch.cat([tokens[j] for j in range(4) if j != i])) for i in range(4)])
    maps = upsample(loo, grid, tiny_backbone.image_size, 4.0)
    raw = maps.flatten(1).amax(dim=1)
    want = (raw.double() - raw.double().mean()) / raw.double().std(unbiased=False)
    torch.testing.assert_close(
        torch.tensor(det.profile_.normal_scores, dtype=torch.float64), want, rtol=1e-4, atol=1e-4
    )


def test_every_source_answers_through_one_interface():
    torch.manual_seed(0)
    grid = (3, 4)
    layers = [torch.randn(4, 12, 5), torch.randn(4, 12, 3)]
    matching = Matching("cosine", (1, 3))
    spaces = matching.spaces(layers, grid)
    pairs = MutualPairs(1, "min", 0, torch.zeros(4, 4, dtype=torch.bool))
    golden = GoldenReferences(matching.spaces([t[:2] for t in layers], grid), grid)

    class _Profile:  # what ProfileBank.of reads of a profile
        bank = flat_bank(matching.spaces([t[2:] for t in layers], grid))
        centring = "none"

        class scale:
            parts: dict = {}

            @staticmethod
            def position_offsets():
                return None

    bank = ProfileBank.of(_Profile)
    for source, refs in ((pairs, None), (golden, [[0, 1]] * 4), (bank, [[]] * 4)):
        found = source.visual_scores(spaces, grid, matching)
        assert found.scores.shape == (4, 12) and found.centring == "none"
        if refs is not None:
            assert found.references == refs
    assert (pairs.scale, golden.scale, bank.scale) == (None, None, _Profile.scale)
    assert [s.references_into_run for s in (pairs, golden, bank)] == [True, False, False]


@pytest.mark.parametrize("distance", ["cosine", "euclidean", "layernorm"])
def test_matchings_under_a_tiny_memory_budget_equal_the_unblocked_ones(distance):
    torch.manual_seed(1)
    grid = (10, 15)
    layers = [torch.randn(5, 150, 8), torch.randn(5, 150, 4)]
    space = match_spaces(layers, grid, distance, (3,))[0]
    tiny = 4 / 2**20  # one float: one pair per batch, its 150 x 150 matrices in blocks of MIN_BLOCK patches
    da, db = nearest_distances([t[:3] for t in space], [t[2:] for t in space], distance)
    ta, tb = nearest_distances([t[:3] for t in space], [t[2:] for t in space], distance, memory_mb=tiny)
    torch.testing.assert_close(ta, da, rtol=0, atol=1e-6)
    torch.testing.assert_close(tb, db, rtol=0, atol=1e-6)
    refs = [[1, 2], [0, 3], [4, 1], [2, 4], [3, 0]]
    torch.testing.assert_close(
        reference_scores(space, refs, distance=distance, memory_mb=tiny),
        reference_scores(space, refs, distance=distance),
        rtol=0,
        atol=1e-6,
    )
    bank = [t[3:].reshape(-1, t.shape[-1]) for t in space]
    torch.testing.assert_close(
        bank_distances(space, bank, distance, memory_mb=tiny), bank_distances(space, bank, distance), rtol=0, atol=1e-6
    )


def test_detector_results_do_not_depend_on_the_memory_budget(images):
    """Pairs, golden references and a profile's fit and scoring under a budget of one float (a 10 x 10 grid:
    every matching in blocks of MIN_BLOCK patches) equal those under the default budget."""
    from dualclip.backbone import build_clip_backbone
    from dualclip.scoring.matching import MIN_BLOCK

    torch.manual_seed(0)
    backbone = build_clip_backbone("dualclip-tiny-test", pretrained=None, image_size=160)
    tiny = 4 / 2**20

    def runs(budget):
        cfg = DetectorConfig(pretrained=None, progress=False, k=3, match_memory_mb=budget, distance="hybrid")
        det = DualClipDetector(cfg, backbone=backbone)
        pairs = det.score_images(images, class_name="texture")
        assert pairs.grid[0] * pairs.grid[1] > MIN_BLOCK
        golden = det.score_images(images[:4], class_name="texture", golden=images[4:])
        fitted = DualClipDetector(cfg, backbone=backbone).fit(images[:4], class_name="texture")
        profile = fitted.score_images(images[4:])
        return [pairs.maps, pairs.image_scores, golden.maps, golden.image_scores, profile.maps, profile.image_scores]

    names = ["pairs maps", "pairs scores", "golden maps", "golden scores", "profile maps", "profile scores"]
    for name, got, want in zip(names, runs(tiny), runs(512.0), strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("bad", [0, -1.0, float("nan"), True])
def test_match_memory_mb_must_be_a_positive_number(bad):
    with pytest.raises(ValueError, match="match_memory_mb must be a positive number of MiB"):
        DetectorConfig(match_memory_mb=bad)


def _nearest(query: list[torch.Tensor], bank: list[torch.Tensor], part: str) -> torch.Tensor:
    """Brute force in float64: ``(N, P)`` distance of each query patch (``query[l]``: ``(N, P, C_l)``) to its
    nearest bank patch (``bank[l]``: ``(M, C_l)``) in the matching space of ``part``: cosine per layer,
    ``(1 - cos) / 2``; layernorm per layer, Euclidean; both averaged over the layers; euclidean of the
    concatenated layers."""
    q, b = [t.double() for t in query], [t.double() for t in bank]
    if part == "euclidean":
        q, b = [torch.cat(q, dim=-1)], [torch.cat(b, dim=-1)]
    per_layer = []
    for ql, bl in zip(q, b, strict=True):
        d = (1 - ql @ bl.T) / 2 if part == "cosine" else torch.cdist(ql, bl.expand(ql.shape[0], -1, -1))
        per_layer.append(d.amin(dim=-1))
    return torch.stack(per_layer).mean(dim=0)


def _over_sizes(query_spaces, bank_spaces, part: str) -> torch.Tensor:
    """:func:`_nearest` averaged over the neighbourhood sizes (``[s][l]`` lists)."""
    return torch.stack([_nearest(q, b, part) for q, b in zip(query_spaces, bank_spaces, strict=True)]).mean(dim=0)


def _flat(space: list[torch.Tensor]) -> list[torch.Tensor]:
    return [t.reshape(-1, t.shape[-1]) for t in space]


def _leave_one_out(spaces, part: str) -> torch.Tensor:
    """``(R, P)``: each image of ``spaces[s][l]`` (``(R, P, C_l)``) against the other images' patches only."""
    r = spaces[0][0].shape[0]
    rows = []
    for i in range(r):
        mine = [[t[i : i + 1] for t in space] for space in spaces]
        others = [[torch.cat([t[j] for j in range(r) if j != i]) for t in space] for space in spaces]
        rows.append(_over_sizes(mine, others, part)[0])
    return torch.stack(rows)


def _lower_median(x: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """The lower median by sorting (``torch.median``'s), over ``dim`` or all values."""
    v = np.sort(x.numpy().reshape(-1) if dim is None else x.numpy(), axis=0 if dim is None else dim)
    n = v.shape[0 if dim is None else dim]
    return torch.from_numpy(np.asarray(np.take(v, (n - 1) // 2, axis=0 if dim is None else dim)))


def test_golden_references_fuse_parts_by_the_runs_robust_moments_and_centre_by_their_own_leave_one_out():
    """Hybrid distance, robust standardisation, two sizes, two layers, a grid that is not square: the parts of
    the test images' scores are standardised by their median and MAD and averaged; the references' own
    leave-one-out scores, standardised by the same moments, give the position medians that are subtracted."""
    g = torch.Generator().manual_seed(0)
    grid = (3, 4)
    matching = Matching("hybrid", (1, 3), robust=True, centring="position")
    golden = matching.spaces([torch.randn(3, 12, 5, generator=g), torch.randn(3, 12, 3, generator=g)], grid)
    test = matching.spaces([torch.randn(4, 12, 5, generator=g), torch.randn(4, 12, 3, generator=g)], grid)
    found = GoldenReferences(golden, grid).visual_scores(test, grid, matching)

    raw = {p: _over_sizes(test[p], [_flat(s) for s in golden[p]], p) for p in matching.parts}
    loo = {p: _leave_one_out(golden[p], p) for p in matching.parts}
    moments = {}
    for p, x in raw.items():
        med = float(_lower_median(x))
        moments[p] = (med, float(_lower_median((x - med).abs())) * 1.4826)

    def fused(scores):
        return sum((scores[p] - c) / s for p, (c, s) in moments.items()) / len(moments)

    want = fused(raw) - _lower_median(fused(loo), dim=0)
    assert found.centring == "position" and found.references == [[0, 1, 2]] * 4
    torch.testing.assert_close(found.scores.double(), want, rtol=0, atol=1e-5)
    # unlike the run's mean and standard deviation: the robust moments are the ones applied
    mean_std = {p: (float(x.mean()), float(x.std(unbiased=False))) for p, x in raw.items()}
    assert max(abs(moments[p][1] - mean_std[p][1]) for p in raw) > 1e-3


@pytest.mark.parametrize("references", [1, 2])
def test_golden_references_centre_only_with_two_references_or_more(references):
    """One layer, the layernorm distance: one reference has no leave-one-out scores, so it is not centred (and
    says so); two are, each by its distance to the other; no centring asked, none applied."""
    g = torch.Generator().manual_seed(1)
    grid = (2, 3)
    layers = [torch.randn(5, 6, 4, generator=g)]
    for centring in ("position", "none"):
        matching = Matching("layernorm", (1,), centring=centring)
        golden = matching.spaces([t[:references] for t in layers], grid)
        test = matching.spaces([t[references:] for t in layers], grid)
        found = GoldenReferences(golden, grid).visual_scores(test, grid, matching)
        raw = _over_sizes(test["layernorm"], [_flat(s) for s in golden["layernorm"]], "layernorm")
        applied = centring if references > 1 else "none"
        want = (
            raw - _lower_median(_leave_one_out(golden["layernorm"], "layernorm"), dim=0) if applied != "none" else raw
        )
        assert found.centring == applied
        assert found.references == [list(range(references))] * (5 - references)
        torch.testing.assert_close(found.scores.double(), want, rtol=0, atol=1e-5)


def test_bank_searches_run_under_the_matchings_budget_and_leave_one_out_only_to_centre(monkeypatch):
    """Every bank search of golden references and of a profile's bank gets the matching's memory budget; golden
    references search their own leave-one-out only when they centre; the matching's progress bar is shown
    when asked, and only then."""
    import dualclip.scoring.sources as sources

    calls = []
    real = sources.bank_distances

    def spy(*args, **kwargs):
        calls.append((kwargs["memory_mb"], kwargs["query_owner"] is not None, kwargs["progress"] is not None))
        return real(*args, **kwargs)

    monkeypatch.setattr(sources, "bank_distances", spy)
    g = torch.Generator().manual_seed(2)
    grid = (2, 3)
    layers = [torch.randn(5, 6, 4, generator=g), torch.randn(5, 6, 2, generator=g)]
    for centring, progress in (("none", None), ("ring", True), ("position", False)):
        matching = Matching("cosine", (1, 3), centring=centring, memory_mb=7.0)
        golden = GoldenReferences(matching.spaces([t[:2] for t in layers], grid), grid)
        test = matching.spaces([t[2:] for t in layers], grid)
        calls.clear()
        if progress is None:
            golden.visual_scores(test, grid, matching)
        else:
            golden.visual_scores(test, grid, matching, progress)
        searches = [(7.0, False, bool(progress))] * 2  # one per neighbourhood size
        if centring != "none":
            searches += [(7.0, True, False)] * 2
        assert calls == searches, centring
    calls.clear()
    profile = ProfileBank(flat_bank(matching.spaces([t[:2] for t in layers], grid)), {}, None, "none", None)
    profile.visual_scores(test, grid, matching)
    assert calls == [(7.0, False, False)] * 2


def test_bank_scores_average_the_sizes_and_search_with_the_given_nearest():
    """Each part's scores are the mean over the neighbourhood sizes of the nearest-patch distances; another
    search (``nearest``) is handed each size's query and bank and its answers are used; with owners, an image
    never matches its own patches."""
    g = torch.Generator().manual_seed(3)
    grid = (3, 4)
    matching = Matching("hybrid", (1, 3))
    spaces = matching.spaces([torch.randn(3, 12, 5, generator=g), torch.randn(3, 12, 3, generator=g)], grid)
    bank = flat_bank(matching.spaces([torch.randn(2, 12, 5, generator=g), torch.randn(2, 12, 3, generator=g)], grid))
    want = {p: _over_sizes(spaces[p], bank[p], p) for p in matching.parts}
    for p, got in bank_scores(spaces, bank).items():
        torch.testing.assert_close(got.double(), want[p], rtol=0, atol=1e-5)

    handed = []

    def nearest(query, patches, part):
        handed.append((part, query, patches))
        return bank_distances_batched(query, patches, part) + 1.0  # marked: its answers are the ones used

    got = bank_scores(spaces, bank, nearest=nearest)
    assert [(p, q, b) for p, q, b in handed] == [
        (p, spaces[p][s], bank[p][s]) for p in matching.parts for s in range(len(matching.sizes))
    ]
    for p in matching.parts:
        torch.testing.assert_close(got[p].double(), want[p] + 1.0, rtol=0, atol=1e-5)

    own = bank_scores(spaces, flat_bank(spaces), torch.arange(3), torch.arange(3).repeat_interleave(12))
    for p in matching.parts:
        torch.testing.assert_close(own[p].double(), _leave_one_out(spaces[p], p), rtol=0, atol=1e-5)


def _profile(bank, position, meta) -> Profile:
    """A profile holding only what :class:`ProfileBank` reads of it."""
    parts = {"cosine": Moments(0.2, 0.05), "euclidean": Moments(3.0, 0.5)}
    scale = ScoreScale(patch={"visual": Moments(0.0, 1.0)}, parts=parts, position=position)
    owner = torch.zeros(next(iter(bank.values()))[0][0].shape[0], dtype=torch.long)
    return Profile(bank=bank, bank_owner=owner, scale=scale, normal_scores=[], threshold=None, meta=meta)


def test_a_profile_bank_scores_in_its_units_with_its_offsets_on_a_grid_that_is_not_square():
    """One layer, hybrid, two sizes, a 3 x 4 grid: each part standardised by the profile's moments, averaged,
    its offsets subtracted; ``nearest`` replaces the search; offsets of another grid are refused by name."""
    g = torch.Generator().manual_seed(4)
    grid = (3, 4)
    matching = Matching("hybrid", (1, 3))
    bank = flat_bank(matching.spaces([torch.randn(3, 12, 6, generator=g)], grid))
    test = matching.spaces([torch.randn(2, 12, 6, generator=g)], grid)
    offsets = torch.linspace(-1.0, 1.0, 12)
    profile = _profile(bank, offsets.tolist(), {"centring": "ring", "config": {"centring": "ring"}})
    source = ProfileBank.of(profile)
    found = source.visual_scores(test, grid, matching)
    parts = profile.scale.parts
    raw = {p: _over_sizes(test[p], bank[p], p) for p in matching.parts}
    want = sum((raw[p] - parts[p].mean) / parts[p].std for p in matching.parts) / 2 - offsets.double()
    assert found.centring == "ring" and found.references == [[], []]
    torch.testing.assert_close(found.scores.double(), want, rtol=0, atol=1e-5)

    searched = []

    def nearest(query, patches, part):
        searched.append(part)
        return bank_distances_batched(query, patches, part) + 0.5

    marked = source.visual_scores(test, grid, matching, nearest=nearest)
    assert searched == ["cosine", "cosine", "euclidean", "euclidean"]
    shift = sum(0.5 / parts[p].std for p in matching.parts) / 2
    torch.testing.assert_close(marked.scores.double(), want + shift, rtol=0, atol=1e-5)

    damaged = ProfileBank.of(_profile(bank, [0.0] * 5, {"centring": "ring"}))
    with pytest.raises(ProfileError) as err:
        damaged.visual_scores(test, grid, matching)
    assert str(err.value) == (
        "the profile's positional offsets cover 5 positions, this model's grid 3 x 4: the profile is damaged"
    )


def test_a_profile_bank_is_labelled_with_the_centring_its_offsets_were_fitted_with():
    """Without offsets nothing is centred, whatever the profile records; with them, the centring its settings
    record, else the one recorded beside them, else ``"position"`` (a profile that names none)."""
    bank = flat_bank(Matching("cosine", (1,)).spaces([torch.randn(2, 4, 3)], (2, 2)))
    cases = [
        (None, {"centring": "ring", "config": {"centring": "ring"}}, "none"),
        ([0.0] * 4, {"centring": "ring", "config": {"centring": "ring"}}, "ring"),
        ([0.0] * 4, {"config": {"centring": "ring"}}, "ring"),
        ([0.0] * 4, {"centring": "ring", "config": {}}, "ring"),
        ([0.0] * 4, {"config": {"centring": None}}, "position"),
    ]
    for position, meta, label in cases:
        profile = _profile(bank, position, meta)
        source = ProfileBank.of(profile)
        assert (profile.centring, source.centring) == (label, label), meta
        assert (source.offsets is None) == (position is None)
        if position is not None:
            assert source.offsets.dtype == torch.float32 and source.offsets.tolist() == position


def test_a_profile_bank_moves_to_each_device_once_and_is_searched_there():
    """The bank is moved once per device (the ``meta`` device stands in for an accelerator), and features on a
    device are matched against the bank's copy on that device."""
    grid = (2, 3)
    matching = Matching("cosine", (1,))
    bank = flat_bank(matching.spaces([torch.randn(2, 6, 4)], grid))
    source = ProfileBank(bank, {}, None, "none", None)
    cpu = source.bank_on(torch.device("cpu"))
    assert source.bank_on(torch.device("cpu")) is cpu and cpu["cosine"][0][0].device.type == "cpu"
    meta = source.bank_on(torch.device("meta"))
    assert meta is not cpu and source.bank_on(torch.device("meta")) is meta
    assert [t.device.type for s in meta["cosine"] for t in s] == ["meta"]
    torch.testing.assert_close(source.bank_on(torch.device("cpu"))["cosine"][0][0], bank["cosine"][0][0])

    seen = []

    def nearest(query, patches, part):
        seen.append(patches[0].device.type)
        return bank_distances_batched(query, patches, part)

    test = {"cosine": [[t.to("meta") for t in s] for s in matching.spaces([torch.randn(2, 6, 4)], grid)["cosine"]]}
    found = source.visual_scores(test, grid, matching, nearest=nearest)
    assert seen == ["meta"] and found.scores.device.type == "meta" and found.scores.shape == (2, 6)


def test_the_batched_bank_search_finds_the_nearest_patch_in_any_chunk_of_the_bank():
    """The export graph's search (:func:`bank_distances_batched`) over a bank cut into several chunks equals the
    per-image search and a brute force, for both distances; the nearest patches lie in different chunks."""
    from dualclip.scoring.matching import MIN_BLOCK

    g = torch.Generator().manual_seed(11)
    query = [torch.randn(3, 5, 4, generator=g), torch.randn(3, 5, 6, generator=g)]
    m = 5 * MIN_BLOCK
    bank = [torch.randn(m, 4, generator=g), torch.randn(m, 6, generator=g)]
    for distance in ("euclidean", "cosine"):
        whole = bank_distances_batched(query, bank, distance, chunk=m)
        chunked = bank_distances_batched(query, bank, distance, chunk=MIN_BLOCK)
        torch.testing.assert_close(chunked, whole, rtol=0, atol=1e-5)
        torch.testing.assert_close(chunked, bank_distances(query, bank, distance), rtol=0, atol=1e-5)
        if distance == "euclidean":  # one group: every layer concatenated
            q, b = torch.cat(query, -1).double(), torch.cat(bank, -1).double()
            brute = torch.cdist(q, b.expand(3, -1, -1)).amin(-1)
            where = torch.cdist(q, b.expand(3, -1, -1)).argmin(-1) // MIN_BLOCK
            assert len(where.unique()) > 2  # the nearest patches lie in several chunks
            torch.testing.assert_close(chunked.double(), brute, rtol=0, atol=1e-5)


def test_the_batched_bank_search_refuses_a_bank_of_other_layers_than_the_query():
    g = torch.Generator().manual_seed(2)
    query = [torch.randn(2, 5, 4, generator=g), torch.randn(2, 5, 6, generator=g)]
    bank = [torch.randn(30, 4, generator=g)]  # one layer for a query of two: no silent truncation
    with pytest.raises(ValueError, match="zip"):
        bank_distances_batched(query, bank, "cosine")
