"""A profile's plain view: the golden-reference nearest neighbour (224 px, zero padding, 3 x 3 average counting
the padding, Euclidean) mixed into the map in profile units, checked against a brute-force recomputation."""

from __future__ import annotations

import dataclasses
import json
import logging

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import reseal_profile, unseal_profile
from dualclip import DetectorConfig, DualClipDetector
from dualclip.backbone.effnet import EffNetLite0Backbone
from dualclip.errors import ConfigError
from dualclip.profile import PROFILE_JSON, ProfileError
from dualclip.scoring.plain import plain_space

CFG = DetectorConfig(
    backbone="effnet-lite0",
    pretrained=None,
    image_size=64,
    plain_image_size=48,
    plain_weight=0.5,
    memory_bank_size=None,
    progress=False,
)


@pytest.fixture(scope="module")
def split(texture_set):
    images, _, labels = texture_set
    normal = [im for im, y in zip(images, labels, strict=True) if y == 0]
    anomalous = [im for im, y in zip(images, labels, strict=True) if y == 1]
    return normal[:4], normal[4:] + anomalous


@pytest.fixture(scope="module")
def fitted(split):
    return DualClipDetector(CFG).fit(split[0])


def _brute_plain_features(images, size=48):
    """The plain view by hand: an independently built network at ``size`` with its zero padding, the layers
    concatenated, each patch the mean of the 3 x 3 square around it with zeros outside the grid."""
    from dualclip.backbone import extract_features

    net = EffNetLite0Backbone(pretrained=None, image_size=size, border="zero")
    out = extract_features(net, images, keep_patch_embeddings=False)
    h, w = out.grid
    x = torch.cat(out.match_features, dim=-1).reshape(len(images), h, w, -1).double()
    padded = F.pad(x.permute(0, 3, 1, 2), (1, 1, 1, 1)).permute(0, 2, 3, 1)
    mean = sum(padded[:, i : i + h, j : j + w] for i in range(3) for j in range(3)) / 9
    return mean.reshape(len(images), h * w, -1), (h, w)


def _nearest(q, bank):
    """``(N, P)`` Euclidean distance of every query patch to its nearest bank patch (float64, no blocks)."""
    return torch.stack([torch.cdist(qi, bank).amin(dim=1) for qi in q])


def test_plain_space_is_the_zero_padded_3x3_mean_of_the_concatenated_layers():
    g = torch.Generator().manual_seed(0)
    layers = [torch.randn(2, 5 * 7, 3, generator=g), torch.randn(2, 5 * 7, 4, generator=g)]
    got = plain_space(layers, (5, 7))
    x = torch.cat(layers, dim=-1).reshape(2, 5, 7, 7)
    want = torch.zeros_like(x)
    for r in range(5):
        for c in range(7):
            for dr in (-1, 0, 1):
                for dc in (-1, 0, 1):
                    if 0 <= r + dr < 5 and 0 <= c + dc < 7:
                        want[:, r, c] += x[:, r + dr, c + dc]
    torch.testing.assert_close(got, (want / 9).reshape(2, 35, 7), rtol=1e-5, atol=1e-6)


def test_the_plain_view_is_the_brute_force_golden_nearest_neighbour_mixed_half_and_half(fitted, split):
    train, test = split
    det = fitted
    scale = det.profile_.scale
    q, grid = _brute_plain_features(test)
    t, _ = _brute_plain_features(train)
    assert det.profile_.plain.grid == grid
    # the bank: every plain patch of the normal images (no coreset at this size)
    torch.testing.assert_close(det.profile_.plain.bank.double(), t.reshape(-1, t.shape[-1]), rtol=1e-4, atol=1e-5)
    # the units: the moments of every normal patch's distance to the other normal images' patches
    loo = torch.cat([_nearest(t[i : i + 1], torch.cat([t[:i], t[i + 1 :]]).reshape(-1, t.shape[-1])) for i in range(4)])
    assert scale.patch["plain"].mean == pytest.approx(float(loo.mean()), rel=1e-4)
    assert scale.patch["plain"].std == pytest.approx(float(loo.std(unbiased=False)), rel=1e-3)
    result = det.score_images(test)
    d = _nearest(q, t.reshape(-1, t.shape[-1]))
    np.testing.assert_allclose(result.branches.plain.numpy(), d.numpy(), rtol=1e-4, atol=1e-4)
    preds = det.predict(test[:1])
    assert preds[0].branch_maps["plain"].shape == grid and preds.run.branches == ["plain", "visual"]
    # the map: half the main view's map (a profile without the plain view, the same main units), half the plain
    # distances in their normal units upsampled to S, then in the units of the normal images' mixed scores
    main = DualClipDetector(dataclasses.replace(CFG, plain_weight=0.0), backbone=det.backbone).fit(train)
    main_maps = main.score_images(test).maps
    z = (d - scale.patch["plain"].mean) / scale.patch["plain"].std
    up = F.interpolate(z.float().reshape(-1, 1, *grid), size=(64, 64), mode="bilinear", align_corners=False)[:, 0]
    mixed = 0.5 * main_maps + 0.5 * up
    views = scale.image["views"]
    torch.testing.assert_close(result.maps, (mixed - views.mean) / views.std, rtol=1e-4, atol=1e-4)
    want_scores = (mixed.reshape(len(test), -1).amax(dim=1) - views.mean) / views.std
    torch.testing.assert_close(result.image_scores, want_scores, rtol=1e-4, atol=1e-4)
    # the normal images' leave-one-out scores are the units: mean 0, spread 1
    normal = np.array(det.profile_.normal_scores)
    assert normal.mean() == pytest.approx(0.0, abs=1e-6) and normal.std() == pytest.approx(1.0, abs=1e-6)


def test_a_plain_view_profile_scores_alone_as_in_a_batch_and_after_a_save(tmp_path, fitted, split):
    _, test = split
    together = fitted.score_images(test).image_scores
    alone = torch.cat([fitted.score_images([img]).image_scores for img in test])
    torch.testing.assert_close(alone, together, rtol=0, atol=1e-5)
    path = fitted.save(tmp_path / "p.dualclip")
    doc = json.loads((path / PROFILE_JSON).read_text())
    assert doc["config"]["plain_weight"] == 0.5 and doc["config"]["plain_image_size"] == 48
    assert doc["plain"] == {"grid": [6, 6], "patches": 4 * 36, "patches_total": 4 * 36}
    loaded = DualClipDetector.load(path)
    assert loaded.profile_.fingerprint() == fitted.profile_.fingerprint()
    torch.testing.assert_close(loaded.score_images(test).image_scores, together, rtol=0, atol=1e-5)


def test_plain_weight_zero_and_zero_shot_runs_leave_the_main_view_alone(split):
    train, test = split
    off = DualClipDetector(dataclasses.replace(CFG, plain_weight=0.0)).fit(train)
    assert off.profile_.plain is None and "plain" not in off.profile_.scale.patch
    assert off.profile_.meta["config"]["plain_weight"] == 0.0
    zero_shot = [DualClipDetector(dataclasses.replace(CFG, plain_weight=w)).predict(test) for w in (0.0, 0.7)]
    assert [p.score for p in zero_shot[0]] == [p.score for p in zero_shot[1]]
    assert "plain" not in zero_shot[1][0].branch_scores


def test_the_plain_view_needs_a_convolutional_vision_only_backbone(tiny_backbone, split):
    from conftest import TINY

    cfg = DetectorConfig(backbone=TINY, pretrained=None, progress=False, memory_bank_size=None, plain_weight=0.5)
    for c in (cfg, dataclasses.replace(cfg, use_text=False)):
        with pytest.raises(ConfigError, match="has no plain view .* use plain_weight=0"):
            DualClipDetector(c, backbone=tiny_backbone).fit(split[0])
    # a backbone with a plain view and a text tower: the mix is a vision-only profile's
    det = DualClipDetector(cfg, backbone=tiny_backbone)
    det._plain_view = tiny_backbone
    with pytest.raises(ConfigError, match="scores with text: use plain_weight=0"):
        det.fit(split[0])
    with pytest.raises(ValueError, match="plain_weight=1.5 is not a weight in \\[0, 1\\]"):
        DetectorConfig(plain_weight=1.5)
    with pytest.raises(ValueError, match="plain_image_size=16 is outside"):
        DetectorConfig(plain_image_size=16)


def _saved(fitted, tmp_path):
    return fitted.save(tmp_path / "p.dualclip")


def _set(key, value):
    def change(doc):
        doc["config"][key] = value
        return doc

    return change


@pytest.mark.parametrize(
    ("doc", "tensors", "message"),
    [
        (lambda d: {**d, "plain": None}, None, "holds tensor plain.bank but no plain entry"),
        (_set("plain_weight", 0.0), None, "holds a plain view \\(plain\\) but records plain_weight 0.0"),
        (lambda d: {**d, "plain": {**d["plain"], "grid": [6, 7]}}, None, "plain.patches_total must be"),
        (lambda d: {**d, "plain": {**d["plain"], "patches": 3}}, None, "plain.patches is 3 for 144"),
        (None, lambda t: {**t, "plain.owner": torch.full_like(t["plain.owner"], 1)}, "must name at least 2"),
        (None, lambda t: {**t, "plain.owner": t["plain.owner"] + 1}, "must name at least 2 of the n_normal=4"),
        (None, lambda t: {**t, "plain.bank": t["plain.bank"].double()}, "plain.bank must be a non-empty 2-D float32"),
        (None, lambda t: {**t, "plain.bank": t["plain.bank"] * float("nan")}, "plain.bank holds values that are not"),
        (None, lambda t: {**t, "plain.bank": t["plain.bank"] * 1e18}, "plain.bank holds values of magnitude above"),
        (lambda d: {**d, "plain": {**d["plain"], "patches": 144.0}}, None, "plain.patches is 144.0 for 144"),
        (lambda d: {**d, "config": {k: v for k, v in d["config"].items() if k != "plain_weight"}}, None, "name no pl"),
        (
            None,
            lambda t: {**t, "plain.bank": t["plain.bank"][:, :-1].contiguous()},
            "plain view has a 6 x 6 grid of width",
        ),
    ],
)
def test_a_tampered_plain_view_is_one_profile_error(tmp_path, fitted, doc, tensors, message):
    path = _saved(fitted, tmp_path)
    reseal_profile(path, doc=doc, tensors=tensors)  # the digests made again: the field checks must hold
    with pytest.raises(ProfileError, match=message):
        DualClipDetector.load(path)


def test_a_profile_without_the_views_moments_is_refused(tmp_path, fitted):
    path = _saved(fitted, tmp_path)

    def drop(doc):
        del doc["scale"]["image"]["views"]
        return doc

    reseal_profile(path, doc=drop)
    with pytest.raises(ProfileError, match="scale.image holds no moments for views"):
        DualClipDetector.load(path)


def test_a_plain_view_profile_without_digests_is_refused(tmp_path, fitted):
    """Every dualclip that saves a plain view binds the two files: one without digests was edited (a changed
    plain_weight would otherwise score silently in units that no longer hold)."""
    path = _saved(fitted, tmp_path)

    def edit(doc):
        doc["config"]["plain_weight"] = 0.3
        return doc

    unseal_profile(path, doc=edit)
    with pytest.raises(ProfileError, match="holds a plain view but no digests binding"):
        DualClipDetector.load(path)


def test_a_profile_saved_before_the_plain_view_loads_without_it(tmp_path, split, caplog):
    """Profiles that name no plain_weight (saved before it existed) score with the main view alone, whatever the
    backbone's default is now."""
    train, test = split
    det = DualClipDetector(dataclasses.replace(CFG, plain_weight=0.0)).fit(train)
    path = det.save(tmp_path / "old.dualclip")

    def older(doc):
        for key in ("plain_weight", "plain_image_size"):
            del doc["config"][key]
        del doc["plain"]
        return doc

    unseal_profile(path, doc=older)
    with caplog.at_level(logging.WARNING):
        loaded = DualClipDetector.load(path)
    assert loaded.plain_weight() == 0.0 and loaded.profile_.plain is None
    torch.testing.assert_close(loaded.score_images(test).image_scores, det.score_images(test).image_scores)


def test_a_bank_smaller_than_one_plain_view_image_is_refused(split):
    """The plain view's bank must hold more than one image's patches (leave-one-out), also where its grid is
    finer than the main view's."""
    cfg = dataclasses.replace(CFG, image_size=32, plain_image_size=64, memory_bank_size=20)
    with pytest.raises(
        ConfigError, match="memory_bank_size=20 is too small: .* one image's 64 patches \\(of the plain"
    ):
        DualClipDetector(cfg).fit(split[0])


def test_plain_view_refusals_come_before_any_image_is_processed(split, monkeypatch):
    """A bank too small for the plain view, and a backbone without one, are refused before the first feature
    pass (a large plain_image_size would otherwise cost the whole pass first)."""
    from dualclip import detector as D

    real = D.extract_features
    normal = {img.tobytes() for img in split[0]}

    def probes_only(backbone, images, *args, **kwargs):  # a blank probe of the grid, never a normal image
        assert not any(img.convert("RGB").tobytes() in normal for img in images), "a normal image was processed"
        return real(backbone, images, *args, **kwargs)

    monkeypatch.setattr(D, "extract_features", probes_only)
    cfg = dataclasses.replace(CFG, image_size=32, plain_image_size=64, memory_bank_size=20)
    with pytest.raises(ConfigError, match="too small: .* \\(of the plain view"):
        DualClipDetector(cfg).fit(split[0])


def test_fit_under_onnxruntime_resolves_the_same_plain_view_as_torch(tmp_path, split):
    pytest.importorskip("onnxruntime")
    cfg = dataclasses.replace(CFG, plain_weight=None)
    torch_fit = DualClipDetector(cfg).fit(split[0])
    ort_fit = DualClipDetector(dataclasses.replace(cfg, runtime="onnxruntime", cache_dir=str(tmp_path))).fit(split[0])
    assert torch_fit.plain_weight() == ort_fit.plain_weight() == 0.5
    assert ort_fit.profile_.plain is not None and ort_fit.profile_.meta["config"]["plain_weight"] == 0.5
    torch.testing.assert_close(
        ort_fit.score_images(split[1]).image_scores, torch_fit.score_images(split[1]).image_scores, atol=1e-3, rtol=0
    )


def test_outputs_name_the_plain_view(fitted):
    assert fitted.plain_summary() == {
        "weight": 0.5,
        "image_size": 48,
        "grid": [6, 6],
        "bank_patches": 144,
        "bank_patches_total": 144,
    }
    assert fitted.profile_summary()["plain_view"] == fitted.plain_summary()


@pytest.mark.parametrize("image_score", ["max", "top1pct"])
def test_the_units_of_the_mixed_map_are_the_normal_images_mixed_scores(image_score):
    """normal_scale by hand on random branch scores: the main view's map in its units, the plain distances in
    theirs upsampled without smoothing, mixed 0.3 / 0.7, its image score (max or the mean of the top 1%), then
    the moments of those scores."""
    from dualclip.core import BranchScores, Fusion, normal_scale
    from dualclip.scoring import upsample

    g = torch.Generator().manual_seed(0)
    branches = BranchScores(visual=torch.rand(5, 16, generator=g), plain=torch.rand(5, 9, generator=g) * 7 + 3)
    branches.plain_grid = (3, 3)
    fusion = Fusion(0.5, 0.5, "zscore", image_score, 2.0, 20, plain=0.7)
    scale, normal = normal_scale(branches, (4, 4), fusion)
    main = upsample(branches.visual, (4, 4), 20, 2.0)  # the visual branch alone: its own units
    flat = main.reshape(5, -1)
    top = max(1, round(0.01 * 400))

    def score(m):
        return m.amax(dim=1) if image_score == "max" else m.sort(dim=1, descending=True).values[:, :top].mean(dim=1)

    raw_main = score(flat).double()
    main_units = (main.double() - raw_main.mean()) / raw_main.std(unbiased=False)
    p = branches.plain.double()
    z = (p - p.mean()) / p.std(unbiased=False)
    up = F.interpolate(z.reshape(5, 1, 3, 3), size=(20, 20), mode="bilinear", align_corners=False)[:, 0]
    raw = score((0.3 * main_units + 0.7 * up).reshape(5, -1))
    assert scale.image["views"].mean == pytest.approx(float(raw.mean()), rel=1e-5)
    assert scale.image["views"].std == pytest.approx(float(raw.std(unbiased=False)), rel=1e-4)
    np.testing.assert_allclose(normal.numpy(), ((raw - raw.mean()) / raw.std(unbiased=False)).numpy(), atol=1e-4)
    # scored later with these units, the same branch scores give the same scores
    from dualclip.core import fuse_branches

    _, scores = fuse_branches(branches, (4, 4), fusion, scale)
    np.testing.assert_allclose(scores.numpy(), normal.numpy(), atol=1e-5)


def _plain_doc(grid=(2, 3), n=4, rows=None, width=5):
    """A valid plain entry and its tensors (``rows`` patches kept of ``n`` images on ``grid``), as a profile holds."""
    total = n * grid[0] * grid[1]
    rows = total if rows is None else rows
    bank = torch.arange(rows * width, dtype=torch.float32).reshape(rows, width) / 10
    owner = torch.arange(rows, dtype=torch.int64) % n
    return {"grid": list(grid), "patches": rows, "patches_total": total}, {"plain.bank": bank, "plain.owner": owner}


def test_a_valid_plain_entry_is_read_as_it_was_saved():
    from dualclip.profile import MAX_FEATURE, _plain_from_files

    d, t = _plain_doc(grid=(2, 3))
    got = _plain_from_files(d, t, 4)
    assert got.grid == (2, 3) and got.total == 24 and torch.equal(got.bank, t["plain.bank"])
    assert torch.equal(got.owner, t["plain.owner"])
    assert _plain_from_files(None, {}, 4) is None
    # the bounds themselves are valid: a side of 1, a width of 1, two owners, a value of exactly MAX_FEATURE
    d, t = _plain_doc(grid=(1, 6), width=1)
    t["plain.bank"][0, 0] = MAX_FEATURE
    t["plain.owner"] = torch.tensor([0, 1] * 12)
    assert _plain_from_files(d, t, 4).grid == (1, 6)
    d, t = _plain_doc(grid=(4096, 1), n=2, width=1)  # the largest side
    assert _plain_from_files(d, t, 2).grid == (4096, 1)


def _broken(change):
    d, t = _plain_doc()
    change(d, t)
    return d, t


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda d, t: d.clear(), "plain must be {'grid', 'patches', 'patches_total'}, got {}"),
        (lambda d, t: d.update(extra=1), "plain must be {'grid', 'patches', 'patches_total'}, got {'grid': [2, 3], "),
        (lambda d, t: d.update(grid=[2]), "plain.grid must be two sides in [1, 4096], got [2]"),
        (lambda d, t: d.update(grid=[2, 3, 4]), "plain.grid must be two sides in [1, 4096], got [2, 3, 4]"),
        (lambda d, t: d.update(grid=[0, 3]), "plain.grid must be two sides in [1, 4096], got [0, 3]"),
        (lambda d, t: d.update(grid=[2, 4097]), "plain.grid must be two sides in [1, 4096], got [2, 4097]"),
        (lambda d, t: d.update(grid=[True, 3]), "plain.grid must be two sides in [1, 4096], got [True, 3]"),
        (
            lambda d, t: t.update({"plain.bank": torch.zeros(0, 5)}),
            "tensor plain.bank must be a non-empty 2-D float32 tensor, got torch.float32 (0, 5)",
        ),
        (
            lambda d, t: t.update({"plain.bank": torch.zeros(24, 0)}),
            "tensor plain.bank must be a non-empty 2-D float32 tensor, got torch.float32 (24, 0)",
        ),
        (
            lambda d, t: t["plain.bank"].__setitem__((0, 0), float("inf")),
            "tensor plain.bank holds values that are not finite",
        ),
        (
            lambda d, t: t["plain.bank"].__setitem__((0, 0), 1.0001e6),
            "tensor plain.bank holds values of magnitude above 1e+06 (features never are)",
        ),
        (
            lambda d, t: t.update({"plain.owner": t["plain.owner"][:-1]}),
            "tensor plain.owner must be int64 with one entry per plain.bank row (24), got torch.int64 (23,)",
        ),
        (
            lambda d, t: t.update({"plain.owner": t["plain.owner"].int()}),
            "tensor plain.owner must be int64 with one entry per plain.bank row (24), got torch.int32 (24,)",
        ),
        (
            lambda d, t: t.update({"plain.bank": torch.ones(1, 5), "plain.owner": torch.zeros(1, dtype=torch.int64)}),
            "tensor plain.owner must name at least 2 of the n_normal=4 images, got ids 0..0",
        ),
        (
            lambda d, t: t.update({"plain.owner": torch.zeros(24, dtype=torch.int64)}),
            "tensor plain.owner must name at least 2 of the n_normal=4 images, got ids 0..0",
        ),
        (
            lambda d, t: t.update({"plain.owner": t["plain.owner"] - 1}),
            "tensor plain.owner must name at least 2 of the n_normal=4 images, got ids -1..2",
        ),
        (
            lambda d, t: t.update({"plain.owner": t["plain.owner"] + 1}),
            "tensor plain.owner must name at least 2 of the n_normal=4 images, got ids 1..4",
        ),
        (lambda d, t: d.update(patches=23), "plain.patches is 23 for 24 plain.bank rows"),
        (lambda d, t: d.update(patches=24.0), "plain.patches is 24.0 for 24 plain.bank rows"),
        (
            lambda d, t: d.update(patches_total=25),
            "plain.patches_total must be n_normal x the grid's patches (24), got 25",
        ),
        (
            lambda d, t: d.update(grid=[3, 3]),
            "plain.patches_total must be n_normal x the grid's patches (36), got 24",
        ),
    ],
)
def test_each_broken_part_of_a_plain_entry_is_named(change, message):
    from dualclip.profile import _plain_from_files

    d, t = _broken(change)
    with pytest.raises(ValueError) as err:
        _plain_from_files(d, t, 4)
    assert str(err.value).startswith(message)


def test_a_long_plain_entry_is_quoted_to_80_characters():
    from dualclip.profile import _plain_from_files

    d = ["x" * 200]
    with pytest.raises(ValueError) as err:
        _plain_from_files(d, {}, 4)
    assert str(err.value) == "plain must be {'grid', 'patches', 'patches_total'}, got " + str(d)[:80]
    with pytest.raises(ValueError, match="^it holds tensor plain.bank but no plain entry$"):
        _plain_from_files(None, {"plain.bank": torch.zeros(1, 1)}, 4)
