"""The interface every backbone implements: images in, global embedding and dense features out."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..errors import InputError, InputNotFoundError


@dataclass
class BackboneOutput:
    """Features of one batch of B images.

    Attributes
    ----------
    global_embedding:
        ``(B, D)``: CLIP's image embedding in the joint space (equal to ``encode_image``), or the pooled
        features of a vision-only backbone. Used for text scoring.
    patch_embeddings:
        ``(B, P, D)``: dense tokens projected into the joint space for text scoring, or ``None`` for a
        vision-only backbone.
    match_features:
        One ``(B, P, C_l)`` tensor per matching layer: the layer's raw patch tokens (brought into the matching
        space of the chosen distance by :func:`dualclip.scoring.matching.match_spaces`).
    grid:
        ``(h, w)`` with ``h * w == P``: the patch grid, row-major.
    """

    global_embedding: torch.Tensor
    patch_embeddings: torch.Tensor | None
    match_features: list[torch.Tensor]
    grid: tuple[int, int]


class Backbone(nn.Module, ABC):
    """A frozen feature extractor.

    Subclasses set ``image_size``, ``mean``, ``std``, ``name`` and ``weights_id`` (identifies the weights:
    an open_clip tag, a file, or ``None`` for random weights), and implement :meth:`forward`.
    """

    name: str
    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    weights_id: str | None
    has_text: bool = False
    logit_scale: float = 100.0
    default_distance: str = "cosine"
    """The matching distance used when ``DetectorConfig.distance`` is ``None``."""
    default_neighbourhood: tuple[int, ...] = (3,)
    """The neighbourhood size(s) used when ``DetectorConfig.neighbourhood`` is ``None``."""
    default_profile_neighbourhood: tuple[int, ...] | None = None
    """The neighbourhood size(s) a fitted profile's memory bank uses when ``DetectorConfig.neighbourhood`` is
    ``None`` (``None``: the same as :attr:`default_neighbourhood`)."""
    default_hybrid_norm: str = "zscore"
    """How the hybrid parts are standardised when ``DetectorConfig.hybrid_norm`` is ``None``."""
    default_centring: str = "none"
    """The positional centring used when ``DetectorConfig.centring`` is ``None``."""
    default_border: str = "zero"
    """How the image border is padded when ``DetectorConfig.border`` is ``None`` (only effnet-lite0 pads)."""
    border: str = "zero"
    """How this backbone pads the image border (``"zero"``: the network's own padding)."""
    default_plain_weight: float = 0.0
    """The plain view's weight in a fitted profile's map when ``DetectorConfig.plain_weight`` is ``None``
    (:mod:`dualclip.scoring.plain`)."""

    @abstractmethod
    def forward(self, images: torch.Tensor) -> BackboneOutput:
        """Extract features of normalised images ``(B, 3, S, S)``."""

    def weights_module(self) -> nn.Module:
        """The module whose weights identify this backbone (its weights fingerprint): itself, or the torch
        model an ONNX runtime wrapper stands in for."""
        return self

    def plain_view(self, image_size: int) -> Backbone:
        """This network at ``image_size`` with its own zero padding, sharing its weights: the second pass of a
        profile's plain view (:mod:`dualclip.scoring.plain`). Only a convolutional backbone has one."""
        from ..errors import ConfigError

        raise ConfigError(
            f"backbone {self.name!r} has no plain view (a second pass of a convolutional network at another size): "
            "use plain_weight=0"
        )

    def encode_text(self, prompts: list[str]) -> torch.Tensor:
        """Embed sentences into the joint space (``(len(prompts), D)``, not normalised)."""
        raise NotImplementedError(f"backbone {self.name!r} has no text tower")


def load_weights_file(net: nn.Module, path: Path, name: str) -> Path:
    """Load a state-dict file into ``net`` (strict): ``.safetensors``, or a torch file read with
    ``weights_only=True`` (no pickled code runs). A missing file is ``FileNotFoundError``; any other failure a
    ``ValueError`` naming the file and the backbone."""
    path = Path(path).expanduser()
    check_weights_file(path)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(path)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
        net.load_state_dict(state, strict=True)
    except Exception as exc:  # unpickling, format and key-mismatch errors come in many types
        raise InputError(f"checkpoint file {path} cannot be loaded into {name!r}: {load_failure(exc)}") from exc
    return path


def check_weights_file(path: Path) -> None:
    """A weights file must be a regular file: missing is :class:`InputNotFoundError`, a folder or a device an
    :class:`InputError` (reading a device could never end)."""
    if not path.exists():
        raise InputNotFoundError(f"checkpoint file not found: {path}")
    if not path.is_file():
        raise InputError(f"checkpoint file {path} is not a regular file (a folder, a FIFO or a device)")


def load_failure(exc: BaseException) -> str:
    """Why a weights file failed to load, in one line: the first line of the error's message (torch's run to
    several lines of advice), with the error's type where the message alone says nothing (a ``KeyError: '101'``
    of a text file read as a pickle)."""
    first = str(exc).splitlines()[0][:300] if str(exc).strip() else ""
    if first.startswith("Weights only load failed"):
        return "it holds pickled objects other than tensors, and dualclip loads tensors only (weights_only=True)"
    if first.startswith("Error(s) in loading state_dict"):  # the next line names the keys that differ
        lines = [line.strip() for line in str(exc).splitlines()[1:] if line.strip()]
        return f"{first} {lines[0][:300]}" if lines else first
    if isinstance(exc, KeyError) or len(first) < 12:
        return f"not a weights file of this model ({type(exc).__name__}: {first or 'no message'})"
    return first


@torch.inference_mode()
def extract_features(
    backbone: Backbone,
    images: list,
    batch_size: int = 8,
    keep_patch_embeddings: bool = True,
    progress: bool = False,
    desc: str = "features",
    precision: str = "fp32",
) -> BackboneOutput:
    """Run ``backbone`` over PIL RGB ``images`` in batches; concatenate the outputs (as fp32) on the backbone's
    device, where every later stage of the pipeline runs.

    ``precision``: ``"fp32"``, or ``"bf16"`` / ``"fp16"``: the forward pass under torch autocast."""
    from tqdm.auto import tqdm

    from .preprocess import to_tensor

    device = next(backbone.parameters()).device
    dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    globals_, patches, matches = [], [], []
    grid = None
    with tqdm(total=len(images), desc=desc, unit="img", disable=not progress, leave=False) as bar:
        for start in range(0, len(images), batch_size):
            batch = to_tensor(images[start : start + batch_size], backbone.image_size, backbone.mean, backbone.std)
            with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
                out = backbone(batch.to(device))
            grid = out.grid
            globals_.append(out.global_embedding.float())
            if keep_patch_embeddings and out.patch_embeddings is not None:
                patches.append(out.patch_embeddings.float())
            matches.append([m.float() for m in out.match_features])
            bar.update(batch.shape[0])
    return BackboneOutput(
        global_embedding=torch.cat(globals_),
        patch_embeddings=torch.cat(patches) if patches else None,
        match_features=[torch.cat(layer) for layer in zip(*matches, strict=True)],
        grid=grid,
    )
