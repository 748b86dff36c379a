"""Writing one segment: token arrays, dead-letter table, then the commit record.

:class:`SegmentWriter` is the only code that writes segments; the indexing job
and the synthetic stores of the benchmarks both use it, so a synthetic store
is what a job writes, by construction. Order matters: data first, dead
letters second, the commit record last. A segment without a commit record is
invisible to readers and re-runs.

Checksums recorded at commit (``verify --deep`` recomputes them): tokens and
scales are the sha256 of the stored bytes; ids the sha256 of each UTF-8 id
followed by a NUL byte.
"""

from __future__ import annotations

import collections
import hashlib
import io
import logging
import time
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import zarr

from edje_indexer.schemas import layout, quantization, tables
from edje_indexer.schemas.records import CommitRecord, FailureRecord, ShardTask, Source, StoreMetadata
from edje_indexer.schemas.storage import Location

log = logging.getLogger(__name__)


def token_checksum(values: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(values).reshape(-1).view(np.uint8)).hexdigest()  # no copy


def ids_checksum(ids) -> str:
    h = hashlib.sha256()
    for i in ids:
        h.update(str(i).encode())
        h.update(b"\0")
    return h.hexdigest()


@dataclass
class SegmentData:
    """What one shard produced: the stored rows and the dead-letter rows."""

    ids: list[str]
    values: np.ndarray  # [n, m, d], the stored dtype
    scales: np.ndarray | None  # [n, m] float16 (int8), or None
    rejected: list[dict] = field(default_factory=list)  # rows of tables.REJECTED_SCHEMA

    @classmethod
    def empty(cls, metadata: StoreMetadata) -> SegmentData:
        m, d = metadata.tokens_per_image, metadata.token_dim
        dtype = np.dtype(metadata.token_encoding["tokens_dtype"])
        scales = np.zeros((0, m), np.float16) if metadata.quantization == "int8" else None
        return cls([], np.zeros((0, m, d), dtype), scales)


class SegmentWriter:
    """Writes segments of one store whose metadata is ``metadata``."""

    def __init__(self, loc: Location, metadata: StoreMetadata):
        self.loc, self.metadata = loc, metadata
        self.encoding = quantization.ENCODINGS[metadata.quantization]

    def _write_arrays(self, data_path: str, data: SegmentData) -> dict:
        n, m, d = data.values.shape
        if (m, d) != (self.metadata.tokens_per_image, self.metadata.token_dim):
            raise ValueError(
                f"tokens of shape {m}x{d} do not fit a store of "
                f"{self.metadata.tokens_per_image}x{self.metadata.token_dim}"
            )
        group = zarr.open_group(self.loc.url_of(data_path), mode="w", zarr_format=3)
        # write_empty_chunks keeps every inner chunk in place, so each shard file
        # is exactly a row-major block (an all-zero token row is still written).
        cfg = {"write_empty_chunks": True}
        tok = group.create_array(
            layout.TOKENS,
            shape=(n, m, d),
            dtype=self.encoding["tokens_dtype"],
            compressors=None,
            config=cfg,
            attributes={"encoding": self.encoding},
            **layout.array_chunking(n, m, d),
        )
        if n:
            tok[...] = data.values
        checksums = {layout.TOKENS: token_checksum(data.values)}
        if self.metadata.quantization == "int8":
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

    def write_uncommitted(self, task: ShardTask, data: SegmentData) -> dict:
        """The segment's arrays and dead letters, no commit record (invisible); returns the checksums."""
        checksums = self._write_arrays(task.data_path, data)
        self._write_rejected(task.data_path, data.rejected)
        return checksums

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
        """Write the segment's data and dead letters, then commit it; returns the commit record."""
        from edje_indexer import __version__

        t0 = time.perf_counter()
        checksums = self.write_uncommitted(task, data)
        write_s = time.perf_counter() - t0
        by_reason = collections.Counter(r["reason"] for r in data.rejected)
        timings = {**(timings_s or {}), "write": round(write_s, 4)}
        timings["total"] = round(timings.get("total", 0.0) + write_s, 4)
        record = CommitRecord(
            segment=task.segment,
            data_path=task.data_path,
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
        )
        if record.accounting_error():
            raise RuntimeError(f"accounting error in {task.url}: {record.accounting_error()}")
        self.loc.write_json_atomic(record.to_json(), *layout.commit_path(task.segment))  # the commit point
        self.loc.remove(*layout.failed_path(task.segment))
        # A superseded version stays until the next job's finalize (pipeline/maintenance.py).
        log.info(
            "committed %s: %d indexed, %d rejected, %.1f images/s",
            task.url,
            record.indexed,
            record.rejected,
            record.indexed / max(timings["total"], 1e-9),
        )
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
