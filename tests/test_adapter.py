"""The adapter architecture, and loading the authors' and the project's weights."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from edje_indexer.pipeline.presets import resolve_spec
from edje_indexer.transforms import AdapterConfig, EDJEAdapter, load_adapter_state, load_model

CFG = AdapterConfig(embed_dim=32, num_heads=4, num_queries=6, out_dim=16, mlp_hidden=64, ln_eps=1e-6)


def authors_state_dict(cfg: AdapterConfig, seed: int = 3) -> dict[str, torch.Tensor]:
    """A full-model state dict as the authors' release names it (plus unrelated keys)."""
    g = torch.Generator().manual_seed(seed)
    d, h, m, o = cfg.embed_dim, cfg.mlp_hidden, cfg.num_queries, cfg.out_dim
    shapes = {
        "query": (1, m, d),
        "key.weight": (d, d),
        "key.bias": (d,),
        "value.weight": (d, d),
        "value.bias": (d,),
        "attention.in_proj_weight": (3 * d, d),
        "attention.in_proj_bias": (3 * d,),
        "attention.out_proj.weight": (d, d),
        "attention.out_proj.bias": (d,),
        "layernorm.weight": (d,),
        "layernorm.bias": (d,),
        "mlp.fc1.weight": (h, d),
        "mlp.fc1.bias": (h,),
        "mlp.fc2.weight": (d, h),
        "mlp.fc2.bias": (d,),
        "projection.weight": (o, d),
        "projection.bias": (o,),
    }
    state = {f"vision_projection.{k}": torch.randn(s, generator=g) * 0.2 for k, s in shapes.items()}
    state["text_encoder.embeddings.word_embeddings.weight"] = torch.randn(10, 4, generator=g)
    return state


def reference_forward(state: dict[str, torch.Tensor], x: torch.Tensor, cfg: AdapterConfig) -> torch.Tensor:
    """edje.md's adapter written out with plain tensor ops, from the authors' names."""
    p = {k.removeprefix("vision_projection."): v for k, v in state.items()}
    b, n, d = x.shape
    hds, hd = cfg.num_heads, d // cfg.num_heads
    k_in = x @ p["key.weight"].T + p["key.bias"]
    v_in = x @ p["value.weight"].T + p["value.bias"]
    wq, wk, wv = p["attention.in_proj_weight"].chunk(3)
    bq, bk, bv = p["attention.in_proj_bias"].chunk(3)
    q = (p["query"].expand(b, -1, -1) @ wq.T + bq).view(b, -1, hds, hd).transpose(1, 2)
    k = (k_in @ wk.T + bk).view(b, n, hds, hd).transpose(1, 2)
    v = (v_in @ wv.T + bv).view(b, n, hds, hd).transpose(1, 2)
    att = torch.softmax(q @ k.transpose(-1, -2) / hd**0.5, dim=-1) @ v
    h = att.transpose(1, 2).reshape(b, -1, d) @ p["attention.out_proj.weight"].T + p["attention.out_proj.bias"]
    y = F.layer_norm(h, (d,), p["layernorm.weight"], p["layernorm.bias"], eps=cfg.ln_eps)
    approximate = {"gelu": "none", "gelu_tanh": "tanh"}[cfg.activation]  # default: the exact (erf) GELU
    y = F.gelu(y @ p["mlp.fc1.weight"].T + p["mlp.fc1.bias"], approximate=approximate) @ p["mlp.fc2.weight"].T
    h = h + y + p["mlp.fc2.bias"]
    return h @ p["projection.weight"].T + p["projection.bias"]


def test_authors_names_load_and_compute_the_reference():
    state = authors_state_dict(CFG)
    adapter = EDJEAdapter(CFG).eval()
    load_adapter_state(adapter, state, "authors.bin")
    x = torch.randn(2, 10, CFG.embed_dim)
    with torch.no_grad():
        got = adapter(x)
    assert got.shape == (2, CFG.num_queries, CFG.out_dim)
    torch.testing.assert_close(got, reference_forward(state, x, CFG), rtol=1e-4, atol=1e-5)


def test_missing_or_misshapen_parameters_are_clear_errors():
    state = authors_state_dict(CFG)
    del state["vision_projection.mlp.fc2.bias"]
    with pytest.raises(ValueError, match=r"lack parameters \['mlp.fc2.bias'\]"):
        load_adapter_state(EDJEAdapter(CFG), state, "x.bin")
    state = authors_state_dict(CFG)
    state["vision_projection.query"] = torch.zeros(1, 5, CFG.embed_dim)
    with pytest.raises(ValueError, match="query has shape"):
        load_adapter_state(EDJEAdapter(CFG), state, "x.bin")


def test_weights_files_load_into_the_tiny_model(tmp_path):
    """Project safetensors (adapter) and a backbone file reproduce the seeded model exactly."""
    tiny = load_model(resolve_spec("tiny"))
    adapter_file, backbone_file = tmp_path / "adapter.safetensors", tmp_path / "backbone.safetensors"
    save_file({k: v.contiguous() for k, v in tiny.adapter.state_dict().items()}, str(adapter_file))
    authors_file = tmp_path / "authors.pth"
    torch.save(
        {"state_dict": {f"vision_projection.{k}": v for k, v in tiny.adapter.state_dict().items()}}, authors_file
    )
    save_file({k: v.contiguous() for k, v in tiny.backbone.state_dict().items()}, str(backbone_file))
    for adapter in (adapter_file, authors_file):
        spec = resolve_spec("tiny", weights=str(backbone_file), adapter=str(adapter))
        loaded = load_model(spec)
        assert loaded.identity.adapter_sha256 == tiny.identity.adapter_sha256
        assert loaded.identity.backbone_sha256 == tiny.identity.backbone_sha256
        assert loaded.identity.random_weights is False and loaded.identity.random_adapter is False


def test_presets_are_deterministic():
    a, b = load_model(resolve_spec("tiny")), load_model(resolve_spec("tiny"))
    assert a.identity == b.identity
    x = torch.randint(0, 255, (2, 64, 64, 3), dtype=torch.uint8).numpy()
    from edje_indexer.transforms import TokenEncoder

    torch.testing.assert_close(
        TokenEncoder(a, "fp16").encode_float(x), TokenEncoder(b, "fp16").encode_float(x), rtol=0, atol=0
    )


def test_missing_weights_are_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty-cache"))
    with pytest.raises(FileNotFoundError, match="no local weights for backbone vit_tiny_patch16_224"):
        load_model(resolve_spec(None, backbone="vit_tiny_patch16_224", random_adapter=True))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_model(resolve_spec("tiny", weights=str(tmp_path / "nope.safetensors")))
    with pytest.raises(FileNotFoundError, match="no adapter weights"):
        load_model(resolve_spec(None, backbone="vit_tiny_patch16_224", random_weights=True))
