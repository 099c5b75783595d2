"""CLIP through an unmodified ``open_clip`` model, with a training-free V-V attention path (docs/method.md §2).

One forward pass runs the frozen blocks as ``open_clip`` does (the original path X, so the global
embedding *is* ``encode_image``) and, beside it, the V-V path Z::

    Z^l = Z^{l-1} + Proj(softmax(v v^T / sqrt(d)) v),   v from LN1(X^{l-1}),   no FFN

Dense tokens come from Z: the last block's through ``ln_post`` and ``proj`` for text scoring, several
blocks' raw tokens for visual matching.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import open_clip
import torch
import torch.nn.functional as F
from open_clip.transformer import ResidualAttentionBlock, VisionTransformer
from torch import nn

from ..config import DEFAULT
from ..errors import ConfigError, InputError, WeightsUnavailableError
from .base import Backbone, BackboneOutput, check_weights_file, load_failure

CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors")

# name -> (default pretrained tag, default processing size)
CLIP_PRESETS: dict[str, tuple[str, int]] = {
    "ViT-B-16-plus-240": ("laion400m_e32", 240),
    "ViT-L-14-336": ("openai", 518),
}


RANDOM_WEIGHTS_SEED = 0
"""``pretrained=None`` initialises the weights randomly from this seed: identical in every run and process."""


def is_checkpoint_path(pretrained: str) -> bool:
    """A ``pretrained`` value names a file (rather than an open_clip tag)."""
    return pretrained.lower().endswith(CHECKPOINT_SUFFIXES) or os.sep in pretrained or Path(pretrained).exists()


def _download_hint(model_name: str, tag: str) -> str:
    cfg = open_clip.get_pretrained_cfg(model_name, tag) or {}
    if cfg.get("hf_hub"):
        where = f"the Hugging Face repository '{cfg['hf_hub'].rstrip('/')}' (file open_clip_pytorch_model.bin or open_clip_model.safetensors)"
    elif cfg.get("url"):
        where = cfg["url"]
    else:
        where = "its open_clip release"
    return (
        f"could not load pretrained weights {model_name!r} / {tag!r}: not in the cache and the download failed. "
        f"On a connected machine fetch {where}, copy the file here and pass it with "
        "pretrained=/path/to/file; or run the vision-only backbone with bundled weights: backbone=effnet-lite0."
    )


def weights_cached(model_name: str, tag: str, cache_dir: str | None = None) -> bool:
    """Whether the weights of an open_clip tag are already in the local Hugging Face cache."""
    hub = ((open_clip.get_pretrained_cfg(model_name, tag) or {}).get("hf_hub") or "").rstrip("/")
    if not hub:
        return False
    from huggingface_hub import try_to_load_from_cache

    return any(
        isinstance(try_to_load_from_cache(hub, f, cache_dir=cache_dir), str)
        for f in ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
    )


def hub_reachable(host: str = "huggingface.co", timeout: float = 3.0) -> bool:
    """Whether a download could start: not offline by setting, and the hub answers within ``timeout``."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        return False
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def uses_quick_gelu(model_name: str, tag: str | None) -> bool:
    """Whether weights were trained with QuickGELU: the tag's open_clip pretrained config says so (all
    ``openai`` tags do), or the model name ends in ``-quickgelu``."""
    if model_name.endswith("-quickgelu"):
        return True
    if tag is None:
        return False
    return bool((open_clip.get_pretrained_cfg(model_name, tag) or {}).get("quick_gelu", False))


def load_open_clip(
    model_name: str,
    pretrained: str | None,
    image_size: int,
    cache_dir: str | None = None,
    device: str = "cpu",
    quick_gelu: bool | None = None,
    weights_tag: str | None = None,
) -> tuple[nn.Module, str | None]:
    """Build an ``open_clip`` model at ``image_size`` and load its weights.

    Returns the model (eval mode, frozen) and an id of its weights (tag, resolved file path, or ``None``).
    Positional embeddings are interpolated when ``image_size`` differs from the model's native size.
    ``quick_gelu``: the activation the weights were trained with; ``None`` = from the tag's open_clip config
    (for a checkpoint file: from ``weights_tag``, the tag the file holds, e.g. the preset's). Where a tag was
    downloaded, nothing is fetched without a network: without the weights in the cache and with no network
    this fails at once with what to do offline.
    """
    if model_name not in open_clip.list_models():
        raise ConfigError(f"unknown open_clip model {model_name!r}; see open_clip.list_models() or use 'effnet-lite0'")
    tag = pretrained if pretrained is not None and not is_checkpoint_path(pretrained) else weights_tag
    if quick_gelu is None:
        quick_gelu = uses_quick_gelu(model_name, tag)
    common = {"force_image_size": image_size, "device": device, "force_quick_gelu": quick_gelu}
    if pretrained is None:
        with torch.random.fork_rng(devices=[]):  # random weights, but the same in every process
            torch.manual_seed(RANDOM_WEIGHTS_SEED)
            model = open_clip.create_model(model_name, pretrained=None, **common)
        weights_id = None
    elif is_checkpoint_path(pretrained):
        path = Path(pretrained).expanduser()
        check_weights_file(path)
        model = open_clip.create_model(model_name, pretrained=None, **common)
        # weights_only=True: tensors only, no pickled code is executed; .safetensors via safetensors.
        try:
            open_clip.load_checkpoint(model, str(path), strict=True, weights_only=True)
        except Exception as exc:  # safetensors, pickle and key-mismatch errors come in many types
            why = load_failure(exc)
            raise InputError(f"checkpoint file {path} cannot be loaded into {model_name!r}: {why}") from exc
        weights_id = str(path.resolve())
    else:
        tags = open_clip.list_pretrained_tags_by_model(model_name)
        if pretrained not in tags:
            raise ConfigError(f"unknown pretrained tag {pretrained!r} for {model_name!r}; known tags: {tags}")
        if not weights_cached(model_name, pretrained, cache_dir) and not hub_reachable():
            raise WeightsUnavailableError(
                _download_hint(model_name, pretrained).replace("the download failed", "there is no network")
            )
        try:
            model = open_clip.create_model(model_name, pretrained=pretrained, cache_dir=cache_dir, **common)
        except Exception as exc:  # network errors come in many types (OSError, HTTP, hub errors)
            raise WeightsUnavailableError(_download_hint(model_name, pretrained)) from exc
        weights_id = pretrained
    model.eval().requires_grad_(False)
    return model, weights_id


class ClipBackbone(Backbone):
    """Global embedding + V-V dense tokens from one pass through a frozen ``open_clip`` CLIP.

    Parameters
    ----------
    model:
        An ``open_clip`` CLIP model with a ViT image tower (not modified).
    tokenizer:
        Its ``open_clip`` tokenizer.
    name, weights_id:
        Identify the model and its weights (text-embedding cache key).
    feature_layers:
        1-based blocks whose V-V tokens feed matching; ``None``: 4 evenly spaced ending at the last.
    vv_start:
        First 1-based block of the V-V path.
    """

    has_text = True

    def __init__(
        self,
        model: nn.Module,
        tokenizer,
        name: str,
        weights_id: str | None,
        feature_layers: tuple[int, ...] | None = None,
        vv_start: int = 1,
    ) -> None:
        super().__init__()
        visual = model.visual
        if not isinstance(visual, VisionTransformer):
            raise ConfigError(f"{name!r}: only open_clip ViT image towers are supported, got {type(visual).__name__}")
        if visual.attn_pool is not None:
            raise ConfigError(f"{name!r}: attentional pooling towers are not supported")
        blocks = visual.transformer.resblocks
        for blk in blocks:
            if not isinstance(blk, ResidualAttentionBlock) or not isinstance(blk.attn, nn.MultiheadAttention):
                raise ConfigError(f"{name!r}: V-V attention needs standard open_clip residual attention blocks")
        if not visual.transformer.batch_first:
            raise ConfigError(f"{name!r}: the vision transformer must run batch-first")
        depth = len(blocks)
        if feature_layers is None:
            feature_layers = tuple(round(depth * (i + 1) / 4) for i in range(4))
        bad = [i for i in feature_layers if not 1 <= i <= depth]
        if bad:
            raise ConfigError(f"feature_layers {bad} outside 1..{depth} for {name!r}")
        if not 1 <= vv_start <= depth:
            raise ConfigError(f"vv_start={vv_start} outside 1..{depth} for {name!r}")
        self.model = model
        self.tokenizer = tokenizer
        self.name = name
        self.weights_id = weights_id
        self.feature_layers = tuple(sorted(set(feature_layers)))
        self.vv_start = vv_start
        size = visual.image_size
        self.image_size = int(size[0] if isinstance(size, (tuple, list)) else size)
        cfg = getattr(visual, "preprocess_cfg", {}) or {}
        self.mean = tuple(cfg.get("mean", open_clip.OPENAI_DATASET_MEAN))
        self.std = tuple(cfg.get("std", open_clip.OPENAI_DATASET_STD))
        self.logit_scale = float(model.logit_scale.exp()) if hasattr(model, "logit_scale") else 100.0

    @property
    def grid(self) -> tuple[int, int]:
        g = self.model.visual.grid_size
        return int(g[0]), int(g[1])

    @staticmethod
    def vv_attention(block: ResidualAttentionBlock, x_normed: torch.Tensor) -> torch.Tensor:
        """``Proj(softmax(v v^T / sqrt(d)) v)`` of one block, ``x_normed = LN1(X)`` of shape ``(B, N, W)``."""
        attn = block.attn
        b, n, width = x_normed.shape
        heads = attn.num_heads
        w_v = attn.in_proj_weight[2 * width :]
        b_v = attn.in_proj_bias[2 * width :] if attn.in_proj_bias is not None else None
        v = F.linear(x_normed, w_v, b_v).view(b, n, heads, width // heads).transpose(1, 2)
        out = F.scaled_dot_product_attention(v, v, v)  # scale 1/sqrt(head dim)
        out = out.transpose(1, 2).reshape(b, n, width)
        return block.ls_1(attn.out_proj(out))

    def forward(self, images: torch.Tensor) -> BackboneOutput:
        visual = self.model.visual
        x = visual._embeds(images)  # conv, class token, positional embedding, ln_pre: X^0
        z = x
        collected: list[torch.Tensor] = []
        last = len(visual.transformer.resblocks)
        for idx, block in enumerate(visual.transformer.resblocks, start=1):
            if idx >= self.vv_start:
                if idx == self.vv_start:
                    z = x  # Z branches off the original path: Z^{s-1} = X^{s-1}
                z = z + self.vv_attention(block, block.ln_1(x))
            x = block(x)  # the unchanged open_clip block: the original path X
            if idx in self.feature_layers:
                collected.append((z if idx >= self.vv_start else x)[:, 1:])
        pooled, _ = visual._pool(x)
        if visual.proj is not None:
            pooled = pooled @ visual.proj
        dense = z if last >= self.vv_start else x
        patch = visual.ln_post(dense[:, 1:])
        if visual.proj is not None:
            patch = patch @ visual.proj
        grid = self.grid
        return BackboneOutput(global_embedding=pooled, patch_embeddings=patch, match_features=collected, grid=grid)

    @torch.no_grad()
    def encode_text(self, prompts: list[str]) -> torch.Tensor:
        device = next(self.model.parameters()).device
        tokens = self.tokenizer(prompts).to(device)
        return self.model.encode_text(tokens).float()


def build_clip_backbone(
    name: str,
    pretrained: str | None,
    image_size: int | None,
    feature_layers: tuple[int, ...] | None = None,
    vv_start: int = 1,
    cache_dir: str | None = None,
    device: str = "cpu",
    quick_gelu: bool | None = None,
) -> ClipBackbone:
    """Load an ``open_clip`` model by name (preset defaults for tag and size) and wrap it.

    ``quick_gelu=None``: the activation the weights were trained with (see :func:`load_open_clip`); a local
    checkpoint file of a preset is taken to hold the preset's weights."""
    if name not in CLIP_PRESETS and name not in open_clip.list_models():
        raise ConfigError(
            f"unknown backbone {name!r}: use effnet-lite0, dinov2-vits14 or an open_clip model name "
            f"(presets: {', '.join(sorted(CLIP_PRESETS))}; all: open_clip.list_models())"
        )
    preset_tag, preset_size = CLIP_PRESETS.get(name, (None, None))
    if pretrained == DEFAULT:
        if preset_tag is None:
            raise ConfigError(f"{name!r} has no preset weights: pass pretrained=<tag or file> (or None for random)")
        pretrained = preset_tag
    if image_size is None:
        image_size = preset_size or _native_size(name)
    model, weights_id = load_open_clip(
        name, pretrained, image_size, cache_dir=cache_dir, device=device, quick_gelu=quick_gelu, weights_tag=preset_tag
    )
    tokenizer = open_clip.get_tokenizer(name)
    return ClipBackbone(model, tokenizer, name, weights_id, feature_layers, vv_start)


def _native_size(name: str) -> int:
    size = open_clip.get_model_config(name)["vision_cfg"]["image_size"]
    return int(size[0] if isinstance(size, (tuple, list)) else size)
