"""The detector: orchestrates backbone -> text / visual-reference / adapted scores -> fusion -> maps.

Data flow of :meth:`DualClipDetector.predict`::

    images --load_image--> RGB --_extract--> global embedding, patch embeddings, match features
       _text   : patch embeddings, [t_n, t_a]  -> s_txt (N, P);  global -> g_txt (N,)
       _visual : pair_references -> reference_scores -> s_vis (N, P)   (or golden references)
       _adapt  : synthesize anomalies, train head -> s_adapt (N, P), takes the text slot of the fusion
       _fuse   : fuse -> upsample + smooth (N, S, S) -> image score
    score_images returns one ScoreResult; predict() alone turns it into per-image Predictions (maps resized
    to each image's own size).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image

from .adaptation.adapt import AdaptationResult
from .backbone import Backbone, BackboneOutput, build_backbone, extract_features
from .config import DetectorConfig
from .data.images import array_to_rgb, load_image, thumbnails, to_rgb8
from .scoring import (
    fuse,
    golden_reference_scores,
    map_scores,
    near_duplicates,
    pair_references,
    reference_scores,
    resize_map,
    text_anomaly_scores,
    upsample,
)
from .text import readable_class_name, text_embeddings

ImageInput = str | os.PathLike | Image.Image | np.ndarray | torch.Tensor


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
    """

    score: float
    anomaly_map: np.ndarray
    branch_scores: dict[str, float] = field(default_factory=dict)
    branch_maps: dict[str, np.ndarray] = field(default_factory=dict)
    references: list[int] = field(default_factory=list)
    source: str | None = None

    def __repr__(self) -> str:
        h, w = self.anomaly_map.shape
        return f"Prediction(score={self.score:.4f}, map={h}x{w}, source={self.source!r})"


@dataclass
class BranchScores:
    """The scores of each branch that ran (``None`` where it did not).

    Attributes
    ----------
    text:
        ``(N, P)`` text-guided patch scores (METHOD §4), probabilities in (0, 1).
    text_global:
        ``(N,)`` text score of each global embedding (g_txt).
    visual:
        ``(N, P)`` visual-reference patch scores (METHOD §5), distances in [0, 1].
    adapted:
        ``(N, P)`` adapted-head patch scores (METHOD §7), probabilities in (0, 1).
    duplicate_pairs:
        Pairs of near-exact duplicates kept from being each other's reference in this run.
    """

    text: torch.Tensor | None = None
    text_global: torch.Tensor | None = None
    visual: torch.Tensor | None = None
    adapted: torch.Tensor | None = None
    duplicate_pairs: int = 0

    def patch(self) -> dict[str, torch.Tensor]:
        """The patch branches that ran, by name: ``(N, P)`` each."""
        named = {"text": self.text, "visual": self.visual, "adapted": self.adapted}
        return {k: v for k, v in named.items() if v is not None}

    def image(self) -> dict[str, torch.Tensor]:
        """Image-level score of each branch that ran: ``text_global``, and the max of each patch branch."""
        out = {} if self.text_global is None else {"text_global": self.text_global}
        out.update({k: v.amax(dim=1) for k, v in self.patch().items()})
        return out


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
    """

    image_scores: torch.Tensor
    maps: torch.Tensor
    branches: BranchScores
    grid: tuple[int, int]
    run: RunInfo


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

    def __init__(self, config: DetectorConfig | None = None, backbone: Backbone | None = None) -> None:
        self.config = config or DetectorConfig()
        self._backbone = backbone
        self.run_info_: RunInfo | None = None

    @property
    def backbone(self) -> Backbone:
        """The backbone, built (and its weights loaded) on first use."""
        if self._backbone is None:
            self._backbone = build_backbone(self.config)
        return self._backbone

    # -- public API -------------------------------------------------------------------------------------
    def predict(
        self,
        images: Sequence[ImageInput],
        class_name: str | None = None,
        references: Sequence[ImageInput] | None = None,
    ) -> list[Prediction]:
        """Score ``images`` (paths, PIL images, ``H x W x 3`` uint8 / ``H x W`` arrays or tensors) of one
        category.

        Without ``references`` the images are each other's visual references (the dual-image setting);
        with ``references`` (golden normal images) every image is compared with all of them instead.
        A single image without references runs text-only with a warning (a vision-only backbone raises).
        """
        if len(images) == 0:
            raise ValueError("no images to score")
        loaded = [_as_rgb(item) for item in images]
        golden = [_as_rgb(item)[0] for item in references] if references else None
        result = self.score_images([img for img, _ in loaded], class_name=class_name, golden=golden)
        branch_image = result.branches.image()
        branch_patch = result.branches.patch()
        return [
            Prediction(
                score=float(result.image_scores[i]),
                anomaly_map=resize_map(result.maps[i], img.height, img.width),
                branch_scores={k: float(v[i]) for k, v in branch_image.items()},
                branch_maps={k: v[i].reshape(result.grid).numpy() for k, v in branch_patch.items()},
                references=list(result.run.references[i]),
                source=source,
            )
            for i, (img, source) in enumerate(loaded)
        ]

    # -- the pipeline -----------------------------------------------------------------------------------
    def score_images(
        self,
        images: list[Image.Image],
        class_name: str | None = None,
        golden: list[Image.Image] | None = None,
    ) -> ScoreResult:
        """Run the pipeline on RGB images: maps at S x S, image scores and every branch's scores."""
        cfg = self.config
        use_text, use_visual = self._branches_to_run(len(images), golden)
        clock = _StageClock()
        with clock("backbone"):
            feats = self._extract(images, keep_patch_embeddings=use_text, desc="features")
        branches = BranchScores()
        temperature = cfg.temperature or self.backbone.logit_scale
        with clock("text"):
            text = self._text(feats, class_name, use_text, temperature, branches)
        refs: list[list[int]] = [[] for _ in images]
        if use_visual:
            refs = self._visual(images, feats, golden, clock, branches)
        adaptation = None
        if cfg.tta:
            with clock("adaptation"):
                adaptation = self._adapt(images, feats, text, temperature, branches)
                branches.adapted = adaptation.patch_scores
        with clock("fusion"):
            maps, image_scores = self._fuse(branches, feats.grid)
        run = RunInfo(
            n_images=len(images),
            seed=cfg.seed,
            pairing=cfg.pairing if golden is None else "golden",
            references=refs,
            branches=sorted(branches.patch()),
            temperature=temperature,
            backbone=self.backbone.name,
            weights=self.backbone.weights_id,
            image_size=self.backbone.image_size,
            timings_s=clock.seconds,
            k_effective=max((len(r) for r in refs), default=0) if use_visual else None,
            duplicate_pairs=branches.duplicate_pairs,
        )
        if adaptation is not None:
            run.synthetic_images = cfg.adaptation.synthetic_budget(len(images))
            run.synthesis_bases = adaptation.bases
        self.run_info_ = run
        return ScoreResult(image_scores=image_scores, maps=maps, branches=branches, grid=feats.grid, run=run)

    def _branches_to_run(self, n: int, golden: list | None) -> tuple[bool, bool]:
        """(use_text, use_visual) for this run: the settings, limited by the backbone and the image count."""
        cfg, backbone = self.config, self.backbone
        use_text = cfg.use_text and backbone.has_text
        if cfg.use_text and not backbone.has_text and not cfg.use_visual and not cfg.tta:
            raise ValueError(f"backbone {backbone.name!r} has no text tower: turn the visual branch or tta on")
        use_visual = cfg.use_visual
        if use_visual and golden is None and n < 2:
            if not use_text:
                raise ValueError(
                    f"one image and a vision-only backbone ({backbone.name!r}): give at least two images "
                    "or golden references"
                )
            warnings.warn(
                "a single image has no partner for the visual reference: running text-only "
                "(give golden references to use the visual branch)",
                stacklevel=4,
            )
            use_visual = False
        return use_text, use_visual

    def _extract(self, images: list[Image.Image], keep_patch_embeddings: bool, desc: str) -> BackboneOutput:
        cfg = self.config
        return extract_features(
            self.backbone,
            images,
            cfg.batch_size,
            keep_patch_embeddings=keep_patch_embeddings,
            progress=cfg.progress,
            desc=desc,
        )

    def _text(
        self, feats: BackboneOutput, class_name: str | None, use_text: bool, temperature: float, out: BranchScores
    ) -> torch.Tensor | None:
        """METHOD §4: fills ``out.text`` and ``out.text_global``; returns ``[t_n, t_a]`` (also for adaptation)."""
        cfg, backbone = self.config, self.backbone
        if not (use_text or (cfg.tta and backbone.has_text)):
            return None
        text = text_embeddings(backbone, readable_class_name(class_name), cfg.cache_dir)
        if use_text:
            out.text = text_anomaly_scores(feats.patch_embeddings, text, temperature)
            out.text_global = text_anomaly_scores(feats.global_embedding, text, temperature)
        return text

    def _visual(
        self,
        images: list[Image.Image],
        feats: BackboneOutput,
        golden: list[Image.Image] | None,
        clock: _StageClock,
        out: BranchScores,
    ) -> list[list[int]]:
        """METHOD §5: fills ``out.visual``; returns each image's reference indices."""
        cfg = self.config
        n = feats.global_embedding.shape[0]
        if golden is not None:
            with clock("backbone"):
                gfeats = self._extract(golden, keep_patch_embeddings=False, desc="references")
            with clock("reference"):
                out.visual = golden_reference_scores(feats.match_features, gfeats.match_features)
            return [list(range(len(golden))) for _ in range(n)]
        with clock("reference"):
            dup = near_duplicates(thumbnails(images), cfg.duplicate_tolerance)
            refs = pair_references(n, cfg.k, cfg.pairing, cfg.seed, forbidden=dup)
            out.visual = reference_scores(feats.match_features, refs, cfg.k_aggregation)
        out.duplicate_pairs = int(dup.sum()) // 2
        return refs

    def _adapt(
        self,
        images: list[Image.Image],
        feats: BackboneOutput,
        text: torch.Tensor | None,
        temperature: float,
        branches: BranchScores,
    ) -> AdaptationResult:
        """METHOD §7: the unadapted joint score picks the most normal-looking images as synthesis bases."""
        from .adaptation import adapt_patch_scores

        cfg = self.config
        patch = branches.patch()
        prior = fuse([(p, 1.0) for p in patch.values()], cfg.fusion_norm).amax(dim=1) if patch else None
        return adapt_patch_scores(self.backbone, images, feats, text, temperature, cfg, prior)

    def _fuse(self, branches: BranchScores, grid: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """METHOD §6: fuse the patch branches into maps ``(N, S, S)`` and image scores ``(N,)``.

        The adapted map, where present, takes the text slot (weight alpha); the visual map gets 1 - alpha.
        """
        cfg = self.config
        slot = branches.adapted if branches.adapted is not None else branches.text
        parts = [(b, w) for b, w in ((slot, cfg.alpha), (branches.visual, 1.0 - cfg.alpha)) if b is not None]
        # a branch of weight 0 drops out; a branch alone keeps its own units whatever its weight
        parts = [(b, w) for b, w in parts if w > 0] or parts
        fused = fuse(parts, cfg.fusion_norm)
        maps = upsample(fused, grid, self.backbone.image_size, cfg.sigma)
        image_scores = map_scores(maps, cfg.image_score)
        if branches.text_global is not None and cfg.beta > 0:
            image_scores = (
                fuse([(branches.text_global, cfg.beta), (image_scores, 1.0 - cfg.beta)], cfg.fusion_norm)
                if cfg.beta < 1
                else branches.text_global
            )
        return maps, image_scores

    def features(self, images: Sequence[ImageInput]) -> BackboneOutput:
        """Backbone features of ``images`` (for inspection and custom pipelines)."""
        return self._extract([_as_rgb(item)[0] for item in images], keep_patch_embeddings=True, desc="features")
