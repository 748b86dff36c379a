"""The model pass: uint8 image batches -> quantized tokens, on one device (:class:`TokenEncoder`)."""

from __future__ import annotations

import copy
import threading
from dataclasses import dataclass

import numpy as np
import torch

from edje_indexer.schemas import quantization
from edje_indexer.transforms.model import LoadedModel

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


class TokenEncoder:
    """uint8 [B, H, W, 3] batches -> quantized tokens, on one device.

    On CUDA: pinned host buffers, asynchronous copies, autocast (bf16 by
    default), normalisation and quantization on the GPU; an error if the work
    did not in fact run there.
    """

    def __init__(
        self,
        model: LoadedModel,
        quantization_name: str,
        device: str = "cpu",
        precision: str | None = None,
        compile: bool = False,
        batch_size: int | None = None,
    ):
        self.quantization = quantization.check_quantization(quantization_name)
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise RuntimeError(
                f"--device {device} was requested but torch sees no CUDA GPU here "
                f"(torch {torch.__version__}, CUDA build: {torch.version.cuda})"
            )
        if device not in ("cpu",) and not device.startswith("cuda"):
            raise ValueError(f"unknown device {device!r}; use 'cpu' or 'cuda[:N]'")
        self.device = torch.device(device)
        precision = precision or ("bf16" if self.device.type == "cuda" else "fp32")
        if precision not in PRECISIONS:
            raise ValueError(f"unknown precision {precision!r}; use one of {sorted(PRECISIONS)}")
        self.precision = precision
        self.model = model
        # The loaded model stays on the CPU (it is shared: transforms/model.py); a
        # GPU encoder works on its own device copy.
        on_cpu = self.device.type == "cpu"
        self.backbone = model.backbone if on_cpu else copy.deepcopy(model.backbone).to(self.device)
        self.adapter = model.adapter if on_cpu else copy.deepcopy(model.adapter).to(self.device)
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
        feats = self.backbone.forward_features(x)[:, self.model.num_prefix_tokens :]
        return self.adapter(feats)

    def _normalized(self, batch: np.ndarray | torch.Tensor) -> torch.Tensor:
        """float32 [B, 3, H, W] backbone input on the device from uint8 host [B, H, W, 3] or device [B, 3, H, W]."""
        if isinstance(batch, torch.Tensor) and batch.device.type == self.device.type:
            x = batch
        else:
            x = self._to_device(np.asarray(batch)).permute(0, 3, 1, 2)
        return (x.float() - self.mean) / self.std

    @torch.inference_mode()
    def encode_backbone(self, batch: np.ndarray | torch.Tensor) -> torch.Tensor:
        """The backbone's float32 ``forward_features`` [B, prefix + n, d_v] before the adapter (prefix tokens
        kept), under the same pixels and autocast as :meth:`encode_float`: what training caches (training/)."""
        dtype = PRECISIONS[self.precision]
        with torch.autocast(self.device.type, dtype=dtype, enabled=dtype is not None):
            return self.backbone.forward_features(self._normalized(batch)).float()

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
            buf = local.staging[local.turn] = torch.empty(
                (max(x.shape[0], 1),) + tuple(x.shape[1:]), dtype=torch.uint8
            ).pin_memory()
        staging = buf[: x.shape[0]]
        staging.copy_(x)
        return staging.to(self.device, non_blocking=True)

    @torch.inference_mode()
    def encode_float(self, batch: np.ndarray | torch.Tensor) -> torch.Tensor:
        """Unquantized float32 tokens [B, m, d] on the device.

        ``batch`` is uint8 [B, H, W, 3] on the host, or a uint8 [B, 3, H, W]
        tensor already on the device (GPU-decoded images).
        """
        x = self._normalized(batch)
        n = x.shape[0]
        if self.pad_to and n < self.pad_to:
            # torch.compile specialises on shapes: pad the last batch of a shard, not recompile for it
            x = torch.cat([x, x.new_zeros((self.pad_to - n,) + tuple(x.shape[1:]))])
        dtype = PRECISIONS[self.precision]
        with torch.autocast(self.device.type, dtype=dtype, enabled=dtype is not None):
            y = self._forward(x)
        if y.device.type != self.device.type:
            raise RuntimeError(f"tokens were computed on {y.device}, not on the requested {self.device}")
        return y[:n].float()

    @torch.inference_mode()
    def start(self, batch) -> PendingBatch:
        """Launch one batch; on CUDA this returns before the GPU is done.

        The indexer starts batch k+1 before it finishes batch k, so building a
        batch on the host overlaps the previous one's compute.
        """
        y = self.encode_float(batch)
        values, scales = quantization.quantize(y, self.quantization)
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
    def finish(pending: PendingBatch):
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
