"""The detector's settings, in two frozen, validated kinds (docs/method.md §1-§7).

:class:`MethodSettings` is what is computed: saved in a profile, and the part of the resume key of an archive
run and of the fingerprint of an evaluation result. :class:`ExecutionSettings` is how it runs (device,
arithmetic, batch size, decoding threads, runtime, progress): the caller's, never saved in a profile.
:class:`DetectorConfig` holds one of each and takes every setting of both as a flat keyword. All three are
frozen after validation: ``dataclasses.replace`` gives a changed, validated copy.

Every set of allowed values is one ``Literal`` below; its runtime tuple (``get_args``) is what validation, the
CLI's help and docs/configuration.md use.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

from .errors import ConfigError

DEFAULT = "default"
"""Sentinel for ``pretrained``: the preset's weights (an open_clip tag, or the bundled EfficientNet file)."""

MAX_IMAGE_SIZE = 4096
"""The largest processing resolution: above it one image's features alone need gigabytes."""
AUTO_MIN_SYNTHETIC = 8
AUTO_MAX_SYNTHETIC = 32
"""Bounds of the automatic synthetic budget (``AdaptationConfig.num_images=None``)."""

Aggregation = Literal["min", "mean_low30"]
AGGREGATIONS: tuple[str, ...] = get_args(Aggregation)
Distance = Literal["cosine", "euclidean", "layernorm", "hybrid"]
DISTANCES: tuple[str, ...] = get_args(Distance)
FusionNorm = Literal["zscore", "rank"]
FUSION_NORMS: tuple[str, ...] = get_args(FusionNorm)
ImageScoreMode = Literal["max", "top1pct"]
IMAGE_SCORES: tuple[str, ...] = get_args(ImageScoreMode)
HybridNorm = Literal["zscore", "robust"]
HYBRID_NORMS: tuple[str, ...] = get_args(HybridNorm)
Border = Literal["zero", "reflect"]
BORDERS: tuple[str, ...] = get_args(Border)
Centring = Literal["none", "ring", "position"]
CENTRINGS: tuple[str, ...] = get_args(Centring)
TTAScope = Literal["category", "image"]
TTA_SCOPES: tuple[str, ...] = get_args(TTAScope)
Runtime = Literal["torch", "onnxruntime"]
RUNTIMES: tuple[str, ...] = get_args(Runtime)
Precision = Literal["auto", "fp32", "bf16", "fp16"]
PRECISIONS: tuple[str, ...] = get_args(Precision)


@dataclass(frozen=True)
class AdaptationConfig:
    """Test-time adaptation on synthesized anomalies (docs/method.md §7).

    Parameters
    ----------
    num_images:
        Synthetic anomalous images made from the test images (per category, or per image with
        ``scope="image"``). ``None`` (default): scaled with the category, ``clip(ceil(N / 2), 8, 32)`` for
        ``N`` test images (``scope="image"``: 8 per image), so that adaptation costs at most about as much
        as the rest of the run; see :meth:`synthetic_budget`.
    steps:
        AdamW steps of the head.
    lr:
        AdamW learning rate.
    weight_decay:
        AdamW weight decay.
    scope:
        ``"category"``: one head trained on the category's synthetic images (default);
        ``"image"``: the head is re-initialised and trained for every image on its own synthetic copies.
    rank:
        Rank of the residual adapter in front of the linear head. 0 (default): a linear head, which
        generalised better than rank 16 on magnetic_tile (docs/results.md, "Test-time adaptation").
    dice_weight:
        Weight of the Dice term added to the BCE loss.
    anchor:
        Weight of the penalty ``||delta||^2 / ||w0||^2`` that keeps the head's direction near its text start
        ``w0`` (docs/method.md §7; 0: free). Without it 60 steps at lr 1e-2 turned the direction almost orthogonal to
        the text (cosine 0.02-0.10).
    base_fraction:
        Synthesis starts from this fraction of the test images: the most normal-looking ones by the
        unadapted score (the text and visual branches before adaptation). Test images are unlabeled; a
        real defect in a base image would be trained as "normal" outside the synthetic mask, so the
        likely-defective images are left out. 1.0: all images. With ``scope="image"`` each image is its own
        base.
    """

    num_images: int | None = None
    steps: int = 60
    lr: float = 1e-2
    weight_decay: float = 1e-4
    scope: TTAScope = "category"
    rank: int = 0
    dice_weight: float = 1.0
    base_fraction: float = 0.5
    anchor: float = 1.0

    def __post_init__(self) -> None:
        _check(self.num_images is None or self.num_images >= 1, "adaptation.num_images must be None or >= 1")
        _check(self.steps >= 0, "adaptation.steps must be >= 0")
        _check(self.lr > 0, "adaptation.lr must be > 0")
        _one_of("adaptation.scope", self.scope, TTA_SCOPES)
        _check(self.rank >= 0, "adaptation.rank must be >= 0")
        _check(0.0 < self.base_fraction <= 1.0, "adaptation.base_fraction must lie in (0, 1]")
        _check(self.anchor >= 0, "adaptation.anchor must be >= 0")

    def synthetic_budget(self, n_test: int) -> int:
        """Synthetic images to train on for ``n_test`` test images (per image with ``scope="image"``)."""
        if self.num_images is not None:
            return self.num_images
        if self.scope == "image":
            return AUTO_MIN_SYNTHETIC
        return int(min(AUTO_MAX_SYNTHETIC, max(AUTO_MIN_SYNTHETIC, math.ceil(n_test / 2))))


@dataclass(frozen=True)
class MethodSettings:
    """What the detector computes: the model, matching, fusion and adaptation settings and the seed.

    A fitted profile saves them; they (with the arithmetic, see :meth:`DetectorConfig.numbers_key`) make
    the resume key of an archive run and the fingerprint of an evaluation result. Frozen once validated.

    Parameters
    ----------
    backbone:
        An ``open_clip`` model name (presets: ``"ViT-B-16-plus-240"`` at 240 px, ``"ViT-L-14-336"`` at
        518 px), ``"effnet-lite0"`` (vision-only EfficientNet-Lite0, no text branch) or ``"dinov2-vits14"``
        (vision-only DINOv2 ViT-S/14 on timm, no text branch).
    pretrained:
        ``"default"`` (the preset's weights), an ``open_clip`` pretrained tag (downloaded and cached on a
        connected machine), a local checkpoint file (``.pt``/``.pth``/``.bin``/``.safetensors``, loaded
        without executing pickled code), or ``None`` for randomly initialised weights (tests, benchmarks).
    image_size:
        Processing resolution S (square), 32 to 4096 pixels. ``None``: the preset's size (240, 518; 320 for effnet-lite0, 224 for
        dinov2-vits14).
    feature_layers:
        1-based transformer blocks whose V-V tokens feed visual matching. ``None``: 4 evenly spaced blocks
        ending at the last (3/6/9/12 for 12 blocks). For ``effnet-lite0``: indices of its MBConv blocks.
    vv_start:
        First (1-based) block of the V-V attention path; before it the V-V path equals the original one.
        ``None``: the backbone's default (CLIP: 1; dinov2-vits14: 0, no V-V path, which only it allows).
    distance:
        The patch distance of visual matching (:mod:`dualclip.scoring.matching`): ``"cosine"`` on
        L2-normalised features (the paper's), ``"euclidean"`` on raw features (layers concatenated),
        ``"layernorm"`` (MuSc: per-patch LayerNorm, then Euclidean per layer), or ``"hybrid"`` (the cosine and
        the Euclidean scores, each standardised, averaged: direction and magnitude). ``None``: the backbone's
        default, chosen by leave-one-defect-type-out (docs/results.md, "Matching"): ``hybrid`` at neighbourhood 1
        for effnet-lite0, ``cosine`` at 1 for dinov2-vits14; ``cosine`` at 3 for CLIP (not chosen by the folds,
        which ran without CLIP weights).
    hybrid_norm:
        How the two parts of the ``hybrid`` distance are put on one scale before they are averaged: ``"zscore"``
        (mean and standard deviation) or ``"robust"`` (median and 1.4826 x the median absolute deviation, which
        the defects of a run that holds many cannot move), over the run's patches, or in a profile over its
        normal images' leave-one-out patches. ``None``: the backbone's default.
    neighbourhood:
        Side of the square neighbourhood over which matching features are averaged (1 = off), or several
        sides, e.g. ``(1, 3, 5)``: one matching space each, scores averaged; each at most the feature grid's
        side. ``None``: the backbone's
        default (see ``distance``); effnet-lite0: 1 zero-shot and with golden references, 3 for a fitted
        profile's memory bank (each chosen for the worst fold, docs/results.md).
    border:
        How a convolutional backbone (effnet-lite0) sees the image's border: ``"reflect"`` pads the image by
        mirroring before the network and crops the features back to the image, so that the zero padding of
        the convolutions never reaches the border patches; ``"zero"``: the network's own zero padding.
        ``None``: the backbone's default. Transformer backbones (CLIP, dinov2-vits14) have no padding:
        ``"reflect"`` is refused for them.
    centring:
        Positional centring of the visual scores (:mod:`dualclip.scoring.position`): from each patch score the
        typical score at that place is subtracted, the median over the run's images at the same grid
        position (``"position"``) or at the same distance from the border (``"ring"``); a saved profile takes
        it from its normal images, golden references from themselves. A response every image shows at a place
        (the border, a fixture) is then no defect. ``"none"``: off. ``None``: the backbone's default, chosen
        by the worst fold of five over three products (docs/results.md).
    k:
        References per image. 1 is the paper's dual-image setting; ``"all"`` is full mutual scoring. Partners
        are drawn at random (seeded; with k = 1 a derangement of pairs, each image the other's reference) over
        the images ordered by their pixels' SHA-256: the same images get the same partners in any listing order.
        Partners chosen by similarity are not offered: defects that recur across a set are each other's
        nearest images and erase themselves; even drawn among the more similar half they lost 5.3 pixel-AUROC
        points to random partners on magnetic_tile's Fray defects (docs/results.md, "Partner selection"). More
        references (``k=3``, ``k="all"``) are the robust way to better scores.
    duplicate_tolerance:
        Near-exact duplicates are never each other's reference (a defect and its copy would erase each
        other): images whose 32 x 32 grey thumbnails differ by at most this many grey levels (0-255) on
        average. Measured: re-encoding as JPEG (quality 70) changes them by at most 0.26, halving the
        resolution by 0.12; the nearest distinct images differ by 1.9 (generated textures) and 6.6
        (metal_plate); magnetic_tile holds a few captures 0.36-0.5 apart that look the same. A negative
        value turns the check off.
    k_aggregation:
        How an image's distances to its k references are combined: ``"mean_low30"``, the mean of the lowest
        ``ceil(0.3 k)`` (the minimum for k <= 3; for large k robust to references that carry the same defect),
        or ``"min"``.
    use_text, use_visual:
        Switch the text branch (§4) and the visual-reference branch (§5) on or off (ablations).
    alpha:
        Fusion weight of the text (or adapted) patch score: ``M = alpha*text + (1-alpha)*visual``.
    beta:
        Weight of the global text score in the image score: ``S = beta*g_txt + (1-beta)*max(M)``.
    fusion_norm:
        How both branches are brought to one scale before fusion: ``"zscore"`` over the run's patches, or
        ``"rank"`` (quantile ranks). Only used when two branches are fused.
    image_score:
        ``"max"`` of the smoothed map, or ``"top1pct"``: mean of its top 1% pixels.
    sigma:
        Gaussian smoothing in pixels at resolution S (0 to S).
    temperature:
        Softmax temperature tau of text scores; ``None``: the model's logit scale (100 for CLIP).
    tta:
        Test-time adaptation on synthesized anomalies (§7); settings in ``adaptation``.
    adaptation:
        The settings of test-time adaptation (:class:`AdaptationConfig`; a dict of them is accepted).
    memory_bank_size:
        Most golden patches a fitted profile keeps (:meth:`DualClipDetector.fit`): above it a greedy coreset
        (PatchCore) chooses this many; ``None`` keeps all. 16384 patches are about 10 images of effnet-lite0
        at 320 px; measured in docs/results.md ("Saved profiles").
    plain_weight:
        A fitted profile's plain view (:mod:`dualclip.scoring.plain`): the weight ``w`` of a plain nearest
        neighbour of the normal images in the profile's map, ``(1 - w) * main + w * plain``, both in profile
        units; the plain view comes from a second pass of the network at ``plain_image_size`` with its own zero
        padding (3 x 3 average counting the padding, Euclidean). 0: off. Only a convolutional backbone (effnet-lite0) has the second pass;
        zero-shot runs and golden references never use it. ``None``: the backbone's default (effnet-lite0: 0.5;
        the others: 0), chosen by the worst fold of five over three products (docs/results.md, "Saved profiles
        over three products").
    plain_image_size:
        The plain view's processing size (32 to 4096 pixels; 224: a 28 x 28 grid for effnet-lite0).
    seed:
        Seeds pairing, synthesis and adaptation; recorded in every output.
    quick_gelu:
        Build the CLIP model with QuickGELU (the activation OpenAI's weights were trained with). ``None``
        (default): from the weights' open_clip pretrained config (``openai`` tags: True); a local checkpoint
        file of a preset is taken to hold the preset's weights.
    """

    backbone: str = "ViT-B-16-plus-240"
    pretrained: str | None = DEFAULT
    image_size: int | None = None
    feature_layers: tuple[int, ...] | None = None
    vv_start: int | None = None
    distance: Distance | None = None
    hybrid_norm: HybridNorm | None = None
    neighbourhood: int | tuple[int, ...] | None = None
    border: Border | None = None
    centring: Centring | None = None
    k: int | Literal["all"] = 1
    duplicate_tolerance: float = 0.5
    k_aggregation: Aggregation = "mean_low30"
    use_text: bool = True
    use_visual: bool = True
    alpha: float = 0.5
    beta: float = 0.5
    fusion_norm: FusionNorm = "zscore"
    image_score: ImageScoreMode = "max"
    sigma: float = 4.0
    temperature: float | None = None
    tta: bool = False
    adaptation: AdaptationConfig = field(default_factory=AdaptationConfig)
    memory_bank_size: int | None = 16384
    plain_weight: float | None = None
    plain_image_size: int = 224
    seed: int = 0
    quick_gelu: bool | None = None

    def __post_init__(self) -> None:
        # normalised forms, set once while the object is built (frozen afterwards)
        if isinstance(self.adaptation, dict):
            object.__setattr__(self, "adaptation", AdaptationConfig(**self.adaptation))
        for name in ("use_text", "use_visual", "tta", "quick_gelu"):
            value = getattr(self, name)
            _check(
                isinstance(value, bool) or (name == "quick_gelu" and value is None),
                f"{name} must be true or false, got {value!r}",
            )
        for name in ("alpha", "beta", "sigma", "duplicate_tolerance", "temperature"):
            value = getattr(self, name)
            _check(
                _is_number(value) or (name == "temperature" and value is None),
                f"{name} must be a number, got {value!r}",
            )
        for name in ("image_size", "vv_start", "memory_bank_size", "plain_image_size"):
            value = getattr(self, name)
            _check(value is None or _is_int(value), f"{name} must be an integer, got {value!r}")
        if self.feature_layers is not None:
            _check(
                isinstance(self.feature_layers, list | tuple) and all(_is_int(i) for i in self.feature_layers),
                f"feature_layers must be a list of block indices (integers), got {self.feature_layers!r}",
            )
            object.__setattr__(self, "feature_layers", tuple(self.feature_layers))
            _check(len(self.feature_layers) > 0, "feature_layers must not be empty")
        _check(
            self.image_size is None or 32 <= self.image_size <= MAX_IMAGE_SIZE,
            f"image_size={self.image_size!r} is outside [32, {MAX_IMAGE_SIZE}] pixels",
        )
        _check(
            32 <= self.plain_image_size <= MAX_IMAGE_SIZE,
            f"plain_image_size={self.plain_image_size!r} is outside [32, {MAX_IMAGE_SIZE}] pixels",
        )
        _check(
            self.plain_weight is None or (_is_number(self.plain_weight) and 0.0 <= self.plain_weight <= 1.0),
            f"plain_weight={self.plain_weight!r} is not a weight in [0, 1]",
        )
        _check(self.vv_start is None or self.vv_start >= 0, "vv_start is 1-based (0: no V-V path) and must be >= 0")
        _one_of("distance", self.distance, DISTANCES, optional=True)
        if self.neighbourhood is not None:
            sizes = (self.neighbourhood,) if isinstance(self.neighbourhood, int) else tuple(self.neighbourhood)
            _check(
                len(sizes) > 0 and all(isinstance(r, int) and r >= 1 and r % 2 == 1 for r in sizes),
                f"neighbourhood must be an odd number >= 1 or a tuple of them, got {self.neighbourhood!r}",
            )
            object.__setattr__(self, "neighbourhood", sizes[0] if len(sizes) == 1 else sizes)
        _one_of("hybrid_norm", self.hybrid_norm, HYBRID_NORMS, optional=True)
        _one_of("border", self.border, BORDERS, optional=True)
        _one_of("centring", self.centring, CENTRINGS, optional=True)
        _check(
            self.k == "all" or (isinstance(self.k, int) and self.k >= 1),
            f"k must be an int >= 1 or 'all', got {self.k!r}",
        )
        _one_of("k_aggregation", self.k_aggregation, AGGREGATIONS)
        _check(self.use_text or self.use_visual or self.tta, "at least one branch (text, visual or tta) must be on")
        _check(0.0 <= self.alpha <= 1.0, "alpha must lie in [0, 1]")
        _check(0.0 <= self.beta <= 1.0, "beta must lie in [0, 1]")
        _one_of("fusion_norm", self.fusion_norm, FUSION_NORMS)
        _one_of("image_score", self.image_score, IMAGE_SCORES)
        _check(
            0 <= self.sigma <= (self.image_size or MAX_IMAGE_SIZE),
            f"sigma={self.sigma!r} is outside [0, {self.image_size or MAX_IMAGE_SIZE}] pixels (at most the image size)",
        )
        _check(
            isinstance(self.seed, int) and not isinstance(self.seed, bool) and 0 <= self.seed < 2**32,
            f"seed must be an integer in [0, 2**32), got {self.seed!r}",
        )
        _check(self.memory_bank_size is None or self.memory_bank_size >= 1, "memory_bank_size must be None or >= 1")

    def to_dict(self) -> dict[str, Any]:
        """The settings as plain JSON-able values, tuples as lists: what a profile saves."""
        d = dataclasses.asdict(self)
        for key in ("feature_layers", "neighbourhood"):
            if isinstance(d[key], tuple):
                d[key] = list(d[key])
        return d


@dataclass(frozen=True)
class ExecutionSettings:
    """How the detector runs: where, in what arithmetic, how many images at once, what decodes and what shows.

    Never saved in a profile (loading one takes the caller's); apart from ``precision`` (see
    :meth:`DetectorConfig.numbers_key`) they change no score beyond rounding. Frozen once validated.

    Parameters
    ----------
    device:
        Torch device: ``"cpu"``, ``"cuda"``, ``"cuda:N"``, ``"mps"``, or ``"auto"`` (``cuda`` where torch sees a
        GPU, then ``mps``, else ``cpu``; :func:`resolve_device`). A device torch cannot use is a ``ValueError`` naming it.
    cache_dir:
        Where downloaded weights, text embeddings and ONNX exports are cached (default: the user cache dir).
    precision:
        The backbone's arithmetic: ``"fp32"``, or ``"bf16"`` / ``"fp16"`` (torch autocast; its outputs, and
        everything after the backbone, stay fp32). ``"auto"``: bf16 on a CUDA GPU that supports it, else
        fp32. Measured on CPU (docs/cli.md, "GPU"): bf16 keeps the pixel ranking of the maps to Spearman 0.998.
    batch_size:
        Images per backbone forward pass.
    num_workers:
        Threads that decode image files in parallel (``predict``, ``fit``, ``eval``); 0 decodes in the calling
        thread. The order and the images are the same either way.
    runtime:
        What runs the backbone's image path: ``"torch"``, or ``"onnxruntime"`` (the ONNX export of the same
        model and weights, :class:`dualclip.export.OnnxBackbone`; made once into the cache unless
        ``onnx_file`` is given). Text prompts are always embedded by torch.
    onnx_file:
        With ``runtime="onnxruntime"``: a file made by ``dualclip export`` (refused if it was exported for
        other weights or settings).
    match_memory_mb:
        Most memory, in MiB, one block of patch distances of the visual reference may take (a batch of pair
        matrices, a slice of a memory bank): larger matchings are computed in blocks under it, on the
        backbone's device. The scores are the same for any budget; only speed and peak memory change.
    progress:
        Show progress bars.
    """

    device: str = "auto"
    cache_dir: str | None = None
    precision: Precision = "auto"
    batch_size: int = 8
    num_workers: int = 0
    runtime: Runtime = "torch"
    onnx_file: str | None = None
    match_memory_mb: float = 512.0
    progress: bool = True

    def __post_init__(self) -> None:
        _check(self.batch_size >= 1, "batch_size must be >= 1")
        _one_of("runtime", self.runtime, RUNTIMES)
        _one_of("precision", self.precision, PRECISIONS)
        _check(self.num_workers >= 0, "num_workers must be >= 0")
        _check(
            isinstance(self.match_memory_mb, int | float)
            and not isinstance(self.match_memory_mb, bool)
            and math.isfinite(self.match_memory_mb)
            and self.match_memory_mb > 0,
            f"match_memory_mb must be a positive number of MiB, got {self.match_memory_mb!r}",
        )
        _check(
            self.precision in ("auto", "fp32") or self.runtime == "torch",
            "precision bf16/fp16 applies to the torch runtime (onnxruntime runs the exported fp32 graph)",
        )
        _check(
            self.onnx_file is None or self.runtime == "onnxruntime",
            "onnx_file= is only used with runtime='onnxruntime'",
        )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def arithmetic(self) -> dict[str, Any]:
        """The settings among these that change the scores beyond rounding (:data:`ARITHMETIC_FIELDS`)."""
        return {k: getattr(self, k) for k in ARITHMETIC_FIELDS}


METHOD_FIELDS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(MethodSettings))
EXECUTION_FIELDS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(ExecutionSettings))
ARITHMETIC_FIELDS: tuple[str, ...] = ("precision",)
"""The execution settings that change the scores beyond rounding (bf16/fp16 arithmetic): part of the keys."""


@dataclass(frozen=True, init=False)
class DetectorConfig:
    """Settings of :class:`dualclip.DualClipDetector`: the method (:class:`MethodSettings`, what is computed) and
    the execution (:class:`ExecutionSettings`, how it runs).

    Every setting of either is accepted as a flat keyword and read as an attribute
    (``DetectorConfig(backbone="effnet-lite0", k=3, device="cpu").k``); ``method=`` and ``execution=`` take
    whole objects (or dicts of them), which flat keywords then change. Frozen: ``dataclasses.replace(config,
    seed=1)`` returns a validated copy.
    """

    method: MethodSettings
    execution: ExecutionSettings

    def __init__(
        self,
        method: MethodSettings | dict | None = None,
        execution: ExecutionSettings | dict | None = None,
        **settings: Any,
    ) -> None:
        unknown = sorted(set(settings) - set(METHOD_FIELDS) - set(EXECUTION_FIELDS))
        if unknown:
            raise TypeError(f"DetectorConfig got unknown setting(s): {', '.join(unknown)}")
        m = _build(MethodSettings, method, {k: v for k, v in settings.items() if k in METHOD_FIELDS})
        e = _build(ExecutionSettings, execution, {k: v for k, v in settings.items() if k in EXECUTION_FIELDS})
        object.__setattr__(self, "method", m)
        object.__setattr__(self, "execution", e)

    def __getattr__(self, name: str) -> Any:
        # only called when normal lookup fails: a flat setting name reads from its part
        if name in METHOD_FIELDS:
            return getattr(self.method, name)
        if name in EXECUTION_FIELDS:
            return getattr(self.execution, name)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def method_key(self) -> dict[str, Any]:
        """The method settings as canonical JSON-able values: what a profile saves and a worker rebuilds."""
        return self.method.to_dict()

    def numbers_key(self) -> dict[str, Any]:
        """What the numbers depend on among the settings: the method settings and the arithmetic
        (``precision``); hashed into an archive run's resume key and an evaluation result's fingerprint.
        Device, batch size, decoding threads, runtime, cache and progress are left out."""
        return {"method": self.method_key(), **self.execution.arithmetic()}

    def to_dict(self) -> dict[str, Any]:
        """All settings, flat, as plain JSON-able values (recorded in every output)."""
        return {**self.method.to_dict(), **self.execution.to_dict()}


def _build(cls: type, base: Any, changes: dict[str, Any]) -> Any:
    """``cls`` from ``base`` (an instance, a dict of its fields, or None: the defaults) with ``changes``."""
    if base is None:
        return cls(**changes)
    if isinstance(base, dict):
        return cls(**{**base, **changes})
    if not isinstance(base, cls):
        raise TypeError(f"expected {cls.__name__}, a dict of its settings or None, got {type(base).__name__}")
    return dataclasses.replace(base, **changes) if changes else base


def resolve_precision(precision: str, device: str, runtime: str = "torch") -> str:
    """The arithmetic a ``precision`` setting names on a resolved ``device``: ``"auto"`` -> ``"bf16"`` on a CUDA
    GPU that supports it, else ``"fp32"``; always ``"fp32"`` on the onnxruntime runtime (the exported graph)."""
    import torch

    if runtime != "torch":
        return "fp32"
    if precision != "auto":
        return precision
    if device.startswith("cuda") and torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return "bf16"
    return "fp32"


def resolve_device(device: str) -> str:
    """The torch device a ``device`` setting names: ``"auto"`` -> ``"cuda"``, else ``"mps"``, else ``"cpu"``.

    Raises ``ValueError`` for a device torch does not know or cannot use here."""
    import torch

    if device == "auto":
        if torch.cuda.is_available():
            return "cuda"
        return "mps" if torch.backends.mps.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ConfigError(f"unknown device {device!r}: use 'cpu', 'cuda', 'cuda:N' or 'auto'") from exc
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device {device!r} asked for, but torch sees no CUDA GPU here: use 'cpu' or 'auto'")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ConfigError(f"device {device!r} asked for, but torch sees {torch.cuda.device_count()} CUDA GPU(s)")
    elif dev.type != "cpu" and not (dev.type == "mps" and torch.backends.mps.is_available()):
        raise ConfigError(f"device {device!r} is not available here: use 'cpu', 'cuda' or 'auto'")
    return device


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def _one_of(name: str, value: Any, allowed: tuple[str, ...], optional: bool = False) -> None:
    _check(
        (optional and value is None) or value in allowed,
        f"{name} must be one of {', '.join(allowed)}, got {value!r}",
    )
