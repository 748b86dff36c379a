"""``edje-index inspect``: what a store holds, from its metadata, commits and index."""

from __future__ import annotations

import collections
import os

from edje_indexer.pipeline.maintenance import find_uncommitted, missing_sources
from edje_indexer.schemas import layout
from edje_indexer.schemas.index import load_index, read_commits, read_pointer
from edje_indexer.schemas.records import CommitRecord, FailureRecord
from edje_indexer.schemas.storage import Location
from edje_indexer.schemas.store import open_metadata


def _data_bytes(loc: Location, data_path: str) -> int:
    """Bytes of array data (chunk files) of one segment, without Zarr metadata."""
    return sum(loc.du(data_path, name, "c") for name in (layout.TOKENS, layout.SCALES, layout.IDS))


def _local_data_bytes(loc: Location, data_path: str, root: str | None = None) -> int:
    """:func:`_data_bytes` on local disk, from the layout's one chunk file per array (a stat each, not a walk)."""
    total = 0
    base = f"{root or loc.root}/{data_path}"
    for name, key in ((layout.TOKENS, "0/0/0"), (layout.SCALES, "0/0"), (layout.IDS, "0")):
        try:
            total += os.stat(f"{base}/{name}/c/{key}").st_size
        except FileNotFoundError:
            if os.path.isdir(f"{base}/{name}/c"):  # not the layout's one chunk file: count what is there
                total += loc.du(data_path, name, "c")
    return total


def _tree_bytes(loc: Location) -> int:
    """Bytes of every file in the store (local disk: one scandir walk; fsspec's du is ~4x slower there)."""
    if not loc.is_local:
        return loc.du()

    def walk(path: str) -> int:
        n = 0
        with os.scandir(path) as entries:
            for e in entries:
                n += walk(e.path) if e.is_dir(follow_symlinks=False) else e.stat(follow_symlinks=False).st_size
        return n

    return walk(loc.root) if os.path.isdir(loc.root) else 0


def data_bytes_per_image(loc: Location, records) -> float | None:
    """Array bytes on disk per image of the given segments (what one job wrote: no look at the rest)."""
    records = list(records)
    images = sum(c.rows for c in records)
    if not images:
        return None
    size = _local_data_bytes if loc.is_local else _data_bytes
    return round(sum(size(loc, c.data_path) for c in records) / images, 1)


def index_counts(loc: Location, commits: dict[str, CommitRecord]) -> tuple[int, int, int | None]:
    """(images, duplicate ids, generation) of the id index as of ``commits``. The published generation's
    pointer says so without reading its files when it covers exactly these commits; else the index is loaded."""
    ptr = read_pointer(loc)
    current = {s: c.data_path for s, c in commits.items()}
    rows = sum(c.rows for c in commits.values())
    if ptr is not None and ptr.segments == current and ptr.images + ptr.duplicates_count == rows:
        return ptr.images, ptr.duplicates_count, ptr.generation
    # format 2 lists no segments: it covers these commits if its log entry logged exactly them
    if ptr is not None and ptr.format >= 2 and ptr.segments_count == len(commits):
        if ptr.images + ptr.duplicates_count == rows:
            return ptr.images, ptr.duplicates_count, ptr.generation
    index = load_index(loc, commits)
    return index.table.num_rows, index.duplicates.num_rows, ptr.generation if ptr else None


def failure_records(loc: Location) -> list[FailureRecord]:
    return [
        FailureRecord.from_json(loc.read_json(layout.FAILED, n))
        for n in loc.list(layout.FAILED)
        if n.endswith(".json") and not n.startswith(".")
    ]


def summarize(url: str, check_sources: bool = True, commits: dict[str, CommitRecord] | None = None) -> dict:
    """``check_sources``: also look up every committed shard's source (one request per shard).
    ``commits``: the store's commit records, if the caller has read them already."""
    loc = Location(url)
    meta = open_metadata(loc)
    commits = read_commits(loc) if commits is None else commits
    images, duplicates, generation = index_counts(loc, commits)
    model = meta.model
    rejected = collections.Counter()
    for c in commits.values():
        rejected.update(c.rejected_by_reason)
    if loc.is_local:
        root = loc.root
        token_bytes = sum(_local_data_bytes(loc, c.data_path, root) for c in commits.values())
    else:
        token_bytes = sum(_data_bytes(loc, c.data_path) for c in commits.values())
    index_bytes = loc.du(layout.INDEX)
    ptr = read_pointer(loc)
    uncommitted = find_uncommitted(loc, commits, keep=list(ptr.retired) if ptr else [])
    failed = failure_records(loc)
    return {
        "store": url,
        "images": images,
        "rows": sum(c.rows for c in commits.values()),
        "segments": len(commits),
        "tokens_per_image": meta.tokens_per_image,
        "token_dim": meta.token_dim,
        "quantization": meta.quantization,
        "stored_dtype": meta.token_encoding["tokens_dtype"],
        "token_encoding": meta.token_encoding,
        "bytes_per_image": round((token_bytes + index_bytes) / images, 1) if images else None,
        "bytes": {"token_data": token_bytes, "index": index_bytes, "store_total": _tree_bytes(loc)},
        "model": {
            k: getattr(model, k)
            for k in (
                "backbone",
                "backbone_kwargs",
                "backbone_sha256",
                "random_weights",
                "adapter",
                "adapter_sha256",
                "random_adapter",
                "tokens",
            )
        },
        "preprocessing": model.preprocessing,
        "id_policy": meta.id_policy,
        "samples_read": sum(c.samples_read for c in commits.values()),
        "rejected": dict(sorted(rejected.items())),
        "rejected_total": sum(rejected.values()),
        "duplicate_ids": duplicates,
        "index_generation": generation,
        "incomplete_shards": sorted(c.shard for c in commits.values() if not c.complete),
        "failed_shards": sorted(f.shard for f in failed),
        "missing_shards": missing_sources(commits) if check_sources else None,
        "uncommitted_data": uncommitted,
        "schema_version": meta.schema_version,
        "software_version": meta.software_version,
    }


def format_summary(s: dict) -> str:
    m = s["model"]
    lines = [
        f"store            {s['store']}",
        f"images           {s['images']} in {s['segments']} segment(s)",
        f"tokens           {s['tokens_per_image']} x {s['token_dim']} per image, {s['quantization']} "
        f"(stored as {s['stored_dtype']})",
        f"bytes/image      {s['bytes_per_image']} (token data + ids + index)",
        f"backbone         {m['backbone']} sha256 {m['backbone_sha256'][:16]}"
        + (" RANDOM WEIGHTS" if m["random_weights"] else ""),
        f"adapter          m={m['adapter']['num_queries']} d={m['adapter']['out_dim']} "
        f"sha256 {m['adapter_sha256'][:16]}" + (" RANDOM" if m["random_adapter"] else ""),
        f"preprocessing    {s['preprocessing']}",
        f"id policy        {s['id_policy']}",
        f"samples read     {s['samples_read']}, rejected {s['rejected_total']}: "
        + (", ".join(f"{k}={v}" for k, v in s["rejected"].items()) or "none"),
        f"duplicate ids    {s['duplicate_ids']}",
        f"index            generation {s['index_generation']}",
        f"versions         schema {s['schema_version']}, written by edje-indexer {s['software_version']}",
    ]
    for key in ("incomplete_shards", "failed_shards", "missing_shards", "uncommitted_data"):
        if s.get(key):
            lines.append(
                f"{key.replace('_', ' '):17s}{len(s[key])}: {', '.join(s[key][:5])}"
                + (" ..." if len(s[key]) > 5 else "")
            )
    return "\n".join(lines)
