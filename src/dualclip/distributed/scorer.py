"""Scoring one block: decode its images, score them as one run (or against a profile), write its heat maps,
masks and result file. The same code runs in-process and in a Ray actor."""

from __future__ import annotations

import json
import pickle
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from ..atomic import dumps, save_image, write_text
from ..data.images import DEFAULT_MAX_SIDE, ImageLoadError, load_image
from ..thresholds import score_error
from .plan import Block

BLOCKS_DIR = "blocks"


@dataclass(frozen=True)
class ScorerSpec:
    """What every worker needs to build the same detector and write the same outputs.

    ``config``: the method settings (:meth:`DetectorConfig.method_key`; zero-shot), or ``profile``: a profile
    folder (its settings); ``threshold``: a manual threshold (else the profile's, else none); ``out``: the run's
    output folder; ``heatmaps``: write heat maps and masks (off for score-only archives); ``where``: see below."""

    out: str
    config: dict | None = None
    profile: str | None = None
    threshold: float | None = None
    heatmaps: bool = True
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
        from ..cli.predict import output_stem
        from ..visualization import binary_mask, overlay, profile_scale, run_scale

        decoded = decode_block(block) if decoded is None else decoded
        ok = [d for d in decoded if d.array is not None]
        det, th = self.detector, self.threshold
        rows: dict[int, dict] = {}
        for d in decoded:
            if d.array is None:
                rows[d.index] = _row(block, d, error=d.error)
        run = None
        scale = None
        if ok and det.profile_ is None and len(ok) < 2 and not det.backbone.has_text:
            for d in ok:
                rows[d.index] = _row(block, d, error="the only readable image of its block: no reference")
            ok = []
        if ok:
            images = [Image.fromarray(d.array) for d in ok]
            preds = det.predict(images, class_name=block.class_name if det.profile_ is None else None)
            run = preds.run.to_dict(with_references=False)
            if det.profile_ is not None:
                scale = profile_scale(det.profile_)
            else:
                scale = run_scale([pr.anomaly_map for pr in preds])
            for d, img, pred in zip(ok, images, preds, strict=True):
                problem = score_error(pred.score)
                if problem:  # an error of that image, never a verdict
                    rows[d.index] = _row(block, d, error=problem)
                    continue
                stem = output_stem(d.index, Path(d.path))
                heat = f"heatmaps/{block.id}/{stem}.png" if self.spec.heatmaps else None
                mask = f"masks/{block.id}/{stem}.png" if self.spec.heatmaps and th.value is not None else None
                if heat:
                    save_image(overlay(img, pred.anomaly_map, scale), Path(self.spec.out) / heat)
                if mask:
                    save_image(binary_mask(pred.anomaly_map, th.value), Path(self.spec.out) / mask)
                rows[d.index] = _row(
                    block,
                    d,
                    score=pred.score,
                    verdict=th.verdict(pred.score, pred.unusable),
                    reason=pred.unusable,
                    threshold=th.value,
                    branch_scores=pred.branch_scores,
                    heatmap=heat,
                    mask=mask,
                    size=[img.width, img.height],
                    original_size=list(d.original_size) if d.original_size else None,
                )
        result = {
            "block": block.to_dict(),
            "rows": [rows[i] for i in sorted(rows)],
            "run": run,
            "heatmap_scale": None if scale is None else scale.to_dict(),
            "threshold": th.to_dict(),
        }
        write_text(block_result_path(self.spec.out, block.id), dumps(result) + "\n")
        return result


def _row(block: Block, d: Decoded, **values) -> dict:
    """One prediction row of ``block`` for the image ``d``: ``values`` over the fields of a row that was not
    scored (an error row when ``error`` is given)."""
    from ..cli.predict import display_path

    row = {
        "index": d.index,
        "path": display_path(d.path),
        "class": block.class_name,
        "block": block.id,
        "score": None,
        "verdict": None,
        "reason": None,
        "threshold": None,
        "branch_scores": {},
        "heatmap": None,
        "mask": None,
        "size": None,
        "original_size": None,
        "error": None,
    }
    unknown = set(values) - set(row)
    if unknown:
        raise TypeError(f"unknown row fields: {sorted(unknown)}")
    return row | values


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
    except (OSError, ValueError):
        return None
    saved = result.get("block") or {}
    if saved.get("fingerprint") != block.fingerprint or saved.get("content") != block.content:
        return None
    return result
