"""A reference reranker: scores (query, image id) pairs with the joint encoder over a token store.

Reading tokens (``Reranker``)
-----------------------------
On the CPU the candidates' tokens come from ``TokenStore.get`` (float32,
decoded by the store). On any other device the stored values come from
``TokenStore.get_raw`` (fp16, int8 + fp16 scales, or packed int4 + fp16 scales:
a half, a quarter or an eighth of the bytes to move) and are decoded on the
device by :func:`schemas.quantization.dequantize_torch` (int4-rht's rotation
undone there too); both give bit-identical float32 tokens. The next batch is
read on a helper thread while the current one is scored. On CUDA the encoder
runs under bf16 autocast.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from edje_indexer.rerank.joint_encoder import EdjeJointEncoder


class Reranker:
    """Scores (query, image id) pairs with the joint encoder, reading the images' tokens from a store.

    ``device``: "cpu", "cuda", "cuda:1", ... (the model is moved there, eval
    mode). ``batch_size``: pairs per forward pass. ``precision``: "bf16"
    (autocast; the default on CUDA) or "fp32" (the default elsewhere).
    ``decode_on_device``: read stored values with ``get_raw`` and decode on
    the device (default: on any device but the CPU). ``prefetch``: read the
    next batch on a helper thread while the current one is scored.
    """

    def __init__(
        self,
        model: EdjeJointEncoder,
        tokenizer,
        store,
        device: str | torch.device = "cpu",
        batch_size: int = 256,
        precision: str | None = None,
        decode_on_device: bool | None = None,
        prefetch: bool = True,
    ):
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        self.device = torch.device(device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise RuntimeError(f"device {device} asked for, but torch sees no CUDA GPU")
        self.model = model.to(self.device).eval()
        self.tokenizer = tokenizer
        self.store = store
        self.batch_size = int(batch_size)
        self.precision = precision or ("bf16" if self.device.type == "cuda" else "fp32")
        if self.precision not in ("bf16", "fp32"):
            raise ValueError(f"precision must be bf16 or fp32, not {self.precision!r}")
        self.decode_on_device = self.device.type != "cpu" if decode_on_device is None else bool(decode_on_device)
        self.prefetch = prefetch
        m, d = int(store.tokens_per_image), int(store.token_dim)
        if d != model.token_dim:
            raise ValueError(f"the store's tokens are {d} wide; the model reads {model.token_dim}-wide tokens")
        if model.num_image_tokens is not None and m != model.num_image_tokens:
            raise ValueError(
                f"the store has {m} tokens per image; the model was trained on {model.num_image_tokens} "
                f"(its adapter's queries): index the images with the same checkpoint"
            )
        if m > model.max_image_tokens:
            raise ValueError(
                f"the store has {m} tokens per image; the model's {model.config.max_position_embeddings} "
                f"positions leave room for {model.max_image_tokens} after a full caption"
            )
        self.tokens_per_image, self.token_dim = m, d

    # reading

    def _read(self, ids: Sequence[str], out: np.ndarray | None = None) -> torch.Tensor:
        """float32 [k, m, d] tokens of ``ids`` on the device."""
        if not self.decode_on_device:
            x = torch.from_numpy(self.store.get(ids, out=out))
            return x.to(self.device) if self.device.type != "cpu" else x
        from edje_indexer.schemas.quantization import dequantize_torch

        values, scales = self.store.get_raw(ids)
        nb = self.device.type == "cuda"
        v = torch.from_numpy(values).to(self.device, non_blocking=nb)
        s = None if scales is None else torch.from_numpy(scales).to(self.device, non_blocking=nb)
        return dequantize_torch(v, s, self.store.quantization, dtype=torch.float32)

    def _token_batches(self, ids: Sequence[str]) -> Iterator[tuple[int, int, torch.Tensor]]:
        """(start, stop, tokens) per batch; the next batch is read while the caller scores this one."""
        k, bs = len(ids), self.batch_size
        spans = [(a, min(a + bs, k)) for a in range(0, k, bs)]
        # CPU: decode into two reused buffers, alternately (batch i+2 is read only after batch i is scored)
        bufs = [None, None]
        if not self.decode_on_device:
            shape = (min(bs, k), self.tokens_per_image, self.token_dim)
            bufs = [np.empty(shape, np.float32), np.empty(shape, np.float32) if len(spans) > 1 else None]

        def read(i):
            a, b = spans[i]
            buf = bufs[i % 2]
            return self._read(ids[a:b], None if buf is None else buf[: b - a])

        if len(spans) <= 1 or not self.prefetch:
            for i, (a, b) in enumerate(spans):
                yield a, b, read(i)
            return
        with ThreadPoolExecutor(1, thread_name_prefix="rerank-read") as pool:
            pending = pool.submit(read, 0)
            for i, (a, b) in enumerate(spans):
                tokens = pending.result()
                if i + 1 < len(spans):
                    pending = pool.submit(read, i + 1)
                yield a, b, tokens
            # a batch's buffer is reused two batches later: by then the caller has scored it

    def _autocast(self):
        if self.precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _check_ids(self, ids) -> list:
        if isinstance(ids, (str, bytes)):
            raise TypeError("ids must be a list of image ids, not a single string; use [image_id]")
        return list(ids)

    # scoring

    @torch.inference_mode()
    def score(self, query: str, ids: Sequence[str]) -> np.ndarray:
        """float32 logits [k] of (query, ids[i]), in the order of ``ids`` (repeats allowed).

        Unknown ids raise ``schemas.UnknownIdError`` (a KeyError) naming the first one.
        """
        if not isinstance(query, str):
            raise TypeError(f"query must be a string, not {type(query).__name__}")
        ids = self._check_ids(ids)
        out = np.empty(len(ids), np.float32)
        if not ids:
            return out
        text = self.model.tokenize(self.tokenizer, [query])
        input_ids = text.input_ids.to(self.device)
        logits = []  # left on the device until the end: no synchronisation per batch
        with self._autocast():
            for a, b, tokens in self._token_batches(ids):
                logits.append(self.model(input_ids.expand(b - a, -1), None, tokens))
        out[:] = torch.cat(logits).cpu().numpy()
        return out

    @torch.inference_mode()
    def score_pairs(self, queries: Sequence[str], ids: Sequence[str]) -> np.ndarray:
        """float32 logits [k] of the pairs (queries[i], ids[i]): different texts in one batch (padded)."""
        ids = self._check_ids(ids)
        if isinstance(queries, str) or len(queries) != len(ids):
            raise ValueError("score_pairs needs one query per id (two lists of the same length)")
        out = np.empty(len(ids), np.float32)
        if not ids:
            return out
        text = self.model.tokenize(self.tokenizer, queries)
        logits = []
        with self._autocast():
            for a, b, tokens in self._token_batches(ids):
                part = text.select(slice(a, b))
                lengths = part.lengths.to(self.device) if part.padded else None
                logits.append(self.model(part.input_ids.to(self.device), lengths, tokens))
        out[:] = torch.cat(logits).cpu().numpy()
        return out

    def rerank(self, query: str, ids: Sequence[str]) -> list[tuple[str, float]]:
        """(id, score) for every id, best first (ties keep the order given)."""
        ids = self._check_ids(ids)
        scores = self.score(query, ids)
        order = np.argsort(-scores, kind="stable")
        return [(ids[i], float(scores[i])) for i in order]
