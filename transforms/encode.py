"""Backbone + adapter: loading them once, and turning uint8 batches into stored tokens."""

from __future__ import annotations

import hashlib
import os
import threading
from dataclasses import dataclass, field, replace

import numpy as np
import torch

from edje_indexer.schemas import quantization
from edje_indexer.transforms.adapter import AdapterConfig, EDJEAdapter, load_adapter_state
from edje_indexer.transforms.decode import Preprocess


@dataclass(frozen=True)
class ModelSpec:
    """A full model configuration; presets (pipeline/presets.py) name one.

    Weights: ``weights`` is a local file (safetensors, .pth, .bin); without it
    the backbone comes from the local timm/Hugging Face cache (never from the
    network) unless ``random_weights`` asks for a seeded random init.
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
    # Decoding choices, applied on top of ``preprocess`` (both change pixels, so both are identity).
    jpeg_draft: bool = True
    decoder: str = "pillow"  # or "torchvision" (nvJPEG on GPUs), see transforms/decode_torch.py
    seed: int = 0


@dataclass
class LoadedModel:
    backbone: torch.nn.Module
    adapter: EDJEAdapter
    preprocess: Preprocess
    identity: dict  # what the store records as "model"
    num_prefix_tokens: int


def _state_sha256(module: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(str(t.dtype).encode())
        h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _read_state_dict(path: str) -> dict[str, torch.Tensor]:
    if not os.path.exists(path):
        raise FileNotFoundError(f"weights file {path} does not exist")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    state = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model", "module"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
    return state


def _build_backbone(spec: ModelSpec) -> torch.nn.Module:
    import timm

    kwargs = dict(spec.backbone_kwargs)
    if spec.weights:
        model = timm.create_model(spec.backbone, pretrained=False, num_classes=0, **kwargs)
        state = _read_state_dict(spec.weights)
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
        load_adapter_state(adapter, _read_state_dict(spec.adapter_weights), spec.adapter_weights)
    elif not spec.random_adapter:
        raise FileNotFoundError(
            f"no adapter weights: pass --adapter FILE (the authors' checkpoint or a project safetensors), "
            f"or --random-adapter for tests"
        )
    preprocess = spec.preprocess or Preprocess.from_timm(timm.data.resolve_model_data_config(backbone))
    preprocess = replace(preprocess, jpeg_draft=spec.jpeg_draft, decoder=spec.decoder)
    prefix = int(getattr(backbone, "num_prefix_tokens", 0))
    identity = {
        "backbone": spec.backbone,
        "backbone_kwargs": {k: v for k, v in spec.backbone_kwargs},
        "backbone_sha256": _state_sha256(backbone),
        "random_weights": bool(spec.random_weights and not spec.weights),
        "adapter": cfg.to_dict(),
        "adapter_sha256": _state_sha256(adapter),
        "random_adapter": bool(spec.random_adapter and not spec.adapter_weights),
        "tokens": f"forward_features (after final norm), {prefix} prefix token(s) dropped",
        "preprocessing": preprocess.to_dict(),
        "tokens_per_image": spec.num_queries,
        "token_dim": spec.out_dim,
    }
    return LoadedModel(backbone, adapter, preprocess, identity, prefix)


_CACHE: dict[ModelSpec, LoadedModel] = {}
_CACHE_LOCK = threading.Lock()


def load_model_cached(spec: ModelSpec) -> LoadedModel:
    """One model per process, shared by every DoFn instance and thread in it."""
    with _CACHE_LOCK:
        if spec not in _CACHE:
            _CACHE[spec] = load_model(spec)
        return _CACHE[spec]


PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


class TokenEncoder:
    """uint8 [B, H, W, 3] batches -> quantized tokens, on one device.

    On CUDA: pinned host buffers, asynchronous copies, autocast (bf16 by
    default), normalisation and quantization on the GPU; an error if the work
    did not in fact run there.
    """

    def __init__(self, model: LoadedModel, quantization_name: str, device: str = "cpu",
                 precision: str | None = None, compile: bool = False, batch_size: int | None = None):
        self.quantization = quantization.check_quantization(quantization_name)
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise RuntimeError(f"--device {device} was requested but torch sees no CUDA GPU here "
                               f"(torch {torch.__version__}, CUDA build: {torch.version.cuda})")
        if device not in ("cpu",) and not device.startswith("cuda"):
            raise ValueError(f"unknown device {device!r}; use 'cpu' or 'cuda[:N]'")
        self.device = torch.device(device)
        precision = precision or ("bf16" if self.device.type == "cuda" else "fp32")
        if precision not in PRECISIONS:
            raise ValueError(f"unknown precision {precision!r}; use one of {sorted(PRECISIONS)}")
        self.precision = precision
        self.model = model
        # Module.to() moves the cached LoadedModel in place (no second copy of a
        # ViT-L in memory), so a process serves one device; the job never mixes them.
        self.backbone = model.backbone.to(self.device)
        self.adapter = model.adapter.to(self.device)
        pp = model.preprocess
        self.mean = torch.tensor(pp.mean, device=self.device).view(1, 3, 1, 1) * 255.0
        self.std = torch.tensor(pp.std, device=self.device).view(1, 3, 1, 1) * 255.0
        self._forward = self._forward_eager
        # Per thread: Beam may run several bundles (threads) through one shared encoder.
        self._local = threading.local()
        self.pad_to = batch_size if compile else None
        if compile:
            self._forward = torch.compile(self._forward_eager, dynamic=False)

    def _forward_eager(self, x: torch.Tensor) -> torch.Tensor:
        feats = self.backbone.forward_features(x)[:, self.model.num_prefix_tokens:]
        return self.adapter(feats)

    def _to_device(self, batch_u8: np.ndarray) -> torch.Tensor:
        """Host uint8 [B, H, W, 3] -> device tensor, via reused pinned buffers on CUDA.

        Each thread has two buffers that take turns: batch k+1 is staged while
        batch k may still be running, and batch k+2 reuses k's buffer only
        after the same thread finished k (:meth:`finish` waits for it), so its
        copy has completed by then.
        """
        x = torch.from_numpy(np.ascontiguousarray(batch_u8))
        if self.device.type != "cuda":
            return x
        local = self._local
        if not hasattr(local, "staging"):
            local.staging, local.turn = [None, None], 0
        local.turn ^= 1
        buf = local.staging[local.turn]
        if buf is None or buf.shape[1:] != x.shape[1:] or buf.shape[0] < x.shape[0]:
            buf = local.staging[local.turn] = torch.empty((max(x.shape[0], 1),) + tuple(x.shape[1:]),
                                                          dtype=torch.uint8).pin_memory()
        staging = buf[: x.shape[0]]
        staging.copy_(x)
        return staging.to(self.device, non_blocking=True)

    @torch.inference_mode()
    def encode_float(self, batch: np.ndarray | torch.Tensor) -> torch.Tensor:
        """Unquantized float32 tokens [B, m, d] on the device.

        ``batch`` is uint8 [B, H, W, 3] on the host, or a uint8 [B, 3, H, W]
        tensor already on the device (GPU-decoded images).
        """
        if isinstance(batch, torch.Tensor) and batch.device.type == self.device.type:
            x = batch
        else:
            x = self._to_device(np.asarray(batch)).permute(0, 3, 1, 2)
        n = x.shape[0]
        if self.pad_to and n < self.pad_to:
            # torch.compile specialises on shapes: pad the last batch of a shard, not recompile for it
            x = torch.cat([x, x.new_zeros((self.pad_to - n,) + tuple(x.shape[1:]))])
        x = (x.float() - self.mean) / self.std
        dtype = PRECISIONS[self.precision]
        with torch.autocast(self.device.type, dtype=dtype, enabled=dtype is not None):
            y = self._forward(x)
        if y.device.type != self.device.type:
            raise RuntimeError(f"tokens were computed on {y.device}, not on the requested {self.device}")
        return y[:n].float()

    @torch.inference_mode()
    def start(self, batch) -> "PendingBatch":
        """Launch one batch; on CUDA this returns before the GPU is done.

        The indexer starts batch k+1 before it finishes batch k, so building a
        batch on the host overlaps the previous one's compute.
        """
        y = self.encode_float(batch)
        values, scales = quantization.encode(y, self.quantization)
        finite = torch.isfinite(y).flatten(1).all(dim=1)
        if self.quantization == "fp16":
            finite &= torch.isfinite(values).flatten(1).all(dim=1)  # overflow past fp16's range
        else:
            finite &= torch.isfinite(scales).flatten(1).all(dim=1)
        outputs = [values, scales, finite]
        event = None
        if self.device.type == "cuda":
            outputs = [None if t is None else t.to("cpu", non_blocking=True) for t in outputs]
            event = torch.cuda.Event()
            event.record()
        return PendingBatch(outputs, event)

    @staticmethod
    def finish(pending: "PendingBatch"):
        """``(values, scales or None, finite)`` as numpy arrays on the host."""
        if pending.event is not None:
            pending.event.synchronize()
        values, scales, finite = pending.outputs
        return values.numpy(), None if scales is None else scales.numpy(), finite.numpy()

    def __call__(self, batch):
        return self.finish(self.start(batch))


@dataclass
class PendingBatch:
    outputs: list  # values, scales (or None), finite: host tensors once ``event`` has completed
    event: object = None  # a torch.cuda.Event on GPUs
