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
from edje_indexer.transforms.adapter import AdapterConfig, EDJEAdapter, load_adapter_state
from edje_indexer.transforms.decoders import DECODERS
from edje_indexer.transforms.preprocess import Preprocess
from edje_indexer.transforms.weights import read_state_dict


@dataclass(frozen=True)
class ModelSpec:
    """A full model configuration; presets (pipeline/presets.py) name one.

    Weights: ``weights`` / ``adapter_weights`` are files or fsspec URLs
    (safetensors, .pth, .bin; see transforms/weights.py); without weights the
    backbone comes from the local timm/Hugging Face cache (never from the
    network) unless ``random_weights`` asks for a seeded random init.
    ``jpeg_draft`` and ``decoder`` decide how image bytes become pixels, on
    top of ``preprocess``; both change pixels, so both are part of the identity.
    """

    backbone: str
    backbone_kwargs: tuple[tuple[str, object], ...] = ()
    weights: str | None = None
    random_weights: bool = False
    adapter_weights: str | None = None
    random_adapter: bool = False
    num_queries: int = 64
    out_dim: int = 384
    mlp_hidden: int = 8192
    preprocess: Preprocess | None = None  # None: the backbone's own timm config
    jpeg_draft: bool = True
    decoder: str = "pillow"  # or "torchvision" (nvJPEG on GPUs), see transforms/decoders.py
    seed: int = 0

    def __post_init__(self):
        if self.decoder not in DECODERS:
            raise ValueError(f"unknown decoder {self.decoder!r}; use one of {', '.join(DECODERS)}")


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


def _build_backbone(spec: ModelSpec) -> torch.nn.Module:
    import timm

    kwargs = dict(spec.backbone_kwargs)
    if spec.weights:
        model = timm.create_model(spec.backbone, pretrained=False, num_classes=0, **kwargs)
        state = read_state_dict(spec.weights)
        missing, unexpected = model.load_state_dict(state, strict=False)
        unexpected = [k for k in unexpected if not k.startswith("head")]
        if missing or unexpected:
            raise ValueError(
                f"backbone weights {spec.weights} do not fit {spec.backbone}: "
                f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}"
            )
        return model
    if spec.random_weights:
        torch.manual_seed(spec.seed)
        return timm.create_model(spec.backbone, pretrained=False, num_classes=0, **kwargs)
    # Pretrained weights from the local cache only: indexing must never download.
    # huggingface_hub reads HF_HUB_OFFLINE once at import, so set its constant too.
    from huggingface_hub import constants as hf_constants

    old_env, old_const = os.environ.get("HF_HUB_OFFLINE"), hf_constants.HF_HUB_OFFLINE
    os.environ["HF_HUB_OFFLINE"], hf_constants.HF_HUB_OFFLINE = "1", True
    try:
        return timm.create_model(spec.backbone, pretrained=True, num_classes=0, **kwargs)
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


def load_model(spec: ModelSpec) -> LoadedModel:
    """Build backbone and adapter on the CPU, in eval mode, with their identity."""
    import timm.data

    backbone = _build_backbone(spec).eval()
    if not hasattr(backbone, "forward_features") or not hasattr(backbone, "blocks"):
        raise ValueError(f"{spec.backbone} is not a timm vision transformer (no forward_features/blocks)")
    embed_dim = int(backbone.num_features)
    num_heads = int(backbone.blocks[0].attn.num_heads)
    ln_eps = float(getattr(backbone.norm, "eps", 1e-6))
    cfg = AdapterConfig(embed_dim, num_heads, spec.num_queries, spec.out_dim, spec.mlp_hidden, ln_eps)
    torch.manual_seed(spec.seed + 1)
    adapter = EDJEAdapter(cfg).eval()
    if spec.adapter_weights:
        load_adapter_state(adapter, read_state_dict(spec.adapter_weights), spec.adapter_weights)
    elif not spec.random_adapter:
        raise FileNotFoundError(
            "no adapter weights: pass --adapter FILE (the authors' checkpoint or a project safetensors), "
            "or --random-adapter for tests"
        )
    preprocess = spec.preprocess or Preprocess.from_timm(timm.data.resolve_model_data_config(backbone))
    prefix = int(getattr(backbone, "num_prefix_tokens", 0))
    identity = ModelIdentity(
        backbone=spec.backbone,
        backbone_kwargs={k: v for k, v in spec.backbone_kwargs},
        backbone_sha256=_state_sha256(backbone),
        random_weights=bool(spec.random_weights and not spec.weights),
        adapter=cfg.to_dict(),
        adapter_sha256=_state_sha256(adapter),
        random_adapter=bool(spec.random_adapter and not spec.adapter_weights),
        tokens=f"forward_features (after final norm), {prefix} prefix token(s) dropped",
        preprocessing={**preprocess.to_dict(), "jpeg_draft": spec.jpeg_draft, "decoder": spec.decoder},
        tokens_per_image=spec.num_queries,
        token_dim=spec.out_dim,
    )
    return LoadedModel(backbone, adapter, preprocess, spec, identity, prefix)


# One CPU model per spec and process, shared by the launcher and in-process workers.
_MODELS = Shared()


def shared_model(spec: ModelSpec) -> LoadedModel:
    """The process's loaded model for ``spec`` (built on first use)."""
    return _MODELS.acquire(lambda: load_model(spec), tag=spec)
