"""The detector: orchestrates backbone -> text / visual-reference / adapted scores -> fusion -> maps.

Data flow of :meth:`DualClipDetector.predict`::

    images --load_image--> RGB --_extract--> global embedding, patch embeddings, match features
                                             (on the backbone's device, where every stage below runs)
       _reference_source : the run's mode, decided once: ProfileBank (fitted), GoldenReferences (references
                           given) or MutualPairs (scoring/sources.py)
       _text   : patch embeddings, [t_n, t_a]  -> s_txt (N, P);  global -> g_txt (N,)   (core/branches.py)
       _visual : source.visual_scores(matching spaces) -> s_vis (N, P), references
       _adapt  : synthesize anomalies, train head -> s_adapt (N, P), takes the text slot of the fusion
                 (or the profile's head)
       _fuse   : core/maps.fuse_branches in the source's units -> maps (N, S, S), image scores (N,)
    score_images returns one ScoreResult on the host; predict() alone turns it into per-image Predictions (maps
    resized to each image's own size), returned with the run's RunInfo.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .adaptation.adapt import AdaptationResult, fit_head, head_scores
from .adaptation.head import AdaptationHead
from .backbone import Backbone, BackboneOutput, extract_features
from .build import build_backbone
from .config import EXECUTION_FIELDS, DetectorConfig, MethodSettings
from .core import BranchScores, Fusion, fuse_branches, normal_scale, text_scores
from .data.images import array_to_rgb, grey_spread, load_image, pixel_digest, thumbnails, to_rgb8
from .errors import ConfigError, InputError, ProfileError
from .profile import (
    BLANK_GREYS,
    OodGuard,
    Profile,
    ScoreScale,
    build_bank,
    weights_fingerprint,
)
from .scoring import (
    centre,
    combine_parts,
    fuse,
    near_duplicates,
    positional_offsets,
    resize_map,
)
from .scoring.plain import PlainBank, plain_space
from .scoring.sources import (
    GoldenReferences,
    Matching,
    MutualPairs,
    ProfileBank,
    ReferenceSource,
    bank_scores,
    part_moments,
)
from .text import TextEmbeddingCache
from .thresholds import Threshold, f1_threshold, quantile_threshold

log = logging.getLogger(__name__)

ImageInput = str | os.PathLike | Image.Image | np.ndarray | torch.Tensor
PROFILE_UNITS = "normal spreads above the normal mean (0: a typical normal image)"
"""The units of a fitted detector's scores."""


@dataclass
class Prediction:
    """The result for one image.

    Attributes
    ----------
    score:
        Image anomaly score, higher = more anomalous.
    anomaly_map:
        ``(H, W)`` float32 map at the input image's own size, same units as ``score``.
    branch_scores:
        Per-branch image-level scores: ``text_global`` (g_txt), ``text``, ``visual``, ``adapted`` (max of that
        branch's patch map), where the branch ran.
    branch_maps:
        Per-branch ``(h, w)`` patch-grid maps (raw branch units) for debugging.
    references:
        Indices (into the run's images, or into the golden references) this image was compared with.
    source:
        The path the image came from, if any.
    unusable:
        Why the image is outside the profile's distribution (its verdict is then ``"unusable"``), or ``None``
        (inside, or no profile guard: see :class:`~dualclip.profile.OodGuard`).
    """

    score: float
    anomaly_map: np.ndarray
    branch_scores: dict[str, float] = field(default_factory=dict)
    branch_maps: dict[str, np.ndarray] = field(default_factory=dict)
    references: list[int] = field(default_factory=list)
    source: str | None = None
    unusable: str | None = None

    def __repr__(self) -> str:
        h, w = self.anomaly_map.shape
        flag = "" if self.unusable is None else ", unusable"
        return f"Prediction(score={self.score:.4f}, map={h}x{w}, source={self.source!r}{flag})"


class Predictions(list):
    """What :meth:`DualClipDetector.predict` returns: the :class:`Prediction` of each image, in input order (a
    ``list``), and ``run``, the :class:`RunInfo` of that call (seed, references, branches, timings). The detector
    keeps no record of its last run: each call's information comes back with its predictions."""

    def __init__(self, predictions=(), run: RunInfo | None = None) -> None:
        super().__init__(predictions)
        self.run = run


@dataclass
class RunInfo:
    """What a run used, recorded in every output: seed, pairing, references, branches, weights, timings."""

    n_images: int
    seed: int
    pairing: str
    references: list[list[int]]
    branches: list[str]
    temperature: float
    backbone: str
    weights: str | None
    image_size: int
    timings_s: dict[str, float]
    k_effective: int | None = None
    duplicate_pairs: int = 0
    synthetic_images: int | None = None
    synthesis_bases: list[int] | None = None
    distance: str | None = None
    neighbourhood: list[int] | None = None
    hybrid_norm: str | None = None
    centring: str | None = None
    border: str | None = None
    precision: str | None = None

    def to_dict(self, with_references: bool = True) -> dict:
        d = dataclasses.asdict(self)
        if not with_references:
            d.pop("references")
        return {k: v for k, v in d.items() if v is not None}


@dataclass
class ScoreResult:
    """One run of the pipeline over N images at processing size S.

    Attributes
    ----------
    image_scores:
        ``(N,)`` float32 image anomaly scores.
    maps:
        ``(N, S, S)`` float32 anomaly maps at the processing size, same units as ``image_scores``.
    branches:
        Every branch's raw scores (:class:`BranchScores`).
    grid:
        ``(h, w)`` patch grid, ``h * w == P``.
    run:
        :class:`RunInfo` of this run (``references[i]``: the indices image i was compared with).
    unusable:
        ``(N,)`` why each image is outside the profile's distribution, or ``None`` (see :class:`Prediction`).
    """

    image_scores: torch.Tensor
    maps: torch.Tensor
    branches: BranchScores
    grid: tuple[int, int]
    run: RunInfo
    unusable: list[str | None] = field(default_factory=list)


_RUN_FIELDS = ("duplicate_pairs", "centring", "plain_grid")
"""BranchScores fields that describe the run, not per-image scores."""


def _concat(results: list[ScoreResult]) -> ScoreResult:
    """One result of the images of several single-image results (profile mode)."""
    first = results[0]

    def cat(name: str) -> torch.Tensor | None:
        parts = [getattr(r.branches, name) for r in results]
        return None if parts[0] is None else torch.cat(parts)

    timings: dict[str, float] = {}
    for r in results:
        for k, v in r.run.timings_s.items():
            timings[k] = timings.get(k, 0.0) + v
    run = dataclasses.replace(
        first.run,
        n_images=len(results),
        references=[ref for r in results for ref in r.run.references],
        timings_s=timings,
    )
    branches = BranchScores(
        **{f.name: cat(f.name) for f in dataclasses.fields(BranchScores) if f.name not in _RUN_FIELDS},
        centring=first.branches.centring,
        plain_grid=first.branches.plain_grid,
    )
    return ScoreResult(
        image_scores=torch.cat([r.image_scores for r in results]),
        maps=torch.cat([r.maps for r in results]),
        branches=branches,
        grid=first.grid,
        run=run,
        unusable=[u for r in results for u in r.unusable],
    )


def _canonical_order(images: list[Image.Image]) -> list[int]:
    """The images' positions sorted by their pixels' digest (equal images: input order): a zero-shot run scores
    the images in this order, so partners depend on the set of images, not on how it was listed."""
    digests = [pixel_digest(img) for img in images]
    return sorted(range(len(images)), key=digests.__getitem__)


def _reorder(result: ScoreResult, order: list[int]) -> ScoreResult:
    """``result`` of ``[images[i] for i in order]`` back in the input order of ``images`` (reference indices
    into the run renamed; golden reference indices kept)."""
    inv = [0] * len(order)
    for pos, i in enumerate(order):
        inv[i] = pos
    index = torch.tensor(inv)

    def back(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else t[index]

    run = result.run
    refs = [run.references[inv[i]] for i in range(len(order))]
    if run.pairing != "golden":
        refs = [[order[j] for j in r] for r in refs]
    run = dataclasses.replace(
        run,
        references=refs,
        synthesis_bases=None if run.synthesis_bases is None else sorted(order[b] for b in run.synthesis_bases),
    )
    branches = dataclasses.replace(
        result.branches,
        **{
            f.name: back(getattr(result.branches, f.name))
            for f in dataclasses.fields(BranchScores)
            if f.name not in _RUN_FIELDS
        },
    )
    return ScoreResult(
        image_scores=back(result.image_scores),
        maps=back(result.maps),
        branches=branches,
        grid=result.grid,
        run=run,
        unusable=[result.unusable[inv[i]] for i in range(len(order))] if result.unusable else [],
    )


def _on_host(result: ScoreResult) -> ScoreResult:
    """``result`` with its tensors on the host (the pipeline runs on the backbone's device until here)."""

    def host(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else t.cpu()

    branches = dataclasses.replace(
        result.branches,
        **{
            f.name: host(getattr(result.branches, f.name))
            for f in dataclasses.fields(BranchScores)
            if f.name not in _RUN_FIELDS
        },
    )
    return dataclasses.replace(
        result, image_scores=host(result.image_scores), maps=host(result.maps), branches=branches
    )


def _as_rgb(item: ImageInput) -> tuple[Image.Image, str | None]:
    if isinstance(item, Image.Image):
        return to_rgb8(item), None
    if isinstance(item, np.ndarray | torch.Tensor):
        return array_to_rgb(item), None
    return load_image(item), str(item)


class _StageClock:
    """Wall-clock seconds per pipeline stage: ``with clock("backbone"): ...`` adds to ``clock.seconds``."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, stage: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[stage] = self.seconds.get(stage, 0.0) + time.perf_counter() - start


def _check_profile_scale(path, profile: Profile, det: DualClipDetector) -> None:
    """A profile's score scale must hold the moments of every branch it runs (each patch branch; the global
    text score and the map's image score where text runs; each part of a two-part distance)."""
    from .scoring.matching import distance_parts

    use_text, use_visual = det._branches_to_run(len(profile.normal_scores), None)
    scale = profile.scale
    needed = {
        "patch": [
            b
            for b, on in (
                ("text", use_text),
                ("adapted", det.config.tta),
                ("visual", use_visual),
                ("plain", use_visual and profile.plain is not None),
            )
            if on
        ],
        "image": (["text_global", "map"] if use_text else []) + (["views"] if profile.plain is not None else []),
        "parts": list(distance_parts(det.config.distance)) if use_visual and len(profile.bank) > 1 else [],
    }
    for group, names in needed.items():
        missing = [n for n in names if n not in getattr(scale, group)]
        if missing:
            raise ProfileError(
                f"{path} is damaged: scale.{group} holds no moments for {', '.join(missing)}, which it scores with"
            )


def _check_profile_geometry(path, profile: Profile, backbone: Backbone) -> None:
    """A profile must fit the model it is loaded with (one forward pass of a blank image gives the grid and the
    widths): its image size, neighbourhood sizes (at most the grid's side), bank widths (each layer's channels),
    out-of-distribution embeddings (the global embedding's width) and positional offsets (one per position)."""
    if profile.meta.get("image_size") != backbone.image_size:
        raise ProfileError(
            f"{path} is damaged: it records image_size {profile.meta.get('image_size')!r}, its settings give "
            f"{backbone.image_size}"
        )
    size = backbone.image_size
    with torch.inference_mode():
        out = backbone(torch.zeros(1, 3, size, size, device=next(backbone.parameters()).device))
    grid = out.grid
    sizes = profile.meta.get("neighbourhood") or []
    if any(s > max(grid) for s in sizes):
        raise ProfileError(
            f"{path} is damaged: its neighbourhood sizes {sizes} exceed the model's feature grid {grid[0]} x {grid[1]}"
        )
    widths = [t.shape[-1] for t in out.match_features]
    for part, spaces in profile.bank.items():
        for s, space in enumerate(spaces):
            got = [t.shape[1] for t in space]
            if got != widths:
                raise ProfileError(
                    f"{path} is damaged: the bank tensors bank.{part}.{s}.* have widths {got}, the model's "
                    f"matching layers {widths}"
                )
    if profile.ood is not None and profile.ood.embeddings.shape[1] != out.global_embedding.shape[-1]:
        raise ProfileError(
            f"{path} is damaged: tensor ood.embeddings has width {profile.ood.embeddings.shape[1]}, the model's "
            f"global embedding {out.global_embedding.shape[-1]}"
        )
    offsets = profile.scale.position
    if offsets is not None and len(offsets) != grid[0] * grid[1]:
        raise ProfileError(
            f"{path} is damaged: its positional offsets (scale.position) cover {len(offsets)} positions, the "
            f"model's grid {grid[0]} x {grid[1]} has {grid[0] * grid[1]}"
        )


def _check_plain_geometry(path, profile: Profile, det: DualClipDetector) -> None:
    """A profile's plain view must fit the model's (one forward pass of a blank image at the plain view's size):
    its grid and its patches' width."""
    if profile.plain is None:
        return
    out = det.plain_probe()
    width = sum(t.shape[-1] for t in out.match_features)
    got = (tuple(profile.plain.grid), int(profile.plain.bank.shape[1]))
    if got != (tuple(out.grid), width):
        raise ProfileError(
            f"{path} is damaged: its plain view has a {got[0][0]} x {got[0][1]} grid of width {got[1]}, the model's "
            f"plain view at {det.plain_backbone.image_size} px a {out.grid[0]} x {out.grid[1]} grid of width {width}"
        )


def _saved_settings(profile: Profile) -> dict:
    """A profile's method settings, with what a profile saved before a setting existed computed with: the network's
    own border padding, no centring (no offsets saved), the distance and neighbourhood it recorded. The execution
    settings that older profiles saved along (device, batch size, ...) are the caller's and left out, and so is
    the removed ``pairing`` (its one value was ``"random"``)."""
    settings = {k: v for k, v in profile.meta["config"].items() if k not in EXECUTION_FIELDS and k != "pairing"}
    centring = settings.get("centring") or profile.meta.get("centring")
    if centring not in (None, "none") and profile.scale.position is None:
        raise ProfileError(f"it records centring {centring!r} but holds no positional offsets (scale.position)")
    if centring == "none" and profile.scale.position is not None:
        raise ProfileError("it holds positional offsets (scale.position) but records centring 'none'")
    for key in ("distance", "neighbourhood", "centring"):
        mine, top = settings.get(key), profile.meta.get(key)
        if isinstance(mine, int) and not isinstance(mine, bool) and key == "neighbourhood":
            mine = [mine]
        if mine is not None and top is not None and mine != top:
            raise ProfileError(f"it records {key} {top!r}, its settings (config.{key}) give {mine!r}")
    settings.setdefault("border", "zero")
    settings.setdefault("hybrid_norm", "zscore")
    if profile.plain is not None and "plain_weight" not in settings:
        raise ProfileError("it holds a plain view (plain) but its settings name no plain_weight")
    settings.setdefault("plain_weight", 0.0)
    weight = settings["plain_weight"]
    if profile.plain is None and weight != 0:
        raise ProfileError(f"it records plain_weight {weight!r} but holds no plain view (plain)")
    if profile.plain is not None and not (isinstance(weight, int | float) and weight > 0):
        raise ProfileError(f"it holds a plain view (plain) but records plain_weight {weight!r}")
    if settings.get("centring") is None:
        settings["centring"] = profile.centring
    for key in ("distance", "neighbourhood"):
        if settings.get(key) is None and profile.meta.get(key) is not None:
            settings[key] = profile.meta[key]
    return settings


def _least_bank_size(grid: tuple[int, int]) -> int:
    """More patches than one image has: no normal image can then own the whole bank."""
    return grid[0] * grid[1] + 1


def _check_normal_spread(scale: ScoreScale) -> None:
    """A profile's units need normal scores that vary: refuse non-finite or degenerate moments (identical images)."""
    for name, m in scale.named().items():
        if not (math.isfinite(m.mean) and math.isfinite(m.std)):
            raise InputError(
                f"the normal images' {name} statistics are not finite numbers (mean {m.mean}, std {m.std})"
            )
        if m.degenerate:
            raise InputError(
                f"the normal images' scores do not vary ({name}: spread {m.std:.3g}): are they copies of one image? "
                "fit needs normal images that differ"
            )


class DualClipDetector:
    """Zero-shot anomaly detector: CLIP text guidance + dual-image visual reference (+ adaptation).

    Parameters
    ----------
    config:
        All settings (:class:`DetectorConfig`); defaults to the CLIP preset.
    backbone:
        An already built :class:`~dualclip.backbone.Backbone` to use instead of building one from
        ``config`` (e.g. a small random CLIP in tests).

    Examples
    --------
    >>> det = DualClipDetector(DetectorConfig(backbone="effnet-lite0", k=1, seed=0))  # doctest: +SKIP
    >>> preds = det.predict(["a.png", "b.png"], class_name="magnetic tile")          # doctest: +SKIP
    >>> preds[0].score, preds[0].anomaly_map.shape                                   # doctest: +SKIP
    """

    def __init__(
        self, config: DetectorConfig | None = None, backbone: Backbone | None = None, profile: Profile | None = None
    ) -> None:
        self.config = config or DetectorConfig()
        self._backbone = backbone
        self.profile_ = profile
        self.text_cache = TextEmbeddingCache()  # text embeddings of this detector's backbone, per class
        self._bank: tuple[Profile, ProfileBank] | None = None  # the source of profile_, its bank moved once
        self._plain_view: Backbone | None = None  # the backbone's plain view, made on first use

    @property
    def backbone(self) -> Backbone:
        """The backbone, built (and its weights loaded) on first use."""
        if self._backbone is None:
            self._backbone = build_backbone(self.config)
        return self._backbone

    @property
    def plain_backbone(self) -> Backbone:
        """The network of the plain view (:mod:`dualclip.scoring.plain`): the backbone's weights at
        ``plain_image_size`` with their own zero padding (the torch model, also under ``runtime="onnxruntime"``)."""
        if self._plain_view is None:
            self._plain_view = self.backbone.weights_module().plain_view(self.config.plain_image_size)
        return self._plain_view

    def plain_weight(self) -> float:
        """The plain view's weight in a fitted profile's map: the setting, or the backbone's default."""
        w = self.config.plain_weight
        return self.backbone.default_plain_weight if w is None else float(w)

    # -- public API -------------------------------------------------------------------------------------
    def predict(
        self,
        images: Sequence[ImageInput],
        class_name: str | None = None,
        references: Sequence[ImageInput] | None = None,
    ) -> Predictions:
        """Score ``images`` (paths, PIL images, ``H x W x 3`` uint8 / ``H x W`` arrays or tensors) of one
        category.

        Without ``references`` the images are each other's visual references (the dual-image setting);
        with ``references`` (golden normal images) every image is compared with all of them instead.
        A single image without references runs text-only with a warning (a vision-only backbone raises).
        After :meth:`fit` (or :meth:`load`) every image is scored on its own against the profile, in the
        profile's fixed units: the same score alone or in any batch. The result's ``run`` says what the call used.
        """
        if len(images) == 0:
            raise InputError("no images to score")
        if references and self.profile_ is not None:
            raise InputError("this detector is fitted: it compares images with its profile, not with references")
        loaded = [_as_rgb(item) for item in images]
        golden = [_as_rgb(item)[0] for item in references] if references else None
        result = self.score_images([img for img, _ in loaded], class_name=class_name, golden=golden)
        branch_image = result.branches.image()
        branch_patch = result.branches.patch()
        predictions = [
            Prediction(
                score=float(result.image_scores[i]),
                anomaly_map=resize_map(result.maps[i], img.height, img.width),
                branch_scores={k: float(v[i]) for k, v in branch_image.items()},
                branch_maps={
                    k: v[i].reshape(result.branches.grid_of(k, result.grid)).numpy() for k, v in branch_patch.items()
                },
                references=list(result.run.references[i]),
                source=source,
                unusable=result.unusable[i] if result.unusable else None,
            )
            for i, (img, source) in enumerate(loaded)
        ]
        return Predictions(predictions, run=result.run)

    # -- the pipeline -----------------------------------------------------------------------------------
    def score_images(
        self,
        images: list[Image.Image],
        class_name: str | None = None,
        golden: list[Image.Image] | None = None,
    ) -> ScoreResult:
        """Run the pipeline on RGB images: maps at S x S, image scores and every branch's scores.

        A fitted detector scores image by image: the same arithmetic, hence the same score, in any batch.
        Without a profile the images are scored in an order of their pixels' digests (and the results given
        back in input order): partners, hence scores, depend on the set of images, not on their order."""
        from tqdm.auto import tqdm

        if self.profile_ is not None:
            class_name = self._profile_class_name(class_name)
            if len(images) > 1:
                bar = tqdm(images, desc="scoring", unit="img", disable=not self.config.progress, leave=False)
                return _concat([self._score([img], class_name, None, progress=False) for img in bar])
            return self._score(images, class_name, golden, progress=self.config.progress)
        order = _canonical_order(images)
        if order == list(range(len(order))):
            return self._score(images, class_name, golden, progress=self.config.progress)
        return _reorder(self._score([images[i] for i in order], class_name, golden, self.config.progress), order)

    def _score(
        self, images: list[Image.Image], class_name: str | None, golden: list[Image.Image] | None, progress: bool
    ) -> ScoreResult:
        """The pipeline on one run of images: features -> the reference source's visual scores, text and adapted
        scores -> fusion in the source's units. Every tensor stays on the backbone's device; the result is
        handed back on the host."""
        cfg = self.config
        profile = self.profile_
        use_text, use_visual = self._branches_to_run(len(images), golden)
        clock = _StageClock()
        with clock("backbone"):
            feats = self._extract(images, keep_patch_embeddings=use_text, desc="features", progress=progress)
        source = self._reference_source(images, golden, clock)
        branches = BranchScores()
        temperature = cfg.temperature or self.backbone.logit_scale
        with clock("text"):
            text = self._text(feats, class_name, use_text, temperature, branches)
        refs: list[list[int]] = [[] for _ in images]
        if use_visual:
            refs = self._visual(source, feats, clock, branches, progress)
            if profile is not None and profile.plain is not None:
                branches.plain = self._plain(images, profile.plain, clock, progress)
                branches.plain_grid = profile.plain.grid
        adaptation = None
        if cfg.tta and profile is not None and profile.head is not None:
            with clock("adaptation"):
                head = AdaptationHead.from_tensors(profile.head).to(feats.global_embedding.device)
                branches.adapted = head_scores(head, feats, use_text)
        elif cfg.tta:
            with clock("adaptation"):
                adaptation = self._adapt(images, feats, text, temperature, branches)
                branches.adapted = adaptation.patch_scores
        with clock("fusion"):
            maps, image_scores = self._fuse(branches, feats.grid, source.scale)
        run = RunInfo(
            n_images=len(images),
            seed=cfg.seed,
            pairing=source.kind,
            references=refs,
            branches=sorted(branches.patch()),
            temperature=temperature,
            backbone=self.backbone.name,
            weights=self.backbone.weights_id,
            image_size=self.backbone.image_size,
            border=self.backbone.border,
            timings_s=clock.seconds,
            k_effective=(max((len(r) for r in refs), default=0) or None) if use_visual else None,
            duplicate_pairs=branches.duplicate_pairs,
            precision=self.precision(),
        )
        if adaptation is not None:
            run.synthetic_images = cfg.adaptation.synthetic_budget(len(images))
            run.synthesis_bases = adaptation.bases
        if use_visual:
            run.distance, sizes = self.matching()
            run.neighbourhood = list(sizes)
            run.centring = branches.centring
            run.hybrid_norm = self.hybrid_norm() if run.distance == "hybrid" else None
        unusable: list[str | None] = [None] * len(images)
        if profile is not None and profile.ood is not None:
            unusable = profile.ood.check(feats.global_embedding, [grey_spread(img) for img in images])
        return _on_host(
            ScoreResult(
                image_scores=image_scores, maps=maps, branches=branches, grid=feats.grid, run=run, unusable=unusable
            )
        )

    def _reference_source(
        self, images: list[Image.Image], golden: list[Image.Image] | None, clock: _StageClock
    ) -> ReferenceSource:
        """The run's visual reference: the profile's bank (fitted), the golden images (given), else mutual pairs
        among the run's images."""
        if self.profile_ is not None:
            return self._profile_bank()
        if golden is not None:
            with clock("backbone"):
                gfeats = self._extract(golden, keep_patch_embeddings=False, desc="references")
            return GoldenReferences(self.matching_settings().spaces(gfeats.match_features, gfeats.grid), gfeats.grid)
        cfg = self.config
        forbidden = near_duplicates(thumbnails(images), cfg.duplicate_tolerance)
        return MutualPairs(cfg.k, cfg.k_aggregation, cfg.seed, forbidden)

    def matching(self, fitted: bool | None = None) -> tuple[str, tuple[int, ...]]:
        """The visual branch's (distance, neighbourhood sizes): the settings, or the backbone's defaults (a
        fitted profile's bank may have its own default neighbourhood). ``fitted``: whether the matching is
        against a fitted profile's bank (default: whether this detector holds one)."""
        cfg, backbone = self.config, self.backbone
        fitted = self.profile_ is not None if fitted is None else fitted
        distance = cfg.distance or backbone.default_distance
        default_sizes = backbone.default_neighbourhood
        if fitted and backbone.default_profile_neighbourhood is not None:
            default_sizes = backbone.default_profile_neighbourhood
        sizes = cfg.neighbourhood or default_sizes
        return distance, (sizes,) if isinstance(sizes, int) else tuple(sizes)

    def hybrid_norm(self) -> str:
        """How the hybrid distance's parts are standardised: the setting, or the backbone's default."""
        return self.config.hybrid_norm or self.backbone.default_hybrid_norm

    def centring(self) -> str:
        """The visual branch's positional centring: the setting, or the backbone's default."""
        return self.config.centring or self.backbone.default_centring

    def _branches_to_run(self, n: int, golden: list | None) -> tuple[bool, bool]:
        """(use_text, use_visual) for this run: the settings, limited by the backbone and the image count."""
        cfg, backbone = self.config, self.backbone
        use_text = cfg.use_text and backbone.has_text
        if cfg.use_text and not backbone.has_text and not cfg.use_visual and not cfg.tta:
            raise ConfigError(f"backbone {backbone.name!r} has no text tower: turn the visual branch or tta on")
        use_visual = cfg.use_visual
        if use_visual and golden is None and self.profile_ is None and n < 2:
            if not use_text:
                raise InputError(
                    f"one image and a vision-only backbone ({backbone.name!r}): give at least two images "
                    "or golden references"
                )
            log.warning(
                "a single image has no partner for the visual reference: running text-only "
                "(give golden references to use the visual branch)"
            )
            use_visual = False
        return use_text, use_visual

    def _extract(
        self,
        images: list[Image.Image],
        keep_patch_embeddings: bool,
        desc: str,
        progress: bool | None = None,
        backbone: Backbone | None = None,
    ) -> BackboneOutput:
        """Features of ``images`` by the backbone (or another network, the plain view's)."""
        cfg = self.config
        return extract_features(
            self.backbone if backbone is None else backbone,
            images,
            cfg.batch_size,
            keep_patch_embeddings=keep_patch_embeddings,
            progress=cfg.progress if progress is None else progress,
            desc=desc,
            precision=self.precision(),
        )

    def precision(self) -> str:
        """The backbone's arithmetic this detector uses (``config.precision`` resolved on its device)."""
        from .config import resolve_precision

        device = str(next(self.backbone.parameters()).device)
        return resolve_precision(self.config.precision, device, self.config.runtime)

    def _text(
        self, feats: BackboneOutput, class_name: str | None, use_text: bool, temperature: float, out: BranchScores
    ) -> torch.Tensor | None:
        """docs/method.md §4: fills ``out.text`` and ``out.text_global``; returns ``[t_n, t_a]`` (also for adaptation)."""
        cfg, backbone = self.config, self.backbone
        if not (use_text or (cfg.tta and backbone.has_text)):
            return None
        text = self.text_cache.get(backbone, class_name, cfg.cache_dir)
        if use_text:
            text_scores(feats, text, temperature, out)
        return text

    def _visual(
        self, source: ReferenceSource, feats: BackboneOutput, clock: _StageClock, out: BranchScores, progress: bool
    ) -> list[list[int]]:
        """docs/method.md §5: fills ``out.visual`` from the run's reference ``source``; returns each image's reference
        indices. ``progress``: a bar over the matching."""
        matching = self.matching_settings()
        spaces = matching.spaces(feats.match_features, feats.grid)
        with clock("reference"):
            found = source.visual_scores(spaces, feats.grid, matching, progress)
        out.visual, out.centring, out.duplicate_pairs = found.scores, found.centring, found.duplicate_pairs
        return found.references

    def _plain_features(self, images: list[Image.Image], desc: str, progress: bool | None = None):
        """The plain view's ``(N, P', C)`` patch features of ``images`` and their grid."""
        out = self._extract(
            images, keep_patch_embeddings=False, desc=desc, progress=progress, backbone=self.plain_backbone
        )
        return plain_space(out.match_features, out.grid), out.grid

    def _plain(self, images: list[Image.Image], bank: PlainBank, clock: _StageClock, progress: bool) -> torch.Tensor:
        """The plain branch ``(N, P')`` of ``images``: their plain-view distances to the profile's plain bank."""
        with clock("backbone"):
            space, plain_grid = self._plain_features(images, "features (plain view)", progress)
        if plain_grid != bank.grid:
            raise ProfileError(
                f"the profile's plain view has a {bank.grid[0]} x {bank.grid[1]} grid, this model's "
                f"{plain_grid[0]} x {plain_grid[1]}: the profile is damaged"
            )
        with clock("reference"):
            return bank.scores(space, self.config.match_memory_mb)

    def plain_probe(self) -> BackboneOutput:
        """The plain view's output for one blank image at its size: its grid and its layers' widths."""
        view = self.plain_backbone
        size = view.image_size
        with torch.inference_mode():
            return view(torch.zeros(1, 3, size, size, device=next(view.parameters()).device))

    def _profile_bank(self) -> ProfileBank:
        """The reference source of ``profile_`` (made once per profile: its bank moves to a device once)."""
        if self._bank is None or self._bank[0] is not self.profile_:
            self._bank = (self.profile_, ProfileBank.of(self.profile_))
        return self._bank[1]

    def matching_settings(self, fitted: bool | None = None) -> Matching:
        """How the visual branch compares patches: distance, sizes, hybrid standardisation, centring, memory
        budget (settings, or the backbone's defaults; ``fitted``: see :meth:`matching`)."""
        distance, sizes = self.matching(fitted)
        robust = self.hybrid_norm() == "robust"
        return Matching(distance, sizes, robust, self.centring(), self.config.match_memory_mb)

    def profile_visual(
        self, spaces: dict[str, list[list[torch.Tensor]]], grid: tuple[int, int], nearest=None
    ) -> tuple[torch.Tensor, str]:
        """The fitted visual score ``(N, P)`` of images in their matching ``spaces`` (``spaces[part][s][l]``)
        and the centring it applied (:class:`~dualclip.scoring.sources.ProfileBank`); ``nearest(query, bank,
        part)``: the exported graph's batched bank search in place of
        :func:`~dualclip.scoring.bank_distances`."""
        found = self._profile_bank().visual_scores(spaces, grid, self.matching_settings(), nearest=nearest)
        return found.scores, found.centring

    def _adapt(
        self,
        images: list[Image.Image],
        feats: BackboneOutput,
        text: torch.Tensor | None,
        temperature: float,
        branches: BranchScores,
    ) -> AdaptationResult:
        """docs/method.md §7: the unadapted joint score picks the most normal-looking images as synthesis bases."""
        from .adaptation import adapt_patch_scores

        cfg = self.config
        patch = branches.patch()
        prior = fuse([(p, 1.0) for p in patch.values()], cfg.fusion_norm).amax(dim=1) if patch else None
        return adapt_patch_scores(self.backbone, images, feats, text, temperature, cfg, prior)

    def fusion(self) -> Fusion:
        """The fusion weights of this detector (settings, and the backbone's processing size)."""
        cfg = self.config
        return Fusion(
            cfg.alpha,
            cfg.beta,
            cfg.fusion_norm,
            cfg.image_score,
            cfg.sigma,
            self.backbone.image_size,
            self.plain_weight(),
        )

    def _fuse(
        self, branches: BranchScores, grid: tuple[int, int], scale: ScoreScale | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """docs/method.md §6 (:func:`~dualclip.core.fuse_branches`) with this detector's weights."""
        return fuse_branches(branches, grid, self.fusion(), scale)

    # -- profiles -----------------------------------------------------------------------------------------
    def fit(
        self,
        images: Sequence[ImageInput],
        class_name: str | None = None,
        threshold_quantile: float | None = None,
        validation_normal: Sequence[ImageInput] | None = None,
        validation_anomalous: Sequence[ImageInput] | None = None,
        sources: Sequence[str] | None = None,
    ) -> DualClipDetector:
        """Fit a profile on normal (defect-free) images; afterwards :meth:`predict` scores against it.

        The images become the golden references: their matching features form the memory bank (greedy
        coreset above ``config.memory_bank_size`` patches). Each of them is then scored against the bank
        without its own patches (leave-one-out), and those normal scores fix the units: every branch is
        standardised by its normal moments, and the final score by the normal scores' mean and standard
        deviation. With ``tta`` the adaptation head is trained here, on anomalies synthesized on the normal
        images, and kept in the profile.

        Parameters
        ----------
        images:
            At least two normal images of one product.
        class_name:
            The product's name for the text prompts (kept in the profile).
        threshold_quantile:
            Verdict threshold: this quantile of the normal images' leave-one-out scores (e.g. 0.99).
        validation_normal, validation_anomalous:
            Labelled validation images: the verdict threshold is the F1-optimal one on their profile scores.
        sources:
            What the profile records as the normal images' origins, one per image (default: their paths, where
            given as paths).

        Returns
        -------
        The detector itself, fitted (``profile_`` set).
        """
        from . import __version__

        cfg, backbone = self.config, self.backbone
        if len(images) < 2:
            raise InputError(f"fit needs at least 2 normal images (leave-one-out statistics), got {len(images)}")
        if threshold_quantile is not None and (validation_normal or validation_anomalous):
            raise ConfigError("give either a threshold quantile or a validation set, not both")
        if sources is not None and len(sources) != len(images):
            raise InputError(f"sources names {len(sources)} origins for {len(images)} images: give one per image")
        loaded = [_as_rgb(item) for item in images]
        rgb = [img for img, _ in loaded]
        self.profile_ = None
        use_text, use_visual = self._branches_to_run(len(rgb), golden=None)
        use_plain = use_visual and self.plain_weight() > 0
        if use_plain:  # refused before any image is processed, as a bank too small below
            self.plain_backbone  # noqa: B018 - a backbone without a plain view is refused here
        if use_plain and use_text:
            raise ConfigError(
                f"plain_weight={self.plain_weight()} mixes a plain view into a vision-only profile's map, and "
                f"{backbone.name!r} scores with text: use plain_weight=0"
            )
        if use_visual and cfg.memory_bank_size is not None:
            main_least, plain_least = self._least_bank_sizes()
            least = max(main_least, plain_least or 0)
            if cfg.memory_bank_size < least:
                view = f" (of the plain view, at plain_image_size={cfg.plain_image_size})" if least > main_least else ""
                raise ConfigError(
                    f"memory_bank_size={cfg.memory_bank_size} is too small: a bank must hold more than one image's "
                    f"{least - 1} patches{view}, so that every normal image is compared with other images "
                    f"(leave-one-out); use at least {least}, or None to keep every patch"
                )
        feats = self._extract(rgb, keep_patch_embeddings=use_text, desc="normal images")
        branches = BranchScores()
        temperature = cfg.temperature or backbone.logit_scale
        text = self._text(feats, class_name, use_text, temperature, branches)
        matching = self.matching_settings(fitted=True)
        distance, sizes = matching.distance, matching.sizes
        bank, owner, total, moments = {}, torch.zeros(0, dtype=torch.long), 0, None
        if use_visual:
            spaces = matching.spaces(feats.match_features, feats.grid)
            bank, owner, total = build_bank(spaces, cfg.memory_bank_size, cfg.seed, progress=cfg.progress)
            ids = torch.arange(len(rgb))
            progress = "leave-one-out" if cfg.progress else None
            loo = bank_scores(spaces, bank, ids, owner, progress=progress, memory_mb=matching.memory_mb)
            moments = part_moments(loo, matching.robust)
            branches.visual = combine_parts(loo, moments)
            offsets = positional_offsets(branches.visual, feats.grid, matching.centring)
            branches.visual = centre(branches.visual, offsets)
        else:
            offsets = None
        plain = None
        if use_plain:
            space, plain_grid = self._plain_features(rgb, "normal images (plain view)")
            flat, plain_owner, plain_total = build_bank(
                {"plain": [[space]]}, cfg.memory_bank_size, cfg.seed, progress=cfg.progress
            )
            plain = PlainBank(flat["plain"][0][0], plain_owner, plain_grid, plain_total)
            progress = "leave-one-out (plain view)" if cfg.progress else None
            loo = plain.scores(space, matching.memory_mb, query_owner=torch.arange(len(rgb)), progress=progress)
            branches.plain, branches.plain_grid = loo, plain_grid
        head = None
        if cfg.tta:
            head, _ = fit_head(backbone, rgb, text, temperature, cfg)
            branches.adapted = head_scores(head, feats, use_text)
        scale, normal_scores = normal_scale(branches, feats.grid, self.fusion())
        normal_scores = normal_scores.cpu()  # what a profile keeps lives on the host
        scale.parts = moments or {}
        scale.position = None if offsets is None else offsets.cpu().tolist()
        # the defaults this fit resolved are saved as settings: a later default cannot change a saved profile
        resolved = {"distance": distance, "neighbourhood": list(sizes), "border": backbone.border}
        resolved["hybrid_norm"] = self.hybrid_norm()
        resolved["plain_weight"] = self.plain_weight() if plain is not None else 0.0
        resolved["centring"] = self.centring() if offsets is not None else "none"
        _check_normal_spread(scale)
        size = backbone.image_size
        blanks = [Image.new("RGB", (size, size), (g, g, g)) for g in BLANK_GREYS]
        blank_feats = self._extract(blanks, keep_patch_embeddings=False, desc="blank frames", progress=False)
        ood = OodGuard.fit(feats.global_embedding, blank_feats.global_embedding, [grey_spread(img) for img in rgb])
        meta = {
            "config": {**cfg.method_key(), **resolved},
            "class_name": class_name,
            "backbone": backbone.name,
            "weights": backbone.weights_id,
            "weights_fingerprint": weights_fingerprint(backbone),
            "image_size": backbone.image_size,
            "distance": distance,
            "neighbourhood": list(sizes),
            "centring": self.centring() if offsets is not None else "none",
            "n_normal": len(rgb),
            "bank_patches": int(owner.numel()),
            "bank_patches_total": total,
            "sources": [src for _, src in loaded] if sources is None else [str(src) for src in sources],
            "created_by": f"dualclip {__version__}",
        }
        self.profile_ = Profile(
            bank=bank,
            bank_owner=owner,
            scale=scale,
            normal_scores=[float(s) for s in normal_scores],
            threshold=None,
            meta=meta,
            head=None if head is None else head.tensors(),
            ood=ood,
            plain=plain,
        )
        if threshold_quantile is not None:
            self.profile_.threshold = quantile_threshold(normal_scores.numpy(), threshold_quantile)
        elif validation_normal or validation_anomalous:
            if not validation_normal or not validation_anomalous:
                raise InputError("a validation set needs both normal and anomalous images")
            result = self.score_images([_as_rgb(i)[0] for i in [*validation_normal, *validation_anomalous]])
            labels = np.array([0] * len(validation_normal) + [1] * len(validation_anomalous))
            self.profile_.threshold = f1_threshold(labels, result.image_scores.numpy())
        return self

    def profile_class(self, class_name: str | None) -> str | None:
        """The class a fitted detector scores with: always its profile's. Another ``class_name`` is a
        ``ValueError`` where the profile's text statistics depend on it; elsewhere it has no effect."""
        fitted = self.profile_.meta.get("class_name")
        if class_name is not None and class_name != fitted and self.backbone.has_text and self.config.use_text:
            raise ProfileError(
                f"this profile was fitted for class {fitted!r}: its text statistics do not apply to {class_name!r}"
            )
        return fitted

    def scoring_class(self, class_name: str | None, strict: bool = True) -> str | None:
        """The class a run scores with when given ``class_name``: the profile's where the detector is fitted
        (another ``class_name`` is then a ``ValueError`` where the profile's text statistics depend on it, unless
        not ``strict``), else ``class_name`` itself."""
        if self.profile_ is None:
            return class_name
        return self.profile_class(class_name if strict else None)

    def min_images(self) -> int:
        """The fewest images one :meth:`predict` call without references can score: 2 where a vision-only
        zero-shot detector needs a partner for every image, else 1."""
        return 1 if self.profile_ is not None or self.backbone.has_text else 2

    def profile_summary(self) -> dict | None:
        """What outputs record of the fitted profile (units, sizes, identity, the guard), or ``None``."""
        if self.profile_ is None:
            return None
        meta = self.profile_.meta
        return {
            "units": PROFILE_UNITS,
            **{k: meta.get(k) for k in ("n_normal", "bank_patches", "weights_fingerprint", "created_by", "class_name")},
            "ood_guard": self.profile_.guard(),
            "plain_view": self.plain_summary(),
        }

    def plain_summary(self) -> dict | None:
        """The fitted profile's plain view in outputs: its weight, size and bank (kept / total), or ``None``."""
        plain = None if self.profile_ is None else self.profile_.plain
        if plain is None:
            return None
        return {
            "weight": self.plain_weight(),
            "image_size": self.config.plain_image_size,
            "grid": list(plain.grid),
            "bank_patches": int(plain.owner.numel()),
            "bank_patches_total": plain.total,
        }

    def normal_scores(self) -> list[float] | None:
        """The leave-one-out scores of the normal images the detector was fitted on, which fix its units and
        its heat maps' colour scale (:func:`~dualclip.output.heatmap_scale`); ``None`` for a zero-shot detector,
        whose scores and heat maps are in each run's own units."""
        return None if self.profile_ is None else list(self.profile_.normal_scores)

    def profile_fingerprint(self) -> str | None:
        """The fitted profile's :meth:`~dualclip.profile.Profile.fingerprint` (bank, scale, normal scores,
        threshold, settings), or ``None`` where the detector is not fitted."""
        return None if self.profile_ is None else self.profile_.fingerprint()

    def profile_meta(self) -> dict | None:
        """A copy of what the fitted profile records of itself (model, weights, class, sizes, sources, ...), or
        ``None`` where the detector is not fitted."""
        return None if self.profile_ is None else copy.deepcopy(self.profile_.meta)

    def _profile_class_name(self, class_name: str | None) -> str | None:
        fitted = self.profile_class(class_name)
        if class_name is not None and class_name != fitted:
            log.warning(
                "class_name %r has no effect: this profile uses no text and keeps its class %r", class_name, fitted
            )
        return fitted

    def min_bank_size(self) -> int:
        """The smallest ``memory_bank_size`` :meth:`fit` accepts with these settings: more than one image's patches,
        in the main view and (where a fit makes one) the plain view, so that every normal image keeps bank patches
        of other images (leave-one-out). One forward pass of a blank image per view."""
        main, plain = self._least_bank_sizes()
        return max(main, plain or 0)

    def _least_bank_sizes(self) -> tuple[int, int | None]:
        """The smallest bank of the main view and of the plain view (``None`` where a fit makes none)."""
        probe = self._extract([Image.new("RGB", (8, 8))], keep_patch_embeddings=False, desc="grid", progress=False)
        use_plain = self.config.use_visual and self.plain_weight() > 0
        return _least_bank_size(probe.grid), _least_bank_size(self.plain_probe().grid) if use_plain else None

    @property
    def threshold_(self) -> Threshold | None:
        """The profile's verdict threshold (``None``: not fitted, or fitted without one)."""
        return None if self.profile_ is None else self.profile_.threshold

    def save(self, path: str | os.PathLike, overwrite: bool = False) -> Path:
        """Save the fitted profile as a folder of safetensors + JSON (no pickle); see :class:`Profile`."""
        if self.profile_ is None:
            raise ProfileError("nothing to save: fit the detector on normal images first")
        return self.profile_.save(path, overwrite=overwrite)

    @classmethod
    def load(
        cls,
        path: str | os.PathLike,
        backbone: Backbone | None = None,
        device: str | None = None,
        runtime: str | None = None,
        onnx_file: str | os.PathLike | None = None,
        precision: str | None = None,
        num_workers: int | None = None,
        batch_size: int | None = None,
        progress: bool | None = None,
        cache_dir: str | os.PathLike | None = None,
        match_memory_mb: float | None = None,
    ) -> DualClipDetector:
        """A detector with the settings, weights and statistics of a saved profile.

        The model is built from the profile's method settings (or ``backbone`` is used) and must compute with the
        same weights as the one the profile was fitted with (weights fingerprint), else :class:`ProfileError`.
        ``device``, ``runtime``, ``onnx_file``, ``precision``, ``num_workers``, ``batch_size``, ``progress``,
        ``cache_dir`` and ``match_memory_mb`` are how it runs (:class:`~dualclip.config.ExecutionSettings`; ``None``: the default); a
        profile never carries them.
        """
        profile = Profile.load(path)
        try:
            method = MethodSettings(**_saved_settings(profile))
        except (TypeError, ValueError, AttributeError) as exc:
            raise ProfileError(f"{path}: its settings are not valid for this dualclip: {exc}") from exc
        execution = {
            "device": device,
            "runtime": runtime,
            "onnx_file": None if onnx_file is None else str(onnx_file),
            "precision": precision,
            "num_workers": num_workers,
            "batch_size": batch_size,
            "progress": progress,
            "cache_dir": None if cache_dir is None else str(cache_dir),
            "match_memory_mb": match_memory_mb,
        }
        try:
            config = DetectorConfig(method=method, **{k: v for k, v in execution.items() if v is not None})
        except ValueError as exc:
            raise ConfigError(f"{path}: {exc}") from exc
        det = cls(config, backbone=backbone, profile=profile)
        want = profile.meta.get("weights_fingerprint")
        got = weights_fingerprint(det.backbone)
        if det.backbone.name != profile.meta.get("backbone") or got != want:
            raise ProfileError(
                f"{path} was fitted with {profile.meta.get('backbone')!r} weights {profile.meta.get('weights')!r} "
                f"(fingerprint {want}); this model is {det.backbone.name!r} with weights {det.backbone.weights_id!r} "
                f"(fingerprint {got}): load it with the same model and weights, or fit a new profile"
            )
        _check_profile_geometry(path, profile, det.backbone)
        _check_plain_geometry(path, profile, det)
        _check_profile_scale(path, profile, det)
        if det.config.sigma > det.backbone.image_size:
            raise ProfileError(
                f"{path} is damaged: its sigma {det.config.sigma!r} exceeds its image size {det.backbone.image_size}"
            )
        return det

    def features(self, images: Sequence[ImageInput]) -> BackboneOutput:
        """Backbone features of ``images`` (for inspection and custom pipelines)."""
        return self._extract([_as_rgb(item)[0] for item in images], keep_patch_embeddings=True, desc="features")
