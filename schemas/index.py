"""The id -> (segment, row) index, a cache of the commit records.

``index/CURRENT.json`` (an IndexPointer) is what readers open. Format 2: a
list of runs (schemas/id_runs.py), one added per job (:func:`update`), merged
when there are too many, published by the launcher after its job log entry
(schemas/job_log.py), so a reader sees the state of the last finished job.
Format 1 (stores written before runs): one Parquet table sorted by id plus a
table of duplicates, patched on load with segments committed after it; still
read, and replaced by runs at the next job.

Duplicate ids resolve to the first occurrence in (segment, row) order; the
rest are listed, never silently dropped.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import zarr

from edje_indexer.schemas import id_runs, layout, tables
from edje_indexer.schemas.records import CommitRecord, IndexPointer
from edje_indexer.schemas.storage import Location


def read_commits(loc: Location, unreadable: list | None = None) -> dict[str, CommitRecord]:
    """segment name -> commit record, for every committed segment.

    A record that cannot be read, or that names a path outside the layout, is an error (nothing is read or
    deleted on its say-so); with ``unreadable`` given (verify), it is listed there as (file, reason) instead.
    """
    names = [f"{layout.COMMITS}/{n}" for n in loc.list(layout.COMMITS) if n.endswith(".json") and not n.startswith(".")]
    out = {}
    for name, raw in sorted(loc.read_many(names).items()):  # concurrent requests on object stores
        try:
            rec = CommitRecord.from_json(json.loads(raw))
            if name.rsplit("/", 1)[1] != f"{rec.segment}.json":
                raise layout.UnsafePath(f"names segment {rec.segment!r}")
        except ValueError as e:
            if unreadable is None:
                raise ValueError(f"commit record {loc.url_of(name)} is unusable: {e}") from e
            unreadable.append((name, str(e)))
            continue
        out[rec.segment] = rec
    return out


def segment_ids(loc: Location, data_path: str) -> np.ndarray:
    group = zarr.open_group(loc.url_of(data_path), mode="r")
    return np.asarray(group[layout.IDS][...], dtype=object)


@dataclass
class IdIndex:
    table: pa.Table  # INDEX_SCHEMA, unique ids, sorted by id
    duplicates: pa.Table  # DUPLICATES_SCHEMA
    covered: dict[str, str]  # segment -> data_path the table reflects
    generation: int
    published: bool = False  # True when this is exactly the stored generation (nothing patched in)


def read_pointer(loc: Location) -> IndexPointer | None:
    """The published generation, or None before the first job finished."""
    if not loc.exists(layout.INDEX, layout.INDEX_POINTER):
        return None
    return IndexPointer.from_json(loc.read_json(layout.INDEX, layout.INDEX_POINTER))


class IndexDamaged(ValueError):
    """An id index file whose bytes are not the ones its generation recorded."""


def _read_parquet(loc: Location, name: str, sha256: str | None = None) -> pa.Table:
    data = loc.read_bytes(layout.INDEX, name)
    if sha256 is not None and hashlib.sha256(data).hexdigest() != sha256:
        raise IndexDamaged(
            f"id index file {loc.url_of(layout.INDEX, name)} does not match the checksum of its "
            f"generation (damaged): run 'edje-index index' again to rebuild the index"
        )
    return pq.read_table(io.BytesIO(data))


def load_index(loc: Location, commits: Mapping[str, CommitRecord]) -> IdIndex:
    """The whole index as one table sorted by id, as of ``commits``: O(store) memory, so only for format-1
    stores (small, from before runs) and ``inspect`` on a store whose published generation lags its commits;
    readers and ``verify`` look ids up in :func:`open_runs`. Format 1: the stored generation, patched with what
    changed since."""
    ptr = read_pointer(loc)
    if ptr and ptr.format >= 2:
        return _runs_as_table(loc, ptr, commits)
    if ptr:
        base = _read_parquet(loc, ptr.ids, ptr.checksums.get(ptr.ids))
        dups = _read_parquet(loc, ptr.duplicates, ptr.checksums.get(ptr.duplicates))
        covered = dict(ptr.segments)
        rows = pa.concat_tables([base, dups.select(["id", "segment", "row"])])
        generation = ptr.generation
    else:
        rows = tables.INDEX_SCHEMA.empty_table()
        covered, generation = {}, 0
    current = {s: c.data_path for s, c in commits.items()}
    stale = [s for s, p in covered.items() if current.get(s) != p]
    fresh = [s for s, p in current.items() if covered.get(s) != p]
    if not stale and not fresh and ptr:
        return IdIndex(base, dups, covered, generation, published=True)
    if stale:
        rows = rows.filter(pc.invert(pc.is_in(rows["segment"], pa.array(stale, pa.string()))))
    table, dups = dedupe(pa.concat_tables([rows, _occurrences(loc, {s: commits[s] for s in fresh})]))
    return IdIndex(table, dups, current, generation)


def dedupe(rows: pa.Table) -> tuple[pa.Table, pa.Table]:
    rows = rows.sort_by([("id", "ascending"), ("segment", "ascending"), ("row", "ascending")])
    ids = rows["id"].to_numpy(zero_copy_only=False)
    if len(ids) == 0:
        return rows, tables.DUPLICATES_SCHEMA.empty_table()
    first = np.ones(len(ids), dtype=bool)
    first[1:] = ids[1:] != ids[:-1]
    unique = rows.filter(pa.array(first))
    if first.all():
        return unique, tables.DUPLICATES_SCHEMA.empty_table()
    # position of the kept row for every row: index of the last "first" at or before it
    kept_pos = np.maximum.accumulate(np.where(first, np.arange(len(ids)), 0))
    dup_mask = ~first
    seg = rows["segment"].to_numpy(zero_copy_only=False)
    row = rows["row"].to_numpy()
    dups = pa.table(
        {
            "id": pa.array(ids[dup_mask], pa.string()),
            "segment": pa.array(seg[dup_mask], pa.string()),
            "row": pa.array(row[dup_mask], pa.int32()),
            "kept_segment": pa.array(seg[kept_pos[dup_mask]], pa.string()),
            "kept_row": pa.array(row[kept_pos[dup_mask]], pa.int32()),
        },
        schema=tables.DUPLICATES_SCHEMA,
    )
    return unique, dups


def retired_paths(loc: Location) -> list[str]:
    """Superseded data kept for readers of the previous snapshot (see schemas/layout.py)."""
    ptr = read_pointer(loc)
    return list(ptr.retired) if ptr else []


# -- format 2: runs ------------------------------------------------------------------------------------------

# Merge the newest two runs while the older one holds at most this many times the newer's entries: run
# sizes then shrink geometrically from oldest to newest (a few runs, each entry merged O(log) times).
MERGE_RATIO = 4
MAX_RUNS = 8  # and never more runs than this
# A run file up to this size is checked against its recorded sha256 when a reader opens it; larger ones are
# checked by `verify` (and whenever a merge reads them): hashing them would read the whole index at open.
CHECK_ON_OPEN_BYTES = 16 << 20


def cache_dir() -> str:
    """Where readers of object stores keep copies of run files (content-addressed, shared by processes)."""
    return os.environ.get("EDJE_INDEX_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "edje-index")


def _file_source(loc: Location, name: str, sha256: str | None):
    """A path to memory-map for index file ``name``: the file itself on local disk, else a local copy."""
    if loc.is_local:
        path = loc.path(layout.INDEX, name)
        try:
            size = os.path.getsize(path)
        except FileNotFoundError:
            raise IndexDamaged(f"id index file {path} is missing: run 'edje-index index' again to rebuild") from None
        if sha256 and size <= CHECK_ON_OPEN_BYTES:
            with open(path, "rb") as f:
                if hashlib.sha256(f.read()).hexdigest() != sha256:
                    raise IndexDamaged(
                        f"id index file {path} does not match the checksum of its generation (damaged): "
                        "run 'edje-index index' again to rebuild the index"
                    )
        return path
    if not sha256:
        return loc.read_bytes(layout.INDEX, name)
    folder = cache_dir()
    cached = os.path.join(folder, f"{sha256}-{name}")
    if os.path.exists(cached):
        return cached
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as f:  # streamed: a run can be larger than memory
            got = loc.sha256(layout.INDEX, name, copy_to=f)
        if got != sha256:
            raise IndexDamaged(f"id index file {loc.url_of(layout.INDEX, name)} does not match its checksum (damaged)")
        os.replace(tmp, cached)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return cached


def open_runs(loc: Location, ptr: IndexPointer) -> list[id_runs.Run]:
    """The runs of a format-2 generation, oldest first, memory-mapped (footers read, nothing else)."""
    runs = []
    for run in ptr.runs:
        try:
            runs.append(
                id_runs.open_run(
                    _file_source(loc, run["ids"], ptr.checksums.get(run["ids"])),
                    _file_source(loc, run["segments"], ptr.checksums.get(run["segments"])),
                )
            )
        except (pa.ArrowInvalid, ValueError) as e:
            if isinstance(e, IndexDamaged):
                raise
            raise IndexDamaged(f"id index run {run['ids']} of {loc.url} is unreadable (damaged): {e}") from e
    return runs


def read_duplicates(loc: Location, ptr: IndexPointer) -> pa.Table:
    """Every duplicate occurrence the generation lists (the ``kept_*`` columns as of the job that found it)."""
    if ptr.format == 1:
        return _read_parquet(loc, ptr.duplicates, ptr.checksums.get(ptr.duplicates))
    parts = [_read_parquet(loc, r["duplicates"], ptr.checksums.get(r["duplicates"])) for r in ptr.runs]
    return pa.concat_tables(parts) if parts else tables.DUPLICATES_SCHEMA.empty_table()


def _runs_as_table(loc: Location, ptr: IndexPointer, commits: Mapping[str, CommitRecord]) -> IdIndex:
    runs = open_runs(loc, ptr)
    table = id_runs.merge_entries(runs).select(["id", "segment", "row"]).cast(tables.INDEX_SCHEMA)
    table = table.sort_by([("id", "ascending")])
    dups = read_duplicates(loc, ptr)
    covered = {s: commits[s].data_path for s in commits}
    return IdIndex(table, dups, covered, ptr.generation, published=runs_cover(ptr, runs, commits))


def runs_cover(ptr: IndexPointer, runs: list[id_runs.Run], commits: Mapping[str, CommitRecord]) -> bool:
    """Whether a format-2 generation reflects exactly ``commits`` (its log entry logged as many segments, and
    none of its runs points into a segment that is no longer committed); reads the runs' segment tables only."""
    live = set(commits)
    return ptr.segments_count == len(commits) and all(
        s in live for r in runs for s in r.segments["segment"].to_pylist()
    )


def legacy_run(index: IdIndex, commits: Mapping[str, CommitRecord]) -> id_runs.Run:
    """A format-1 index (one table, loaded whole: stores from before runs are small) as one in-memory run,
    so readers and verify look ids up the same way whatever the format."""
    return id_runs.run_in_memory(id_runs.with_segments(index.table, _segment_table(commits, commits)))


def _occurrences(loc: Location, added: Mapping[str, CommitRecord]) -> pa.Table:
    """(id, segment, row) of every row of the ``added`` segments, from their ids arrays (O(new))."""
    parts = [tables.INDEX_SCHEMA.empty_table()]
    for s in sorted(added):
        ids = segment_ids(loc, added[s].data_path)
        parts.append(
            pa.table(
                {
                    "id": pa.array(ids, pa.string()),
                    "segment": pa.array([s] * len(ids), pa.string()),
                    "row": pa.array(np.arange(len(ids), dtype=np.int32)),
                },
                schema=tables.INDEX_SCHEMA,
            )
        )
    return pa.concat_tables(parts)


def _segment_table(commits: Mapping[str, CommitRecord], segments) -> pa.Table:
    names = sorted(set(segments))
    return pa.table(
        {
            "segment": pa.array(names, pa.string()),
            "data_path": pa.array([commits[s].data_path for s in names], pa.string()),
            "rows": pa.array([commits[s].rows for s in names], pa.int64()),
        },
        schema=id_runs.SEGMENTS_SCHEMA,
    )


def _with_info(entries: pa.Table, commits: Mapping[str, CommitRecord]) -> pa.Table:
    segs = entries["segment"].combine_chunks().unique().to_pylist() if entries.num_rows else []
    return id_runs.with_segments(entries.select(["id", "segment", "row"]), _segment_table(commits, segs))


@dataclass
class _PendingRun:
    run: id_runs.Run
    duplicates: pa.Table
    descriptor: dict | None = None  # set for runs already stored


def _rebuild(loc: Location, previous: IndexPointer | None, before, commits, added, stale):
    """Every occurrence, minus the ``stale`` segments, plus ``added``, deduplicated into one run (O(store):
    only when segments are replaced or removed, or the store has a format-1 index)."""
    if previous is not None and previous.format >= 2:
        runs = open_runs(loc, previous)
        winners = id_runs.merge_entries(runs).select(["id", "segment", "row"]).cast(tables.INDEX_SCHEMA)
        losers = read_duplicates(loc, previous).select(["id", "segment", "row"])
        rows = pa.concat_tables([winners, losers.cast(tables.INDEX_SCHEMA)])
    else:
        legacy = load_index(loc, {s: before[s] for s in before if s not in stale})
        rows = pa.concat_tables([legacy.table, legacy.duplicates.select(["id", "segment", "row"])])
    if stale:
        rows = rows.filter(pc.invert(pc.is_in(rows["segment"], pa.array(sorted(stale), pa.string()))))
    unique, dups = dedupe(pa.concat_tables([rows, _occurrences(loc, added)]))
    return [_PendingRun(id_runs.run_in_memory(_with_info(unique, commits)), dups)], unique.num_rows


def _add_run(loc: Location, previous: IndexPointer, commits, added):
    """The stored runs plus one for ``added``: ids that are new, or whose new occurrence comes first."""
    runs = open_runs(loc, previous)
    pending = [_PendingRun(r, None, d) for r, d in zip(runs, previous.runs)]
    unique, internal = dedupe(_occurrences(loc, added))
    which, pos, _ = id_runs.Lookup(runs).find(unique["id"])
    found = np.flatnonzero(which >= 0)
    keep = np.ones(unique.num_rows, bool)
    losers = [internal.select(["id", "segment", "row"])]
    kept_of: dict[str, tuple[str, int]] = {}
    if len(found):
        new_seg = unique["segment"].to_numpy(zero_copy_only=False)
        new_row = unique["row"].to_numpy()
        ids = unique["id"].to_numpy(zero_copy_only=False)
        old_seg, old_row, new_lose, old_lose = [], [], [], []
        for i in found.tolist():  # only ids stored before: duplicates, rare in real corpora
            run = runs[which[i]]
            p = int(pos[i])
            seg = run.segments["segment"][int(run.segment[p])].as_py()
            row = int(run.row[p])
            if (seg, row) < (new_seg[i], int(new_row[i])):
                keep[i] = False
                new_lose.append(i)
                kept_of[ids[i]] = (seg, row)
            else:
                old_lose.append((ids[i], seg, row))
                kept_of[ids[i]] = (new_seg[i], int(new_row[i]))
            old_seg.append(seg)
            old_row.append(row)
        losers.append(unique.take(pa.array(new_lose, pa.int64())).select(["id", "segment", "row"]))
        losers.append(
            pa.table(
                {
                    "id": pa.array([x[0] for x in old_lose], pa.string()),
                    "segment": pa.array([x[1] for x in old_lose], pa.string()),
                    "row": pa.array([x[2] for x in old_lose], pa.int32()),
                },
                schema=tables.INDEX_SCHEMA,
            )
        )
    winners = unique.filter(pa.array(keep))
    for i, s, r in zip(
        winners["id"].to_pylist(), winners["segment"].to_pylist(), winners["row"].to_pylist(), strict=True
    ):
        kept_of.setdefault(i, (s, r))
    lost = pa.concat_tables([t.cast(tables.INDEX_SCHEMA) for t in losers])
    kept = [kept_of[i] for i in lost["id"].to_pylist()]
    dups = pa.table(
        {
            "id": lost["id"],
            "segment": lost["segment"],
            "row": lost["row"],
            "kept_segment": pa.array([k[0] for k in kept], pa.string()),
            "kept_row": pa.array([k[1] for k in kept], pa.int32()),
        },
        schema=tables.DUPLICATES_SCHEMA,
    )
    # the new run's segment table lists the new segments (every entry of the run points into one of them)
    entries = id_runs.with_segments(winners, _segment_table(commits, added))
    pending.append(_PendingRun(id_runs.run_in_memory(entries), dups))
    return pending, int((which < 0).sum())


def _merge_tail(loc: Location, checksums: dict, pending: list[_PendingRun]) -> list[_PendingRun]:
    """Merge the newest two runs while the older is at most MERGE_RATIO times the newer (or too many runs)."""

    def duplicates(p: _PendingRun) -> pa.Table:
        if p.duplicates is None:  # a stored run: its duplicates file
            p.duplicates = _read_parquet(loc, p.descriptor["duplicates"], checksums.get(p.descriptor["duplicates"]))
        return p.duplicates

    while len(pending) >= 2 and (
        len(pending[-2].run) <= MERGE_RATIO * max(len(pending[-1].run), 1) or len(pending) > MAX_RUNS
    ):
        older, newer = pending[-2], pending[-1]
        merged = id_runs.run_in_memory(id_runs.merge_entries([older.run, newer.run]))
        pending[-2:] = [_PendingRun(merged, pa.concat_tables([duplicates(older), duplicates(newer)]))]
    return pending


def update(
    loc: Location,
    previous: IndexPointer | None,
    before: Mapping[str, CommitRecord],
    after: Mapping[str, CommitRecord],
    added: Mapping[str, CommitRecord],
    stale: set[str],
    log_seq: int,
    retired: list[str],
) -> IndexPointer:
    """Write the run files of the next generation (not yet published: see :func:`publish`).

    ``before``/``after``: the committed state before and after the job; ``added``: segments (new data
    versions) to index; ``stale``: segments whose indexed rows are gone (replaced or removed)."""
    gen = (previous.generation if previous else 0) + 1
    if previous is None or previous.format < 2 or stale:
        pending, images = _rebuild(loc, previous, before, after, added, stale)
    elif added:
        pending, new_ids = _add_run(loc, previous, after, added)
        pending, images = _merge_tail(loc, previous.checksums, pending), previous.images + new_ids
    else:
        pending = [_PendingRun(r, None, d) for r, d in zip(open_runs(loc, previous), previous.runs)]
        images = previous.images
    if sum(p.descriptor is None for p in pending) > 1:
        raise AssertionError("one generation writes at most one run")
    runs, checksums = [], {}
    for p in pending:
        if p.descriptor is not None:  # unchanged: keep the stored files
            runs.append(p.descriptor)
            for key in ("ids", "segments", "duplicates"):
                checksums[p.descriptor[key]] = previous.checksums.get(p.descriptor[key])
            continue
        names = {k: f"run-{gen:08d}.{k}.{ext}" for k, ext in (("ids", "arrow"), ("segments", "arrow"))}
        names["duplicates"] = f"run-{gen:08d}.duplicates.parquet"
        ids_bytes = id_runs.ipc_bytes(p.run.table())
        seg_bytes = id_runs.ipc_bytes(p.run.segments)
        dup_bytes = id_runs.duplicates_bytes(p.duplicates)
        for key, data in (("ids", ids_bytes), ("segments", seg_bytes), ("duplicates", dup_bytes)):
            loc.write_bytes_atomic(data, layout.INDEX, names[key])
            checksums[names[key]] = hashlib.sha256(data).hexdigest()
        runs.append({**names, "entries": len(p.run), "duplicates_count": p.duplicates.num_rows})
    return IndexPointer(
        generation=gen,
        retired=sorted(retired),
        images=images,
        duplicates_count=sum(r["duplicates_count"] for r in runs),
        checksums=checksums,
        runs=runs,
        segments_count=len(after),
        log_seq=log_seq,
        format=2,
    )


def publish(loc: Location, pointer: IndexPointer) -> None:
    """Make ``pointer`` the generation readers open; delete index files neither it nor the generation before
    it uses (a reader may have just read the previous pointer)."""
    previous = read_pointer(loc)
    loc.write_json_atomic(pointer.to_json(), layout.INDEX, layout.INDEX_POINTER)
    keep = set(pointer.files()) | (set(previous.files()) if previous else set())
    for name in loc.list(layout.INDEX):
        if name != layout.INDEX_POINTER and not name.startswith(".") and name not in keep:
            loc.remove(layout.INDEX, name)
