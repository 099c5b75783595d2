"""The visual reference's three sources (mutual pairs, golden references, a profile's bank) behind one interface:
each mode's scores equal a direct recomputation, fit and scoring share one bank search, and the matching
gives the same scores under any memory budget."""

from __future__ import annotations

import pytest
import torch

from dualclip import DetectorConfig, DualClipDetector
from dualclip.scoring import bank_distances, match_spaces, nearest_distances, reference_scores, upsample
from dualclip.scoring.reference import aggregate
from dualclip.scoring.sources import GoldenReferences, Matching, MutualPairs, ProfileBank, flat_bank

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
        meta = {"centring": "none"}

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
