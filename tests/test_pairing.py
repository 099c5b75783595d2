"""Partner selection under recurring defects and duplicates (real ImageNet features: effnet-lite0), and the
mutual-pairs source itself against a brute-force search (random features).

A defect that recurs across the set (here: the same synthetic defect on many images) must not erase itself
through the choice of partners; a defective image and its copy are never
each other's partner.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import unseal_profile
from dualclip import DetectorConfig, DualClipDetector
from dualclip.data.synthetic import make_texture_set
from dualclip.scoring.reference import pair_references
from dualclip.scoring.sources import Matching, MutualPairs


def _recurring(n_normal=12, n_defective=8, seed=0):
    """Textures; the defective ones all carry the same bright blob at the same place."""
    images, _, _ = make_texture_set(n_normal + n_defective, 0, 128, seed=seed)
    out = []
    for i, img in enumerate(images):
        a = np.asarray(img).copy()
        if i >= n_normal:
            a[40:60, 70:92] = 250
        out.append(Image.fromarray(a))
    return out, np.array([0] * n_normal + [1] * n_defective)


@pytest.fixture(scope="module")
def backbone():
    pytest.importorskip("efficientnet_lite_pytorch")
    from dualclip.backbone import EffNetLite0Backbone

    return EffNetLite0Backbone(image_size=128)


def _scores(backbone, images, **settings):
    cfg = DetectorConfig(backbone="effnet-lite0", progress=False, **settings)
    return DualClipDetector(cfg, backbone=backbone).score_images(images).image_scores.numpy()


@pytest.mark.parametrize("k", [1, 3])
def test_recurring_defect_scores_above_normal_with_random_partners(backbone, k):
    """8 of 20 images carry the same defect at the same place: random partners still find it."""
    images, labels = _recurring()
    for seed in (0, 1, 2):
        s = _scores(backbone, images, k=k, seed=seed)
        assert s[labels == 1].mean() > 2 * s[labels == 0].mean(), (k, seed)


def test_full_mutual_scoring_holds_below_30_percent_recurrence(backbone):
    """k = "all" keeps the mean of the closest 30% of references: a defect on fewer than 30% of the images
    stands out, one on 40% is matched by enough copies to vanish (a documented limit). Measured with the plain
    cosine distance, whose scores are distances (ratios mean something); the hybrid default keeps the 40%
    defect at 1.3x the normal images' mean."""
    images, labels = _recurring(n_normal=16, n_defective=4)  # 20%
    for distance in ("cosine", "hybrid"):
        s = _scores(backbone, images, k="all", distance=distance, neighbourhood=3)
        assert s[labels == 1].mean() > 2 * s[labels == 0].mean(), distance
    images, labels = _recurring(n_normal=12, n_defective=8)  # 40%
    s = _scores(backbone, images, k="all", distance="cosine", neighbourhood=3)
    assert s[labels == 1].mean() < 1.2 * s[labels == 0].mean()


def test_pairing_is_no_setting_and_no_option():
    from typer.testing import CliRunner

    from dualclip.cli.main import app

    with pytest.raises(TypeError, match="pairing"):
        DetectorConfig(pairing="random")
    r = CliRunner().invoke(app, ["predict", "x.png", "-o", "o", "--pairing", "random"])
    assert r.exit_code == 2 and "No such option" in r.output and "--pairing" in r.output


def test_a_profile_saved_with_the_pairing_setting_still_loads(backbone, tmp_path):
    import json

    images, _ = _recurring(n_normal=4, n_defective=0)
    cfg = DetectorConfig(backbone="effnet-lite0", progress=False, plain_weight=0.0)  # no plain view back then
    DualClipDetector(cfg, backbone=backbone).fit(images).save(tmp_path / "p")
    doc = json.loads((tmp_path / "p" / "profile.json").read_text())
    doc["config"]["pairing"] = "random"  # what a profile saved while the setting existed holds
    unseal_profile(tmp_path / "p", doc=lambda _: doc)
    det = DualClipDetector.load(tmp_path / "p", backbone=backbone)
    assert "pairing" not in det.config.to_dict() and det.predict(images[:1])[0].score is not None


def test_a_defect_and_its_copy_are_never_partners(backbone):
    images, _ = _recurring(n_normal=9, n_defective=1)
    with_copy = images + [images[-1].copy()]

    def run(images, seed, tolerance):
        # a plain distance: its scores are distances, comparable across runs (hybrid's are z-scores over the run)
        cfg = DetectorConfig(
            backbone="effnet-lite0", progress=False, seed=seed, duplicate_tolerance=tolerance, distance="euclidean"
        )
        return DualClipDetector(cfg, backbone=backbone).score_images(images)

    # a seed whose random pairs put the two copies together when the duplicate check is off
    seed = next(s for s in range(100) if run(with_copy, s, -1.0).run.references[9] == [10])
    off = run(with_copy, seed, -1.0).image_scores.numpy()
    r = run(with_copy, seed, 0.5)
    s = r.image_scores.numpy()
    assert r.run.duplicate_pairs == 1 and r.run.references[9] != [10] and r.run.references[10] != [9]
    assert set(np.argsort(s)[-2:].tolist()) == {9, 10}  # both copies score highest
    alone = run(images, seed, 0.5).image_scores.numpy()
    assert s[9] >= 0.8 * alone[9] and s[10] >= 0.8 * alone[9]  # the score it has without the copy
    assert off[9] < 0.5 * alone[9]  # without the check the copies erase each other
    default = DetectorConfig(backbone="effnet-lite0", progress=False, seed=seed)  # hybrid: run-relative scores
    s = DualClipDetector(default, backbone=backbone).score_images(with_copy).image_scores.numpy()
    assert set(np.argsort(s)[-2:].tolist()) == {9, 10}  # the default, too, ranks both copies highest


def _forbidding(n: int, *pairs: tuple[int, int]) -> torch.Tensor:
    """``(n, n)`` marks of near-duplicate pairs, both ways."""
    forbidden = torch.zeros(n, n, dtype=torch.bool)
    for a, b in pairs:
        forbidden[a, b] = forbidden[b, a] = True
    return forbidden


def test_mutual_pairs_keep_near_duplicates_apart_and_score_each_image_by_its_partner(monkeypatch):
    """Six images of one layer, k = 1, images 0/1 and 2/3 marked as near-duplicates, under a seed whose pairs
    put 0 with 1 when nothing is marked: the partners are ``pair_references``' under the marks (0 and 1 apart),
    each patch scores its Euclidean distance to the nearest patch of the partner, every pair is matched under
    the matching's memory budget, and the two pairs kept apart are counted (an integer)."""
    import dualclip.scoring.sources as sources

    budgets = []
    real = sources.reference_scores

    def spy(*args, **kwargs):
        budgets.append(kwargs["memory_mb"])
        return real(*args, **kwargs)

    monkeypatch.setattr(sources, "reference_scores", spy)
    x = torch.randn(6, 9, 4, generator=torch.Generator().manual_seed(0))
    forbidden = _forbidding(6, (0, 1), (2, 3))
    seed = next(s for s in range(100) if pair_references(6, 1, s)[0] == [1])
    matching = Matching("euclidean", (1,), memory_mb=7.0)
    found = MutualPairs(1, "min", seed, forbidden).visual_scores(matching.spaces([x], (3, 3)), (3, 3), matching)
    assert found.references == pair_references(6, 1, seed, forbidden=forbidden)
    assert all(not forbidden[a, b] for a, refs in enumerate(found.references) for b in refs)
    assert found.references[0] != [1]
    want = torch.stack(
        [torch.cdist(x[a].double(), x[r[0]].double()).amin(dim=1) for a, r in enumerate(found.references)]
    )
    torch.testing.assert_close(found.scores.double(), want, rtol=0, atol=1e-5)
    assert budgets == [7.0]
    assert found.duplicate_pairs == 2 and type(found.duplicate_pairs) is int
    assert found.centring == "none"


def test_mutual_pairs_fuse_hybrid_parts_by_the_runs_robust_moments():
    """Hybrid, two sizes, two layers, robust: each part's scores (the partners' nearest distances, averaged
    over the sizes) are standardised by their lower median and MAD and averaged; the run's mean and standard
    deviation would give other scores."""
    g = torch.Generator().manual_seed(1)
    grid = (3, 3)
    layers = [torch.randn(5, 9, 4, generator=g), torch.randn(5, 9, 3, generator=g)]
    matching = Matching("hybrid", (1, 3), robust=True)
    spaces = matching.spaces(layers, grid)
    found = MutualPairs(1, "min", 0, _forbidding(5)).visual_scores(spaces, grid, matching)
    refs = found.references

    def nearest(part, space, a, b):  # (P,): image a's patches to image b's nearest, in one size's space[l]
        if part == "cosine":  # per layer (1 - cos) / 2, averaged over the layers
            return torch.stack([((1 - t[a].double() @ t[b].double().T) / 2).amin(dim=1) for t in space]).mean(0)
        both = [torch.cat([t[i] for t in space], dim=-1).double() for i in (a, b)]  # the concatenated layers
        return torch.cdist(*both).amin(dim=1)

    raw = {
        part: torch.stack(
            [torch.stack([nearest(part, space, a, r[0]) for a, r in enumerate(refs)]) for space in spaces[part]]
        ).mean(dim=0)
        for part in matching.parts
    }

    def robust(x):
        v = np.sort(x.numpy().reshape(-1))
        med = v[(v.size - 1) // 2]
        return (x - med) / (1.4826 * np.sort(np.abs(v - med))[(v.size - 1) // 2])

    torch.testing.assert_close(found.scores.double(), sum(robust(x) for x in raw.values()) / 2, rtol=0, atol=1e-5)
    plain = sum((x - x.mean()) / x.std(unbiased=False) for x in raw.values()) / 2
    assert float((plain - found.scores.double()).abs().max()) > 1e-2
