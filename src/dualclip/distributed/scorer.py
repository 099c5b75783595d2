"""Scoring one block: decode its images, score them as one run (or against a profile), write its heat maps,
masks and result file. The same code runs in-process and in a Ray actor."""

from __future__ import annotations

import json
import pickle
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from ..atomic import dumps, write_text
from ..data.images import DEFAULT_MAX_SIDE, ImageLoadError, load_image
from ..errors import DualclipError
from ..output import OutputWriter, PredictionRow, display_path, heatmap_scale, row_references
from .plan import Block

BLOCKS_DIR = "blocks"


@dataclass(frozen=True)
class ScorerSpec:
    """What every worker needs to build the same detector and write the same outputs.

    ``config``: the method settings (:meth:`DetectorConfig.method_key`; zero-shot), or ``profile``: a profile
    folder (its settings); ``threshold``: a manual threshold (else the profile's, else none); ``out``: the run's
    output folder; ``heatmaps``: write heat maps and masks (off for score-only archives); ``maps``: see below;
    ``where``: see below."""

    out: str
    config: dict | None = None
    profile: str | None = None
    threshold: float | None = None
    heatmaps: bool = True
    maps: str | None = None
    """Also write each raw anomaly map (``npy`` or ``tiff``)."""
    where: dict | None = None
    """The execution settings of the workers (:class:`~dualclip.config.ExecutionSettings` as a dict: how they run,
    not what they compute)."""

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Decoded:
    """One image of a block after decoding: the array, or why it could not be read."""

    index: int
    path: str
    array: np.ndarray | None
    original_size: tuple[int, int] | None
    error: str | None


def decode_block(block: Block) -> list[Decoded]:
    """Read every image of ``block`` (CPU work, done apart from the model: in Ray, in CPU tasks)."""
    out = []
    for i, p in zip(block.index, block.paths, strict=True):
        try:
            img = load_image(p, max_side=DEFAULT_MAX_SIDE)
            out.append(Decoded(i, p, np.asarray(img), img.info.get("original_size"), None))
        except ImageLoadError as exc:
            out.append(Decoded(i, p, None, None, exc.reason))
    return out


def block_result_path(out: str | Path, block_id: str) -> Path:
    return Path(out) / BLOCKS_DIR / f"{block_id}.json"


class BlockScorer:
    """Builds the detector once; each call scores one block and writes its outputs (idempotent: a block
    scored again writes the same files under the same names)."""

    def __init__(self, spec: ScorerSpec) -> None:
        from ..config import DetectorConfig
        from ..detector import DualClipDetector
        from ..thresholds import NO_THRESHOLD, manual_threshold

        self.spec = spec
        where = {**(spec.where or {}), "progress": False}
        if spec.profile is not None:
            self.detector = DualClipDetector.load(spec.profile, **where)
        else:
            self.detector = DualClipDetector(DetectorConfig(method=spec.config, execution=where))
        _ = self.detector.backbone
        if spec.threshold is not None:
            self.threshold = manual_threshold(spec.threshold)
        else:
            self.threshold = self.detector.threshold_ or NO_THRESHOLD

    def __call__(self, block: Block, decoded: list[Decoded] | None = None) -> dict:
        decoded = decode_block(block) if decoded is None else decoded
        ok = [d for d in decoded if d.array is not None]
        det, th = self.detector, self.threshold
        images = []
        for d in ok:
            img = Image.fromarray(d.array)
            if d.original_size:
                img.info["original_size"] = tuple(d.original_size)
            images.append(img)
        run, preds, refused = None, [], None
        if ok:
            try:
                preds = det.predict(images, class_name=det.scoring_class(block.class_name, strict=False))
            except DualclipError as exc:  # the detector cannot score this block (one image, no reference): say why
                refused = str(exc)
            else:
                run = preds.run.to_dict(with_references=False)
        scale = heatmap_scale([pr.anomaly_map for pr in preds], det.normal_scores(), th.value) if preds else None
        writer = OutputWriter(
            Path(self.spec.out), scale, th, heatmaps=self.spec.heatmaps, maps=self.spec.maps, subfolder=block.id
        )
        common = {"class_name": block.class_name, "block": block.id}
        for d in decoded:
            if d.array is None:
                writer.failed(d.index, d.path, d.error, **common)
            elif refused is not None:
                writer.failed(d.index, d.path, refused, **common)
        names = [display_path(d.path) for d in ok]
        for d, img, pred in zip(ok, images, preds, strict=True) if preds else ():
            references = row_references(preds.run.pairing, pred.references, names)
            writer.add(d.index, d.path, img, pred, **common, references=references)
        result = {
            "block": block.to_dict(),
            "rows": [r.to_dict() for r in sorted(writer.rows, key=lambda r: r.index)],
            "run": run,
            "heatmap_scale": None if scale is None else scale.to_dict(),
            "threshold": th.to_dict(),
        }
        write_text(block_result_path(self.spec.out, block.id), dumps(result) + "\n")
        return result


def block_rows(result: dict) -> list[PredictionRow]:
    """The rows of a block's saved result."""
    return [PredictionRow.from_dict(r) for r in result["rows"]]


def pack(decoded: list[Decoded]) -> bytes:
    """Decoded images as bytes (a Ray Data column of one block)."""
    return pickle.dumps(decoded, protocol=pickle.HIGHEST_PROTOCOL)


def unpack(data: bytes) -> list[Decoded]:
    return pickle.loads(data)  # noqa: S301 - bytes made by pack() in this run's own tasks


def load_block_result(out: str | Path, block: Block) -> dict | None:
    """A finished block's saved result, if it is there, readable, and for this very block (fingerprint) scored
    from the same content (the same files and profile: ``Block.content``)."""
    path = block_result_path(out, block.id)
    if not path.is_file():
        return None
    try:
        result = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return None
    saved = result.get("block") or {}
    if saved.get("fingerprint") != block.fingerprint or saved.get("content") != block.content:
        return None
    return result
