"""ONNX export of the one-pass image encoder and scoring with onnxruntime: parity with torch, identity checks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("onnxruntime", reason="the convert extra (onnx, onnxruntime) is not installed")

from typer.testing import CliRunner  # noqa: E402

from conftest import TINY  # noqa: E402
from dualclip import DetectorConfig  # noqa: E402
from dualclip.backbone import EffNetLite0Backbone, build_clip_backbone  # noqa: E402
from dualclip.cli.main import app  # noqa: E402
from dualclip.detector import DualClipDetector  # noqa: E402
from dualclip.export import OnnxBackbone, export_onnx, onnx_metadata, output_names  # noqa: E402
from dualclip.profile import weights_fingerprint  # noqa: E402

TOL = 1e-4


def _assert_same_features(a, b, tol=TOL):
    assert a.grid == b.grid
    torch.testing.assert_close(a.global_embedding, b.global_embedding, atol=tol, rtol=0)
    if a.patch_embeddings is None:
        assert b.patch_embeddings is None
    else:
        torch.testing.assert_close(a.patch_embeddings, b.patch_embeddings, atol=tol, rtol=0)
    assert len(a.match_features) == len(b.match_features)
    for x, y in zip(a.match_features, b.match_features, strict=True):
        torch.testing.assert_close(x, y, atol=tol, rtol=0)


@pytest.mark.parametrize("kind", ["clip", "effnet", "dinov2"])
def test_export_matches_torch_on_every_output_at_any_batch_size(kind, tmp_path):
    torch.manual_seed(0)
    if kind == "clip":  # random CLIP weights (none can be had here), V-V from block 2
        model = build_clip_backbone(TINY, pretrained=None, image_size=None, vv_start=2).eval()
    elif kind == "effnet":  # the real ImageNet weights
        model = EffNetLite0Backbone(image_size=128).eval()
    else:  # random weights, positions resized from 37 x 37 to 8 x 8 inside the graph
        pytest.importorskip("timm", reason="the dinov2 extra (timm) is not installed")
        from dualclip.backbone import DinoV2Backbone

        model = DinoV2Backbone(pretrained=None, image_size=112).eval()
    path = export_onnx(model, tmp_path / "encoder.onnx")
    meta = onnx_metadata(path)
    assert meta["weights_fingerprint"] == weights_fingerprint(model)
    assert meta["outputs"] == output_names(model)
    assert meta["image_size"] == model.image_size
    runner = OnnxBackbone(model, path)
    x = torch.randn(3, 3, model.image_size, model.image_size)  # exported at batch 2: the batch axis is dynamic
    with torch.inference_mode():
        want = model(x)
    got = runner(x)
    _assert_same_features(got, want)
    assert len(got.match_features) == len(model.feature_layers)
    assert (got.patch_embeddings is not None) == (kind == "clip")


def test_a_file_for_other_weights_or_settings_is_refused(tmp_path):
    torch.manual_seed(0)
    a = build_clip_backbone(TINY, pretrained=None, image_size=None)
    path = export_onnx(a, tmp_path / "a.onnx")
    b = build_clip_backbone(TINY, pretrained=None, image_size=None)
    with torch.no_grad():
        b.model.visual.proj.add_(1e-3)  # other weights
    with pytest.raises(ValueError, match="weights_fingerprint"):
        OnnxBackbone(b, path)
    torch.manual_seed(0)
    c = build_clip_backbone(TINY, pretrained=None, image_size=None, vv_start=3)
    with pytest.raises(ValueError, match="vv_start: file 1, model 3"):
        OnnxBackbone(c, path)
    (tmp_path / "junk.onnx").write_bytes(b"not a model")
    with pytest.raises(ValueError, match="not a readable ONNX file"):
        onnx_metadata(tmp_path / "junk.onnx")


def test_runtime_onnxruntime_scores_like_torch_and_loads_torch_profiles(tmp_path, texture_set):
    images, _, labels = texture_set
    base = dict(backbone="effnet-lite0", image_size=128, progress=False, device="cpu", cache_dir=str(tmp_path))
    torch_det = DualClipDetector(DetectorConfig(**base))
    ort_det = DualClipDetector(DetectorConfig(**base, runtime="onnxruntime"))
    a, b = torch_det.predict(images), ort_det.predict(images)
    assert isinstance(ort_det.backbone, OnnxBackbone)
    assert list(ort_det.backbone.path.parent.glob("*.onnx")) == [ort_det.backbone.path]  # exported once, cached
    np.testing.assert_allclose([p.score for p in b], [p.score for p in a], atol=1e-3)
    np.testing.assert_allclose(b[0].anomaly_map, a[0].anomaly_map, atol=1e-3)
    # a profile fitted with torch runs on onnxruntime (same weights fingerprint)
    normal = [img for img, y in zip(images, labels, strict=True) if not y]
    profile = torch_det.fit(normal).save(tmp_path / "profile")
    loaded = DualClipDetector.load(profile, runtime="onnxruntime")
    assert loaded.config.runtime == "onnxruntime"
    want = torch_det.predict(images[-2:])
    got = loaded.predict(images[-2:])
    np.testing.assert_allclose([p.score for p in got], [p.score for p in want], atol=1e-3)


def test_cli_export_writes_the_profile_model_and_refuses_to_overwrite(tmp_path, texture_set):
    images, _, labels = texture_set
    det = DualClipDetector(DetectorConfig(backbone="effnet-lite0", image_size=96, progress=False, device="cpu"))
    profile = det.fit([img for img, y in zip(images, labels, strict=True) if not y]).save(tmp_path / "p")
    out = tmp_path / "enc.onnx"
    r = CliRunner().invoke(app, ["export", "--format", "onnx", "-o", str(out), "--profile", str(profile)])
    assert r.exit_code == 0, r.output
    meta = onnx_metadata(out)
    assert (meta["image_size"], meta["weights_fingerprint"]) == (96, det.profile_.meta["weights_fingerprint"])
    r = CliRunner().invoke(app, ["export", "-o", str(out), "--profile", str(profile)])
    assert r.exit_code == 2 and "--overwrite" in r.output
    r = CliRunner().invoke(
        app, ["export", "--format", "tflite", "-o", str(tmp_path / "x"), "--backbone", "effnet-lite0"]
    )
    assert r.exit_code == 2 and "onnx is the only export format" in r.output
    r = CliRunner().invoke(
        app, ["predict", str(tmp_path), "-o", str(tmp_path / "o"), "--profile", str(profile), "--onnx-file", str(out)]
    )
    assert r.exit_code == 2 and "onnx_file is only used with runtime='onnxruntime'" in r.output
