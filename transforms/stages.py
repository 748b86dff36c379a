"""The stages of one shard between reading and writing: generators that transforms/indexer.py chains.

::

    iter_shard (transforms/shards.py)    Sample | Rejection
      -> OrderedDecodeMap                Decoded | Rejection      thread pool, input order kept, timeouts
      -> fixed_batches                   Batch | Rejection        batch_size samples each (the last may be short)
      -> encode_batches                  EncodedBatch | Rejection batch k+1 starts before batch k is finished
      -> collect                         SegmentData              what schemas.segment.SegmentWriter writes

Every stage passes Rejections through unchanged and in order, so the last
stage sees every sample of the shard exactly once: stored, or a dead-letter row.
"""

from __future__ import annotations

import collections
import concurrent.futures as cf
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import numpy as np

from edje_indexer.schemas.records import StoreMetadata
from edje_indexer.schemas.segment import SegmentData
from edje_indexer.transforms.decoders import Decoder, DecodeRejected
from edje_indexer.transforms.encoder import TokenEncoder
from edje_indexer.transforms.shards import Rejection, Sample


@dataclass
class Decoded:
    sample: Sample
    pixels: object  # what Decoder.prepare returned


@dataclass
class Batch:
    samples: list[Sample]
    pixels: list


@dataclass
class EncodedBatch:
    ids: list[str]
    values: np.ndarray
    scales: np.ndarray | None


@dataclass
class Stopwatch:
    seconds: float = 0.0

    def __enter__(self):
        self._t = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds += time.perf_counter() - self._t


class OrderedDecodeMap:
    """Decode samples on a thread pool, up to ``prefetch`` ahead, yielding results in input order.

    A decode that overruns ``timeout_s`` (counted from its own start, not from
    when it was queued) becomes a ``timeout`` rejection. Python cannot kill
    the stuck thread, so it is written off: the pool is replaced and the
    images that had not started yet move to the new one, so none of them is
    rejected for time spent queued behind it. :meth:`close` never waits for a
    stuck decode.
    """

    def __init__(self, decoder: Decoder, threads: int, timeout_s: float, prefetch: int):
        self.decoder, self.threads, self.timeout_s, self.prefetch = decoder, threads, timeout_s, prefetch
        self._pool = self._new_pool()
        self._pending: collections.deque = collections.deque()  # (item, future or None, start times)

    def _new_pool(self) -> cf.ThreadPoolExecutor:
        return cf.ThreadPoolExecutor(self.threads, thread_name_prefix="decode")

    def _timed(self, data: bytes, started: list):
        started.append(time.monotonic())
        return self.decoder.prepare(data)

    def _submit(self, item: Sample):
        started: list[float] = []
        return item, self._pool.submit(self._timed, item.data, started), started

    def _write_off_stuck_thread(self) -> None:
        self._pool.shutdown(wait=False)
        self._pool = self._new_pool()
        for i, (item, fut, _) in enumerate(self._pending):
            if fut is not None and fut.cancel():  # not started: decode it on the new pool
                self._pending[i] = self._submit(item)

    def _resolve(self, entry) -> Decoded | Rejection:
        item, fut, started = entry
        if fut is None:
            return item
        timeout = self.timeout_s
        try:
            try:
                return Decoded(item, fut.result(timeout=timeout))
            except cf.TimeoutError:
                if started and time.monotonic() - started[0] < timeout:  # it started late: give it its full time
                    return Decoded(item, fut.result(timeout=timeout - (time.monotonic() - started[0])))
                raise
        except DecodeRejected as e:
            return Rejection(item.id, item.member, "decode", e.reason, "DecodeRejected", str(e))
        except cf.TimeoutError:
            if not fut.cancel():
                self._write_off_stuck_thread()
            return Rejection(
                item.id, item.member, "decode", "timeout", "TimeoutError", f"decoding took longer than {timeout}s"
            )
        except Exception as e:  # noqa: BLE001 -- any decoder failure rejects this image only
            return Rejection(item.id, item.member, "decode", "decode_error", type(e).__name__, str(e) or repr(e))

    def __call__(self, items: Iterable[Sample | Rejection]) -> Iterator[Decoded | Rejection]:
        pending = self._pending
        for item in items:
            pending.append(self._submit(item) if isinstance(item, Sample) else (item, None, None))
            while len(pending) > self.prefetch:
                yield self._resolve(pending.popleft())
        while pending:
            yield self._resolve(pending.popleft())

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def fixed_batches(items: Iterable[Decoded | Rejection], size: int) -> Iterator[Batch | Rejection]:
    samples, pixels = [], []
    for item in items:
        if isinstance(item, Rejection):
            yield item
            continue
        samples.append(item.sample)
        pixels.append(item.pixels)
        if len(samples) == size:
            yield Batch(samples, pixels)
            samples, pixels = [], []
    if samples:
        yield Batch(samples, pixels)


def _finish(encoder: TokenEncoder, pending, samples: list[Sample]) -> Iterator[EncodedBatch | Rejection]:
    values, scales, finite = encoder.finish(pending)
    for j in np.flatnonzero(~finite):
        yield Rejection(
            samples[j].id,
            samples[j].member,
            "encode",
            "non_finite_tokens",
            "NonFiniteTokens",
            f"the model produced NaN/inf tokens (or values beyond {encoder.quantization}'s range)",
        )
    keep = np.flatnonzero(finite)
    if len(keep) < len(finite):
        values, scales = values[keep], None if scales is None else scales[keep]
    yield EncodedBatch([samples[j].id for j in keep], values, scales)


def encode_batches(
    batches: Iterable[Batch | Rejection], decoder: Decoder, encoder: TokenEncoder, clock: Stopwatch | None = None
) -> Iterator[EncodedBatch | Rejection]:
    """Assemble each batch, start it on the encoder, then finish the one before it.

    On a GPU ``start`` returns before the work is done, so assembling batch
    k+1 on the host overlaps batch k's compute. ``clock`` accumulates the
    seconds spent here (recorded as the shard's encode time).
    """
    clock = clock or Stopwatch()
    in_flight = None  # (pending, samples) of the one started batch
    for item in batches:
        if isinstance(item, Rejection):
            yield item
            continue
        with clock:
            batch, errors = decoder.assemble(item.pixels)
            rejected = [
                Rejection(s.id, s.member, "decode", "decode_error", type(e).__name__, str(e))
                for s, e in zip(item.samples, errors)
                if e is not None
            ]
            good = [s for s, e in zip(item.samples, errors) if e is None]
            started = (encoder.start(batch), good) if good else None
        yield from rejected
        if started is None:
            continue
        if in_flight is not None:
            with clock:
                done = list(_finish(encoder, *in_flight))
            yield from done
        in_flight = started
    if in_flight is not None:
        with clock:
            done = list(_finish(encoder, *in_flight))
        yield from done


def rejection_row(shard_url: str, r: Rejection) -> dict:
    """A dead-letter row (schemas.tables.REJECTED_SCHEMA) for one rejection."""
    return {
        "id": r.id,
        "shard": shard_url,
        "member": r.member,
        "stage": r.stage,
        "reason": r.reason,
        "error_type": r.error_type,
        "message": r.message[:2000],
    }


@dataclass
class _Parts:
    ids: list[str] = field(default_factory=list)
    values: list[np.ndarray] = field(default_factory=list)
    scales: list[np.ndarray] = field(default_factory=list)
    rejected: list[dict] = field(default_factory=list)


def collect(items: Iterable[EncodedBatch | Rejection], shard_url: str, metadata: StoreMetadata) -> SegmentData:
    """The shard's rows and dead letters, in order, as one SegmentData."""
    parts = _Parts()
    for item in items:
        if isinstance(item, Rejection):
            parts.rejected.append(rejection_row(shard_url, item))
            continue
        parts.ids += item.ids
        parts.values.append(item.values)
        if item.scales is not None:
            parts.scales.append(item.scales)
    empty = SegmentData.empty(metadata)
    values = np.concatenate(parts.values) if parts.values else empty.values
    scales = empty.scales
    if metadata.quantization == "int8" and parts.scales:
        scales = np.concatenate(parts.scales)
    return SegmentData(parts.ids, values, scales, parts.rejected)
