"""Positional centring of the visual scores: brute-force medians, and the detector's three modes (mutual
pairs, golden references, a saved profile) against a plain recomputation."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from conftest import TINY, unseal_profile
from dualclip import DetectorConfig, DualClipDetector
from dualclip.data.images import pixel_digest
from dualclip.scoring import bank_distances, match_spaces, pair_references, reference_scores
from dualclip.scoring.position import border_rings, centre, positional_offsets

CFG = DetectorConfig(
    backbone=TINY, pretrained=None, progress=False, use_text=False, memory_bank_size=None, distance="cosine"
)


def lower_median(x: np.ndarray, axis: int = 0) -> np.ndarray:
    """The lower median (torch.median's), by sorting."""
    return np.take(np.sort(x, axis=axis), (x.shape[axis] - 1) // 2, axis=axis)


def test_border_rings_count_the_distance_to_the_nearest_edge():
    want = np.array(
        [
            [0, 0, 0, 0, 0],
            [0, 1, 1, 1, 0],
            [0, 1, 2, 1, 0],
            [0, 1, 1, 1, 0],
            [0, 0, 0, 0, 0],
        ]
    )
    np.testing.assert_array_equal(border_rings((5, 5)).reshape(5, 5).numpy(), want)
    np.testing.assert_array_equal(border_rings((2, 3)).numpy(), np.zeros(6))


def test_border_rings_of_a_grid_that_is_not_square_count_rows_and_columns_without_a_torch_warning():
    import warnings

    want = np.array(
        [
            [0, 0, 0, 0, 0, 0, 0],
            [0, 1, 1, 1, 1, 1, 0],
            [0, 1, 1, 1, 1, 1, 0],
            [0, 0, 0, 0, 0, 0, 0],
        ]
    )
    always = torch.is_warn_always_enabled()
    torch.set_warn_always(True)  # torch warns once per process: here, every time
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # meshgrid without its indexing warns that it will soon be required
            rings = border_rings((4, 7))
            tall = border_rings((7, 4))
    finally:
        torch.set_warn_always(always)
    np.testing.assert_array_equal(rings.reshape(4, 7).numpy(), want)
    np.testing.assert_array_equal(tall.reshape(7, 4).numpy(), want.T)


def test_offsets_are_medians_per_position_and_per_ring():
    g = torch.Generator().manual_seed(0)
    scores = torch.rand(7, 4 * 5, generator=g)
    s = scores.numpy()
    np.testing.assert_allclose(positional_offsets(scores, (4, 5), "position").numpy(), lower_median(s))
    rings = border_rings((4, 5)).numpy()
    want = np.empty(20, dtype=np.float32)
    for r in np.unique(rings):
        values = np.sort(s[:, rings == r].reshape(-1))
        want[rings == r] = values[(values.size - 1) // 2]  # the lower median, as documented
    np.testing.assert_allclose(positional_offsets(scores, (4, 5), "ring").numpy(), want)
    assert positional_offsets(scores, (4, 5), "none") is None
    np.testing.assert_array_equal(centre(scores, None).numpy(), s)
    with pytest.raises(ValueError, match="centring must be one of"):
        positional_offsets(scores, (4, 5), "rows")
    with pytest.raises(ValueError, match="grid 3 x 3 has 9"):
        positional_offsets(scores, (3, 3), "position")


def test_a_response_every_image_shows_at_one_place_is_removed_and_a_single_one_kept():
    scores = torch.zeros(5, 9)
    scores[:, 0] = 3.0  # every image is hot at position 0 (a border)
    scores[2, 4] = 2.0  # one image has a defect at position 4
    out = centre(scores, positional_offsets(scores, (3, 3), "position"))
    assert torch.equal(out[:, 0], torch.zeros(5))
    assert out[2, 4] == 2.0 and out.argmax() == 2 * 9 + 4


def test_mutual_pairs_subtract_the_runs_median_at_each_position(tiny_backbone, texture_set):
    images = texture_set[0]
    det = DualClipDetector(dataclasses.replace(CFG, centring="position"), backbone=tiny_backbone)
    run = det.score_images(images)
    got = run.branches.visual
    feats = det.features(images)
    refs = run.run.references  # the partners of the run (seeded over the images' pixel-digest order)
    order = sorted(range(len(images)), key=lambda i: pixel_digest(images[i]))
    canonical = pair_references(len(images), 1, 0)
    assert refs == [[order[canonical[order.index(i)][0]]] for i in range(len(images))]
    (space,) = match_spaces(feats.match_features, feats.grid, "cosine", (3,))
    raw = reference_scores(space, refs, distance="cosine")
    want = raw.numpy() - lower_median(raw.numpy())
    np.testing.assert_allclose(got.numpy(), want, atol=1e-6)
    assert det.score_images(images).run.centring == "position"
    off = DualClipDetector(dataclasses.replace(CFG, centring="none"), backbone=tiny_backbone)
    plain = off.score_images(images)
    np.testing.assert_allclose(plain.branches.visual.numpy(), raw.numpy(), atol=1e-6)
    assert plain.run.centring == "none"


def test_golden_references_take_their_offsets_from_their_own_leave_one_out_scores(tiny_backbone, texture_set):
    images = texture_set[0]
    golden, test = images[:3], images[3:]
    det = DualClipDetector(dataclasses.replace(CFG, centring="position"), backbone=tiny_backbone)
    got = det.score_images(test, golden=golden).branches.visual
    gf, tf = det.features(golden), det.features(test)
    (gs,) = match_spaces(gf.match_features, gf.grid, "cosine", (3,))
    (ts,) = match_spaces(tf.match_features, tf.grid, "cosine", (3,))
    bank = [t.reshape(-1, t.shape[-1]) for t in gs]
    p = gf.grid[0] * gf.grid[1]

    def loo(i, layer):  # brute force: reference i against the other references' patches only
        others = torch.cat([layer[j] for j in range(3) if j != i])
        return torch.cdist(layer[i], others).pow(2).div(4).amin(dim=1)  # (1 - cos) / 2 on unit vectors

    normal = np.stack([torch.stack([loo(i, layer) for layer in gs]).mean(0).numpy() for i in range(3)])
    raw = bank_distances(ts, bank, "cosine")
    want = raw.numpy() - lower_median(normal)
    assert normal.shape == (3, p)
    np.testing.assert_allclose(got.numpy(), want, atol=1e-5)


def test_a_profile_keeps_its_normal_offsets_and_scores_an_image_alone_as_in_a_batch(
    tmp_path, tiny_backbone, texture_set
):
    images = texture_set[0]
    train, test = images[:4], images[4:]
    det = DualClipDetector(dataclasses.replace(CFG, centring="ring"), backbone=tiny_backbone).fit(train)
    offsets = det.profile_.scale.position_offsets()
    assert det.profile_.meta["centring"] == "ring"
    # the offsets are the ring medians of the normal images' leave-one-out visual scores
    plain = DualClipDetector(dataclasses.replace(CFG, centring="none"), backbone=tiny_backbone).fit(train)
    feats = plain.features(train)
    (space,) = match_spaces(feats.match_features, feats.grid, "cosine", (3,))
    loo = bank_distances(
        space,
        plain.profile_.bank["cosine"][0],
        "cosine",
        query_owner=torch.arange(4),
        bank_owner=plain.profile_.bank_owner,
    )
    np.testing.assert_allclose(offsets.numpy(), positional_offsets(loo, feats.grid, "ring").numpy(), atol=1e-6)
    # prediction subtracts them; an image alone scores as in a batch; a saved profile keeps them
    together = det.predict(test)
    want = plain.predict(test[:1])[0].branch_maps["visual"].reshape(-1) - offsets.numpy()
    np.testing.assert_allclose(together[0].branch_maps["visual"].reshape(-1), want, atol=1e-5)
    assert abs(det.predict(test[1:2])[0].score - together[1].score) <= 1e-5
    det.save(tmp_path / "p")
    again = DualClipDetector.load(tmp_path / "p", backbone=tiny_backbone)
    first = again.predict(test[:1])
    assert abs(first[0].score - together[0].score) <= 1e-5
    assert first.run.centring == "ring"
    # a document that records the centring in its settings only still says which centring its offsets apply
    unseal_profile(tmp_path / "p", doc=lambda doc: {k: v for k, v in doc.items() if k != "centring"})
    again = DualClipDetector.load(tmp_path / "p", backbone=tiny_backbone)
    first = again.predict(test[:1])
    assert first.run.centring == "ring" and abs(first[0].score - together[0].score) <= 1e-5
    assert again.profile_.centring == again.config.centring == "ring"


def test_reflect_border_gives_a_flat_image_nearly_the_same_features_at_its_border_as_inside():
    from dualclip.backbone.effnet import EffNetLite0Backbone

    flat = torch.full((1, 3, 128, 128), 0.3)
    zero = EffNetLite0Backbone(image_size=128, border="zero")  # the bundled ImageNet weights
    reflect = EffNetLite0Backbone(image_size=128, border="reflect")
    spreads = []
    for layer_zero, layer_reflect in zip(zero(flat).match_features, reflect(flat).match_features, strict=True):
        spreads.append(
            (
                float((layer_zero[0] - layer_zero[0].mean(0)).abs().max()),
                float((layer_reflect[0] - layer_reflect[0].mean(0)).abs().max()),
            )
        )
    # block 4 (receptive field inside the 32 px of mirror): the border patches of a flat image are the inner
    # ones (measured 0.008 against 19.0); block 10 sees past the mirror to the network's own padding, and
    # still differs less than half as much (4.4 against 10.5)
    assert spreads[0][1] < 0.01 * spreads[0][0]
    assert spreads[1][1] < 0.5 * spreads[1][0]
    assert reflect(flat).grid == zero(flat).grid == (16, 16)


def test_reflect_border_is_the_network_on_the_mirrored_image_cropped_back():
    import torch.nn.functional as F

    from dualclip.backbone.effnet import EffNetLite0Backbone

    x = torch.randn(2, 3, 96, 96, generator=torch.Generator().manual_seed(0))
    reflect = EffNetLite0Backbone(pretrained=None, image_size=96, border="reflect")
    plain = EffNetLite0Backbone(pretrained=None, image_size=160, border="zero")  # same random weights
    assert reflect.border_pad == 32
    big = plain(F.pad(x, (32, 32, 32, 32), mode="reflect"))
    h, w = big.grid
    for got, full in zip(reflect(x).match_features, big.match_features, strict=True):
        want = full.reshape(2, h, w, -1)[:, 4 : h - 4, 4 : w - 4].reshape(2, -1, full.shape[-1])
        torch.testing.assert_close(got, want)


def test_reflect_border_is_refused_for_a_transformer_and_old_profiles_keep_zero_padding(tmp_path, texture_set):
    from dualclip.build import build_backbone

    with pytest.raises(ValueError, match="border='reflect' pads a convolutional backbone"):
        build_backbone(DetectorConfig(backbone=TINY, pretrained=None, border="reflect"))
    cfg = DetectorConfig(
        backbone="effnet-lite0", pretrained=None, image_size=64, progress=False, border="zero", plain_weight=0.0
    )  # older profiles have no plain view
    det = DualClipDetector(cfg).fit(texture_set[0][:3])
    assert det.profile_.meta["config"]["border"] == "zero"
    assert det.profile_.meta["config"]["distance"] == det.matching()[0]  # the defaults it used are saved
    det.save(tmp_path / "p")
    doc = (tmp_path / "p" / "profile.json").read_text()
    import json

    saved = json.loads(doc)
    del saved["config"]["border"]  # a profile made before the setting existed
    saved["config"]["distance"] = None
    unseal_profile(tmp_path / "p", doc=lambda _: saved)
    again = DualClipDetector.load(tmp_path / "p")
    assert again.config.border == "zero" and again.backbone.border == "zero"
    assert again.config.distance == saved["distance"]


def test_cli_fit_takes_the_matching_settings_and_refuses_unknown_values(tmp_path, texture_set):
    from typer.testing import CliRunner

    from dualclip.cli.main import app

    d = tmp_path / "normal"
    d.mkdir()
    for i, img in enumerate(texture_set[0][:3]):
        img.save(d / f"{i}.png")
    common = ["fit", str(d), "--backbone", "effnet-lite0", "--pretrained", "none", "--image-size", "64", "-q"]
    bad = CliRunner().invoke(app, [*common, "-o", str(tmp_path / "bad"), "--centring", "rows"])
    assert bad.exit_code == 2 and "centring must be one of" in bad.output
    ok = CliRunner().invoke(
        app,
        [*common, "-o", str(tmp_path / "p"), "--centring", "ring", "--border", "zero", "--hybrid-norm", "robust"],
    )
    assert ok.exit_code == 0, ok.output
    config = DualClipDetector.load(tmp_path / "p").config
    assert (config.centring, config.border, config.hybrid_norm) == ("ring", "zero", "robust")


@pytest.mark.parametrize(
    ("tamper", "message"),
    [
        (lambda d: d["scale"].update(position=[1.0, 2.0]), "cover 2 positions"),
        (lambda d: d["scale"].update(position=None), "holds no positional offsets"),
        (lambda d: d["config"].pop("centring") and d.update(centring="none"), "but records centring 'none'"),
        (lambda d: d.update(image_size=-5), "records image_size -5"),
    ],
    ids=["offsets-of-another-grid", "centring-without-offsets", "offsets-recorded-as-none", "image-size"],
)
def test_a_profile_whose_offsets_or_size_do_not_fit_its_model_is_refused_at_load(
    tmp_path, tiny_backbone, texture_set, tamper, message
):

    from dualclip.profile import ProfileError

    det = DualClipDetector(dataclasses.replace(CFG, centring="position"), backbone=tiny_backbone).fit(
        texture_set[0][:3]
    )
    det.save(tmp_path / "p")
    unseal_profile(tmp_path / "p", doc=lambda doc: tamper(doc) or doc)
    with pytest.raises(ProfileError, match=message):
        DualClipDetector.load(tmp_path / "p", backbone=tiny_backbone)


def test_ring_offsets_are_each_rings_lower_median_on_a_grid_of_three_rings_in_the_scores_dtype():
    """Brute force: every position's offset is the lower median of all scores at positions of its ring (its
    distance from the nearest border); a 6 x 7 grid has three rings."""
    g = torch.Generator().manual_seed(6)
    grid = (6, 7)
    scores = torch.randn(5, 42, generator=g, dtype=torch.float64)
    got = positional_offsets(scores, grid, "ring")
    ring = [min(i, j, grid[0] - 1 - i, grid[1] - 1 - j) for i in range(grid[0]) for j in range(grid[1])]
    assert sorted(set(ring)) == [0, 1, 2]
    for pos in range(42):
        vals = sorted(scores[:, [q for q in range(42) if ring[q] == ring[pos]]].reshape(-1).tolist())
        assert got[pos].item() == vals[(len(vals) - 1) // 2], pos
    assert got.dtype == torch.float64
    with pytest.raises(ValueError, match=r"^scores have 40 positions, the grid 6 x 7 has 42$"):
        positional_offsets(scores[:, :40], grid, "ring")


def test_centring_keeps_the_scores_dtype():
    scores = torch.tensor([[1.0, 2.0, 3.0]], dtype=torch.float16)
    out = centre(scores, torch.tensor([0.5, 0.25, 1.0]))
    assert out.dtype == torch.float16 and out.tolist() == [[0.5, 1.75, 2.0]]
