"""Backbone: V-V attention, equivalence with open_clip, weight loading."""

from __future__ import annotations

import math
import os
import pickle

import open_clip
import pytest
import torch
import torch.nn.functional as F

from conftest import TINY
from dualclip.backbone import (
    CLIP_PRESETS,
    ClipBackbone,
    EffNetLite0Backbone,
    WeightsUnavailableError,
    build_clip_backbone,
    load_open_clip,
)
from dualclip.scoring.matching import to_match_space


def _images(n=3, size=64, seed=0):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("vv_start", [1, 2, 4])
def test_global_embedding_is_encode_image_bit_for_bit(tiny_backbone, vv_start):
    bb = ClipBackbone(tiny_backbone.model, tiny_backbone.tokenizer, TINY, None, vv_start=vv_start)
    x = _images()
    with torch.no_grad():
        ours = bb(x).global_embedding
        ref = bb.model.encode_image(x)
    assert torch.equal(ours, ref)


def _reference_vv(model, images, vv_start, layers):
    """Plain re-computation of the V-V path from the block weights, head by head."""
    visual = model.visual
    x = visual._embeds(images)
    z = x.clone()
    outs = {}
    for idx, blk in enumerate(visual.transformer.resblocks, start=1):
        if idx >= vv_start:
            if idx == vv_start:
                z = x.clone()
            h = F.layer_norm(x, blk.ln_1.normalized_shape, blk.ln_1.weight, blk.ln_1.bias, blk.ln_1.eps)
            width = h.shape[-1]
            heads = blk.attn.num_heads
            d = width // heads
            wv = blk.attn.in_proj_weight[2 * width :]
            bv = blk.attn.in_proj_bias[2 * width :]
            v = h @ wv.T + bv
            per_head = []
            for j in range(heads):
                vj = v[..., j * d : (j + 1) * d]
                attn = torch.softmax(vj @ vj.transpose(-1, -2) / math.sqrt(d), dim=-1)
                per_head.append(attn @ vj)
            out = torch.cat(per_head, dim=-1) @ blk.attn.out_proj.weight.T + blk.attn.out_proj.bias
            z = z + out
        x = blk(x)
        outs[idx] = (z if idx >= vv_start else x).clone()
    last = outs[len(visual.transformer.resblocks)][:, 1:]
    patch = visual.ln_post(last) @ visual.proj
    return outs, patch


@pytest.mark.parametrize("vv_start", [1, 3])
def test_vv_attention_matches_plain_recomputation(tiny_backbone, vv_start):
    layers = (1, 2, 3, 4)
    bb = ClipBackbone(tiny_backbone.model, tiny_backbone.tokenizer, TINY, None, layers, vv_start)
    x = _images()
    with torch.no_grad():
        out = bb(x)
        ref_layers, ref_patch = _reference_vv(bb.model, x, vv_start, layers)
    torch.testing.assert_close(out.patch_embeddings, ref_patch, rtol=1e-5, atol=1e-5)
    for got, layer in zip(out.match_features, layers, strict=True):
        torch.testing.assert_close(got, ref_layers[layer][:, 1:], rtol=1e-5, atol=1e-5)
    # the V-V path really differs from the original path's tokens
    with torch.no_grad():
        x_tokens = bb.model.visual.transformer(bb.model.visual._embeds(x))[:, 1:]
    assert not torch.allclose(out.match_features[-1], x_tokens, atol=1e-3)


def test_default_feature_layers_are_evenly_spaced(tiny_backbone):
    assert tiny_backbone.feature_layers == (1, 2, 3, 4)
    out = tiny_backbone(_images(2))
    assert out.grid == (4, 4)
    assert len(out.match_features) == 4
    for f in out.match_features:
        assert f.shape == (2, 16, 64)
    assert out.patch_embeddings.shape == (2, 16, 32)


def test_neighbourhood_average_matches_manual():
    tokens = torch.randn(1, 9, 5)
    got = to_match_space(tokens, (3, 3), "cosine", 3)
    t = F.normalize(tokens, dim=-1)[0].reshape(3, 3, 5)
    # centre patch: mean of all 9; corner (0,0): mean of its 4 in-grid neighbours
    centre = F.normalize(t.reshape(9, 5).mean(0), dim=0)
    corner = F.normalize(t[:2, :2].reshape(4, 5).mean(0), dim=0)
    torch.testing.assert_close(got[0, 4], centre)
    torch.testing.assert_close(got[0, 0], corner)


@pytest.mark.parametrize("suffix", [".pt", ".bin", ".safetensors"])
def test_checkpoint_file_loads_identically(tiny_backbone, tmp_path, suffix):
    state = tiny_backbone.model.state_dict()
    path = tmp_path / f"weights{suffix}"
    if suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    else:
        torch.save({"state_dict": state} if suffix == ".bin" else state, path)
    bb = build_clip_backbone(TINY, pretrained=str(path), image_size=None)
    assert bb.weights_id == str(path.resolve())
    x = _images(2)
    assert torch.equal(bb(x).global_embedding, tiny_backbone(x).global_embedding)


class _Evil:
    marker = ""

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_checkpoint_with_pickled_code_is_refused(tmp_path):
    path = tmp_path / "evil.pt"
    evil = _Evil()
    evil.marker = str(tmp_path / "pwned")
    with open(path, "wb") as fh:
        pickle.dump({"state_dict": evil}, fh)
    with pytest.raises(ValueError, match="cannot be loaded into") as err:
        build_clip_backbone(TINY, pretrained=str(path), image_size=None)
    assert isinstance(err.value.__cause__, pickle.UnpicklingError)
    assert not (tmp_path / "pwned").exists()  # the pickled code never ran


def test_positional_embedding_interpolated_for_other_size(tiny_backbone, tmp_path):
    path = tmp_path / "w.pt"
    torch.save(tiny_backbone.model.state_dict(), path)
    bb = build_clip_backbone(TINY, pretrained=str(path), image_size=96)
    assert bb.image_size == 96 and bb.grid == (6, 6)
    out = bb(_images(1, size=96))
    assert out.patch_embeddings.shape == (1, 36, 32)
    assert torch.isfinite(out.patch_embeddings).all()


def test_missing_file_and_unknown_names_give_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="checkpoint file not found"):
        build_clip_backbone(TINY, pretrained=str(tmp_path / "nope.pt"), image_size=None)
    with pytest.raises(ValueError, match="unknown open_clip model"):
        load_open_clip("no-such-model", None, 224)
    with pytest.raises(ValueError, match="unknown pretrained tag"):
        load_open_clip("ViT-B-16-plus-240", "no_such_tag", 240)


def test_download_failure_names_model_tag_file_and_flag(tmp_path):
    # HF_HUB_OFFLINE=1 (conftest) and an empty cache: the real loading path must fail clearly.
    with pytest.raises(WeightsUnavailableError) as err:
        load_open_clip("ViT-B-16-plus-240", "laion400m_e32", 240, cache_dir=str(tmp_path))
    msg = str(err.value)
    assert "ViT-B-16-plus-240" in msg and "laion400m_e32" in msg and "pretrained=/path/to/file" in msg
    assert open_clip.get_pretrained_cfg("ViT-B-16-plus-240", "laion400m_e32")["hf_hub"].rstrip("/") in msg


def test_effnet_backbone_features():
    pytest.importorskip("efficientnet_lite_pytorch")
    bb = EffNetLite0Backbone(image_size=128, border="zero")
    images = torch.randn(2, 3, 128, 128)
    out = bb(images)
    assert out.patch_embeddings is None and not bb.has_text
    assert out.grid == (16, 16)
    assert [f.shape[-1] for f in out.match_features] == [40, 112]
    # raw block outputs (magnitude kept), with the network's own zero padding: block 4 at its stride-8 grid
    net = bb.net
    with torch.no_grad():
        x = net._swish(net._bn0(net._conv_stem(images)))
        for block in net._blocks[:5]:
            x = block(x)
    torch.testing.assert_close(out.match_features[0], x.flatten(2).transpose(1, 2))
    with pytest.raises(NotImplementedError):
        bb.encode_text(["x"])


def test_open_clip_models_are_not_modified(tiny_backbone):
    """The wrapper adds no module and changes no parameter or buffer of the open_clip model: every tensor equals
    the one of a plain open_clip model built under the same seed."""
    from dualclip.backbone.clip import RANDOM_WEIGHTS_SEED

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(RANDOM_WEIGHTS_SEED)
        ref = open_clip.create_model(TINY, pretrained=None)
    wrapped = tiny_backbone.model
    assert sum(p.numel() for p in ref.parameters()) > 0
    assert [n for n, _ in wrapped.named_modules()] == [n for n, _ in ref.named_modules()]
    for kind in ("named_parameters", "named_buffers"):
        got, want = dict(getattr(wrapped, kind)()), dict(getattr(ref, kind)())
        assert sorted(got) == sorted(want), kind
        for name, tensor in want.items():
            assert got[name].shape == tensor.shape, name
            assert got[name].dtype == tensor.dtype, name
            assert torch.equal(got[name], tensor), f"{name} differs from open_clip's"


@pytest.mark.parametrize("preset", sorted(CLIP_PRESETS))
def test_quick_gelu_follows_the_weights_for_every_preset_tag(preset):
    """Weights trained with QuickGELU (every `openai` tag) are built with it; the others with exact GELU."""
    from dualclip.backbone.clip import uses_quick_gelu

    tags = open_clip.list_pretrained_tags_by_model(preset)
    assert tags
    for tag in tags:
        want = bool((open_clip.get_pretrained_cfg(preset, tag) or {}).get("quick_gelu", False))
        assert uses_quick_gelu(preset, tag) is want
        if tag == "openai":
            assert want
    assert uses_quick_gelu("ViT-L-14-336", "openai") and not uses_quick_gelu("ViT-B-16-plus-240", "laion400m_e32")
    assert uses_quick_gelu(f"{preset}-quickgelu", None) and not uses_quick_gelu(preset, None)


def test_quick_gelu_reaches_the_model(tiny_backbone, tmp_path):
    from open_clip.transformer import QuickGELU

    def acts(bb):
        return {type(b.mlp.gelu).__name__ for b in bb.model.visual.transformer.resblocks}

    assert acts(tiny_backbone) == {"GELU"}
    path = tmp_path / "w.pt"
    torch.save(tiny_backbone.model.state_dict(), path)
    quick = build_clip_backbone(TINY, pretrained=str(path), image_size=None, quick_gelu=True)
    assert acts(quick) == {QuickGELU.__name__}
    assert acts(build_clip_backbone(TINY, pretrained=str(path), image_size=None)) == {"GELU"}


def test_effnet_scores_at_the_smallest_image_size_with_a_reflected_border():
    from PIL import Image

    from dualclip import DetectorConfig, DualClipDetector

    images = [Image.new("RGB", (40, 40), (i * 40, 90, 200 - i * 30)) for i in range(3)]
    det = DualClipDetector(DetectorConfig(backbone="effnet-lite0", image_size=32, progress=False))
    result = det.score_images(images)
    assert tuple(result.maps.shape) == (3, 32, 32) and torch.isfinite(result.image_scores).all()
    assert det.backbone.border == "reflect"


def test_a_file_that_is_no_weights_file_is_one_line_that_says_so(tmp_path):
    from dualclip.backbone import EffNetLite0Backbone

    text = tmp_path / "notes.txt"
    text.write_text("hello")
    evil = tmp_path / "evil.pt"
    marker = _Evil()
    marker.marker = str(tmp_path / "pwned")
    with open(evil, "wb") as fh:
        pickle.dump({"state_dict": marker}, fh)
    said = {
        text: "not a weights file of this model (KeyError: ",
        evil: "it holds pickled objects other than tensors, and dualclip loads tensors only (weights_only=True)",
    }
    for path, why in said.items():
        for build in (
            lambda p: build_clip_backbone(TINY, pretrained=str(p), image_size=None),
            lambda p: EffNetLite0Backbone(pretrained=str(p), image_size=64),
        ):
            with pytest.raises(ValueError, match="cannot be loaded into") as err:
                build(path)
            assert why in str(err.value) and "\n" not in str(err.value), str(err.value)
    assert not (tmp_path / "pwned").exists()


def test_a_weights_path_that_is_no_regular_file_or_has_other_keys_is_named_as_such(tmp_path):
    from dualclip.backbone import EffNetLite0Backbone

    folder = tmp_path / "weights"
    folder.mkdir()
    for build in (
        lambda p: build_clip_backbone(TINY, pretrained=str(p), image_size=None),
        lambda p: EffNetLite0Backbone(pretrained=str(p), image_size=64),
    ):
        with pytest.raises(ValueError, match="is not a regular file") as err:
            build(folder)
        assert not isinstance(err.value, FileNotFoundError)
        with pytest.raises(FileNotFoundError, match="checkpoint file not found"):
            build(tmp_path / "missing.pt")
    wrong = tmp_path / "wrong.pt"
    torch.save({"not_a_layer.weight": torch.zeros(2)}, wrong)
    with pytest.raises(ValueError, match=r"Error\(s\) in loading state_dict for \w+: (Missing|Unexpected) key") as err:
        EffNetLite0Backbone(pretrained=str(wrong), image_size=64)
    assert "\n" not in str(err.value)
