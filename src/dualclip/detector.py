"""The detector: orchestrates backbone -> text / visual-reference / adapted scores -> fusion -> maps.

Data flow of :meth:`DualClipDetector.predict`::

    images --load_image--> RGB --extract_features--> global embedding, patch embeddings, match features
       text branch     : patch embeddings, [t_n, t_a]  -> s_txt (N, P);  global -> g_txt (N,)
       visual branch   : pair_references -> reference_scores -> s_vis (N, P)   (or golden references)
       adaptation (opt): synthesize anomalies, train head -> s_adapt (N, P), replaces s_txt
       fusion          : fuse -> upsample + smooth (N, S, S) -> image score; maps resized to each image
"""

from __future__ import annotations

import contextlib
import os
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image

from .backbone import Backbone, BackboneOutput, build_backbone, extract_features
from .config import DetectorConfig
from .data.images import load_image, to_rgb8
from .scoring import (
    fuse,
    golden_reference_scores,
    map_scores,
    pair_references,
    reference_scores,
    resize_map,
    text_anomaly_scores,
    upsample,
)
from .text import readable_class_name, text_embeddings

ImageInput = str | os.PathLike | Image.Image


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


def _as_rgb(item: ImageInput) -> tuple[Image.Image, str | None]:
    if isinstance(item, Image.Image):
        return to_rgb8(item), None
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
        self.run_info_: dict = {}

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
        """Score ``images`` (paths or PIL images) of one category.

        Without ``references`` the images are each other's visual references (the dual-image setting);
        with ``references`` (golden normal images) every image is compared with all of them instead.
        A single image without references runs text-only with a warning (a vision-only backbone raises).
        """
        if len(images) == 0:
            raise ValueError("no images to score")
        loaded = [_as_rgb(item) for item in images]
        pils = [img for img, _ in loaded]
        golden = [_as_rgb(item)[0] for item in references] if references else None
        result = self.score_images(pils, class_name=class_name, golden=golden)
        preds = []
        for i, (img, source) in enumerate(loaded):
            preds.append(
                Prediction(
                    score=float(result["image_scores"][i]),
                    anomaly_map=resize_map(result["maps"][i], img.height, img.width),
                    branch_scores={k: float(v[i]) for k, v in result["branch_scores"].items()},
                    branch_maps={k: v[i].reshape(result["grid"]).numpy() for k, v in result["branch_patch"].items()},
                    references=list(result["references"][i]),
                    source=source,
                )
            )
        return preds

    # -- the pipeline -----------------------------------------------------------------------------------
    def score_images(
        self,
        images: list[Image.Image],
        class_name: str | None = None,
        golden: list[Image.Image] | None = None,
    ) -> dict:
        """Run the pipeline on RGB images; returns maps at S x S and all intermediate scores.

        Keys: ``image_scores (N,)``, ``maps (N, S, S)``, ``branch_patch {name: (N, P)}``,
        ``branch_scores {name: (N,)}``, ``references`` (list of index lists), ``grid``.
        """
        cfg = self.config
        backbone = self.backbone
        n = len(images)
        use_text = cfg.use_text and backbone.has_text
        if cfg.use_text and not backbone.has_text and not cfg.use_visual and not cfg.tta:
            raise ValueError(f"backbone {backbone.name!r} has no text tower: turn the visual branch or tta on")
        use_visual = cfg.use_visual
        if use_visual and golden is None and n < 2:
            if use_text:
                warnings.warn(
                    "a single image has no partner for the visual reference: running text-only "
                    "(give golden references to use the visual branch)",
                    stacklevel=3,
                )
                use_visual = False
            else:
                raise ValueError(
                    f"one image and a vision-only backbone ({backbone.name!r}): give at least two images "
                    "or golden references"
                )
        clock = _StageClock()
        with clock("backbone"):
            feats = extract_features(
                backbone, images, cfg.batch_size, keep_patch_embeddings=use_text, progress=cfg.progress, desc="features"
            )
        branch_patch: dict[str, torch.Tensor] = {}
        branch_scores: dict[str, torch.Tensor] = {}
        text = None
        temperature = cfg.temperature or backbone.logit_scale
        with clock("text"):
            if use_text or (cfg.tta and backbone.has_text):
                text = text_embeddings(backbone, readable_class_name(class_name), cfg.cache_dir)
            if use_text:
                branch_patch["text"] = text_anomaly_scores(feats.patch_embeddings, text, temperature)
                branch_scores["text_global"] = text_anomaly_scores(feats.global_embedding, text, temperature)
        refs: list[list[int]] = [[] for _ in range(n)]
        if use_visual:
            if golden is not None:
                with clock("backbone"):
                    gfeats = extract_features(
                        backbone,
                        golden,
                        cfg.batch_size,
                        keep_patch_embeddings=False,
                        progress=cfg.progress,
                        desc="references",
                    )
                with clock("reference"):
                    branch_patch["visual"] = golden_reference_scores(feats.match_features, gfeats.match_features)
                refs = [list(range(len(golden))) for _ in range(n)]
            else:
                with clock("reference"):
                    refs = pair_references(n, cfg.k, cfg.pairing, cfg.seed, feats.global_embedding)
                    branch_patch["visual"] = reference_scores(feats.match_features, refs, cfg.k_aggregation)
        if cfg.tta:
            from .adaptation import adapt_patch_scores

            with clock("adaptation"):
                # the unadapted joint score picks the most normal-looking images as synthesis bases
                prior = (
                    fuse([(p, 1.0) for p in branch_patch.values()], cfg.fusion_norm).amax(dim=1)
                    if branch_patch
                    else None
                )
                branch_patch["adapted"] = adapt_patch_scores(backbone, images, feats, text, temperature, cfg, prior)
        for name, patch in branch_patch.items():
            branch_scores[name] = patch.amax(dim=1)
        with clock("fusion"):
            maps, image_scores = self._joint_scores(branch_patch, branch_scores, feats.grid)
        self.run_info_ = {
            "n_images": n,
            "seed": cfg.seed,
            "pairing": cfg.pairing if golden is None else "golden",
            "references": refs,
            "branches": sorted(branch_patch),
            "temperature": temperature,
            "backbone": backbone.name,
            "weights": backbone.weights_id,
            "image_size": backbone.image_size,
            "timings_s": clock.seconds,
        }
        if cfg.tta:
            self.run_info_["synthetic_images"] = cfg.adaptation.synthetic_budget(n)
            if cfg.adaptation.scope == "category":  # the images the synthetic anomalies were made from
                self.run_info_["synthesis_bases"] = adapt_patch_scores.last_bases
        return {
            "image_scores": image_scores,
            "maps": maps,
            "branch_patch": branch_patch,
            "branch_scores": branch_scores,
            "references": refs,
            "grid": feats.grid,
        }

    def _joint_scores(
        self, branch_patch: dict[str, torch.Tensor], branch_scores: dict[str, torch.Tensor], grid: tuple[int, int]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """METHOD §6: fuse the patch branches into maps ``(N, S, S)`` and image scores ``(N,)``."""
        cfg = self.config
        slot = "adapted" if "adapted" in branch_patch else ("text" if "text" in branch_patch else None)
        parts = []
        if slot is not None:
            parts.append((branch_patch[slot], cfg.alpha if "visual" in branch_patch else 1.0))
        if "visual" in branch_patch:
            parts.append((branch_patch["visual"], 1.0 - cfg.alpha if slot is not None else 1.0))
        parts = [(s, w) for s, w in parts if w > 0] or parts[:1]
        fused = fuse(parts, cfg.fusion_norm)
        maps = upsample(fused, grid, self.backbone.image_size, cfg.sigma)
        image_scores = map_scores(maps, cfg.image_score)
        if "text_global" in branch_scores and cfg.beta > 0:
            image_scores = (
                fuse([(branch_scores["text_global"], cfg.beta), (image_scores, 1.0 - cfg.beta)], cfg.fusion_norm)
                if cfg.beta < 1
                else branch_scores["text_global"]
            )
        return maps, image_scores

    def features(self, images: Sequence[ImageInput]) -> BackboneOutput:
        """Backbone features of ``images`` (for inspection and custom pipelines)."""
        pils = [_as_rgb(item)[0] for item in images]
        return extract_features(self.backbone, pils, self.config.batch_size, progress=self.config.progress)
