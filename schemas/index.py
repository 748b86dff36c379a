"""The id -> (segment, row) index, built from commit records.

Commit records are the truth; the index is a cache of them, one Parquet
generation per finished job. Loading it costs one file read plus the ids of
segments committed after it was written (a job that died before its
finalize step), so readers never miss a committed segment nor see an
uncommitted one. Duplicate ids resolve to the first occurrence in (segment,
row) order; the rest are listed, never silently dropped.
"""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import zarr

from edje_indexer.schemas import layout, tables
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


def load_index(loc: Location, commits: dict[str, CommitRecord]) -> IdIndex:
    """The index as of ``commits``: the stored generation, patched with what changed since."""
    ptr = read_pointer(loc)
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
    parts = [rows]
    for s in sorted(fresh):
        ids = segment_ids(loc, current[s])
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
    table, dups = _dedupe(pa.concat_tables(parts))
    return IdIndex(table, dups, current, generation)


def _dedupe(rows: pa.Table) -> tuple[pa.Table, pa.Table]:
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


def write_index(loc: Location, index: IdIndex, retired: list[str] = ()) -> IdIndex:
    """Publish ``index`` as a new generation (one writer: the job's finalize step).

    The previous generation's files are kept (a reader may have just read the
    old pointer); older ones are deleted.
    """
    previous = read_pointer(loc)
    gen = index.generation + 1
    names = {"ids": f"ids-{gen:08d}.parquet", "duplicates": f"duplicates-{gen:08d}.parquet"}
    checksums = {}
    for key, table in (("ids", index.table), ("duplicates", index.duplicates)):
        buf = io.BytesIO()
        pq.write_table(table, buf)
        loc.write_bytes_atomic(buf.getvalue(), layout.INDEX, names[key])
        checksums[names[key]] = hashlib.sha256(buf.getvalue()).hexdigest()
    pointer = IndexPointer(
        generation=gen,
        ids=names["ids"],
        duplicates=names["duplicates"],
        segments=index.covered,
        retired=sorted(retired),
        images=index.table.num_rows,
        duplicates_count=index.duplicates.num_rows,
        checksums=checksums,
    )
    loc.write_json_atomic(pointer.to_json(), layout.INDEX, layout.INDEX_POINTER)
    keep = set(names.values()) | ({previous.ids, previous.duplicates} if previous else set())
    for name in loc.list(layout.INDEX):
        if name.endswith(".parquet") and name not in keep:
            loc.remove(layout.INDEX, name)
    return IdIndex(index.table, index.duplicates, index.covered, gen, published=True)
