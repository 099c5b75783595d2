"""A saved inspection profile: the golden references of one product and the statistics that fix its score units.

A profile is a folder of two files, no pickle anywhere::

    tile.dualclip/
        profile.json          settings, model and weights identity, version, score scale, threshold, provenance
        tensors.safetensors   the memory bank (one tensor per matching space and layer), its owners, the head

Scores of a profile are in fixed units: the fused score of an image minus the mean of the normal images'
leave-one-out scores, divided by their standard deviation (0 = a typical normal image, 3 = three normal
spreads above it). They do not depend on the other images of a run, so a threshold fitted once applies to
tomorrow's images.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import __version__
from .atomic import dumps, write_bytes, write_text
from .thresholds import Threshold

PROFILE_FORMAT = 1
"""Version of the profile layout; a profile of another format is refused with the version that made it."""
PROFILE_JSON = "profile.json"
PROFILE_TENSORS = "tensors.safetensors"


class ProfileError(ValueError):
    """A profile cannot be saved, read, or used with this model."""


@dataclass(frozen=True)
class Moments:
    """Mean and standard deviation of one quantity over the normal images: ``standardize(x) = (x - mean) / std``."""

    mean: float
    std: float

    @classmethod
    def of(cls, values: torch.Tensor) -> Moments:
        v = values.double().reshape(-1)
        return cls(float(v.mean()), float(v.std(unbiased=False)) if v.numel() > 1 else 0.0)

    def standardize(self, x: torch.Tensor) -> torch.Tensor:
        """``(x - mean) / std`` (``std`` 0: ``x - mean``)."""
        d = x.double() - self.mean
        return (d / self.std if self.std > 0 else d).to(x.dtype)

    def to_dict(self) -> dict:
        return {"mean": self.mean, "std": self.std}


@dataclass
class ScoreScale:
    """The fixed units of a profile's scores, from the normal images' leave-one-out scores.

    Attributes
    ----------
    patch:
        Per patch branch (``text``, ``visual``, ``adapted``): moments over all normal patches; fusion
        standardises each branch with them (instead of over the run).
    image:
        ``text_global`` and ``map`` (the fused map's image score): moments over the normal images, for the
        ``beta`` fusion of the image score.
    score:
        Moments of the fused image scores of the normal images: the final standardisation.
    parts:
        For the ``hybrid`` distance: moments of each part's (cosine, euclidean) normal patch scores, which
        standardise the parts before they are averaged into the visual score.
    position:
        Positional centring (:mod:`dualclip.scoring.position`): the offset of each grid position (row-major),
        from the normal images' leave-one-out visual scores; ``None``: no centring.
    """

    patch: dict[str, Moments]
    image: dict[str, Moments] = field(default_factory=dict)
    score: Moments = Moments(0.0, 1.0)
    parts: dict[str, Moments] = field(default_factory=dict)
    position: list[float] | None = None

    def position_offsets(self) -> torch.Tensor | None:
        """The positional offsets as a ``(P,)`` float32 tensor, or ``None``."""
        return None if self.position is None else torch.tensor(self.position, dtype=torch.float32)

    def to_dict(self) -> dict:
        return {
            "patch": {k: v.to_dict() for k, v in self.patch.items()},
            "image": {k: v.to_dict() for k, v in self.image.items()},
            "score": self.score.to_dict(),
            "parts": {k: v.to_dict() for k, v in self.parts.items()},
            "position": self.position,
        }

    @classmethod
    def from_dict(cls, d: dict) -> ScoreScale:
        return cls(
            patch={k: Moments(**v) for k, v in d["patch"].items()},
            image={k: Moments(**v) for k, v in d["image"].items()},
            score=Moments(**d["score"]),
            parts={k: Moments(**v) for k, v in d.get("parts", {}).items()},
            position=_offsets(d.get("position")),
        )


@dataclass
class Profile:
    """Everything :meth:`DualClipDetector.fit` learns from the normal images (see the module docstring).

    Attributes
    ----------
    bank:
        ``bank[part][s][l]``: ``(M, C_l)`` golden patches in the matching space of distance ``part`` (one, or
        two for ``hybrid``) at neighbourhood size ``s``, layer ``l``; the same M patches everywhere.
    bank_owner:
        ``(M,)`` index of the normal image each bank patch came from (leave-one-out statistics).
    scale:
        The :class:`ScoreScale` that fixes the units.
    normal_scores:
        The normal images' leave-one-out scores, in profile units.
    threshold:
        The verdict threshold fitted at fit time, if any.
    head:
        The adaptation head's tensors (``tta``), trained at fit time on anomalies synthesized on the normal images.
    meta:
        Identity and provenance: ``config`` (the DetectorConfig), ``class_name``, ``backbone``, ``weights``,
        ``weights_fingerprint``, ``image_size``, ``distance``, ``neighbourhood``, ``n_normal``,
        ``bank_patches``, ``bank_patches_total``, ``sources``, ``dualclip_version``, ``format``.
    """

    bank: dict[str, list[list[torch.Tensor]]]
    bank_owner: torch.Tensor
    scale: ScoreScale
    normal_scores: list[float]
    threshold: Threshold | None
    meta: dict
    head: dict[str, torch.Tensor] | None = None

    # -- files ----------------------------------------------------------------------------------------------
    def save(self, path: str | os.PathLike, overwrite: bool = False) -> Path:
        """Write the profile folder atomically: a complete profile appears at ``path``, or nothing changes.

        An existing ``path`` is replaced only with ``overwrite`` and only if it is a profile (a folder holding
        ``profile.json`` and ``tensors.safetensors`` and nothing else)."""
        from safetensors.torch import save as save_tensors

        path = Path(path)
        check_destination(path, overwrite)
        tensors = {
            f"bank.{part}.{s}.{layer}": t.contiguous()
            for part, spaces in self.bank.items()
            for s, space in enumerate(spaces)
            for layer, t in enumerate(space)
        }
        tensors["bank_owner"] = self.bank_owner.to(torch.int64).contiguous()
        for k, v in (self.head or {}).items():
            tensors[f"head.{k}"] = v.detach().float().contiguous()
        doc = {
            **self.meta,
            "format": PROFILE_FORMAT,
            "dualclip_version": __version__,
            "scale": self.scale.to_dict(),
            "normal_scores": self.normal_scores,
            "threshold": None if self.threshold is None else self.threshold.to_dict(),
            "parts": list(self.bank),
            "spaces": len(next(iter(self.bank.values()), [])),
            "layers": len(next(iter(self.bank.values()), [[]])[0]),
            "head": sorted(self.head) if self.head else None,
        }
        staging = path.parent / f".{path.name}.partial-{os.getpid()}"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        try:
            write_bytes(staging / PROFILE_TENSORS, save_tensors(tensors))
            write_text(staging / PROFILE_JSON, dumps(doc) + "\n")
            if path.exists():
                old = path.parent / f".{path.name}.old-{os.getpid()}"
                os.rename(path, old)
                os.rename(staging, path)
                shutil.rmtree(old)
            else:
                os.rename(staging, path)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> Profile:
        """Read a profile folder; a missing, damaged or other-format profile is a :class:`ProfileError`."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        path = Path(path)
        if not (path / PROFILE_JSON).is_file() or not (path / PROFILE_TENSORS).is_file():
            raise ProfileError(f"{path} is not a profile: it needs {PROFILE_JSON} and {PROFILE_TENSORS}")
        try:
            doc = json.loads((path / PROFILE_JSON).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ProfileError(f"{path / PROFILE_JSON} cannot be read: {exc}") from exc
        if doc.get("format") != PROFILE_FORMAT:
            raise ProfileError(
                f"{path} has profile format {doc.get('format')!r} (made by dualclip {doc.get('dualclip_version')}); "
                f"this dualclip {__version__} reads format {PROFILE_FORMAT}: fit the profile again with this version"
            )
        try:
            tensors = load_file(path / PROFILE_TENSORS)
        except (OSError, SafetensorError) as exc:
            raise ProfileError(f"{path / PROFILE_TENSORS} cannot be read: {exc}") from exc
        try:
            bank = {
                part: [
                    [tensors[f"bank.{part}.{s}.{layer}"] for layer in range(doc["layers"])]
                    for s in range(doc["spaces"])
                ]
                for part in doc["parts"]
            }
            head = {k: tensors[f"head.{k}"] for k in doc["head"]} if doc.get("head") else None
            threshold = Threshold(**doc["threshold"]) if doc.get("threshold") else None
            meta = {k: v for k, v in doc.items() if k not in _DERIVED}
            return cls(
                bank,
                tensors["bank_owner"],
                ScoreScale.from_dict(doc["scale"]),
                doc["normal_scores"],
                threshold,
                meta,
                head,
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ProfileError(f"{path} is damaged: {exc!r} missing or invalid") from exc


def _offsets(values) -> list[float] | None:
    """A profile's positional offsets: ``None``, or a non-empty list of finite numbers."""
    import math

    if values is None:
        return None
    if (
        not isinstance(values, list)
        or not values
        or not all(isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) for v in values)
    ):
        raise ValueError("scale.position must be null or a non-empty list of finite numbers")
    return [float(v) for v in values]


_DERIVED = {"scale", "normal_scores", "threshold", "parts", "spaces", "layers", "head"}


def check_destination(path: str | os.PathLike, overwrite: bool = False) -> None:
    """Refuse, before any fitting, a ``path`` that :meth:`Profile.save` will not write: an existing path
    without ``overwrite``, or one that is not a profile folder (a folder holding ``profile.json`` and
    ``tensors.safetensors`` and nothing else)."""
    path = Path(path)
    if path.exists() or path.is_symlink():
        if not overwrite:
            raise ProfileError(f"{path} exists: choose another path or overwrite it (--overwrite)")
        if not _is_profile_folder(path):
            raise ProfileError(f"{path} is not a profile folder: refusing to replace it")


def _is_profile_folder(path: Path) -> bool:
    return (
        path.is_dir() and not path.is_symlink() and {p.name for p in path.iterdir()} == {PROFILE_JSON, PROFILE_TENSORS}
    )


def weights_fingerprint(module: torch.nn.Module) -> str:
    """SHA-256 (first 16 hex digits) of every parameter and buffer of ``module``, in name order: two models
    share it exactly when they compute with the same weights (a backbone: its :meth:`weights_module`)."""
    if hasattr(module, "weights_module"):
        module = module.weights_module()
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.detach().cpu().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def build_bank(
    spaces: dict[str, list[list[torch.Tensor]]], size: int | None, seed: int = 0, progress: bool = False
) -> tuple[dict[str, list[list[torch.Tensor]]], torch.Tensor, int]:
    """The memory bank of ``N`` normal images' patches: ``(bank, owner, total)``.

    ``spaces[part][s][l]``: ``(N, P, C_l)`` features. Every patch is kept up to ``size`` patches in all; above
    it a greedy coreset (:func:`~dualclip.scoring.coreset.greedy_coreset`, on the first part's first space,
    layers concatenated) chooses ``size`` of them, the same patches in every part, space and layer. ``owner``:
    the image of each kept patch; ``total``: the patch count before subsampling. ``progress``: the coreset's
    progress bar.
    """
    from .scoring.coreset import greedy_coreset

    first = next(iter(spaces.values()))
    n, p = first[0][0].shape[:2]
    total = n * p
    flat = {part: [[t.reshape(total, -1) for t in space] for space in sp] for part, sp in spaces.items()}
    owner = torch.arange(n).repeat_interleave(p)
    if size is not None and total > size:
        keep = greedy_coreset(torch.cat(next(iter(flat.values()))[0], dim=-1), size, seed, progress=progress)
        flat = {part: [[t[keep].contiguous() for t in space] for space in sp] for part, sp in flat.items()}
        owner = owner[keep]
    return flat, owner, total
