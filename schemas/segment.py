"""Writing one segment: token arrays, dead-letter table, then the commit record.

:class:`SegmentWriter` is the only code that writes segments; the indexing job
and the synthetic stores of the benchmarks both use it, so a synthetic store
is what a job writes, by construction. Order matters: data first, dead
letters second, the commit record last. A segment without a commit record is
invisible to readers and re-runs.

Every attempt is harmless (runners execute a shard at least once, sometimes
twice at the same time):

* each attempt writes a data folder of its own (``task.data_path(attempt)``);
* an attempt whose task is already committed returns that record unwritten;
* the commit is a compare-and-swap of ``commits/<segment>.json`` from the
  state the job planned against (``task.replaces``): of two attempts that
  both finish, exactly one wins, and the other removes only its own folder;
* before committing, the attempt checks its job's lease (the store lock still
  held by ``task.job_id`` and not finalizing), so a job that lost its lock
  (or a zombie worker of a finished job) cannot commit.

Checksums recorded at commit (``verify --deep`` recomputes them): tokens and
scales are the sha256 of the stored bytes; ids the sha256 of each UTF-8 id
followed by a NUL byte.
"""

from __future__ import annotations

import collections
import hashlib
import io
import json
import logging
import os
import socket
import time
import uuid
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import zarr

from edje_indexer.schemas import layout, quantization, tables
from edje_indexer.schemas.records import CommitRecord, FailureRecord, LockRecord, ShardTask, Source, StoreMetadata
from edje_indexer.schemas.storage import Location

log = logging.getLogger(__name__)


def token_checksum(values: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(values).reshape(-1).view(np.uint8)).hexdigest()  # no copy


CHECKSUM_VERSION = 2


def ids_checksum(ids, version: int = CHECKSUM_VERSION) -> str:
    """sha256 of the ids. Version 2 prefixes each UTF-8 id with its length (8 bytes, little-endian), so
    ``["a\\0b"]`` and ``["a", "b"]`` differ; version 1 (stores written before) put a NUL after each id."""
    h = hashlib.sha256()
    for i in ids:
        b = str(i).encode()
        if version >= 2:
            h.update(len(b).to_bytes(8, "little"))
            h.update(b)
        else:
            h.update(b)
            h.update(b"\0")
    return h.hexdigest()


@dataclass
class SegmentData:
    """What one shard produced: the stored rows and the dead-letter rows."""

    ids: list[str]
    values: np.ndarray  # [n, m, d] (int4: [n, m, d / 2] packed), the stored dtype
    scales: np.ndarray | None  # [n, m] float16 (int8, int4), or None (fp16)
    rejected: list[dict] = field(default_factory=list)  # rows of tables.REJECTED_SCHEMA

    @classmethod
    def empty(cls, metadata: StoreMetadata) -> SegmentData:
        m, d, quant = metadata.tokens_per_image, metadata.token_dim, metadata.quantization
        scales = np.zeros((0, m), np.float16) if quantization.has_scales(quant) else None
        values = np.zeros((0, *quantization.stored_row_shape(quant, m, d)), quantization.stored_dtype(quant))
        return cls([], values, scales)


class LeaseLost(RuntimeError):
    """The job this attempt belongs to no longer holds the store (or is finalizing): do not commit."""


class CommitConflict(RuntimeError):
    """The segment's commit changed since the job planned (another job wrote it): this attempt stands down."""


def check_lease(loc: Location, job_id: str) -> None:
    """Raise LeaseLost unless ``job_id`` holds the store lock and still accepts commits."""
    try:
        lock = LockRecord.from_json(loc.read_json(layout.LOCK))
    except (FileNotFoundError, ValueError) as e:
        raise LeaseLost(f"job {job_id} no longer holds {loc.url} (no readable lock: {e})") from None
    if lock.token != job_id:
        raise LeaseLost(f"job {job_id} lost the lock on {loc.url} to job {lock.token}; this attempt does not commit")
    if lock.phase != "running":
        raise LeaseLost(f"job {job_id} is {lock.phase}: it accepts no more commits")


def new_attempt_id() -> str:
    return uuid.uuid4().hex[:8]


class SegmentWriter:
    """Writes segments of one store whose metadata is ``metadata``."""

    def __init__(self, loc: Location, metadata: StoreMetadata):
        self.loc, self.metadata = loc, metadata
        self.encoding = quantization.encoding(metadata.quantization, metadata.token_dim)
        # [m, d], or [m, d / 2] for int4 (two values per byte)
        self.row_shape = quantization.stored_row_shape(
            metadata.quantization, metadata.tokens_per_image, metadata.token_dim
        )
        self.dtype = quantization.stored_dtype(metadata.quantization)

    def _write_arrays(self, data_path: str, data: SegmentData) -> dict:
        n, m, d = data.values.shape
        if (m, d) != self.row_shape or data.values.dtype != self.dtype:
            raise ValueError(
                f"stored tokens of shape {m}x{d} {data.values.dtype} do not fit a {self.metadata.quantization} "
                f"store of {self.metadata.tokens_per_image}x{self.metadata.token_dim} tokens "
                f"(stored as {self.row_shape[0]}x{self.row_shape[1]} {self.dtype})"
            )
        if quantization.has_scales(self.metadata.quantization) and (
            data.scales is None or data.scales.shape != (n, m) or data.scales.dtype != np.float16
        ):
            raise ValueError(f"{self.metadata.quantization} tokens need float16 scales of shape {(n, m)}")
        group = zarr.open_group(self.loc.url_of(data_path), mode="w", zarr_format=3)
        # write_empty_chunks keeps every inner chunk in place, so each shard file
        # is exactly a row-major block (an all-zero token row is still written).
        cfg = {"write_empty_chunks": True}
        tok = group.create_array(
            layout.TOKENS,
            shape=(n, m, d),
            dtype=self.dtype,
            compressors=None,
            config=cfg,
            attributes={"encoding": self.encoding},
            **layout.array_chunking(n, m, d),
        )
        if n:
            tok[...] = data.values
        checksums = {layout.TOKENS: token_checksum(data.values)}
        if quantization.has_scales(self.metadata.quantization):
            chunking = layout.array_chunking(n, m, 1)
            sc = group.create_array(
                layout.SCALES,
                shape=(n, m),
                dtype="float16",
                compressors=None,
                config=cfg,
                chunks=chunking["chunks"][:2],
                shards=chunking["shards"][:2],
            )
            if n:
                sc[...] = data.scales
            checksums[layout.SCALES] = token_checksum(data.scales)
        id_arr = group.create_array(layout.IDS, shape=(n,), dtype=str, chunks=(max(n, 1),))
        if n:
            id_arr[...] = np.array(data.ids, dtype=object)
        checksums[layout.IDS] = ids_checksum(data.ids)
        return checksums

    def _write_rejected(self, data_path: str, rows: list[dict]) -> None:
        table = pa.Table.from_pylist(rows, schema=tables.REJECTED_SCHEMA)
        buf = io.BytesIO()
        pq.write_table(table, buf)
        self.loc.write_bytes_atomic(buf.getvalue(), *layout.rejected_path(data_path))

    def write_uncommitted(self, task: ShardTask, data: SegmentData, attempt: str) -> dict:
        """The attempt's arrays and dead letters, no commit record (invisible), durable on disk before any
        commit can name them; returns the checksums."""
        checksums = self._write_arrays(task.data_path(attempt), data)
        self._write_rejected(task.data_path(attempt), data.rejected)
        self.loc.sync(*task.data_path(attempt).split("/"))
        self.loc.sync(*layout.rejected_path(task.data_path(attempt)))
        return checksums

    def committed(self, task: ShardTask) -> CommitRecord | None:
        """The commit record of ``task`` if some attempt already committed it (read from the store, not a cache)."""
        raw, _ = self.loc.read_versioned(*layout.commit_path(task.segment))
        record = CommitRecord.from_json(json.loads(raw)) if raw else None
        return record if task.done_by(record) else None

    def discard(self, data_path: str) -> None:
        """Remove one attempt's own, uncommitted data (never anything a commit names)."""
        self.loc.remove(*data_path.split("/"))
        self.loc.remove(*layout.rejected_path(data_path))

    def write(
        self,
        task: ShardTask,
        data: SegmentData,
        *,
        samples_read: int,
        complete: bool = True,
        incomplete_reason: str | None = None,
        extra_image_members: int = 0,
        bytes_read: int | None = None,
        sha256: str | None = None,
        timings_s: dict | None = None,
    ) -> CommitRecord:
        """Write one attempt's data and dead letters, then commit it; returns the winning commit record."""
        from edje_indexer import __version__

        attempt = new_attempt_id()
        t0 = time.perf_counter()
        checksums = self.write_uncommitted(task, data, attempt)
        write_s = time.perf_counter() - t0
        by_reason = collections.Counter(r["reason"] for r in data.rejected)
        timings = {**(timings_s or {}), "write": round(write_s, 4)}
        timings["total"] = round(timings.get("total", 0.0) + write_s, 4)
        record = CommitRecord(
            segment=task.segment,
            data_path=task.data_path(attempt),
            revision=task.revision,
            shard=task.url,
            source=Source(task.source.size, task.source.version, bytes_read, sha256),
            identity_sha256=self.metadata.identity_sha256(),
            quantization=self.metadata.quantization,
            rows=len(data.ids),
            samples_read=samples_read,
            indexed=len(data.ids),
            rejected=sum(by_reason.values()),
            rejected_by_reason=dict(sorted(by_reason.items())),
            extra_image_members=extra_image_members,
            complete=complete,
            incomplete_reason=incomplete_reason,
            checksums=checksums,
            token_bytes=int(data.values.nbytes + (0 if data.scales is None else data.scales.nbytes)),
            timings_s=timings,
            software_version=__version__,
            checksum_version=CHECKSUM_VERSION,
            job_id=task.job_id,
            attempt=attempt,
            writer={"host": socket.gethostname(), "pid": os.getpid()},
        )
        if record.accounting_error():
            self.discard(record.data_path)
            raise RuntimeError(f"accounting error in {task.url}: {record.accounting_error()}")
        winner = self.commit(task, record)
        if winner is record:
            log.info(
                "committed %s: %d indexed, %d rejected, %.1f images/s",
                task.url,
                record.indexed,
                record.rejected,
                record.indexed / max(timings["total"], 1e-9),
            )
        return winner

    def commit(self, task: ShardTask, record: CommitRecord) -> CommitRecord:
        """Make ``record`` the segment's commit unless another attempt got there first (see the module doc);
        returns the record that is committed now."""
        where = layout.commit_path(task.segment)
        raw, version = self.loc.read_versioned(*where)
        while True:
            current = CommitRecord.from_json(json.loads(raw)) if raw else None
            if task.done_by(current):  # a twin attempt won: stand down, removing only our own folder
                self.discard(record.data_path)
                log.info(
                    "%s: another attempt committed first (%s); this one's data is discarded",
                    task.url,
                    current.data_path,
                )
                return current
            if (current.data_path if current else None) != task.replaces:
                self.discard(record.data_path)
                raise CommitConflict(
                    f"the commit of {task.url} changed since the job planned (now "
                    f"{current.data_path if current else 'absent'}, planned "
                    f"{task.replaces or 'absent'}); run the job again"
                )
            if task.job_id:
                try:
                    check_lease(self.loc, task.job_id)
                except LeaseLost:
                    self.discard(record.data_path)
                    raise
            if not self.loc.exists(record.data_path, layout.TOKENS, "zarr.json"):
                raise RuntimeError(f"the data of this attempt ({record.data_path}) disappeared before its commit")
            payload = json.dumps(record.to_json(), indent=1, sort_keys=True).encode()
            if self.loc.write_if(payload, *where, expected=version):
                break  # the commit point
            raw, version = self.loc.read_versioned(*where)  # another writer changed it: look at what won
        self.loc.remove(*layout.failed_path(task.segment))
        # A superseded version stays until the next job's finalize (pipeline/maintenance.py).
        return record

    def fail(self, task: ShardTask, error: BaseException) -> FailureRecord:
        """Record a shard that could not be read at all (the next run retries it)."""
        record = FailureRecord(
            segment=task.segment, shard=task.url, error_type=type(error).__name__, message=str(error) or repr(error)
        )
        self.loc.write_json_atomic(record.to_json(), *layout.failed_path(task.segment))
        log.warning("shard %s could not be read: %s", task.url, record.error)
        return record


def read_rejected(loc: Location, data_path: str) -> pa.Table:
    """The dead-letter rows of one data version (empty if it has none)."""
    if not loc.exists(*layout.rejected_path(data_path)):
        return tables.REJECTED_SCHEMA.empty_table()
    return pq.read_table(io.BytesIO(loc.read_bytes(*layout.rejected_path(data_path))))


def read_failure(loc: Location, segment: str) -> FailureRecord | None:
    if not loc.exists(*layout.failed_path(segment)):
        return None
    return FailureRecord.from_json(loc.read_json(*layout.failed_path(segment)))
