"""The stages of one shard between reading and writing: generators that transforms/indexer.py chains.

::

    iter_shard (transforms/shards.py)    Sample | Rejection
      -> OrderedDecodeMap                Decoded | Rejection      daemon threads, input order kept, timeouts
      -> fixed_batches                   Batch | Rejection        batch_size samples each (the last may be short)
      -> encode_batches                  EncodedBatch | Rejection batch k+1 starts before batch k is finished
      -> collect                         SegmentData              what schemas.segment.SegmentWriter writes

Every stage passes Rejections through unchanged and in order, so the last
stage sees every sample of the shard exactly once: stored, or a dead-letter row.
"""

from __future__ import annotations

import collections
import concurrent.futures as cf
import queue
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import numpy as np

from edje_indexer.schemas import quantization
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


# At most this many bytes of encoded images are in the decode window at once (at least one image).
MAX_PENDING_BYTES = 256 * 1024 * 1024


class DaemonPool:
    """A small thread pool (``submit``/``shutdown`` as ``concurrent.futures``) on daemon threads.

    ``ThreadPoolExecutor`` joins its threads when the interpreter exits, so one
    decode that never returns keeps the process alive after its job is done;
    nothing ever waits for these threads. Threads start as work arrives, up to
    ``threads``; after :meth:`shutdown`, each exits once its current task returns.
    """

    def __init__(self, threads: int, name: str = "decode"):
        self._max, self._name = max(1, threads), name
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        self._idle = threading.Semaphore(0)
        self._closed = False

    def submit(self, fn, *args) -> cf.Future:
        if self._closed:
            raise RuntimeError("cannot submit to a pool that was shut down")
        fut: cf.Future = cf.Future()
        self._queue.put((fut, fn, args))
        if not self._idle.acquire(blocking=False) and len(self._threads) < self._max:
            t = threading.Thread(target=self._work, name=f"{self._name}_{len(self._threads)}", daemon=True)
            t.start()
            self._threads.append(t)
        return fut

    def _work(self) -> None:
        while True:
            task = self._queue.get()
            if task is None:
                self._queue.put(None)  # for the next thread
                return
            fut, fn, args = task
            task = None
            if fut.set_running_or_notify_cancel():
                try:
                    result = fn(*args)
                except BaseException as e:  # noqa: BLE001 -- handed to whoever waits for the future
                    fut.set_exception(e)
                else:
                    fut.set_result(result)
                result = None
            fut = fn = args = None  # nothing of this task stays referenced while the thread waits
            self._idle.release()

    def shutdown(self, cancel_futures: bool = False) -> None:
        """Never waits. ``cancel_futures``: tasks not started yet are cancelled."""
        self._closed = True
        if cancel_futures:
            while True:
                try:
                    task = self._queue.get_nowait()
                except queue.Empty:
                    break
                if task is not None:
                    task[0].cancel()
        self._queue.put(None)


class OrderedDecodeMap:
    """Decode samples on a thread pool, up to ``prefetch`` ahead, yielding results in input order.

    The window holds at most ``prefetch`` samples and, by their encoded bytes,
    at most ``max_pending_bytes`` (always at least one sample, however large).
    A sample's bytes are dropped (``Sample.data`` becomes ``b""``) as its decode
    starts, so what follows holds pixels, not encoded images.

    A decode that overruns ``timeout_s`` (counted from its own start, not from
    when it was queued) becomes a ``timeout`` rejection. Python cannot kill
    the stuck thread, so it is written off: the pool is replaced and the
    images that had not started yet move to the new one, so none of them is
    rejected for time spent queued behind it. The threads are daemon threads
    (:class:`DaemonPool`): :meth:`close` never waits for a stuck decode, and
    neither does the interpreter's exit.
    """

    def __init__(
        self,
        decoder: Decoder,
        threads: int,
        timeout_s: float,
        prefetch: int,
        max_pending_bytes: int = MAX_PENDING_BYTES,
    ):
        self.decoder, self.threads, self.timeout_s, self.prefetch = decoder, threads, timeout_s, prefetch
        self.max_pending_bytes = max_pending_bytes
        self._pool = self._new_pool()
        self._pending: collections.deque = collections.deque()  # (item, future or None, start times, bytes)
        self._pending_bytes = 0

    def _new_pool(self) -> DaemonPool:
        return DaemonPool(self.threads, "decode")

    def _timed(self, item: Sample, started: list):
        started.append(time.monotonic())
        data, item.data = item.data, b""
        return self.decoder.prepare(data)

    def _submit(self, item: Sample):
        started: list[float] = []
        size = len(item.data)  # before the decode starts and drops the bytes
        return item, self._pool.submit(self._timed, item, started), started, size

    def _write_off_stuck_thread(self) -> None:
        self._pool.shutdown()
        self._pool = self._new_pool()
        for i, (item, fut, _, _) in enumerate(self._pending):
            if fut is not None and fut.cancel():  # not started: decode it on the new pool
                self._pending[i] = self._submit(item)

    def _pop(self) -> Decoded | Rejection:
        entry = self._pending.popleft()
        self._pending_bytes -= entry[3]
        return self._resolve(entry)

    def _resolve(self, entry) -> Decoded | Rejection:
        item, fut, started, _ = entry
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
            if isinstance(item, Sample):
                while pending and self._pending_bytes + len(item.data) > self.max_pending_bytes:
                    yield self._pop()
                entry = self._submit(item)
                self._pending_bytes += entry[3]
                pending.append(entry)
            else:
                pending.append((item, None, None, 0))
            while len(pending) > self.prefetch:
                yield self._pop()
        while pending:
            yield self._pop()

    def close(self) -> None:
        self._pool.shutdown(cancel_futures=True)

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
    if quantization.has_scales(metadata.quantization) and parts.scales:
        scales = np.concatenate(parts.scales)
    return SegmentData(parts.ids, values, scales, parts.rejected)
