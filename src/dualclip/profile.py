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
import logging
import math
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import __version__
from .atomic import dumps, finite, named_path, take_folder_settings, write_bytes, write_text
from .data.images import file_fingerprint
from .errors import ProfileError
from .scoring.plain import PlainBank
from .thresholds import Threshold

PROFILE_FORMAT = 1
"""Version of the profile layout; a profile of another format is refused with the version that made it."""
PROFILE_JSON = "profile.json"
PROFILE_TENSORS = "tensors.safetensors"
TENSORS_DIGEST = "tensors_sha256"
"""The field of ``profile.json`` holding the SHA-256 of the ``tensors.safetensors`` file saved with it."""
JSON_DIGEST = "profile_json_sha256"
"""The metadata key of ``tensors.safetensors`` holding the SHA-256 of the ``profile.json`` document saved with it
(:func:`document_digest`, without :data:`TENSORS_DIGEST`)."""

log = logging.getLogger(__name__)


MAX_MOMENT = 1e6
"""The largest ``|mean|`` or ``std`` a profile's moments may hold: each describes a distance, a probability or
a standardised score, all far below it (a larger one is a damaged profile)."""
MAX_FEATURE = 1e6
"""The largest magnitude a bank value may have: a feature (an activation, a normalised or averaged token) is far
below it; above it, squared distances overflow float32 and scores turn NaN."""
SPREAD_FLOOR = 1e-6
"""A spread at or below ``SPREAD_FLOOR * max(1, |mean|)`` is none: dividing by it would turn float noise into
scores of millions."""


def _is_number(v) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


@dataclass(frozen=True)
class Moments:
    """Mean and standard deviation of one quantity over the normal images: ``standardize(x) = (x - mean) / std``."""

    mean: float
    std: float

    @classmethod
    def of(cls, values: torch.Tensor, robust: bool = False) -> Moments:
        """Mean and population standard deviation of all values, or (``robust``) their median and 1.4826 times
        their median absolute deviation."""
        from .scoring.matching import centre_and_spread

        return cls(*centre_and_spread(values, robust))

    @property
    def degenerate(self) -> bool:
        """No spread: ``std`` at or below :data:`SPREAD_FLOOR` relative to the mean (or not a number)."""
        return not self.std > SPREAD_FLOOR * max(1.0, abs(self.mean))

    def standardize(self, x: torch.Tensor) -> torch.Tensor:
        """``(x - mean) / std``; without a spread (:attr:`degenerate`) ``x - mean``: never a division by (about)
        zero."""
        d = x.double() - self.mean
        return (d if self.degenerate else d / self.std).to(x.dtype)

    def problem(self) -> str | None:
        """Why these moments cannot be a profile's units (``"std must ..."``), or ``None``."""
        for name in ("mean", "std"):
            v = getattr(self, name)
            if not _is_number(v) or not math.isfinite(v) or abs(v) > MAX_MOMENT:
                return f"{name} must be a finite number of magnitude at most {MAX_MOMENT:g}, got {v!r}"
        if self.degenerate:
            return f"std must be a spread above {SPREAD_FLOOR:g} x max(1, |mean|), got {self.std!r}"
        return None

    def to_dict(self) -> dict:
        return {"mean": self.mean, "std": self.std}

    @classmethod
    def from_dict(cls, d) -> Moments:
        if not isinstance(d, dict) or set(d) != {"mean", "std"}:
            raise ValueError(f"moments must be {{'mean': number, 'std': number}}, got {d!r}")
        return cls(d["mean"], d["std"])


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

    def named(self) -> dict[str, Moments]:
        """Every moment by its place in the saved profile (``patch.visual``, ``image.map``, ``score``, ...)."""
        out = {f"patch.{k}": v for k, v in self.patch.items()}
        out.update({f"image.{k}": v for k, v in self.image.items()})
        out["score"] = self.score
        out.update({f"parts.{k}": v for k, v in self.parts.items()})
        return out

    @classmethod
    def from_dict(cls, d: dict) -> ScoreScale:
        def group(key: str) -> dict[str, Moments]:
            g = d.get(key, {})
            if not isinstance(g, dict):
                raise ValueError(f"scale.{key} must be an object, got {g!r}")
            return {k: Moments.from_dict(v) for k, v in g.items()}

        if not isinstance(d, dict):
            raise ValueError(f"scale must be an object, got {d!r}")
        return cls(
            patch=group("patch"),
            image=group("image"),
            score=Moments.from_dict(d["score"]),
            parts=group("parts"),
            position=_offsets(d.get("position")),
        )


TEXTURE_FRACTION = 0.1
"""An image whose grey-level spread is below this fraction of the least textured normal image's has no
texture (a blank frame)."""
BLANK_GREYS = (0, 128, 255)
"""The featureless frames (uniform grey levels) a profile measures its normal images against."""


@dataclass
class OodGuard:
    """Whether an image belongs to a profile at all: outside, it gets the verdict ``unusable``, not a score verdict.

    Two checks, fitted on the normal images: **texture** (an image whose grey-level spread is below
    ``texture_floor``, :data:`TEXTURE_FRACTION` of the least textured normal image's, shows nothing to inspect)
    and **embedding** (the cosine distance of its global embedding to the nearest normal image's above
    ``limit``). ``limit`` lies halfway between ``normal_max``, the farthest any normal image is from its nearest
    other normal image (leave-one-out), and ``blank_min``, the nearest a featureless frame (:data:`BLANK_GREYS`)
    comes to a normal image; ``None`` where the two do not separate (the normal images look featureless
    themselves), and then only the texture check runs. A defective part lies near its normal images; a blank,
    covered or wrong frame does not.

    Attributes
    ----------
    embeddings:
        ``(N, D)`` L2-normalised global embeddings of the normal images.
    """

    embeddings: torch.Tensor
    limit: float | None
    normal_max: float
    blank_min: float
    texture_floor: float
    normal_texture: float

    @classmethod
    def fit(cls, normal: torch.Tensor, blanks: torch.Tensor, textures: list[float]) -> OodGuard:
        """From the normal images' global embeddings ``(N, D)``, the featureless frames' ``(B, D)`` and the normal
        images' grey-level spreads."""
        e = torch.nn.functional.normalize(normal.double().cpu(), dim=1)
        sim = e @ e.T
        sim.fill_diagonal_(-math.inf)
        normal_max = float((1 - sim.amax(dim=1)).max())
        b = torch.nn.functional.normalize(blanks.double().cpu(), dim=1)
        blank_min = float((1 - (b @ e.T).amax(dim=1)).min())
        limit = (normal_max + blank_min) / 2 if blank_min > normal_max else None
        normal_texture = float(min(textures))
        return cls(e.float(), limit, normal_max, blank_min, TEXTURE_FRACTION * normal_texture, normal_texture)

    def distances(self, embeddings: torch.Tensor) -> torch.Tensor:
        """``(N,)`` cosine distance of each global embedding ``(N, D)`` to its nearest normal image's (float64)."""
        e = torch.nn.functional.normalize(embeddings.double(), dim=1)
        return 1 - (e @ self.embeddings.to(e.device).double().T).amax(dim=1)

    def check(self, embeddings: torch.Tensor, textures: list[float]) -> list[str | None]:
        """For each image (global embedding, grey-level spread): why it is unusable, or ``None``."""
        nearest = self.distances(embeddings)
        out: list[str | None] = []
        for d, t in zip(nearest.tolist(), textures, strict=True):
            if t < self.texture_floor:
                out.append(
                    f"no texture: grey-level spread {t:.2f}, the normal images' at least {self.normal_texture:.2f} "
                    "(a blank or covered frame?)"
                )
            elif self.limit is not None and d > self.limit:
                out.append(
                    f"unlike every normal image: embedding distance {d:.3f} to the nearest, above the limit "
                    f"{self.limit:.3f} (normal images: at most {self.normal_max:.3f}; a blank frame: "
                    f"{self.blank_min:.3f})"
                )
            else:
                out.append(None)
        return out

    def describe(self) -> str:
        """One line for outputs: what the guard checks."""
        emb = "off" if self.limit is None else f"limit {self.limit:.3f}"
        return f"on: texture floor {self.texture_floor:.2f} (grey-level spread), embedding distance {emb}"

    def to_dict(self) -> dict:
        return {
            "limit": self.limit,
            "normal_max": self.normal_max,
            "blank_min": self.blank_min,
            "texture_floor": self.texture_floor,
            "normal_texture": self.normal_texture,
        }

    @classmethod
    def from_dict(cls, d, embeddings: torch.Tensor, n_normal: int) -> OodGuard:
        if not isinstance(d, dict) or set(d) != {"limit", "normal_max", "blank_min", "texture_floor", "normal_texture"}:
            raise ValueError(f"ood must hold limit, normal_max, blank_min, texture_floor, normal_texture; got {d!r}")
        for k, top in (("normal_max", 2.0), ("blank_min", 2.0), ("texture_floor", 255.0), ("normal_texture", 255.0)):
            _need(_is_number(d[k]) and 0 <= d[k] <= top, f"ood.{k} must be a number in [0, {top:g}], got {d[k]!r}")
        if d["limit"] is not None:
            _need(
                _is_number(d["limit"]) and 0 < d["limit"] <= 2,
                f"ood.limit must be in (0, 2] or null, got {d['limit']!r}",
            )
        _need(
            embeddings.dtype == torch.float32 and embeddings.ndim == 2 and embeddings.shape[0] == n_normal,
            f"tensor ood.embeddings must be float32 of shape (n_normal={n_normal}, D), got "
            f"{embeddings.dtype} {tuple(embeddings.shape)}",
        )
        _need(bool(torch.isfinite(embeddings).all()), "tensor ood.embeddings holds values that are not finite")
        return cls(embeddings, **d)


def _need(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


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
    ood:
        The :class:`OodGuard` (``None``: a profile saved before it existed; no guard).
    plain:
        The plain view's bank (:class:`~dualclip.scoring.plain.PlainBank`; ``None``: no plain view).
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
    ood: OodGuard | None = None
    plain: PlainBank | None = None

    @property
    def centring(self) -> str:
        """The positional centring its offsets (``scale.position``) apply: ``"none"`` without offsets; else the one
        it records, in its settings (``config.centring``) or beside them (``centring``), and ``"position"`` where
        it names none."""
        if self.scale.position is None:
            return "none"
        return (self.meta.get("config") or {}).get("centring") or self.meta.get("centring") or "position"

    def guard(self) -> str:
        """The out-of-distribution guard in one line (recorded in every output): on with its limits, or off."""
        if self.ood is None:
            return "off: this profile holds no out-of-distribution statistics (fit it again to add them)"
        return self.ood.describe()

    def fingerprint(self) -> str:
        """SHA-256 (first 16 hex digits) of everything the profile scores with and records: bank, owners, head,
        scale, normal scores, threshold and settings. The same for the fitted profile and for it saved and
        loaded; what an export of the profile names it by."""
        h = hashlib.sha256()
        tensors = {
            f"bank.{part}.{s}.{layer}": t
            for part, sp in self.bank.items()
            for s, space in enumerate(sp)
            for layer, t in enumerate(space)
        }
        tensors["bank_owner"] = self.bank_owner
        tensors.update({f"head.{k}": v for k, v in (self.head or {}).items()})
        tensors.update(self._plain_tensors())
        _hash_tensors(h, tensors)
        doc = {
            "meta": {k: v for k, v in self.meta.items() if k not in ("format", "dualclip_version")},
            **({"plain": self._plain_doc()} if self.plain is not None else {}),
            "scale": self.scale.to_dict(),
            "normal_scores": self.normal_scores,
            "threshold": None if self.threshold is None else self.threshold.to_dict(),
        }
        h.update(json.dumps(finite(doc), sort_keys=True, allow_nan=False).encode())
        return h.hexdigest()[:16]

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
        if self.ood is not None:
            tensors["ood.embeddings"] = self.ood.embeddings.float().contiguous()
        tensors.update(self._plain_tensors())
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
            "ood": None if self.ood is None else self.ood.to_dict(),
            "plain": None if self.plain is None else self._plain_doc(),
        }
        # the two files name each other: the tensors the digest of the document, the document the tensors file's
        blob = save_tensors(tensors, metadata={JSON_DIGEST: document_digest(json.loads(dumps(doc)))})
        doc[TENSORS_DIGEST] = hashlib.sha256(blob).hexdigest()
        path = named_path(path)
        staging = path.parent / f".{path.name}.partial-{os.getpid()}"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        if path.is_dir() and not path.is_symlink():  # replaced (overwrite): its group and mode are kept
            take_folder_settings(staging, path)
        try:
            write_bytes(staging / PROFILE_TENSORS, blob)
            write_text(staging / PROFILE_JSON, dumps(doc) + "\n")
            if path.exists():
                old = path.parent / f".{path.name}.old-{os.getpid()}"
                os.rename(path, old)
                os.rename(staging, path)
                for name in (PROFILE_JSON, PROFILE_TENSORS):  # only what an earlier save wrote
                    (old / name).unlink(missing_ok=True)
                try:
                    old.rmdir()
                except OSError:
                    log.warning("%s: files put into it during the save were kept in %s", path, old)
            else:
                os.rename(staging, path)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return path

    def _plain_tensors(self) -> dict[str, torch.Tensor]:
        if self.plain is None:
            return {}
        return {
            "plain.bank": self.plain.bank.float().contiguous(),
            "plain.owner": self.plain.owner.to(torch.int64).contiguous(),
        }

    def _plain_doc(self) -> dict:
        p = self.plain
        return {"grid": list(p.grid), "patches": int(p.owner.numel()), "patches_total": p.total}

    @classmethod
    def load(cls, path: str | os.PathLike) -> Profile:
        """Read a profile folder; a missing, damaged or other-format profile is a :class:`ProfileError` (one line,
        naming the field). Every field is checked: types, shapes, dtypes, finiteness and ranges."""
        from safetensors import SafetensorError
        from safetensors.torch import load as load_tensors

        path = Path(path)
        if not (path / PROFILE_JSON).is_file() or not (path / PROFILE_TENSORS).is_file():
            raise ProfileError(f"{path} is not a profile: it needs {PROFILE_JSON} and {PROFILE_TENSORS}")
        try:
            doc = json.loads((path / PROFILE_JSON).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
            why = "its JSON is nested too deeply" if isinstance(exc, RecursionError) else exc
            raise ProfileError(f"{path / PROFILE_JSON} cannot be read: {why}") from None
        if not isinstance(doc, dict):
            raise ProfileError(f"{path} is damaged: {PROFILE_JSON} must hold an object, got a {type(doc).__name__}")
        if doc.get("format") != PROFILE_FORMAT:
            raise ProfileError(
                f"{path} has profile format {doc.get('format')!r} (made by dualclip {doc.get('dualclip_version')}); "
                f"this dualclip {__version__} reads format {PROFILE_FORMAT}: fit the profile again with this version"
            )
        try:
            blob = (path / PROFILE_TENSORS).read_bytes()
            tensors = load_tensors(blob)
        except (OSError, SafetensorError) as exc:
            raise ProfileError(f"{path / PROFILE_TENSORS} cannot be read: {exc}") from exc
        sealed = _check_binding(path, doc, blob)
        if not sealed and (doc.get("plain") is not None or "plain.bank" in tensors):
            raise ProfileError(
                f"{path} holds a plain view but no digests binding {PROFILE_JSON} and {PROFILE_TENSORS}: every "
                "dualclip that saves a plain view binds them, so the files were edited; fit the profile again"
            )
        try:
            profile = cls._from_files(doc, tensors)
        except (KeyError, TypeError, ValueError, AttributeError, IndexError) as exc:
            what = f"{exc.args[0]!r} missing" if isinstance(exc, KeyError) else str(exc).splitlines()[0]
            raise ProfileError(f"{path} is damaged: {what}") from exc
        if not sealed:
            log.warning(
                "%s holds no digests binding %s and %s (saved by an older dualclip): that they belong together is "
                "not checked; save the profile again to add them",
                path,
                PROFILE_JSON,
                PROFILE_TENSORS,
            )
        return profile

    @classmethod
    def _from_files(cls, doc: dict, tensors: dict[str, torch.Tensor]) -> Profile:
        """The profile of a parsed ``profile.json`` and its tensors; ``ValueError`` / ``KeyError`` name the first
        field that is missing or invalid."""
        for key, kind in (("config", dict), ("backbone", str), ("weights_fingerprint", str)):
            _need(isinstance(doc[key], kind), f"{key} must be a {kind.__name__}, got {doc[key]!r}")
        _need(doc.get("class_name") is None or isinstance(doc["class_name"], str), "class_name must be text or null")
        n = doc["n_normal"]
        _need(isinstance(n, int) and not isinstance(n, bool) and n >= 2, f"n_normal must be an integer >= 2, got {n!r}")
        bank, owner = cls._bank_from_files(doc, tensors, n)
        scale = ScoreScale.from_dict(doc["scale"])
        _need(bool(scale.patch), "scale.patch must hold the moments of at least one branch")
        for name, moments in scale.named().items():
            problem = moments.problem()
            _need(problem is None, f"scale.{name}.{problem}")
        scores = doc["normal_scores"]
        _need(
            isinstance(scores, list)
            and len(scores) == n
            and all(_is_number(v) and math.isfinite(v) and abs(v) <= MAX_MOMENT for v in scores),
            f"normal_scores must be a list of n_normal={n} finite numbers of magnitude at most {MAX_MOMENT:g}, "
            f"got {str(scores)[:80]}",
        )
        th = doc.get("threshold")
        threshold = None
        if th is not None:
            _need(
                isinstance(th, dict) and set(th) == {"value", "source"} and isinstance(th["source"], str),
                f"threshold must be {{'value': number or null, 'source': text}}, got {th!r}",
            )
            _need(
                th["value"] is None or _is_number(th["value"]), f"threshold.value must be a number, got {th['value']!r}"
            )
            threshold = Threshold(**th)
        head = None
        _need(
            not doc["config"].get("tta") or bool(doc.get("head")),
            "config.tta is on but the profile holds no adaptation head (head)",
        )
        if doc.get("head"):
            _need(isinstance(doc["head"], list), f"head must be a list of tensor names, got {doc['head']!r}")
            head = {k: tensors[f"head.{k}"] for k in doc["head"]}
            for k, t in head.items():
                _need(
                    t.dtype == torch.float32 and bool(torch.isfinite(t).all()),
                    f"tensor head.{k} must hold finite float32 values, got {t.dtype}",
                )
            from .adaptation.head import AdaptationHead

            try:
                AdaptationHead.from_tensors(head)
            except (KeyError, RuntimeError, ValueError, TypeError) as exc:
                raise ValueError(f"the head tensors do not make a head: {str(exc).splitlines()[0]}") from exc
        ood = None
        if doc.get("ood") is not None:
            ood = OodGuard.from_dict(doc["ood"], tensors["ood.embeddings"], n)
        plain = _plain_from_files(doc.get("plain"), tensors, n)
        meta = {k: v for k, v in doc.items() if k not in _DERIVED}
        return cls(bank, owner.to(torch.int64), scale, [float(v) for v in scores], threshold, meta, head, ood, plain)

    @staticmethod
    def _bank_from_files(
        doc: dict, tensors: dict[str, torch.Tensor], n: int
    ) -> tuple[dict[str, list[list[torch.Tensor]]], torch.Tensor]:
        """The memory bank and its owners, checked against the settings (parts of the distance, one space per
        neighbourhood size) and each other (finite floats, one row count, one owner per row)."""
        from .scoring.matching import distance_parts

        parts, spaces, layers = doc["parts"], doc["spaces"], doc["layers"]
        use_visual = doc["config"].get("use_visual", True)
        _need(isinstance(use_visual, bool), f"config.use_visual must be true or false, got {use_visual!r}")
        if not use_visual:
            _need(parts == [], f"parts must be empty without the visual branch, got {parts!r}")
            return {}, torch.zeros(0, dtype=torch.int64)
        want = list(distance_parts(doc["distance"]))
        _need(parts == want, f"parts must be {want} for distance {doc['distance']!r}, got {parts!r}")
        sizes = doc["neighbourhood"]
        _need(
            isinstance(sizes, list)
            and all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 and v % 2 for v in sizes),
            f"neighbourhood must be a list of odd integers >= 1, got {sizes!r}",
        )
        _need(spaces == len(sizes), f"spaces must be {len(sizes)}, one per neighbourhood size")
        _need(
            isinstance(layers, int) and not isinstance(layers, bool) and layers >= 1,
            f"layers must be >= 1, got {layers!r}",
        )
        bank: dict[str, list[list[torch.Tensor]]] = {}
        rows = set()
        for part in parts:
            bank[part] = []
            for s in range(spaces):
                bank[part].append([])
                for layer in range(layers):
                    name = f"bank.{part}.{s}.{layer}"
                    t = tensors[name]
                    _check_patches(t, name, f"tensor {name} of the bank")
                    rows.add(t.shape[0])
                    bank[part][s].append(t)
        _need(len(rows) == 1, f"the bank tensors have different row counts {sorted(rows)}")
        widths = {
            f"bank.{part}.{s}.*": [t.shape[1] for t in space] for part in parts for s, space in enumerate(bank[part])
        }
        _need(
            len({tuple(w) for w in widths.values()}) == 1,
            f"the bank tensors of each part and neighbourhood must have the same layer widths, got {widths}",
        )
        (m,) = rows
        owner = tensors["bank_owner"]
        _need(
            owner.ndim == 1 and not owner.is_floating_point() and not owner.is_complex() and owner.dtype != torch.bool,
            f"tensor bank_owner must be a 1-D integer tensor, got {owner.dtype} {tuple(owner.shape)}",
        )
        _need(owner.numel() == m, f"tensor bank_owner has {owner.numel()} entries for {m} bank rows")
        _need(
            int(owner.min()) >= 0 and int(owner.max()) < n,
            f"tensor bank_owner must hold image ids in [0, {n}), got {int(owner.min())}..{int(owner.max())}",
        )
        _need(len(owner.unique()) >= 2, "tensor bank_owner: the bank must hold patches of at least 2 normal images")
        _need(doc["bank_patches"] == m, f"bank_patches is {doc['bank_patches']!r} for {m} bank rows")
        return bank, owner


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


_DERIVED = {"scale", "normal_scores", "threshold", "parts", "spaces", "layers", "head", "ood", "plain", TENSORS_DIGEST}


def _check_patches(t: torch.Tensor, name: str, subject: str) -> None:
    """A bank tensor ``name`` (named ``subject`` in messages about its values): a non-empty 2-D float32 tensor of
    finite values of magnitude at most :data:`MAX_FEATURE`."""
    _need(
        t.dtype == torch.float32 and t.ndim == 2 and t.shape[0] >= 1 and t.shape[1] >= 1,
        f"tensor {name} must be a non-empty 2-D float32 tensor, got {t.dtype} {tuple(t.shape)}",
    )
    _need(bool(torch.isfinite(t).all()), f"{subject} holds values that are not finite")
    _need(
        float(t.abs().max()) <= MAX_FEATURE,
        f"{subject} holds values of magnitude above {MAX_FEATURE:g} (features never are)",
    )


def _plain_from_files(d, tensors: dict[str, torch.Tensor], n: int) -> PlainBank | None:
    """The plain view's bank of a parsed ``profile.json`` (``d``: its ``plain`` entry) and its tensors, checked:
    a grid of positive sides, finite float32 patches, one owner per patch naming one of the ``n`` normal images
    (at least two of them), the counts the document records."""
    if d is None:
        _need("plain.bank" not in tensors, "it holds tensor plain.bank but no plain entry")
        return None
    _need(
        isinstance(d, dict) and set(d) == {"grid", "patches", "patches_total"},
        f"plain must be {{'grid', 'patches', 'patches_total'}}, got {str(d)[:80]}",
    )
    grid = d["grid"]
    _need(
        isinstance(grid, list)
        and len(grid) == 2
        and all(isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= 4096 for v in grid),
        f"plain.grid must be two sides in [1, 4096], got {grid!r}",
    )
    bank, owner = tensors["plain.bank"], tensors["plain.owner"]
    _check_patches(bank, "plain.bank", "tensor plain.bank")
    _need(
        owner.dtype == torch.int64 and owner.ndim == 1 and owner.numel() == bank.shape[0],
        f"tensor plain.owner must be int64 with one entry per plain.bank row ({bank.shape[0]}), got "
        f"{owner.dtype} {tuple(owner.shape)}",
    )
    _need(
        int(owner.min()) >= 0 and int(owner.max()) < n and len(owner.unique()) >= 2,
        f"tensor plain.owner must name at least 2 of the n_normal={n} images, got ids "
        f"{int(owner.min())}..{int(owner.max())}",
    )
    total = d["patches_total"]
    _need(
        isinstance(d["patches"], int) and not isinstance(d["patches"], bool) and d["patches"] == bank.shape[0],
        f"plain.patches is {d['patches']!r} for {bank.shape[0]} plain.bank rows",
    )
    _need(
        isinstance(total, int) and not isinstance(total, bool) and total == n * grid[0] * grid[1],
        f"plain.patches_total must be n_normal x the grid's patches ({n * grid[0] * grid[1]}), got {total!r}",
    )
    return PlainBank(bank, owner, (grid[0], grid[1]), total)


def document_digest(doc: dict) -> str:
    """SHA-256 of a ``profile.json`` document without its :data:`TENSORS_DIGEST`, keys sorted (the same for the
    document saved and read back, whatever its layout)."""
    body = {k: v for k, v in doc.items() if k != TENSORS_DIGEST}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def _tensors_metadata(blob: bytes) -> dict:
    """The ``__metadata__`` of a safetensors file's header (8-byte little-endian length, then JSON)."""
    try:
        n = int.from_bytes(blob[:8], "little")
        meta = json.loads(blob[8 : 8 + n]).get("__metadata__")
    except (ValueError, AttributeError):
        return {}
    return meta if isinstance(meta, dict) else {}


def _check_binding(path: Path, doc: dict, blob: bytes) -> bool:
    """The two files of a profile must be the pair :meth:`Profile.save` wrote: ``profile.json`` records the
    SHA-256 of ``tensors.safetensors``, whose metadata records the SHA-256 of ``profile.json``. ``False``: a
    profile saved before the digests existed (neither file holds one; not checked)."""
    want_tensors = doc.get(TENSORS_DIGEST)
    want_doc = _tensors_metadata(blob).get(JSON_DIGEST)
    if want_tensors is None and want_doc is None:
        return False
    problems = []
    if want_tensors != hashlib.sha256(blob).hexdigest():
        problems.append(f"{PROFILE_TENSORS} is not the tensors file {PROFILE_JSON} was saved with")
    if want_doc != document_digest(doc):
        problems.append(f"{PROFILE_JSON} is not the document {PROFILE_TENSORS} was saved with (edited or replaced)")
    if problems:
        raise ProfileError(
            f"{path}: {PROFILE_JSON} and {PROFILE_TENSORS} do not belong together: {'; '.join(problems)}; "
            "fit the profile again"
        )
    return True


def check_destination(path: str | os.PathLike, overwrite: bool = False) -> None:
    """Refuse, before any fitting, a ``path`` that :meth:`Profile.save` will not write: an existing path
    without ``overwrite``, or one that is not a profile folder (a folder holding ``profile.json`` and
    ``tensors.safetensors`` and nothing else). An empty folder is written into as a new path."""
    path = Path(path)
    if empty_folder(path):
        return  # filled (it keeps its mode and group)
    if path.exists() or path.is_symlink():
        if not overwrite:
            raise ProfileError(f"{path} exists: choose another path or overwrite it (overwrite=True)")
        if not _is_profile_folder(path):
            raise ProfileError(f"{path} is not a profile folder: refusing to replace it")


def empty_folder(path: Path) -> bool:
    """A real folder (not a link) with nothing in it, as one makes for a profile: written into as a new path."""
    return path.is_dir() and not path.is_symlink() and not any(path.iterdir())


def _is_profile_folder(path: Path) -> bool:
    return (
        path.is_dir() and not path.is_symlink() and {p.name for p in path.iterdir()} == {PROFILE_JSON, PROFILE_TENSORS}
    )


def profile_digest(path: str | os.PathLike) -> str:
    """SHA-256 (first 16 hex digits) of a profile folder's two files, their sizes, modification times and
    contents: it changes when the profile is fitted again at the same path."""
    path = Path(path)
    parts = [file_fingerprint(path / name) for name in (PROFILE_JSON, PROFILE_TENSORS)]
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:16]


def weights_fingerprint(module: torch.nn.Module) -> str:
    """SHA-256 (first 16 hex digits) of every parameter and buffer of ``module``, in name order: two models
    share it exactly when they compute with the same weights (a backbone: its :meth:`weights_module`)."""
    if hasattr(module, "weights_module"):
        module = module.weights_module()
    h = hashlib.sha256()
    _hash_tensors(h, module.state_dict())
    return h.hexdigest()[:16]


def _hash_tensors(h, tensors: dict[str, torch.Tensor]) -> None:
    """Feed every tensor's name, shape and bytes, in name order, to the hash ``h``."""
    for name, t in sorted(tensors.items()):
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.detach().cpu().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())


def build_bank(
    spaces: dict[str, list[list[torch.Tensor]]], size: int | None, seed: int = 0, progress: bool = False
) -> tuple[dict[str, list[list[torch.Tensor]]], torch.Tensor, int]:
    """The memory bank of ``N`` normal images' patches: ``(bank, owner, total)``.

    ``spaces[part][s][l]``: ``(N, P, C_l)`` features. Every patch is kept up to ``size`` patches in all; above
    it a greedy coreset (:func:`~dualclip.scoring.coreset.greedy_coreset`, on the first part's first space,
    layers concatenated) chooses ``size`` of them, the same patches in every part, space and layer. ``owner``:
    the image of each kept patch; ``total``: the patch count before subsampling. ``progress``: the coreset's
    progress bar. The bank is kept on the host (it is saved; a scoring source moves it to the features' device).
    """
    from .scoring.coreset import greedy_coreset

    first = next(iter(spaces.values()))
    n, p = first[0][0].shape[:2]
    total = n * p
    flat = {part: [[t.reshape(total, -1).cpu() for t in space] for space in sp] for part, sp in spaces.items()}
    owner = torch.arange(n).repeat_interleave(p)
    if size is not None and total > size:
        keep = greedy_coreset(torch.cat(next(iter(flat.values()))[0], dim=-1), size, seed, progress=progress)
        flat = {part: [[t[keep].contiguous() for t in space] for space in sp] for part, sp in flat.items()}
        owner = owner[keep]
    return flat, owner, total
