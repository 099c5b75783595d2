"""Shared fixtures: a small randomly initialised open_clip CLIP and generated data."""

from __future__ import annotations

import json
import os
from pathlib import Path

# No network in tests: the hub client must answer from its cache at once (read at import time).
os.environ["HF_HUB_OFFLINE"] = "1"

import open_clip
import pytest
import torch

TINY = "dualclip-tiny-test"
TINY_CONFIG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 64, "layers": 4, "width": 64, "patch_size": 16, "head_width": 32},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}
SHARED = Path(__file__).resolve().parents[2] / "shared" / "datasets"


def pytest_configure(config):
    path = Path(config.rootpath) / ".pytest_cache" / "model_configs"
    path.mkdir(parents=True, exist_ok=True)
    (path / f"{TINY}.json").write_text(json.dumps(TINY_CONFIG))
    open_clip.add_model_config(path)


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DUALCLIP_CACHE_DIR", str(tmp_path / "cache"))


@pytest.fixture
def tiny_backbone():
    from dualclip.backbone import build_clip_backbone

    torch.manual_seed(0)
    return build_clip_backbone(TINY, pretrained=None, image_size=None)


@pytest.fixture(scope="session")
def texture_set():
    from dualclip.data.synthetic import make_texture_set

    return make_texture_set(n_normal=6, n_anomalous=4, size=96, seed=0)


@pytest.fixture
def folder(tmp_path, texture_set):
    """The texture set saved as PNG files in a folder with a non-ASCII name and a sub-folder."""
    d = tmp_path / "imgs é"
    (d / "sub").mkdir(parents=True)
    images, masks, labels = texture_set
    for i, img in enumerate(images):
        img.save(d / ("sub" if i % 2 else "") / f"{i:02d}.png")
    return d


def shared_dataset(name: str) -> Path:
    root = SHARED / name
    if not root.is_dir():
        pytest.skip(f"real data not available: {root} is absent (it lives in ../shared/datasets)")
    return root


def write_mvtec_tree(root: Path, data, category: str = "bottle", defect: str = "broken", no_mask=()) -> Path:
    """Save ``(images, masks, labels)`` in the MVTec AD layout under ``root`` (0/255 masks; the indices in
    ``no_mask`` get none); returns ``root``."""
    import numpy as np
    from PIL import Image

    images, masks, labels = data
    for i, (img, m, y) in enumerate(zip(images, masks, labels, strict=True)):
        d = root / category / "test" / (defect if y else "good")
        d.mkdir(parents=True, exist_ok=True)
        img.save(d / f"{i:03d}.png")
        if y and i not in no_mask:
            g = root / category / "ground_truth" / defect
            g.mkdir(parents=True, exist_ok=True)
            Image.fromarray(m.astype(np.uint8) * 255).save(g / f"{i:03d}_mask.png")
    return root


def unseal_profile(path: Path, doc=None, tensors=None) -> None:
    """Rewrite a saved profile as one saved before its files named each other (no digests), after
    ``doc(profile_json_dict)`` and ``tensors(dict_of_tensors)`` changed it (each returns the new value): the
    field checks of a load then meet the change, not the digests."""
    from safetensors.torch import load_file, save_file

    from dualclip.profile import PROFILE_JSON, PROFILE_TENSORS, TENSORS_DIGEST

    d = json.loads((path / PROFILE_JSON).read_text())
    d = d if doc is None else doc(d)
    if isinstance(d, dict):
        d.pop(TENSORS_DIGEST, None)
    (path / PROFILE_JSON).write_text(json.dumps(d))
    t = load_file(path / PROFILE_TENSORS)
    save_file(t if tensors is None else tensors(t), path / PROFILE_TENSORS)  # no metadata


def reseal_profile(path: Path, doc=None, tensors=None) -> None:
    """Rewrite a saved profile after ``doc`` and ``tensors`` changed it (as :func:`unseal_profile`), with both
    digests computed again, as a forger who knows the format would: only the field checks stand in the way."""
    import hashlib

    from safetensors.torch import load_file, save_file
    from safetensors.torch import save as save_tensors

    from dualclip.profile import JSON_DIGEST, PROFILE_JSON, PROFILE_TENSORS, TENSORS_DIGEST, document_digest

    d = json.loads((path / PROFILE_JSON).read_text())
    d = d if doc is None else doc(d)
    t = load_file(path / PROFILE_TENSORS)
    t = t if tensors is None else tensors(t)
    if not isinstance(d, dict):  # no place for a digest: the document alone is what is checked
        (path / PROFILE_JSON).write_text(json.dumps(d))
        save_file(t, path / PROFILE_TENSORS)
        return
    d.pop(TENSORS_DIGEST, None)
    blob = save_tensors(t, metadata={JSON_DIGEST: document_digest(d)})
    d[TENSORS_DIGEST] = hashlib.sha256(blob).hexdigest()
    (path / PROFILE_TENSORS).write_bytes(blob)
    (path / PROFILE_JSON).write_text(json.dumps(d))


def set_field(*keys, value):
    """A profile.json edit (for :func:`unseal_profile`): the field at ``keys`` set to ``value``."""

    def change(doc):
        target = doc
        for k in keys[:-1]:
            target = target[k]
        target[keys[-1]] = value
        return doc

    return change
