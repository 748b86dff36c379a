"""``edje-index rejected``: the dead-letter rows of a store, across its committed segments.

Each committed segment version has one dead-letter table
(``rejected/<data folder>.parquet``, schemas.tables.REJECTED_SCHEMA); only the
tables of segments whose commit record counts rejects are read, one at a
time, so listing stays light on stores of many segments. Rows come out in
segment order with a ``segment`` column added.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator

import pyarrow as pa
import pyarrow.compute as pc

from edje_indexer.pipeline.plan import canonical_url
from edje_indexer.schemas import layout, tables
from edje_indexer.schemas.index import read_commits
from edje_indexer.schemas.records import CommitRecord
from edje_indexer.schemas.segment import read_rejected
from edje_indexer.schemas.storage import Location

SCHEMA = tables.REJECTED_SCHEMA.append(pa.field("segment", pa.string(), nullable=False))
COLUMNS = [f.name for f in SCHEMA]


def shard_commits(commits: dict[str, CommitRecord], shard: str | None) -> list[CommitRecord]:
    """The commits to read, in segment order: all of them, or the one of ``shard`` (a URL or path as the job
    was given it; ValueError if it is not committed in the store)."""
    if shard is None:
        return [commits[s] for s in sorted(commits)]
    key = layout.shard_key(canonical_url(shard))
    hits = [c for c in commits.values() if layout.shard_key(canonical_url(c.shard)) == key]
    if not hits:
        raise ValueError(f"shard {shard} is not committed in this store (see 'edje-index inspect' for failed shards)")
    return hits


def iter_tables(loc: Location, commits: list[CommitRecord], reason: str | None = None) -> Iterator[pa.Table]:
    """One table of dead-letter rows per segment that has any (of ``reason``, if given), with ``segment``."""
    for c in commits:
        if not c.rejected or (reason is not None and not c.rejected_by_reason.get(reason)):
            continue
        t = read_rejected(loc, c.data_path).select(tables.REJECTED_SCHEMA.names).cast(tables.REJECTED_SCHEMA)
        if reason is not None:
            t = t.filter(pc.equal(t["reason"], reason))
        if t.num_rows:
            yield t.append_column(SCHEMA.field("segment"), pa.array([c.segment] * t.num_rows, pa.string()))


def dead_letters(url: str, reason: str | None = None, shard: str | None = None) -> pa.Table:
    """Every dead-letter row of the store (optionally of one reason or one shard), as one table."""
    loc = Location(url)
    parts = list(iter_tables(loc, shard_commits(read_commits(loc), shard), reason))
    return pa.concat_tables(parts) if parts else SCHEMA.empty_table()


def _text_line(row: dict) -> str:
    message = " ".join(str(row["message"]).split())
    if len(message) > 160:
        message = message[:157] + "..."
    return (
        f"{row['reason']:<20} {row['stage']:<7} {row['id'] if row['id'] is not None else '-':<28} "
        f"{row['member'] or '-':<28} {row['shard']}  {row['error_type']}: {message}"
    )


def run(args, out=None) -> int:
    """The ``rejected`` subcommand: text lines (default), ``--json`` (a list of rows) or ``--parquet OUT``."""
    import pyarrow.parquet as pq

    out = out or sys.stdout
    loc = Location(args.store)
    commits = read_commits(loc)
    chosen = shard_commits(commits, args.shard)
    parts = iter_tables(loc, chosen, args.reason)
    n = segments = 0
    if args.parquet:
        with pq.ParquetWriter(args.parquet, SCHEMA) as writer:
            for t in parts:
                writer.write_table(t)
                n, segments = n + t.num_rows, segments + 1
        print(f"wrote {args.parquet}: {n} rejected sample(s) from {segments} segment(s)", file=out)
        return 0
    if args.json:
        out.write("[")
        for t in parts:
            for row in t.to_pylist():
                out.write(("\n " if not n else ",\n ") + json.dumps(row))
                n += 1
        out.write("\n]\n" if n else "]\n")
        return 0
    for t in parts:
        if not segments:
            print(f"{'reason':<20} {'stage':<7} {'id':<28} {'member':<28} shard  error", file=out)
        for row in t.to_pylist():
            print(_text_line(row), file=out)
        n, segments = n + t.num_rows, segments + 1
    what = f" ({args.reason})" if args.reason else ""
    print(f"{n} rejected sample(s){what} in {segments} of {len(chosen)} segment(s)", file=out)
    return 0
