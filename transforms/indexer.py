"""Index one shard end to end: read -> decode -> encode -> write -> commit.

This is the whole per-shard unit of work. The Beam step (pipeline/job.py)
calls :func:`index_shard` once per shard; benchmarks and tests call it
directly. It never raises for bad samples (they become dead-letter rows) and
turns an unreadable shard into a failure record instead of an exception, so a
runner never retries bad data.
"""

from __future__ import annotations

import collections
import concurrent.futures as cf
import datetime as dt
import logging
import os
import tarfile
import time
from dataclasses import dataclass, field

import numpy as np

from edje_indexer import __version__
from edje_indexer.schemas import layout
from edje_indexer.schemas.storage import Location
from edje_indexer.transforms import decode_torch
from edje_indexer.transforms.decode import DEFAULT_MAX_PIXELS, DecodeRejected, decode_image
from edje_indexer.transforms.encode import TokenEncoder
from edje_indexer.transforms.shards import Rejection, Sample, ShardReadStats, iter_shard
from edje_indexer.transforms.write import write_rejected, write_segment_data

log = logging.getLogger(__name__)

SOFTWARE_VERSION = __version__


@dataclass(frozen=True)
class ShardTask:
    url: str
    segment: str
    fingerprint: dict  # {"size": ..., "version": ...}; see pipeline/plan.py
    revision: int = 0  # > 0: re-indexing an unchanged source; never overwrite committed data
    replaces: str | None = None  # data_path of the committed version this task supersedes

    @property
    def data_path(self) -> str:
        return layout.segment_data_path(self.segment, self.fingerprint, self.revision)


@dataclass(frozen=True)
class IndexSettings:
    """Per-job settings every worker needs (picklable, no I/O)."""

    store: str
    quantization: str
    identity_sha256: str
    id_policy: str = "key"
    batch_size: int = 32
    decode_threads: int = 0  # 0: one per core of the worker, at most 16 (decided where the shard runs)
    decode_timeout_s: float = 60.0
    max_pixels: int = DEFAULT_MAX_PIXELS


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def _rejection_row(task: ShardTask, r: Rejection) -> dict:
    return {"id": r.id, "shard": task.url, "member": r.member, "stage": r.stage, "reason": r.reason,
            "error_type": r.error_type, "message": r.message[:2000]}


def decode_threads(settings: IndexSettings) -> int:
    # On a GPU worker one core decodes ~200 images/s at 384 px (edje.md), so use them all.
    return settings.decode_threads or min(16, os.cpu_count() or 2)


def _decoded(items, pools: list, encoder: TokenEncoder, settings: IndexSettings):
    """Decode on a thread pool, ``prefetch`` samples ahead, preserving order.

    ``pools[-1]`` is the pool in use. When an image's decode overruns the
    timeout, its thread is written off: the images that have not started yet
    move to a fresh pool, so none of them is rejected for time spent queued
    behind it (Python cannot kill the stuck thread; it ends on its own or
    with the process).
    """
    pp = encoder.model.preprocess
    threads = decode_threads(settings)
    prefetch = max(2 * settings.batch_size, 2 * threads)
    pending: collections.deque = collections.deque()
    timeout = settings.decode_timeout_s

    if pp.decoder == "torchvision":
        def decode(data):
            return decode_torch.prepare(data, pp, settings.max_pixels, encoder.device)
    else:
        def decode(data):
            return decode_image(data, pp, settings.max_pixels)

    def timed(data, started):
        started.append(time.monotonic())
        return decode(data)

    def submit(item):
        started: list[float] = []
        return item, pools[-1].submit(timed, item.data, started), started

    def write_off_stuck_thread():
        pools[-1].shutdown(wait=False)
        pools.append(cf.ThreadPoolExecutor(threads, thread_name_prefix="decode"))
        for i, (item, fut, _) in enumerate(pending):
            if fut is not None and fut.cancel():  # not started: decode it on the new pool
                pending[i] = submit(item)

    def resolve(entry):
        item, fut, started = entry
        if fut is None:
            return item
        try:
            try:
                return item, fut.result(timeout=timeout)
            except cf.TimeoutError:
                if started and time.monotonic() - started[0] < timeout:  # it started late: give it its full time
                    return item, fut.result(timeout=timeout - (time.monotonic() - started[0]))
                raise
        except DecodeRejected as e:
            return Rejection(item.id, item.member, "decode", e.reason, "DecodeRejected", str(e))
        except cf.TimeoutError:
            if not fut.cancel():
                write_off_stuck_thread()
            return Rejection(item.id, item.member, "decode", "timeout", "TimeoutError",
                             f"decoding took longer than {timeout}s")
        except Exception as e:  # noqa: BLE001 -- any decoder failure rejects this image only
            return Rejection(item.id, item.member, "decode", "decode_error", type(e).__name__, str(e) or repr(e))

    for item in items:
        pending.append(submit(item) if isinstance(item, Sample) else (item, None, None))
        while len(pending) > prefetch:
            yield resolve(pending.popleft())
    while pending:
        yield resolve(pending.popleft())


def index_shard(task: ShardTask, encoder: TokenEncoder, settings: IndexSettings) -> dict:
    """Index one shard into ``settings.store``; returns its commit (or failure) record."""
    loc = Location(settings.store)
    t0 = time.perf_counter()
    stats = ShardReadStats()
    rejected: list[dict] = []
    ids: list[str] = []
    values_parts: list[np.ndarray] = []
    scales_parts: list[np.ndarray] = []
    batch_ids: list[str] = []
    batch_members: list[str] = []
    batch_pixels: list[np.ndarray] = []
    encode_s = 0.0

    in_flight: list = []  # at most one started batch: (pending, ids, members)

    def complete(pending, good_ids, good_members):
        values, scales, finite = encoder.finish(pending)
        for j in np.flatnonzero(~finite):
            rejected.append(_rejection_row(task, Rejection(
                good_ids[j], good_members[j], "encode", "non_finite_tokens", "NonFiniteTokens",
                f"the model produced NaN/inf tokens (or values beyond {settings.quantization}'s range)")))
        keep = np.flatnonzero(finite)
        everything = len(keep) == len(finite)
        values_parts.append(values if everything else values[keep])
        if scales is not None:
            scales_parts.append(scales if everything else scales[keep])
        ids.extend(good_ids[j] for j in keep)

    def flush(last: bool = False):
        """Start the collected batch, then finish the one before it (order is kept)."""
        nonlocal encode_s
        te = time.perf_counter()
        if batch_pixels:
            pp = encoder.model.preprocess
            if pp.decoder == "torchvision":
                batch, errors = decode_torch.assemble(batch_pixels, pp, encoder.device)
            else:
                batch, errors = np.stack(batch_pixels), [None] * len(batch_pixels)
            for i, e in enumerate(errors):
                if e is not None:
                    rejected.append(_rejection_row(task, Rejection(batch_ids[i], batch_members[i], "decode",
                                                                   "decode_error", type(e).__name__, str(e))))
            good = [i for i, e in enumerate(errors) if e is None]
            if good:
                in_flight.append((encoder.start(batch), [batch_ids[i] for i in good],
                                  [batch_members[i] for i in good]))
            batch_ids.clear(), batch_members.clear(), batch_pixels.clear()
        while len(in_flight) > (0 if last else 1):
            complete(*in_flight.pop(0))
        encode_s += time.perf_counter() - te

    # Not a `with` block: its exit would wait for a decoder stuck past its timeout.
    pools = [cf.ThreadPoolExecutor(decode_threads(settings), thread_name_prefix="decode")]
    try:
        for out in _decoded(iter_shard(task.url, settings.id_policy, stats), pools, encoder, settings):
            if isinstance(out, Rejection):
                rejected.append(_rejection_row(task, out))
                continue
            sample, pixels = out
            batch_ids.append(sample.id)
            batch_members.append(sample.member)
            batch_pixels.append(pixels)
            if len(batch_pixels) == settings.batch_size:
                flush()
        flush(last=True)
    except (OSError, EOFError, tarfile.TarError) as e:
        if stats.samples_read or ids:
            raise  # damage after the shard started is handled inside iter_shard; anything else is a bug
        return _fail(loc, task, e)
    finally:
        pools[-1].shutdown(wait=False, cancel_futures=True)
    read_s = time.perf_counter() - t0

    m, d = encoder.model.identity["tokens_per_image"], encoder.model.identity["token_dim"]
    empty = np.zeros((0, m, d), dtype=np.int8 if settings.quantization == "int8" else np.float16)
    values = np.concatenate(values_parts) if values_parts else empty
    scales = None
    if settings.quantization == "int8":
        scales = np.concatenate(scales_parts) if scales_parts else np.zeros((0, m), dtype=np.float16)

    tw = time.perf_counter()
    checksums = write_segment_data(loc, task.data_path, ids, values, scales, settings.quantization)
    write_rejected(loc, task.data_path, rejected)
    write_s = time.perf_counter() - tw

    by_reason = collections.Counter(r["reason"] for r in rejected)
    record = {
        "schema_version": layout.SCHEMA_VERSION,
        "software_version": SOFTWARE_VERSION,
        "segment": task.segment,
        "data_path": task.data_path,
        "revision": task.revision,
        "shard": task.url,
        "source": {**task.fingerprint, "bytes_read": stats.size, "sha256": stats.sha256},
        "identity_sha256": settings.identity_sha256,
        "quantization": settings.quantization,
        "rows": len(ids),
        "samples_read": stats.samples_read,
        "indexed": len(ids),
        "rejected": sum(by_reason.values()),
        "rejected_by_reason": dict(sorted(by_reason.items())),
        "extra_image_members": stats.extra_image_members,
        "complete": stats.complete,
        "incomplete_reason": stats.incomplete_reason,
        "checksums": checksums,
        "token_bytes": int(values.nbytes + (0 if scales is None else scales.nbytes)),
        "timings_s": {"read_decode_encode": round(read_s, 4), "encode": round(encode_s, 4),
                      "write": round(write_s, 4), "total": round(time.perf_counter() - t0, 4)},
        "committed_at": _now(),
    }
    if record["samples_read"] != record["indexed"] + record["rejected"]:
        raise RuntimeError(f"accounting error in {task.url}: {record['samples_read']} read, "
                           f"{record['indexed']} indexed, {record['rejected']} rejected")
    loc.write_json_atomic(record, *layout.commit_path(task.segment))  # the commit point
    loc.remove(*layout.failed_path(task.segment))
    # A superseded version stays until the next job's finalize (pipeline/maintenance.py).
    log.info("committed %s: %d indexed, %d rejected, %.1f images/s", task.url, len(ids), record["rejected"],
             len(ids) / max(record["timings_s"]["total"], 1e-9))
    return record


def _fail(loc: Location, task: ShardTask, e: Exception) -> dict:
    record = {"segment": task.segment, "shard": task.url, "failed": True, "error_type": type(e).__name__,
              "message": str(e) or repr(e), "failed_at": _now()}
    loc.write_json_atomic(record, *layout.failed_path(task.segment))
    log.warning("shard %s could not be read: %s: %s", task.url, record["error_type"], record["message"])
    return record


__all__ = ["IndexSettings", "ShardTask", "index_shard"]
