"""A fitted profile's whole scoring as one ONNX graph: normalised images in, image score and anomaly map out.

Inside the graph, in the order :meth:`DualClipDetector.predict` runs them on a fitted detector: the backbone,
the text scores against the profile's class prompts (CLIP; the text embeddings are constants), the matching
spaces (distance parts, neighbourhood sizes), each patch's distance to its nearest memory-bank patch (the bank
is a constant, visited in chunks), the hybrid parts' standardisation, the positional centring offsets, the
adaptation head (``tta`` profiles), the fusion by the profile's moments, the upsampling to ``S x S`` and the
Gaussian smoothing, the image score and the final standardisation into profile units. Every step calls the
detector's own code; only the bank search has a batched form (:func:`~dualclip.scoring.bank_distances_batched`).

Outside it, and recorded in the metadata (``preprocess``): decoding to 8-bit RGB, the bicubic resize of the
whole image to ``S x S`` (squashed, no crop) and the normalisation ``(pixels / 255 - mean) / std``.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from .. import __version__
from ..backbone.base import BackboneOutput
from ..errors import ConfigError
from .onnx import OPSET, check_folder, model_identity, write_graph

MODEL_OUTPUTS = ["score", "anomaly_map"]
MAX_GRAPH_BYTES = 2**31 - 2**26
"""The most weight and constant bytes one graph may hold: an ONNX file is one protobuf message (2 GiB at most)."""
UNITS = "profile units: 0 = the mean of the normal images' leave-one-out scores, 1 = their standard deviation"


OOD_RULE = (
    "unusable (no score verdict) if the grey-level spread (standard deviation of the decoded image's 8-bit grey "
    "levels, PIL mode L) is below texture_floor, or if limit is not null and ood_distance is above limit"
)


class ProfileGraph(nn.Module):
    """A fitted ``detector``'s scoring of ``(B, 3, S, S)`` normalised images: ``(score (B,), anomaly_map
    (B, S, S))``, each image on its own, in profile units (what :meth:`DualClipDetector.score_images`
    returns for the same images), and, where the profile has an out-of-distribution guard, ``ood_distance (B,)``:
    each global embedding's cosine distance to the nearest normal image's (:meth:`OodGuard.distances`)."""

    def __init__(self, detector) -> None:
        super().__init__()
        from ..adaptation.head import AdaptationHead

        profile, cfg = detector.profile_, detector.config
        self.detector = detector
        self.backbone = detector.backbone.weights_module()  # the torch model (also under runtime="onnxruntime")
        self.use_text, self.use_visual = detector._branches_to_run(1, golden=None)
        self.temperature = cfg.temperature or self.backbone.logit_scale
        text = None
        if self.use_text:  # the profile's class prompts, embedded once: constants of the graph
            text = detector.text_cache.get(self.backbone, profile.meta.get("class_name"), cfg.cache_dir)
            text = text.detach().clone().float()
        self.register_buffer("text", text)
        use_head = cfg.tta and profile.head is not None
        self.head = AdaptationHead.from_tensors(profile.head) if use_head else None
        # the plain view: the same network at its own size (its weights are the backbone's), and its bank
        self.plain_view = None if profile.plain is None else detector.plain_backbone
        bank, centre = (None, None) if profile.plain is None else profile.plain.centred_on("cpu")
        self.register_buffer("plain_bank", bank)  # centred, as the detector searches it
        self.register_buffer("plain_centre", centre)

    def branches(self) -> list[str]:
        """The patch branches the graph computes."""
        named = {
            "text": self.use_text,
            "visual": self.use_visual,
            "adapted": self.head is not None,
            "plain": self.plain_view is not None,
        }
        return sorted(k for k, on in named.items() if on)

    def output_names(self) -> list[str]:
        """``score``, ``anomaly_map``, and ``ood_distance`` where the profile has an out-of-distribution guard."""
        return MODEL_OUTPUTS + (["ood_distance"] if self.detector.profile_.ood is not None else [])

    def input_sizes(self) -> dict[str, int]:
        """Each input's side: ``images`` at S, and ``plain_images`` at the plain view's size where the profile has
        one."""
        sizes = {"images": self.detector.backbone.image_size}
        if self.plain_view is not None:
            sizes["plain_images"] = self.plain_view.image_size
        return sizes

    def forward(self, images: torch.Tensor, plain_images: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
        from ..adaptation.adapt import head_scores
        from ..core import BranchScores, text_scores
        from ..scoring import bank_distances_batched, distance_parts, match_spaces
        from ..scoring.plain import PLAIN_DISTANCE, plain_space

        det = self.detector
        out = self.backbone(images)
        feats = BackboneOutput(
            out.global_embedding.float(),
            None if out.patch_embeddings is None else out.patch_embeddings.float(),
            [m.float() for m in out.match_features],
            out.grid,
        )
        branches = BranchScores()
        if self.text is not None:
            text_scores(feats, self.text, self.temperature, branches)
        if self.use_visual:
            distance, sizes = det.matching()
            spaces = {p: match_spaces(feats.match_features, feats.grid, p, sizes) for p in distance_parts(distance)}
            branches.visual, _ = det.profile_visual(spaces, feats.grid, nearest=bank_distances_batched)
        if self.head is not None:
            branches.adapted = head_scores(self.head, feats, self.use_text)
        if self.plain_view is not None:
            out = self.plain_view(plain_images)
            space = plain_space([m.float() for m in out.match_features], out.grid)
            d = bank_distances_batched([space - self.plain_centre], [self.plain_bank], PLAIN_DISTANCE)
            # one row per image of `images`: a plain_images batch of another size fails here (a concatenation
            # needs equal batch sizes; the mix below would broadcast one image's distances to all)
            branches.plain = torch.cat([d, images.flatten(1)[:, :1]], dim=1)[:, :-1]
            branches.plain_grid = out.grid
        maps, scores = det._fuse(branches, feats.grid, det.profile_.scale)
        if det.profile_.ood is None:
            return scores, maps
        return scores, maps, det.profile_.ood.distances(feats.global_embedding).float()


def export_model(
    detector, path: str | os.PathLike, opset: int = OPSET, profile_path: str | os.PathLike | None = None
) -> Path:
    """Write a fitted ``detector``'s whole scoring (:class:`ProfileGraph`) to ``path`` as one ONNX graph.

    Input ``images`` (``B x 3 x S x S`` float32, resized and normalised as the metadata's ``preprocess``
    says) and, for a profile with a plain view, ``plain_images`` (the same images at the plain view's size);
    outputs ``score`` (``B``) and ``anomaly_map`` (``B x S x S``), in profile units. The ``dualclip``
    metadata records the preprocessing, the threshold, the units, the backbone's identity, the profile's
    fingerprint (:meth:`~dualclip.profile.Profile.fingerprint`) and settings, the dualclip version and the
    graph's hash. Written to a temporary sibling, checked with ``onnx.checker``, renamed into place.

    ``detector``: fitted (:meth:`~DualClipDetector.fit` or :meth:`~DualClipDetector.load`), on the CPU, with
    fp32 arithmetic. ``profile_path``: where the profile was read from (recorded).
    """
    profile = detector.profile_
    if profile is None:
        raise ConfigError("export_model needs a fitted detector: fit it on normal images or load a profile")
    check_folder(path)
    if detector.precision() != "fp32":
        raise ConfigError(
            f"the detector computes in {detector.precision()}: the exported graph is fp32; load it with precision='fp32'"
        )
    graph = ProfileGraph(detector).eval()
    if next(graph.backbone.parameters()).device.type != "cpu":
        raise ConfigError("export_model traces on the CPU, where the profile's memory bank is: load with device='cpu'")
    backbone, cfg = graph.backbone, detector.config
    held = [*graph.state_dict().values(), *(t for sp in profile.bank.values() for space in sp for t in space)]
    held = list({id(t): t for t in held}.values())  # the plain view's weights are the backbone's
    size_bytes = sum(t.numel() * t.element_size() for t in held)
    if size_bytes > MAX_GRAPH_BYTES:
        raise ConfigError(
            f"the model's weights and memory bank take {size_bytes / 2**30:.2f} GiB, over the 2 GiB one ONNX file "
            "can hold: fit the profile with a smaller memory_bank_size, or export the encoder alone"
        )
    identity = model_identity(backbone)
    size = identity["image_size"]
    threshold = profile.threshold
    distance, sizes = detector.matching()
    meta = {
        **identity,
        "what": "model",
        "dualclip_version": __version__,
        "inputs": {name: ["batch", 3, side, side] for name, side in graph.input_sizes().items()},
        "outputs": {"score": ["batch"], "anomaly_map": ["batch", size, size]}
        | ({"ood_distance": ["batch"]} if profile.ood is not None else {}),
        "preprocess": {
            "decode": "8-bit RGB, EXIF orientation applied",
            "resize": "bicubic",
            "size": [size, size],
            "sizes": {name: [side, side] for name, side in graph.input_sizes().items()},
            "aspect": "squashed to S x S (the whole image: no crop, no padding)",
            "value_range": [0.0, 1.0],
            "normalise": "(pixels / 255 - mean) / std, per RGB channel, channels first",
            "mean": list(backbone.mean),
            "std": list(backbone.std),
        },
        "mean": list(backbone.mean),
        "std": list(backbone.std),
        "threshold": None if threshold is None or threshold.value is None else threshold.to_dict(),
        "ood": None if profile.ood is None else {**profile.ood.to_dict(), "rule": OOD_RULE},
        "units": UNITS,
        "image_score": cfg.image_score,
        "branches": graph.branches(),
        "precision": "fp32",
        "profile": {
            "fingerprint": profile.fingerprint(),
            "path": None if profile_path is None else str(profile_path),
            "class_name": profile.meta.get("class_name"),
            "n_normal": profile.meta.get("n_normal"),
            "bank_patches": profile.meta.get("bank_patches"),
            "distance": distance,
            "neighbourhood": list(sizes),
            "centring": profile.centring,
            "sigma": cfg.sigma,
            "alpha": cfg.alpha,
            "beta": cfg.beta,
            "created_by": profile.meta.get("created_by"),
            "config": profile.meta.get("config"),
        },
    }
    return write_graph(graph, graph.input_sizes(), graph.output_names(), meta, path, opset)
