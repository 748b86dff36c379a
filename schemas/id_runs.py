"""The id index as sorted runs: id -> (segment, row) without holding every id in memory.

Each job adds one *run* for the segments it committed; runs are merged when
there are more than a handful (:func:`plan_merge`), so no job rewrites the
whole index and a lookup searches a few runs, newest first. A run is three
files in ``index/``, all readable by any Arrow or Parquet tool:

* ``run-<gen>.ids.arrow`` (Arrow IPC file, uncompressed, one record batch):
  ``hash`` (uint64, ascending), ``id`` (large_string), ``segment`` (int32,
  a row of the run's segment table) and ``row`` (int32). ``hash`` is the
  64-bit FNV-1a of the id's UTF-8 bytes (:func:`fnv1a64`; ids of equal hash
  are adjacent, in no particular order). 24 bytes plus the id's own length
  per id, no padding.
* ``run-<gen>.segments.arrow``: ``segment``, ``data_path``, ``rows`` of every
  segment the run's rows point into.
* ``run-<gen>.duplicates.parquet``: occurrences this run's job found already
  stored (tables.DUPLICATES_SCHEMA).

A run holds, for each of its ids, where the id resolves in the whole store
(the first occurrence in (segment, row) order, as documented): a job adds to
its run only ids that are new or whose new occurrence comes first, so the
newest run that has an id is right about it. Readers memory-map the files:
opening reads their footers only, and a lookup touches the pages of the ids it
looks for (binary search over the hash column, then an exact comparison of the
bytes), so resident memory grows with what is asked, not with the store.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from edje_indexer.schemas import tables

FNV_OFFSET = np.uint64(0xCBF29CE484222325)
FNV_PRIME = np.uint64(0x100000001B3)

RUN_SCHEMA = pa.schema(
    [
        pa.field("hash", pa.uint64(), nullable=False),
        pa.field("id", pa.large_string(), nullable=False),
        pa.field("segment", pa.int32(), nullable=False),
        pa.field("row", pa.int32(), nullable=False),
    ]
)
SEGMENTS_SCHEMA = pa.schema(
    [
        pa.field("segment", pa.string(), nullable=False),
        pa.field("data_path", pa.string(), nullable=False),
        pa.field("rows", pa.int64(), nullable=False),
    ]
)
# Hash this many ids at a time (bounds the padded byte matrix).
HASH_BATCH = 1 << 16


def _utf8(ids) -> pa.LargeStringArray:
    if isinstance(ids, pa.ChunkedArray):
        ids = ids.combine_chunks() if ids.num_chunks != 1 else ids.chunk(0)
    if not isinstance(ids, pa.Array):
        try:
            ids = pa.array(ids, pa.large_string())
        except (pa.ArrowTypeError, pa.ArrowInvalid):
            bad = next(i for i in ids if not isinstance(i, str))
            raise TypeError(f"image ids are strings; got {type(bad).__name__} {bad!r}") from None
    return ids.cast(pa.large_string()) if ids.type != pa.large_string() else ids


def _bytes_of(arr: pa.LargeStringArray) -> tuple[np.ndarray, np.ndarray]:
    """(offsets [n + 1] int64 from 0, UTF-8 bytes) of a large_string array, zero-copy where possible."""
    _, off_buf, data_buf = arr.buffers()[:3]
    offsets = np.frombuffer(off_buf, np.int64, len(arr) + 1, arr.offset * 8)
    data = np.frombuffer(data_buf, np.uint8) if data_buf is not None else np.zeros(0, np.uint8)
    return offsets, data


def _padded(offsets: np.ndarray, data: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """([n, width] uint8 zero-padded bytes, lengths [n]) of the strings the offsets describe."""
    lengths = np.diff(offsets)
    width = int(lengths.max()) if len(lengths) else 0
    block = np.zeros((len(lengths), max(width, 1)), np.uint8)
    block[np.arange(max(width, 1)) < lengths[:, None]] = data[offsets[0] : offsets[-1]]
    return block, lengths


def fnv1a64(ids) -> np.ndarray:
    """64-bit FNV-1a of each id's UTF-8 bytes (uint64), vectorised over ids, one byte column at a time."""
    arr = _utf8(ids)
    out = np.empty(len(arr), np.uint64)
    for a in range(0, len(arr), HASH_BATCH):
        offsets, data = _bytes_of(arr.slice(a, HASH_BATCH))
        block, lengths = _padded(offsets, data)
        h = np.full(len(lengths), FNV_OFFSET, np.uint64)
        with np.errstate(over="ignore"):
            for j in range(block.shape[1]):
                live = lengths > j
                if not live.any():
                    break
                h = np.where(live, (h ^ block[:, j].astype(np.uint64)) * FNV_PRIME, h)
        out[a : a + len(lengths)] = h
    return out


def _equal_at(arr: pa.LargeStringArray, pos: np.ndarray, q_offsets: np.ndarray, q_data: np.ndarray) -> np.ndarray:
    """Whether stored id ``pos[i]`` equals query id ``i`` (byte for byte), vectorised."""
    offsets, data = _bytes_of(arr)
    starts, ends = offsets[pos], offsets[pos + 1]
    lengths = ends - starts
    q_lengths = np.diff(q_offsets)
    same = lengths == q_lengths
    if not same.any():
        return same
    idx = np.flatnonzero(same)
    n = lengths[idx]
    total = int(n.sum())
    if total == 0:
        return same
    # every byte of every candidate, against the query's byte at the same place
    first = np.repeat(np.cumsum(n) - n, n)
    within = np.arange(total) - first
    stored = data[np.repeat(starts[idx], n) + within]
    asked = q_data[np.repeat(q_offsets[idx], n) + within]  # offsets index the whole data buffer
    differs = np.bincount(np.repeat(np.arange(len(idx)), n), weights=stored != asked, minlength=len(idx))
    same[idx] = differs == 0
    return same


@dataclass
class Run:
    """One run's columns (memory-mapped, or in memory for stores of the first format) and its segment table."""

    hashes: np.ndarray  # uint64, sorted
    ids: pa.LargeStringArray
    segment: np.ndarray  # int32, row of ``segments``
    row: np.ndarray  # int32
    segments: pa.Table  # SEGMENTS_SCHEMA

    def __len__(self) -> int:
        return len(self.hashes)

    def find(self, q_hashes: np.ndarray, q_ids: pa.LargeStringArray) -> np.ndarray:
        """Position of each query id in this run, or -1."""
        out = np.full(len(q_hashes), -1, np.int64)
        if len(self.hashes) == 0 or len(q_hashes) == 0:
            return out
        # sorted queries: numpy's binary search starts from the previous answer (fewer cache misses)
        order = np.argsort(q_hashes)
        pos = np.empty(len(q_hashes), np.intp)
        pos[order] = np.searchsorted(self.hashes, q_hashes[order])
        np.minimum(pos, len(self.hashes) - 1, out=pos)
        hit = self.hashes[pos] == q_hashes
        idx = np.flatnonzero(hit)
        if len(idx) == 0:
            return out
        sel = q_ids.take(pa.array(idx))
        s_off, s_data = _bytes_of(sel)
        same = _equal_at(self.ids, pos[idx], s_off, s_data)
        out[idx[same]] = pos[idx[same]]
        # Different ids of one hash (rare): the right one is elsewhere in the run of equal hashes.
        for i in idx[~same].tolist():
            want = q_ids[i].as_py()
            p = int(pos[i]) + 1
            while p < len(self.hashes) and self.hashes[p] == q_hashes[i]:
                if self.ids[p].as_py() == want:
                    out[i] = p
                    break
                p += 1
        return out

    def table(self) -> pa.Table:
        """The run as written (RUN_SCHEMA)."""
        return pa.table(
            {
                "hash": pa.array(self.hashes),
                "id": self.ids,
                "segment": pa.array(self.segment),
                "row": pa.array(self.row),
            },
            schema=RUN_SCHEMA,
        )

    def entries(self) -> pa.Table:
        """Every entry as (id, segment name, row), for merges and rebuilds."""
        names = self.segments["segment"].combine_chunks().take(pa.array(self.segment))
        return pa.table({"id": self.ids.cast(pa.string()), "segment": names, "row": pa.array(self.row)})


def ipc_bytes(table: pa.Table) -> bytes:
    sink = io.BytesIO()
    with pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table, max_chunksize=max(table.num_rows, 1))
    return sink.getvalue()


def parquet_bytes(table: pa.Table) -> bytes:
    buf = io.BytesIO()
    pq.write_table(table, buf)
    return buf.getvalue()


def build_run(entries: pa.Table) -> tuple[bytes, bytes]:
    """(ids file, segments file) bytes of a run of ``entries`` (id, segment name, row, data_path, rows).

    ``entries`` has unique ids. Sorted by hash here; the segment table lists each segment once."""
    ids = _utf8(entries["id"])
    hashes = fnv1a64(ids)
    order = np.argsort(hashes, kind="stable")
    seg_names = entries["segment"].combine_chunks()
    enc = seg_names.dictionary_encode()
    codes = enc.indices.to_numpy(zero_copy_only=False).astype(np.int32)
    first = np.unique(codes, return_index=True)[1] if len(codes) else np.zeros(0, np.int64)
    seg_table = pa.table(
        {
            "segment": enc.dictionary.cast(pa.string()),
            "data_path": entries["data_path"].combine_chunks().take(pa.array(first)).cast(pa.string()),
            "rows": entries["rows"].combine_chunks().take(pa.array(first)).cast(pa.int64()),
        },
        schema=SEGMENTS_SCHEMA,
    )
    take = pa.array(order)
    run = pa.table(
        {
            "hash": pa.array(hashes[order]),
            "id": ids.take(take),
            "segment": pa.array(codes[order]),
            "row": entries["row"].combine_chunks().take(take).cast(pa.int32()),
        },
        schema=RUN_SCHEMA,
    )
    return ipc_bytes(run), ipc_bytes(seg_table)


def _batch(source) -> pa.RecordBatch:
    reader = pa.ipc.open_file(source)
    if reader.num_record_batches == 0:
        return pa.RecordBatch.from_pylist([], schema=reader.schema)
    if reader.num_record_batches != 1:
        raise ValueError(f"an id run has {reader.num_record_batches} record batches; this layout writes one")
    return reader.get_batch(0)


def open_run(ids_source, segments_source) -> Run:
    """A run from its two files (paths, memory-mapped; or bytes)."""

    def source(s):
        return pa.memory_map(s, "r") if isinstance(s, (str, os.PathLike)) else pa.BufferReader(s)

    batch = _batch(source(ids_source))
    if batch.schema != RUN_SCHEMA:
        raise ValueError(f"an id run has columns {batch.schema.names}, not {RUN_SCHEMA.names}")
    segments = pa.Table.from_batches([_batch(source(segments_source))])
    n = batch.num_rows

    def numpy(col: str, dtype) -> np.ndarray:
        arr = batch.column(col)
        if n == 0:
            return np.zeros(0, dtype)
        return np.frombuffer(arr.buffers()[1], dtype, n, arr.offset * np.dtype(dtype).itemsize)

    return Run(
        numpy("hash", np.uint64), batch.column("id"), numpy("segment", np.int32), numpy("row", np.int32), segments
    )


def run_in_memory(entries: pa.Table) -> Run:
    """A run built in memory (stores of the first format, whose index is one Parquet table)."""
    ids_bytes, seg_bytes = build_run(entries)
    return open_run(ids_bytes, seg_bytes)


class Lookup:
    """Ids -> (run, position) over runs ordered oldest first; the newest run that has an id decides."""

    def __init__(self, runs: list[Run]):
        self.runs = runs

    def find(self, ids, hashes: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, pa.LargeStringArray]:
        """(run number or -1, position in that run) of each id, and the ids as Arrow. ``hashes``: the ids'
        :func:`fnv1a64`, where the caller has them already (a run's own column)."""
        q = _utf8(ids)
        hashes = fnv1a64(q) if hashes is None else hashes
        which = np.full(len(q), -1, np.int64)
        pos = np.full(len(q), -1, np.int64)
        todo = np.arange(len(q))
        for r in range(len(self.runs) - 1, -1, -1):
            if len(todo) == 0:
                break
            found = self.runs[r].find(hashes[todo], q.take(pa.array(todo)) if len(todo) != len(q) else q)
            hit = found >= 0
            which[todo[hit]] = r
            pos[todo[hit]] = found[hit]
            todo = todo[~hit]
        return which, pos, q


def served_count(runs: list[Run], batch: int = HASH_BATCH) -> int:
    """How many ids ``runs`` (oldest first) serve: each run's entries that no newer run shadows, counted
    ``batch`` entries at a time, so memory stays bounded whatever the store's size (verify)."""
    total = len(runs[-1]) if runs else 0  # the newest run is shadowed by nothing
    for r, run in enumerate(runs[:-1]):
        newer = Lookup(runs[r + 1 :])
        for start in range(0, len(run), batch):
            which, _, _ = newer.find(run.ids.slice(start, batch), run.hashes[start : start + batch])
            total += int(np.count_nonzero(which < 0))
    return total


def merge_entries(runs: list[Run]) -> pa.Table:
    """The entries of ``runs`` (oldest first) as one table with unique ids, the newest run's entry kept,
    with ``data_path`` and ``rows`` of each entry's segment (ready for :func:`build_run`)."""
    parts = []
    for rank, run in enumerate(reversed(runs)):  # newest first: a stable sort keeps it first
        t = run.entries().append_column("rank", pa.array(np.full(len(run), rank, np.int32)))
        parts.append(t.append_column("hash", pa.array(run.hashes)))
    every = pa.concat_tables(parts) if parts else pa.table({})
    if every.num_rows == 0:
        return _with_segment_info(tables.INDEX_SCHEMA.empty_table(), runs)
    hashes = every["hash"].to_numpy()
    order = np.lexsort((every["rank"].to_numpy(), hashes))
    hs = hashes[order]
    keep = np.ones(len(order), bool)
    same_hash = np.flatnonzero(hs[1:] == hs[:-1]) + 1  # rows whose hash equals the previous row's
    if len(same_hash):  # equal hashes (the same id in several runs, or a collision): first of each id wins
        ids = every["id"]
        for s in np.setdiff1d(same_hash - 1, same_hash).tolist():  # where each group of equal hashes starts
            e = s + 1
            while e < len(order) and hs[e] == hs[s]:
                e += 1
            seen: set[str] = set()
            for p in range(s, e):
                i = ids[int(order[p])].as_py()
                keep[p] = i not in seen
                seen.add(i)
    merged = every.take(pa.array(order[keep])).select(["id", "segment", "row"])
    return _with_segment_info(merged, runs)


def _with_segment_info(entries: pa.Table, runs: list[Run]) -> pa.Table:
    """``entries`` (id, segment, row) plus each segment's data_path and rows from the runs' segment tables."""
    seg_tables = [r.segments for r in runs if r.segments.num_rows]
    info = pa.concat_tables(seg_tables) if seg_tables else SEGMENTS_SCHEMA.empty_table()
    return with_segments(entries, info)


def with_segments(entries: pa.Table, segments: pa.Table) -> pa.Table:
    """Join data_path and rows (from a SEGMENTS_SCHEMA table) onto entries by segment name."""
    names = segments["segment"].to_pylist()
    at = {s: i for i, s in enumerate(names)}
    enc = entries["segment"].combine_chunks().dictionary_encode()
    try:
        rows_of = np.array([at[s] for s in enc.dictionary.to_pylist()], np.int64)
    except KeyError as e:
        raise ValueError(f"an id index entry points to segment {e.args[0]!r}, which no segment table lists") from None
    pick = pa.array(rows_of[enc.indices.to_numpy(zero_copy_only=False)] if len(entries) else np.zeros(0, np.int64))
    return entries.append_column("data_path", segments["data_path"].take(pick)).append_column(
        "rows", segments["rows"].take(pick)
    )


def duplicates_bytes(duplicates: pa.Table) -> bytes:
    return parquet_bytes(duplicates.cast(tables.DUPLICATES_SCHEMA))
