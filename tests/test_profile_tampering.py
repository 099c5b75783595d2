"""A saved profile is one consistent pair of files: swapped, edited or malformed parts are one ProfileError."""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import TINY, set_field, unseal_profile
from dualclip import DetectorConfig, DualClipDetector
from dualclip.errors import ConfigError
from dualclip.profile import JSON_DIGEST, PROFILE_JSON, PROFILE_TENSORS, TENSORS_DIGEST, ProfileError

CFG = DetectorConfig(
    backbone=TINY,
    pretrained=None,
    progress=False,
    memory_bank_size=None,
    distance="hybrid",
    neighbourhood=3,
    tta=True,
    adaptation={"num_images": 4, "steps": 2},
)


def _backbone():
    from dualclip.backbone import build_clip_backbone

    torch.manual_seed(0)
    return build_clip_backbone(TINY, pretrained=None, image_size=None)


@pytest.fixture(scope="module")
def saved(tmp_path_factory, texture_set):
    """Two profiles of the same backbone and settings, fitted on different normal images."""
    images, _, labels = texture_set
    normal = [im for im, y in zip(images, labels, strict=True) if y == 0]
    root = tmp_path_factory.mktemp("profiles")
    backbone = _backbone()
    DualClipDetector(CFG, backbone=backbone).fit(normal[:4]).save(root / "a")
    DualClipDetector(CFG, backbone=backbone).fit(normal[2:]).save(root / "b")
    return root


@pytest.fixture
def profile(saved, tmp_path):
    return shutil.copytree(saved / "a", tmp_path / "a")


def _load(path):
    return DualClipDetector.load(path, backbone=_backbone())


def _edit(path, change):
    doc = json.loads((path / PROFILE_JSON).read_text())
    change(doc)
    (path / PROFILE_JSON).write_text(json.dumps(doc))


def test_an_untampered_profile_names_its_tensors_and_loads(profile):
    import hashlib

    from safetensors import safe_open

    doc = json.loads((profile / PROFILE_JSON).read_text())
    assert doc[TENSORS_DIGEST] == hashlib.sha256((profile / PROFILE_TENSORS).read_bytes()).hexdigest()
    with safe_open(profile / PROFILE_TENSORS, "pt") as f:
        assert len(f.metadata()[JSON_DIGEST]) == 64
    assert _load(profile).matching() == ("hybrid", (3,))


def test_tensors_of_another_profile_are_refused(profile, saved):
    shutil.copy(saved / "b" / PROFILE_TENSORS, profile / PROFILE_TENSORS)
    with pytest.raises(ProfileError, match="profile.json and tensors.safetensors do not belong together: tensors"):
        _load(profile)


@pytest.mark.parametrize(
    "change",
    [
        pytest.param(lambda d: d.update(neighbourhood=[1]) or d["config"].update(neighbourhood=[1]), id="nbhd-1"),
        pytest.param(lambda d: d.update(neighbourhood=[5]) or d["config"].update(neighbourhood=[5]), id="nbhd-5"),
        pytest.param(lambda d: d.update(neighbourhood=[1001]) or d["config"].update(neighbourhood=[1001]), id="1001"),
        pytest.param(lambda d: d.update(image_size=128) or d["config"].update(image_size=128), id="image-size"),
        pytest.param(lambda d: d["config"].update(alpha=0.9), id="alpha"),
    ],
)
def test_edited_settings_in_profile_json_are_refused(profile, change):
    _edit(profile, change)
    with pytest.raises(ProfileError, match=r"do not belong together: profile.json is not the document"):
        _load(profile)


def test_swapped_bank_tensors_are_refused(profile):
    t = load_file(profile / PROFILE_TENSORS)
    t["bank.cosine.0.0"], t["bank.euclidean.0.0"] = t["bank.euclidean.0.0"], t["bank.cosine.0.0"]
    save_file(t, profile / PROFILE_TENSORS, metadata={JSON_DIGEST: "0" * 64})
    with pytest.raises(ProfileError, match="tensors.safetensors is not the tensors file profile.json was saved with"):
        _load(profile)


def test_an_old_profile_without_digests_loads_with_a_warning(profile, caplog):
    unseal_profile(profile)
    with caplog.at_level(logging.WARNING, logger="dualclip"):
        det = _load(profile)
    assert det.matching() == ("hybrid", (3,))
    assert "holds no digests binding profile.json and tensors.safetensors" in caplog.text


def test_a_digest_on_one_file_only_is_refused(profile):
    _edit(profile, lambda d: d.pop(TENSORS_DIGEST))
    with pytest.raises(ProfileError, match="do not belong together: tensors.safetensors is not the tensors file"):
        _load(profile)


def _cast(name, dtype):
    return lambda t: {**t, name: t[name].to(dtype)}


def _narrow(*names):
    return lambda t: {**t, **{n: t[n][:, :-1].contiguous() for n in names}}


def _drop(*keys):
    def change(doc):
        target = doc
        for k in keys[:-1]:
            target = target[k]
        del target[keys[-1]]
        return doc

    return change


def _both(key, value):
    return lambda d: set_field(key, value=value)(set_field("config", key, value=value)(d))


# each forged field (digests removed, as an older profile has none) is one ProfileError naming it
@pytest.mark.parametrize(
    ("doc", "tensors", "message"),
    [
        (None, _cast("bank.cosine.0.0", torch.float16), "tensor bank.cosine.0.0 must be a non-empty 2-D float32"),
        (None, _cast("bank.euclidean.0.1", torch.float64), "tensor bank.euclidean.0.1 must be a non-empty 2-D float32"),
        (None, _cast("ood.embeddings", torch.float64), "tensor ood.embeddings must be float32"),
        (None, _cast("head.delta", torch.float16), "tensor head.delta must hold finite float32"),
        (None, _narrow("bank.cosine.0.0"), "must have the same layer widths"),
        (None, _narrow("bank.cosine.0.0", "bank.euclidean.0.0"), r"widths \[63, 64, 64, 64\], the model's"),
        (None, _narrow("ood.embeddings"), "ood.embeddings has width 31, the model's global embedding 32"),
        (set_field("head", value=None), None, "config.tta is on but the profile holds no adaptation head"),
        (
            set_field("config", "sigma", value=1e308),
            None,
            r"sigma=1e\+308 is outside \[0, 4096\] pixels",
        ),
        (set_field("config", "sigma", value=65.0), None, "its sigma 65.0 exceeds its image size 64"),
        (_both("image_size", 1e9), None, "image_size must be an integer, got 1000000000.0"),
        (_both("image_size", 100000), None, r"image_size=100000 is outside \[32, 4096\] pixels"),
        (
            set_field("normal_scores", value=[1e308, 0.0, 0.0, 0.0]),
            None,
            "normal_scores must be a list of n_normal=4 finite",
        ),
        (set_field("scale", "position", value=[]), None, "scale.position must be null or a non-empty list of finite"),
        (set_field("config", "use_visual", value="no"), None, "config.use_visual must be true or false, got 'no'"),
        (set_field("config", "use_text", value="no"), None, "use_text must be true or false, got 'no'"),
        (set_field("config", "alpha", value="x"), None, "alpha must be a number, got 'x'"),
        (set_field("config", "feature_layers", value="abc"), None, "feature_layers must be a list of block indices"),
        (
            set_field("config", "neighbourhood", value=[5]),
            None,
            r"it records neighbourhood \[3\], its settings .* \[5\]",
        ),
        (
            set_field("centring", value="ring"),
            None,
            r"it records centring .ring., its settings \(config.centring\) give .none.",
        ),
        (_drop("scale", "patch", "visual"), None, "scale.patch holds no moments for visual, which it scores with"),
        (_drop("scale", "patch", "text"), None, "scale.patch holds no moments for text, which it scores with"),
        (_drop("scale", "patch", "adapted"), None, "scale.patch holds no moments for adapted"),
        (_drop("scale", "image", "map"), None, "scale.image holds no moments for map"),
        (_drop("scale", "image", "text_global"), None, "scale.image holds no moments for text_global"),
        (_drop("scale", "parts", "cosine"), None, "scale.parts holds no moments for cosine"),
        (_both("neighbourhood", [2]), None, r"neighbourhood must be a list of odd integers >= 1, got \[2\]"),
        (_both("neighbourhood", [5]), None, r"neighbourhood sizes \[5\] exceed the model's feature grid 4 x 4"),
    ],
    ids=lambda v: None if callable(v) or v is None else v[:24],
)
def test_a_forged_profile_field_is_one_clear_error(profile, doc, tensors, message):
    unseal_profile(profile, doc=doc, tensors=tensors)
    with pytest.raises(ProfileError, match=message) as err:
        _load(profile)
    assert "\n" not in str(err.value)


def test_settings_refuse_a_huge_image_size_and_a_neighbourhood_beyond_the_grid(tmp_path, tiny_backbone, texture_set):
    from typer.testing import CliRunner

    from dualclip.cli.main import app

    with pytest.raises(ConfigError, match=r"image_size=100000 is outside \[32, 4096\] pixels"):
        DetectorConfig(backbone=TINY, image_size=100000)
    r = CliRunner().invoke(app, ["predict", str(tmp_path), "-o", str(tmp_path / "o"), "--image-size", "100000"])
    assert r.exit_code == 2 and r.output == "error: --image-size 100000 is outside [32, 4096] pixels\n", r.output
    cfg = dataclasses.replace(CFG, tta=False, use_text=False, neighbourhood=5)
    with pytest.raises(
        ConfigError, match=r"neighbourhood=5 does not fit the feature grid \(4 x 4\): choose an odd size at most 4"
    ):
        DualClipDetector(cfg, backbone=tiny_backbone).predict(texture_set[0][:4])


def test_a_profile_json_nested_too_deeply_is_one_clear_error(profile):
    (profile / PROFILE_JSON).write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(ProfileError, match="profile.json cannot be read: its JSON is nested too deeply$"):
        _load(profile)
