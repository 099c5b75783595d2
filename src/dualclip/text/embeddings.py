"""Text embeddings t_n, t_a (METHOD.md §3), computed once per (model, weights, class) and cached.

The cache lives in memory and, for identifiable weights (an open_clip tag or a checkpoint file), on disk
under the user cache directory, keyed by a hash of model name, weights, class name and prompt set, so a
different model or prompt set never reuses another's embeddings. Random weights are never cached on disk.
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
from ..backbone import Backbone
from .prompts import ANOMALOUS_STATES, NORMAL_STATES, TEMPLATES, build_prompts, readable_class_name

_MEMORY: dict[str, torch.Tensor] = {}


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
    """``(2, D)`` tensor ``[t_n, t_a]`` for one class, from memory, disk, or computed."""
    name = readable_class_name(class_name)
    key = cache_key(backbone, name)
    # Identifiable weights share one process-wide cache; random weights cache on the backbone object.
    memory = _MEMORY if key is not None else backbone.__dict__.setdefault("_text_cache", {})
    mem_key = key or name
    if mem_key in memory:
        return memory[mem_key]
    path = None
    if key is not None:
        path = Path(cache_dir or default_cache_dir()) / "text" / f"{key}.pt"
        if path.is_file():
            try:
                emb = torch.load(path, map_location="cpu", weights_only=True)
                memory[mem_key] = emb
                return emb
            except Exception:  # a corrupt cache file is recomputed, not fatal
                path.unlink(missing_ok=True)
    with torch.no_grad():
        emb = torch.stack(
            [
                state_embedding(backbone, build_prompts(name, NORMAL_STATES)),
                state_embedding(backbone, build_prompts(name, ANOMALOUS_STATES)),
            ]
        ).cpu()
    memory[mem_key] = emb
    if path is not None:
        buf = io.BytesIO()
        torch.save(emb, buf)
        write_bytes(path, buf.getvalue())
    return emb
