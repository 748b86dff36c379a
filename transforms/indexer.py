"""Index one shard end to end: read -> decode -> batch -> encode -> write -> commit.

:func:`index_shard` is the whole per-shard unit of work, a composition of the
stages in transforms/stages.py; the Beam transform (transforms/index_shards.py)
calls it once per shard, benchmarks and tests call it directly. It never
raises for bad samples (they become dead-letter rows) and turns a shard that
cannot be read at all into a failure record, so a runner never retries bad data.
"""

from __future__ import annotations

import logging
import os
import tarfile
import time
from dataclasses import dataclass

from edje_indexer.schemas.records import CommitRecord, FailureRecord, ShardTask
from edje_indexer.schemas.segment import SegmentWriter
from edje_indexer.transforms.decoders import DEFAULT_MAX_PIXELS, make_decoder
from edje_indexer.transforms.encoder import PRECISIONS, TokenEncoder
from edje_indexer.transforms.shards import ShardReadStats, iter_shard
from edje_indexer.transforms.stages import OrderedDecodeMap, Stopwatch, collect, encode_batches, fixed_batches

log = logging.getLogger(__name__)

# Errors that say a shard cannot be used at all (not that reading it failed this time): a failure record.
UNUSABLE_SHARD = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError, tarfile.TarError, EOFError)


@dataclass(frozen=True)
class IndexSettings:
    """How a worker runs (picklable, no I/O). What the store records (model, quantization,
    id policy) is not here: it is the store's metadata, which workers get from the launcher."""

    batch_size: int = 32
    decode_threads: int = 0  # 0: one per core of the worker, at most 16 (decided where the shard runs)
    decode_timeout_s: float = 60.0
    max_pixels: int = DEFAULT_MAX_PIXELS
    device: str = "cpu"
    precision: str | None = None  # default: bf16 on cuda, fp32 on cpu
    compile: bool = False
    shard_attempts: int = 3  # tries per shard in one job when reading fails transiently (runners may retry more)

    def __post_init__(self):
        if self.batch_size < 1 or self.decode_threads < 0:
            raise ValueError("--batch-size must be at least 1 and --decode-threads at least 0 (0: one per core)")
        if self.shard_attempts < 1:
            raise ValueError("shard_attempts must be at least 1")
        if self.decode_timeout_s <= 0:
            raise ValueError("--decode-timeout must be positive")
        if self.precision is not None and self.precision not in PRECISIONS:
            raise ValueError(f"unknown precision {self.precision!r}; use one of {sorted(PRECISIONS)}")

    def threads(self) -> int:
        # On a GPU worker one core decodes ~200 images/s at 384 px (edje.md), so use them all.
        return self.decode_threads or min(16, os.cpu_count() or 2)

    def encoder(self, model, quantization: str) -> TokenEncoder:
        return TokenEncoder(model, quantization, self.device, self.precision, self.compile, self.batch_size)


def index_shard(
    task: ShardTask, encoder: TokenEncoder, writer: SegmentWriter, settings: IndexSettings
) -> CommitRecord | FailureRecord:
    """Index one shard into the writer's store; returns its commit (or failure) record.

    An attempt whose task some attempt already committed returns that record
    without reading anything. A shard that cannot be used at all (missing,
    unreadable, not a tar) gets a failure record; a transient error (the
    connection dropped, :class:`SourceReadError`) propagates, so the attempt
    fails and is retried, and nothing of it is committed.
    """
    done = writer.committed(task)
    if done is not None:
        return done
    t0 = time.perf_counter()
    spec = encoder.model.spec
    decoder = make_decoder(spec.decoder, encoder.model.preprocess, encoder.device, spec.jpeg_draft, settings.max_pixels)
    stats = ShardReadStats()
    clock = Stopwatch()
    prefetch = max(2 * settings.batch_size, 2 * settings.threads())
    # Not waited for on exit: a decoder stuck past its timeout must not hold up the shard.
    with OrderedDecodeMap(decoder, settings.threads(), settings.decode_timeout_s, prefetch) as decode:
        try:
            samples = iter_shard(task.url, writer.metadata.id_policy, stats)
            encoded = encode_batches(fixed_batches(decode(samples), settings.batch_size), decoder, encoder, clock)
            data = collect(encoded, task.url, writer.metadata)
        except UNUSABLE_SHARD as e:
            if stats.samples_read:
                raise  # damage after the shard started is handled inside iter_shard; anything else is a bug
            return writer.fail(task, e)
    read_s = time.perf_counter() - t0
    return writer.write(
        task,
        data,
        samples_read=stats.samples_read,
        complete=stats.complete,
        incomplete_reason=stats.incomplete_reason,
        extra_image_members=stats.extra_image_members,
        bytes_read=stats.size,
        sha256=stats.sha256,
        timings_s={
            "read_decode_encode": round(read_s, 4),
            "encode": round(clock.seconds, 4),
            "total": round(time.perf_counter() - t0, 4),
        },
    )


RETRY_WAIT_S = (1.0, 4.0, 16.0)


def index_shard_retrying(
    task: ShardTask, encoder: TokenEncoder, writer: SegmentWriter, settings: IndexSettings, sleep=time.sleep
) -> CommitRecord | FailureRecord:
    """:func:`index_shard`, with up to ``settings.shard_attempts`` attempts when reading fails transiently.

    Runners retry failed bundles too (Dataflow: 4 times), but the local ones and
    Dask do not; each try is a new attempt with a folder of its own, so a retry
    can never meet a half-written earlier one.
    """
    for n in range(1, settings.shard_attempts + 1):
        try:
            return index_shard(task, encoder, writer, settings)
        except OSError as e:  # transient: UNUSABLE_SHARD errors became failure records inside
            if n == settings.shard_attempts:
                raise
            wait = RETRY_WAIT_S[min(n - 1, len(RETRY_WAIT_S) - 1)]
            log.warning(
                "shard %s: attempt %d of %d failed (%s: %s); retrying in %.0f s",
                task.url,
                n,
                settings.shard_attempts,
                type(e).__name__,
                e,
                wait,
            )
            sleep(wait)
    raise AssertionError("unreachable")
