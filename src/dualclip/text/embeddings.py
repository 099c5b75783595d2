"""Text embeddings t_n, t_a (docs/method.md §3), computed once per (model, weights, class) and cached.

Two caches, both owned by someone: on disk under the user cache directory for identifiable weights (an
open_clip tag or a checkpoint file), keyed by a hash of model name, weights, class name and prompt set, so a
different model or prompt set never reuses another's embeddings (random weights are never cached on disk); and
in memory, in a :class:`TextEmbeddingCache` object (each detector holds one). Nothing is kept on this module or
on the backbone.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from pathlib import Path

import platformdirs
import torch
import torch.nn.functional as F

from ..atomic import write_bytes
from ..backbone.base import Backbone
from .prompts import ANOMALOUS_STATES, NORMAL_STATES, TEMPLATES, build_prompts, readable_class_name


def default_cache_dir() -> Path:
    return Path(os.environ.get("DUALCLIP_CACHE_DIR") or platformdirs.user_cache_dir("dualclip"))


def state_embedding(backbone: Backbone, prompts: list[str]) -> torch.Tensor:
    """Normalise each sentence embedding, average them, re-normalise."""
    emb = F.normalize(backbone.encode_text(prompts).float(), dim=-1)
    return F.normalize(emb.mean(dim=0), dim=-1)


def _weights_fingerprint(weights_id: str) -> str:
    path = Path(weights_id)
    if path.is_file():
        st = path.stat()
        return f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}"
    return weights_id


def cache_key(backbone: Backbone, class_name: str) -> str | None:
    if backbone.weights_id is None:
        return None
    payload = json.dumps(
        {
            "model": backbone.name,
            "weights": _weights_fingerprint(backbone.weights_id),
            "class": class_name,
            "prompts": [NORMAL_STATES, ANOMALOUS_STATES, TEMPLATES],
        },
        sort_keys=True,
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:32]


def text_embeddings(backbone: Backbone, class_name: str | None, cache_dir: str | Path | None = None) -> torch.Tensor:
    """``(2, D)`` tensor ``[t_n, t_a]`` for one class, from the disk cache or computed (and then saved there).
    Keeps nothing in memory: a :class:`TextEmbeddingCache` does."""
    name = readable_class_name(class_name)
    key = cache_key(backbone, name)
    path = None
    if key is not None:
        path = Path(cache_dir or default_cache_dir()) / "text" / f"{key}.pt"
        if path.is_file():
            try:
                return torch.load(path, map_location="cpu", weights_only=True)
            except Exception:  # a corrupt cache file is recomputed, not fatal
                path.unlink(missing_ok=True)
    with torch.no_grad():
        emb = torch.stack(
            [
                state_embedding(backbone, build_prompts(name, NORMAL_STATES)),
                state_embedding(backbone, build_prompts(name, ANOMALOUS_STATES)),
            ]
        ).cpu()
    if path is not None:
        buf = io.BytesIO()
        torch.save(emb, buf)
        write_bytes(path, buf.getvalue())
    return emb


class TextEmbeddingCache:
    """Text embeddings held in memory for one owner (a detector): :meth:`get` computes or reads each
    (backbone, class) once. Entries are keyed by the disk-cache key (model, weights, class, prompts) for
    identifiable weights, and by the backbone object and class for random weights (which no file identifies)."""

    def __init__(self) -> None:
        self._entries: dict[tuple, torch.Tensor] = {}

    def get(self, backbone: Backbone, class_name: str | None, cache_dir: str | Path | None = None) -> torch.Tensor:
        """``(2, D)`` ``[t_n, t_a]`` for ``class_name``, from memory, the disk cache, or computed."""
        name = readable_class_name(class_name)
        key = cache_key(backbone, name)
        entry = ("weights", key) if key is not None else ("object", id(backbone), name)
        if entry not in self._entries:
            self._entries[entry] = text_embeddings(backbone, name, cache_dir)
        return self._entries[entry]

    def __len__(self) -> int:
        return len(self._entries)

    def clear(self) -> None:
        self._entries.clear()
