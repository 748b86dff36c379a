"""Hugging Face SigLIP vision weights and the EDJE authors' checkpoint, for the timm backbone.

The authors' model (``shahafwa/EDJE``, ``pretrain_model.py``) holds a Hugging
Face ``SiglipVisionModel`` as ``vision_encoder`` (frozen: the stock
``google/siglip2-large-patch16-384`` weights) and the adapter as
``vision_projection``; their checkpoint is ``torch.save`` of ``{"model":
state_dict, "optimizer", "config", "epoch", "global_step"}``. The stored tokens
are the vision model's ``last_hidden_state`` (after ``post_layernorm``), which
is timm's ``forward_features`` (after the final ``norm``, before the MAP head).

Names, after a prefix: ``vision_encoder.vision_model.`` in the authors' file
(saved with transformers 4.x), ``vision_model.`` in ``google/siglip2-*``'s
``model.safetensors`` (next to ``text_model.*``), ``vision_encoder.`` or
nothing when saved with transformers 5.x (which dropped the ``vision_model``
level of ``SiglipVisionModel``):

=====================================================  ==========================================
Hugging Face ``SiglipVisionModel``                     timm ``VisionTransformer``
=====================================================  ==========================================
``embeddings.patch_embedding.{weight,bias}``           ``patch_embed.proj.*``
``embeddings.position_embedding.weight`` [n, d]        ``pos_embed`` [1, n, d]
``encoder.layers.i.layer_norm{1,2}.*``                 ``blocks.i.norm{1,2}.*``
``encoder.layers.i.self_attn.{q,k,v}_proj.*``          ``blocks.i.attn.qkv.*`` (q, k, v stacked)
``encoder.layers.i.self_attn.out_proj.*``              ``blocks.i.attn.proj.*``
``encoder.layers.i.mlp.fc{1,2}.*``                     ``blocks.i.mlp.fc{1,2}.*``
``post_layernorm.*``                                   ``norm.*``
``head.probe``                                         ``attn_pool.latent``
``head.attention.in_proj_{weight,bias}`` [3d, ...]     ``attn_pool.q.*`` (first d), ``attn_pool.kv.*``
``head.attention.out_proj.*``                          ``attn_pool.proj.*``
``head.layernorm.*``, ``head.mlp.fc{1,2}.*``           ``attn_pool.norm.*``, ``attn_pool.mlp.fc{1,2}.*``
=====================================================  ==========================================

A file without the MAP head (``head.*``) loads into a backbone whose
``attn_pool`` is then dropped (tokens do not use it). Every other name and
shape must fit: a key that maps nowhere, a parameter the backbone lacks or
has in another shape is an error naming it. Hugging Face SigLIP's MLP
activation is ``gelu_pytorch_tanh``; timm's SigLIP ViT-B/L definitions use the
exact GELU, so a backbone built for these weights gets ``act_layer="gelu_tanh"``
unless its kwargs say otherwise (:func:`backbone_kwargs_for_hf`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch

from edje_indexer.transforms.adapter import AUTHORS_PREFIX
from edje_indexer.transforms.preprocess import Preprocess

HF_VISION = "vision_model."
AUTHORS_VISION = "vision_encoder."
# Where the vision names start: transformers 4.x (the authors' version) nests them under vision_model.; 5.x saves
# a SiglipVisionModel without that level. Found by the patch embedding, else by any key under the prefix.
VISION_PREFIXES = (AUTHORS_VISION + HF_VISION, AUTHORS_VISION, HF_VISION, "")
_ANCHOR = "embeddings.patch_embedding.weight"
# Parts of the authors' model that indexing does not use (the joint encoder, its heads, the frozen SigLIP teacher).
AUTHORS_NOT_INDEXING = ("language_model.", "text_embeddings.", "classification_head.", "clip.", "text_projection.")
HF_NOT_VISION = ("text_model.", "logit_scale", "logit_bias")  # the rest of a full SiglipModel file
HF_ACT_LAYER = "gelu_tanh"  # timm's name for Hugging Face SigLIP's hidden_act "gelu_pytorch_tanh"
HF_IGNORED = ("embeddings.position_ids",)  # a buffer some exports carry

_LAYER = re.compile(r"encoder\.layers\.(\d+)\.(.+)$")
_LAYER_NAMES = {
    "layer_norm1.": "norm1.",
    "layer_norm2.": "norm2.",
    "self_attn.out_proj.": "attn.proj.",
    "mlp.fc1.": "mlp.fc1.",
    "mlp.fc2.": "mlp.fc2.",
}
_QKV = ("self_attn.q_proj.", "self_attn.k_proj.", "self_attn.v_proj.")
_TOP_NAMES = {
    "embeddings.patch_embedding.": "patch_embed.proj.",
    "post_layernorm.": "norm.",
    "head.attention.out_proj.": "attn_pool.proj.",
    "head.layernorm.": "attn_pool.norm.",
    "head.mlp.fc1.": "attn_pool.mlp.fc1.",
    "head.mlp.fc2.": "attn_pool.mlp.fc2.",
}


def authors_preprocess(size: tuple[int, int]) -> Preprocess:
    """The authors' pixels (their Hugging Face SigLIP processor): squash-resize, bilinear, [0, 1], mean = std = 0.5."""
    return Preprocess(size=tuple(size), resize="squash", interpolation="bilinear", mean=(0.5,) * 3, std=(0.5,) * 3)


def hf_vision_prefix(state: dict) -> str | None:
    """Where Hugging Face SigLIP vision names start in ``state`` (one of :data:`VISION_PREFIXES`), or None."""
    for prefix in VISION_PREFIXES:
        if prefix + _ANCHOR in state:
            return prefix
    for prefix in VISION_PREFIXES[:-1]:
        if any(k.startswith(prefix + p) for k in state for p in ("embeddings.", "encoder.layers.", "post_layernorm.")):
            return prefix
    return None


def backbone_kwargs_for_hf(kwargs: dict) -> dict:
    """timm kwargs for a backbone that loads Hugging Face SigLIP weights: their tanh GELU unless chosen otherwise."""
    return kwargs if "act_layer" in kwargs else {**kwargs, "act_layer": HF_ACT_LAYER}


@dataclass
class Converted:
    """:func:`convert_hf_siglip`'s result."""

    state: dict = field(default_factory=dict)  # timm names
    origin: dict = field(default_factory=dict)  # timm name -> the file's name(s)
    problems: list[str] = field(default_factory=list)  # keys that map nowhere, incomplete q/k/v
    reported: set[str] = field(default_factory=set)  # timm names a problem already covers


def convert_hf_siglip(state: dict, prefix: str) -> Converted:
    """Hugging Face vision names under ``prefix`` -> timm names (keys outside ``prefix`` are not looked at)."""
    c = Converted()
    qkv: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for key, v in state.items():
        if not key.startswith(prefix):
            continue
        name = key[len(prefix) :]
        if name in HF_IGNORED:
            continue
        target = None
        if (m := _LAYER.match(name)) is not None:
            i, rest = int(m.group(1)), m.group(2)
            part = next((p for p in _QKV if rest.startswith(p)), None)
            if part is not None and rest[len(part) :] in ("weight", "bias"):
                qkv.setdefault((i, rest[len(part) :]), {})[part] = v
                continue
            src = next((p for p in _LAYER_NAMES if rest.startswith(p)), None)
            if src is not None:
                target = f"blocks.{i}.{_LAYER_NAMES[src]}{rest[len(src) :]}"
        elif name == "embeddings.position_embedding.weight":
            target, v = "pos_embed", v.unsqueeze(0)
        elif name == "head.probe":
            target = "attn_pool.latent"
        elif name in ("head.attention.in_proj_weight", "head.attention.in_proj_bias"):
            kind = name.rsplit("_", 1)[1]
            d = v.shape[0] // 3  # MultiheadAttention stacks q, k, v; timm's pool has q and kv (k then v)
            c.state[f"attn_pool.q.{kind}"], c.state[f"attn_pool.kv.{kind}"] = v[:d], v[d:]
            c.origin[f"attn_pool.q.{kind}"] = c.origin[f"attn_pool.kv.{kind}"] = key
            continue
        else:
            src = next((p for p in _TOP_NAMES if name.startswith(p)), None)
            if src is not None:
                target = _TOP_NAMES[src] + name[len(src) :]
        if target is None:
            c.problems.append(f"{key} maps to no parameter of the backbone")
        else:
            c.state[target], c.origin[target] = v, key
    for (i, kind), parts in sorted(qkv.items()):
        names = [f"{prefix}encoder.layers.{i}.{p}{kind}" for p in _QKV]
        target = f"blocks.{i}.attn.qkv.{kind}"
        c.origin[target] = ", ".join(names)
        if len(parts) < 3:
            lacking = [n for n, p in zip(names, _QKV) if p not in parts]
            c.problems.append(f"missing {', '.join(lacking)} (q, k and v together make {target})")
            c.reported.add(target)
        else:
            c.state[target] = torch.cat([parts[p] for p in _QKV])
    return c


def load_hf_siglip(model: torch.nn.Module, state: dict, prefix: str, source: str) -> None:
    """Load Hugging Face SigLIP vision weights (``prefix`` + the names above) into a timm ViT, checking every key."""
    c = convert_hf_siglip(state, prefix)
    if not c.state and not c.problems:
        raise ValueError(f"{source} has no SigLIP vision weights under {prefix!r}")
    if getattr(model, "attn_pool", None) is not None and not any(k.startswith("attn_pool.") for k in c.state):
        model.attn_pool = None  # the file has no MAP head; the tokens come before it
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    stray = [k for k in state if not k.startswith(prefix) and not k.startswith(HF_NOT_VISION)]
    problems = [f"{k} is not a SigLIP vision weight (nothing under {prefix!r})" for k in sorted(stray)] + c.problems
    for k, shape in expected.items():
        if k in c.reported:
            continue
        if k not in c.state:
            problems.append(f"missing {c.origin.get(k, k)} (for {k} {list(shape)})")
        elif tuple(c.state[k].shape) != shape:
            problems.append(
                f"{c.origin[k]} gives {k} the shape {list(c.state[k].shape)}, the backbone needs {list(shape)}"
            )
    for k in c.state:
        if k not in expected:
            why = " (the backbone has no MAP head: global_pool='map')" if k.startswith("attn_pool.") else ""
            problems.append(f"{c.origin[k]} has no place in the backbone ({k}){why}")
    if problems:
        raise ValueError(
            f"SigLIP vision weights {source} do not fit the backbone ({len(problems)} problem(s)): "
            + "; ".join(problems[:10])
            + (" ..." if len(problems) > 10 else "")
        )
    model.load_state_dict(c.state, strict=True)


@dataclass
class AuthorsCheckpoint:
    """The parts of an authors'-format state dict that indexing uses (either may be absent from a subset)."""

    source: str
    vision: dict | None = None  # keys under vision_encoder. (prefix kept)
    adapter: dict | None = None  # keys under vision_projection. (prefix stripped)
    ignored: list[str] = field(default_factory=list)  # the joint encoder, heads, CLIP teacher


def split_authors_checkpoint(state: dict, source: str, adapter_names: set[str] | None = None) -> AuthorsCheckpoint:
    """Sort an authors'-format state dict into vision encoder, adapter and the parts indexing ignores.

    A key that is none of these, or an adapter key not in ``adapter_names``
    (default: :class:`EDJEAdapter`'s), is an error naming it.
    """
    from edje_indexer.transforms.adapter import AdapterConfig, EDJEAdapter

    if adapter_names is None:
        adapter_names = set(EDJEAdapter(AdapterConfig(8, 1, 1, 8, 8)).state_dict())
    out = AuthorsCheckpoint(source)
    vision, adapter, unknown = {}, {}, []
    for k, v in state.items():
        if k.startswith(AUTHORS_VISION):
            vision[k] = v
        elif k.startswith(AUTHORS_PREFIX):
            name = k[len(AUTHORS_PREFIX) :]
            if name in adapter_names:
                adapter[name] = v
            else:
                unknown.append(k)
        elif k.startswith(AUTHORS_NOT_INDEXING):
            out.ignored.append(k)
        else:
            unknown.append(k)
    if unknown:
        raise ValueError(
            f"checkpoint {source} has key(s) that fit no part of the EDJE authors' model: {sorted(unknown)[:10]} "
            f"(expected {AUTHORS_VISION}*, {AUTHORS_PREFIX}{{{', '.join(sorted(adapter_names))}}}, "
            f"or {', '.join(p + '*' for p in AUTHORS_NOT_INDEXING)})"
        )
    out.vision, out.adapter = vision or None, adapter or None
    if out.vision is None and out.adapter is None:
        raise ValueError(
            f"checkpoint {source} holds neither the vision encoder ({AUTHORS_VISION}*) nor the adapter "
            f"({AUTHORS_PREFIX}*): nothing to index with"
        )
    return out


def read_authors_checkpoint(url: str) -> AuthorsCheckpoint:
    """The vision encoder and adapter of an authors'-format file (local path or URL; transforms/weights.py)."""
    from edje_indexer.transforms.weights import read_checkpoint

    return split_authors_checkpoint(read_checkpoint(url), url)
