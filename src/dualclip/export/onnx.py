"""The backbone's image path as an ONNX graph: one pass giving the global embedding, the V-V patch
embeddings (CLIP) and every matching layer's raw tokens; and :class:`OnnxBackbone`, which runs that graph
with onnxruntime in place of torch.

The graph's metadata names the backbone, its weights fingerprint, size, layers and V-V start, and a hash of
the graph itself (every node and weight); a file made for other weights or settings, or whose graph or
weights were changed after export, is refused with the difference named. Text (CLIP's prompt embeddings) stays on
the torch model: it runs once per class, not per image.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .. import __version__
from ..atomic import dumps, temp_sibling, write_bytes
from ..backbone.base import Backbone, BackboneOutput
from ..errors import InputError, InputNotFoundError, OutputError

OPSET = 17
META_KEYS = (
    "backbone",
    "weights",
    "weights_fingerprint",
    "image_size",
    "feature_layers",
    "vv_start",
    "border",
    "grid",
)


def output_names(backbone: Backbone) -> list[str]:
    """The graph's outputs: ``global_embedding``, ``patch_embeddings`` (text backbones), ``match_0``, ..."""
    names = ["global_embedding"] + (["patch_embeddings"] if backbone.has_text else [])
    return names + [f"match_{i}" for i in range(len(backbone.feature_layers))]


def model_identity(backbone: Backbone) -> dict:
    """What an exported graph must match to stand in for ``backbone`` (hashes every weight and runs one
    forward pass: compute it once and pass it on)."""
    from ..profile import weights_fingerprint

    return {
        "backbone": backbone.name,
        "weights": backbone.weights_id,
        "weights_fingerprint": weights_fingerprint(backbone),
        "image_size": int(backbone.image_size),
        "feature_layers": list(backbone.feature_layers),
        "vv_start": getattr(backbone, "vv_start", None),
        "border": backbone.border,
        "grid": list(_grid(backbone)),
    }


def graph_sha256(graph) -> str:
    """SHA-256 of an ONNX graph: every node, weight (initializer), input and output, in order (what the file
    computes, apart from its metadata)."""
    h = hashlib.sha256()
    for field, value in graph.ListFields():
        scalar = isinstance(value, str | bytes | int | float) or hasattr(value, "SerializeToString")
        for item in [value] if scalar else value:
            data = item.SerializeToString(deterministic=True) if hasattr(item, "SerializeToString") else repr(item)
            data = data if isinstance(data, bytes) else data.encode()
            h.update(field.name.encode() + len(data).to_bytes(8, "little"))
            h.update(data)
    return h.hexdigest()


def _grid(backbone: Backbone) -> tuple[int, int]:
    with torch.inference_mode():
        probe = torch.zeros(1, 3, backbone.image_size, backbone.image_size, device=_device(backbone))
        return tuple(backbone(probe).grid)


def _device(module: nn.Module) -> torch.device:
    return next(module.parameters()).device


class _Flat(nn.Module):
    """The backbone with a tuple of tensors as its output (what the exporter traces)."""

    def __init__(self, backbone: Backbone) -> None:
        super().__init__()
        self.backbone = backbone

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = self.backbone(images)
        head = [out.global_embedding] + ([out.patch_embeddings] if out.patch_embeddings is not None else [])
        return tuple(head + list(out.match_features))


@contextlib.contextmanager
def _plain_attention():
    """torch's fused attention fast path has no ONNX export; trace the plain path (same arithmetic)."""
    previous = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(previous)


def export_onnx(backbone: Backbone, path: str | os.PathLike, opset: int = OPSET, identity: dict | None = None) -> Path:
    """Write ``backbone``'s image path to ``path`` as ONNX (dynamic batch size), with its identity
    (:func:`model_identity`) in the metadata; written to a temporary sibling and renamed into place, checked
    with ``onnx.checker``."""
    check_folder(path)
    identity = identity or model_identity(backbone)
    names = output_names(backbone)
    meta = {**identity, "what": "encoder", "dualclip_version": __version__, "outputs": names}
    meta.update(mean=list(backbone.mean), std=list(backbone.std))
    return write_graph(_Flat(backbone), backbone.image_size, names, meta, path, opset)


def check_folder(path: str | os.PathLike) -> None:
    """Refuse, before any export work, a ``path`` whose folder does not exist (``FileNotFoundError``)."""
    folder = Path(path).absolute().parent
    if not folder.is_dir():
        raise OutputError(f"the folder of {path} ({folder}) does not exist")


def write_graph(
    module: nn.Module, sizes: int | dict[str, int], names: list[str], meta: dict, path: str | os.PathLike, opset: int
) -> Path:
    """Trace ``module`` (inputs ``{name: side}``, each ``B x 3 x side x side``, dynamic batch; an int: the one
    input ``images``; outputs ``names``) into an ONNX file at ``path`` with ``meta`` and the graph's hash
    (``graph_sha256``) as its ``dualclip`` metadata; written to a temporary sibling, checked with
    ``onnx.checker`` and put in place atomically."""
    import onnx

    path = Path(path)
    sizes = {"images": sizes} if isinstance(sizes, int) else sizes
    examples = tuple(torch.zeros(2, 3, side, side, device=_device(module)) for side in sizes.values())
    tmp = temp_sibling(path)
    try:
        with _plain_attention(), warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # the tracer's notes on Python-side shape arithmetic
            torch.onnx.export(
                module.eval(),
                examples,
                str(tmp),
                dynamo=False,
                input_names=list(sizes),
                output_names=names,
                # a batch axis of its own for every further input: the graph then checks it against the first's
                # (one named axis would let the exporter assume the sizes equal and drop the check)
                dynamic_axes={
                    name: {0: "batch" if i == 0 or name in names else f"{name}_batch"}
                    for i, name in enumerate([*sizes, *names])
                },
                opset_version=opset,
            )
        model = onnx.load(str(tmp))
        meta = {**meta, "graph_sha256": graph_sha256(model.graph)}
        onnx.helper.set_model_props(model, {"dualclip": dumps(meta, indent=None)})
        onnx.checker.check_model(model)
        write_bytes(path, model.SerializeToString())
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _read_model(path: str | os.PathLike):
    """The bytes of an ONNX file and the model they hold (``ValueError`` if unreadable)."""
    import onnx

    path = Path(path)
    if not path.is_file():
        raise InputNotFoundError(f"ONNX file not found: {path}")
    data = path.read_bytes()
    try:
        return data, onnx.load_model_from_string(data)
    except Exception as exc:  # protobuf decode errors come in several types
        raise InputError(f"{path} is not a readable ONNX file: {exc}") from exc


def _dualclip_meta(path: str | os.PathLike, model) -> dict:
    props = {p.key: p.value for p in model.metadata_props}
    if "dualclip" not in props:
        raise InputError(f"{path} was not exported by dualclip (no dualclip metadata)")
    return json.loads(props["dualclip"])


def onnx_metadata(path: str | os.PathLike) -> dict:
    """The dualclip metadata of an exported file (``ValueError`` if it has none)."""
    return _dualclip_meta(path, _read_model(path)[1])


def check_graph(path: str | os.PathLike, model, meta: dict) -> None:
    """Refuse a file whose graph or weights are not the ones exported (the hash recorded at export)."""
    recorded = meta.get("graph_sha256")
    if recorded is None:
        raise InputError(f"{path} records no hash of its graph (exported by an earlier dualclip): export again")
    actual = graph_sha256(model.graph)
    if actual != recorded:
        raise InputError(
            f"{path}: its graph or weights differ from the ones exported (graph_sha256: recorded {recorded[:16]}, "
            f"file {actual[:16]}): the file was changed after export; export again"
        )


def onnx_cache_path(
    backbone: Backbone, cache_dir: str | os.PathLike | None = None, identity: dict | None = None
) -> Path:
    """Where ``runtime="onnxruntime"`` keeps the export of ``backbone`` (keyed on its identity)."""
    from ..text.embeddings import default_cache_dir

    identity = identity or model_identity(backbone)
    key = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]
    safe = "".join(c if c.isalnum() or c in "-._" else "_" for c in backbone.name)
    return Path(cache_dir or default_cache_dir()) / "onnx" / f"{safe}-{backbone.image_size}-{key}.onnx"


class OnnxBackbone(Backbone):
    """``backbone``'s image path run by onnxruntime from an exported file; everything else (text tower,
    identity, defaults) is the torch backbone's.

    Parameters
    ----------
    backbone:
        The torch backbone the file was exported from (same weights fingerprint, size, layers, V-V start).
    path:
        The file :func:`export_onnx` wrote.
    providers:
        onnxruntime execution providers (default: CUDA where available and the backbone is on a GPU, else CPU).
    threads:
        Intra-op threads of the session (default: torch's thread count, so both runtimes use the same cores).
    identity:
        :func:`model_identity` of ``backbone``, if already computed.
    """

    def __init__(
        self,
        backbone: Backbone,
        path: str | os.PathLike,
        providers: list[str] | None = None,
        threads: int | None = None,
        identity: dict | None = None,
    ) -> None:
        import onnxruntime as ort

        super().__init__()
        data, model = _read_model(path)  # checked and run from the same bytes
        meta = _dualclip_meta(path, model)
        if meta.get("what", "encoder") != "encoder":
            raise InputError(
                f"{path} is a whole-model export (image to score and anomaly map): onnx_file takes the encoder "
                "alone (export_onnx)"
            )
        want = identity or model_identity(backbone)
        diff = [f"{k}: file {meta.get(k)!r}, model {want[k]!r}" for k in META_KEYS if meta.get(k) != want[k]]
        if diff:
            raise InputError(f"{path} was exported for another model or settings ({'; '.join(diff)}): export again")
        check_graph(path, model, meta)
        del model
        self.torch_backbone = backbone
        self.path = Path(path)
        for attr in (
            "name",
            "image_size",
            "mean",
            "std",
            "weights_id",
            "has_text",
            "logit_scale",
            "feature_layers",
            "border",
        ):
            setattr(self, attr, getattr(backbone, attr))
        self.default_distance = backbone.default_distance
        self.default_neighbourhood = backbone.default_neighbourhood
        self.default_profile_neighbourhood = backbone.default_profile_neighbourhood
        self.default_centring = backbone.default_centring
        self.default_hybrid_norm = backbone.default_hybrid_norm
        self.default_plain_weight = backbone.default_plain_weight
        self.grid = tuple(meta["grid"])
        self.outputs = list(meta["outputs"])
        if providers is None:
            gpu = _device(backbone).type == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers()
            providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if gpu else ["CPUExecutionProvider"]
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or torch.get_num_threads()
        self.session = ort.InferenceSession(data, options, providers=providers)

    def weights_module(self) -> nn.Module:
        return self.torch_backbone

    def forward(self, images: torch.Tensor) -> BackboneOutput:
        arr = np.ascontiguousarray(images.detach().float().cpu().numpy())
        outs = dict(zip(self.outputs, self.session.run(self.outputs, {"images": arr}), strict=True))
        dev = images.device
        matches = [torch.from_numpy(outs[f"match_{i}"]).to(dev) for i in range(len(self.feature_layers))]
        patch = outs.get("patch_embeddings")
        return BackboneOutput(
            global_embedding=torch.from_numpy(outs["global_embedding"]).to(dev),
            patch_embeddings=None if patch is None else torch.from_numpy(patch).to(dev),
            match_features=matches,
            grid=self.grid,
        )

    def encode_text(self, prompts: list[str]) -> torch.Tensor:
        return self.torch_backbone.encode_text(prompts)
