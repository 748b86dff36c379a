"""``edje-index inspect``: what a store holds, from its metadata, commits and index."""

from __future__ import annotations

import collections

from edje_indexer.pipeline.maintenance import find_uncommitted, missing_sources
from edje_indexer.schemas import layout
from edje_indexer.schemas.index import load_index, read_commits, retired_paths
from edje_indexer.schemas.records import FailureRecord
from edje_indexer.schemas.storage import Location
from edje_indexer.schemas.store import open_metadata


def _data_bytes(loc: Location, data_path: str) -> int:
    """Bytes of array data (chunk files) of one segment, without Zarr metadata."""
    return sum(loc.du(data_path, name, "c") for name in (layout.TOKENS, layout.SCALES, layout.IDS))


def summarize(url: str, check_sources: bool = True) -> dict:
    """``check_sources``: also look up every committed shard's source (one request per shard)."""
    loc = Location(url)
    meta = open_metadata(loc)
    commits = read_commits(loc)
    index = load_index(loc, commits)
    model = meta.model
    rejected = collections.Counter()
    for c in commits.values():
        rejected.update(c.rejected_by_reason)
    images = index.table.num_rows
    token_bytes = sum(_data_bytes(loc, c.data_path) for c in commits.values())
    index_bytes = loc.du(layout.INDEX)
    uncommitted = find_uncommitted(loc, commits, keep=retired_paths(loc))
    failed = [
        FailureRecord.from_json(loc.read_json(layout.FAILED, n))
        for n in loc.list(layout.FAILED)
        if n.endswith(".json") and not n.startswith(".")
    ]
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
        "bytes": {"token_data": token_bytes, "index": index_bytes, "store_total": loc.du()},
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
        "duplicate_ids": index.duplicates.num_rows,
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
    ]
    for key in ("incomplete_shards", "failed_shards", "missing_shards", "uncommitted_data"):
        if s.get(key):
            lines.append(
                f"{key.replace('_', ' '):17s}{len(s[key])}: {', '.join(s[key][:5])}"
                + (" ..." if len(s[key]) > 5 else "")
            )
    return "\n".join(lines)
