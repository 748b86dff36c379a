"""The model: which backbone and adapter (:class:`ModelSpec`), loading them, and their identity.

A loaded model lives on the CPU and is shared by everything in a process that
asks for the same spec (:func:`shared_model`, Beam's ``Shared``): the launcher
(which records its identity in the store) and, on in-process runners, the
workers. A worker on a GPU gets its own device copy (transforms/encoder.py).
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass

import torch
from apache_beam.utils.shared import Shared

from edje_indexer.schemas.records import ModelIdentity
from edje_indexer.transforms import siglip_checkpoint as hf
from edje_indexer.transforms.adapter import (
    ACTIVATIONS,
    DEFAULT_ACTIVATION,
    AdapterConfig,
    EDJEAdapter,
    load_adapter_state,
    num_queries_of,
)
from edje_indexer.transforms.decoders import DECODERS
from edje_indexer.transforms.preprocess import Preprocess
from edje_indexer.transforms.weights import read_state_dict


@dataclass(frozen=True)
class ModelSpec:
    """A full model configuration; presets (pipeline/presets.py) name one.

    Weights: ``weights`` / ``adapter_weights`` are files or fsspec URLs
    (safetensors, .pth, .bin; see transforms/weights.py); ``weights`` may be
    timm's names or a Hugging Face SigLIP vision model's (``vision_model.*``,
    converted by transforms/siglip_checkpoint.py). ``checkpoint`` is one
    EDJE authors'-format file (their full model, or any subset of it): the
    backbone comes from its ``vision_encoder.vision_model.*`` and the adapter
    from its ``vision_projection.*`` (a part it lacks comes from ``weights`` /
    ``adapter_weights`` instead; both is an error). Without weights the backbone
    comes from the local timm/Hugging Face cache (never from the network)
    unless ``random_weights`` asks for a seeded random init.
    ``num_queries``: the tokens per image; None takes the adapter weights' m
    (their ``query`` is [1, m, d_v]; 64 for a random adapter), a number must
    agree with them. ``adapter_activation``: the adapter MLP's GELU
    (transforms/adapter.py). ``preprocess`` None: the authors' processor
    (:func:`siglip_checkpoint.authors_preprocess`) at the backbone's input
    size with a ``checkpoint``, else the backbone's own timm config.
    ``jpeg_draft`` and ``decoder`` decide how image bytes become pixels, on
    top of ``preprocess``; both change pixels, so both are part of the identity.
    """

    backbone: str
    backbone_kwargs: tuple[tuple[str, object], ...] = ()
    weights: str | None = None
    random_weights: bool = False
    adapter_weights: str | None = None
    random_adapter: bool = False
    checkpoint: str | None = None
    num_queries: int | None = None
    out_dim: int = 384
    mlp_hidden: int = 8192
    adapter_activation: str = DEFAULT_ACTIVATION
    preprocess: Preprocess | None = None  # None: see above
    jpeg_draft: bool = True
    decoder: str = "pillow"  # or "torchvision" (nvJPEG on GPUs), see transforms/decoders.py
    seed: int = 0

    def __post_init__(self):
        if self.decoder not in DECODERS:
            raise ValueError(f"unknown decoder {self.decoder!r}; use one of {', '.join(DECODERS)}")
        if self.adapter_activation not in ACTIVATIONS:
            raise ValueError(
                f"unknown adapter activation {self.adapter_activation!r}; use one of {', '.join(ACTIVATIONS)}"
            )


@dataclass
class LoadedModel:
    backbone: torch.nn.Module
    adapter: EDJEAdapter
    preprocess: Preprocess
    spec: ModelSpec
    identity: ModelIdentity  # what the store records as "model"
    num_prefix_tokens: int


def _state_sha256(module: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(str(t.dtype).encode())
        h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _build_backbone(spec: ModelSpec, ckpt: hf.AuthorsCheckpoint | None) -> tuple[torch.nn.Module, dict, bool]:
    """(backbone, the timm kwargs it was built with, whether its weights came from a file)."""
    import timm

    kwargs = dict(spec.backbone_kwargs)
    if ckpt is not None and ckpt.vision is not None and spec.weights:
        raise ValueError(
            f"backbone weights given twice: --weights {spec.weights} and the vision encoder in --checkpoint "
            f"{spec.checkpoint}; drop one"
        )
    state, source = (ckpt.vision, spec.checkpoint) if ckpt is not None and ckpt.vision else (None, spec.weights)
    if state is None and spec.weights:
        state = read_state_dict(spec.weights)
    if state is not None:
        prefix = hf.hf_vision_prefix(state)
        if prefix is not None:
            kwargs = hf.backbone_kwargs_for_hf(kwargs)
        model = timm.create_model(spec.backbone, pretrained=False, num_classes=0, **kwargs)
        if prefix is not None:
            hf.load_hf_siglip(model, state, prefix, source)
            return model, kwargs, True
        missing, unexpected = model.load_state_dict(state, strict=False)
        unexpected = [k for k in unexpected if not k.startswith("head")]
        if missing or unexpected:
            raise ValueError(
                f"backbone weights {source} do not fit {spec.backbone}: "
                f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}"
            )
        return model, kwargs, True
    if spec.random_weights:
        torch.manual_seed(spec.seed)
        return timm.create_model(spec.backbone, pretrained=False, num_classes=0, **kwargs), kwargs, False
    # Pretrained weights from the local cache only: indexing must never download.
    # huggingface_hub reads HF_HUB_OFFLINE once at import, so set its constant too.
    from huggingface_hub import constants as hf_constants

    old_env, old_const = os.environ.get("HF_HUB_OFFLINE"), hf_constants.HF_HUB_OFFLINE
    os.environ["HF_HUB_OFFLINE"], hf_constants.HF_HUB_OFFLINE = "1", True
    try:
        return timm.create_model(spec.backbone, pretrained=True, num_classes=0, **kwargs), kwargs, True
    except Exception as e:
        raise FileNotFoundError(
            f"no local weights for backbone {spec.backbone}: pass --weights FILE (safetensors or .pth), "
            f"or fill the Hugging Face cache on this machine first (e.g. timm.create_model({spec.backbone!r}, "
            f"pretrained=True) where there is network), or use --random-weights for tests"
        ) from e
    finally:
        hf_constants.HF_HUB_OFFLINE = old_const
        if old_env is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = old_env


def _adapter_state(spec: ModelSpec, ckpt: hf.AuthorsCheckpoint | None) -> tuple[dict | None, str | None]:
    if ckpt is not None and ckpt.adapter is not None:
        if spec.adapter_weights:
            raise ValueError(
                f"adapter weights given twice: --adapter {spec.adapter_weights} and vision_projection.* in "
                f"--checkpoint {spec.checkpoint}; drop one"
            )
        return ckpt.adapter, spec.checkpoint
    if spec.adapter_weights:
        return read_state_dict(spec.adapter_weights), spec.adapter_weights
    return None, None


def _num_queries(spec: ModelSpec, state: dict | None, source: str | None) -> int:
    m = num_queries_of(state, source) if state is not None else None
    if m is not None and spec.num_queries is not None and m != spec.num_queries:
        raise ValueError(
            f"the adapter in {source} has {m} queries (vision_projection.query is [1, {m}, d_v]), but this "
            f"configuration stores {spec.num_queries} tokens per image; a preset pins its token count, so for "
            f"this file use --backbone {spec.backbone} without --preset (the count then comes from the file)"
        )
    return m or spec.num_queries or 64


def _json_value(v):
    return list(v) if isinstance(v, tuple) else v


def load_model(spec: ModelSpec) -> LoadedModel:
    """Build backbone and adapter on the CPU, in eval mode, with their identity."""
    import timm.data

    ckpt = hf.read_authors_checkpoint(spec.checkpoint) if spec.checkpoint else None
    backbone, kwargs, backbone_from_file = _build_backbone(spec, ckpt)
    backbone = backbone.eval()
    if not hasattr(backbone, "forward_features") or not hasattr(backbone, "blocks"):
        raise ValueError(f"{spec.backbone} is not a timm vision transformer (no forward_features/blocks)")
    embed_dim = int(backbone.num_features)
    num_heads = int(backbone.blocks[0].attn.num_heads)
    ln_eps = float(getattr(backbone.norm, "eps", 1e-6))
    state, source = _adapter_state(spec, ckpt)
    m = _num_queries(spec, state, source)
    cfg = AdapterConfig(embed_dim, num_heads, m, spec.out_dim, spec.mlp_hidden, ln_eps, spec.adapter_activation)
    torch.manual_seed(spec.seed + 1)
    adapter = EDJEAdapter(cfg).eval()
    if state is not None:
        load_adapter_state(adapter, state, source)
    elif not spec.random_adapter:
        raise FileNotFoundError(
            "no adapter weights: pass --checkpoint FILE (the authors' checkpoint), --adapter FILE (the authors' "
            "checkpoint or a project safetensors), or --random-adapter for tests"
        )
    del ckpt, state  # a memory-mapped checkpoint's other tensors are never read
    data_config = timm.data.resolve_model_data_config(backbone)
    img_size = getattr(getattr(backbone, "patch_embed", None), "img_size", None)
    if img_size is not None:  # the pretrained config's size ignores an img_size kwarg
        data_config["input_size"] = (3, *tuple(img_size))
    if spec.preprocess is not None:
        preprocess = spec.preprocess
    elif spec.checkpoint:
        preprocess = hf.authors_preprocess(data_config["input_size"][1:])
    else:
        preprocess = Preprocess.from_timm(data_config)
    prefix = int(getattr(backbone, "num_prefix_tokens", 0))
    identity = ModelIdentity(
        backbone=spec.backbone,
        backbone_kwargs={k: _json_value(v) for k, v in kwargs.items()},
        backbone_sha256=_state_sha256(backbone),
        random_weights=not backbone_from_file,
        adapter=cfg.to_dict(),
        adapter_sha256=_state_sha256(adapter),
        random_adapter=source is None,
        tokens=f"forward_features (after final norm), {prefix} prefix token(s) dropped",
        preprocessing={**preprocess.to_dict(), "jpeg_draft": spec.jpeg_draft, "decoder": spec.decoder},
        tokens_per_image=m,
        token_dim=spec.out_dim,
    )
    return LoadedModel(backbone, adapter, preprocess, spec, identity, prefix)


# One CPU model per spec and process, shared by the launcher and in-process workers.
_MODELS = Shared()


def shared_model(spec: ModelSpec) -> LoadedModel:
    """The process's loaded model for ``spec`` (built on first use)."""
    return _MODELS.acquire(lambda: load_model(spec), tag=spec)
