"""``edje-index inspect STORE --html FILE``: a store's health as one self-contained HTML page.

:func:`build_report` gathers what the page shows, as plain data (also what
the tests check against the store); :mod:`pipeline.report_html` renders it,
with charts from :mod:`pipeline.charts` (matplotlib, SVG) and thumbnails of
rejected images from :mod:`pipeline.thumbnails`.

Built for big stores: everything comes from per-segment records (commit and
failure records, one listing per folder for the shards' sources) and from
bounded samples: ``sample_rows`` token rows (pipeline/token_stats.py), at
most ``DEAD_LETTER_TABLES`` dead-letter tables and ``THUMBNAILS`` images read
back from their shards. No pass over the tokens (unless ``deep``, which runs
``verify --deep``), no id index loaded when the published one is current.
The per-segment table holds at most ``SEGMENT_ROWS`` rows (problem segments
first, then an even spread); the charts summarize every segment.
"""

from __future__ import annotations

import collections
import time

import numpy as np

from edje_indexer.pipeline.plan import fingerprints
from edje_indexer.pipeline.rejected import iter_tables
from edje_indexer.pipeline.summary import failure_records, summarize
from edje_indexer.pipeline.token_stats import token_stats
from edje_indexer.schemas.index import read_commits
from edje_indexer.schemas.records import CommitRecord, utc_now
from edje_indexer.schemas.storage import Location, filesystem
from edje_indexer.schemas.store import open_metadata

SEGMENT_ROWS = 20_000
DEAD_LETTER_ROWS = 400  # rows shown, spread over the reasons
DEAD_LETTER_TABLES = 64  # dead-letter tables read at most
THUMBNAILS = 24
THUMBNAILS_PER_REASON = 4


def segment_row(c: CommitRecord) -> dict:
    total = c.timings_s.get("total") if isinstance(c.timings_s, dict) else None
    return {
        "segment": c.segment,
        "shard": c.shard,
        "indexed": c.indexed,
        "rejected": c.rejected,
        "rejected_by_reason": dict(c.rejected_by_reason),
        "samples_read": c.samples_read,
        "complete": c.complete,
        "incomplete_reason": c.incomplete_reason,
        "seconds": total,
        "images_per_s": round(c.indexed / total, 2) if total else None,
        "committed_at": c.committed_at,
        "source_bytes": c.source.bytes_read if c.source.bytes_read is not None else c.source.size,
        "revision": c.revision,
    }


def _table_rows(rows: list[dict], limit: int) -> list[dict]:
    """At most ``limit`` segment rows: every problem segment (rejects, incomplete) first, then an even spread."""
    if len(rows) <= limit:
        return rows
    problems = [r for r in rows if r["rejected"] or not r["complete"]][:limit]
    rest = [r for r in rows if not (r["rejected"] or not r["complete"])]
    room = limit - len(problems)
    picked = [rest[i] for i in np.linspace(0, len(rest) - 1, room).astype(int)] if room > 0 and rest else []
    return sorted(problems + picked, key=lambda r: r["committed_at"])


def source_states(commits: dict[str, CommitRecord]) -> dict:
    """Committed shards whose source is gone or changed since its commit (one listing per folder where that is
    cheaper), and those this machine cannot look up (an unknown protocol)."""
    reachable, unknown = [], []
    protocols: dict[str, bool] = {}
    for c in commits.values():
        proto = c.shard.split("://", 1)[0] if "://" in c.shard else "file"
        if proto not in protocols:
            try:
                filesystem(c.shard)
                protocols[proto] = True
            except (ValueError, ImportError):
                protocols[proto] = False
        (reachable if protocols[proto] else unknown).append(c)
    now = fingerprints([c.shard for c in reachable]) if reachable else {}
    missing, changed = [], []
    for c in reachable:
        fp = now[c.shard]
        if fp.size is None and fp.version is None:
            missing.append(c.shard)
        elif not c.source.same_version(fp):
            changed.append(c.shard)
    return {"missing": sorted(missing), "changed": sorted(changed), "unknown": sorted(c.shard for c in unknown)}


def dead_letter_sample(loc: Location, commits: dict[str, CommitRecord], seed: int = 0) -> dict:
    """Up to ``DEAD_LETTER_ROWS`` dead-letter rows spread over the reasons, read from at most
    ``DEAD_LETTER_TABLES`` tables of segments (chosen at random among those counting each reason)."""
    rng = np.random.default_rng(seed)
    with_reason: dict[str, list[CommitRecord]] = collections.defaultdict(list)
    for s in sorted(commits):
        for reason, n in commits[s].rejected_by_reason.items():
            if n:
                with_reason[reason].append(commits[s])
    per_reason = max(5, DEAD_LETTER_ROWS // max(1, len(with_reason)))
    cache: dict[str, list[dict]] = {}
    rows: list[dict] = []
    for reason in sorted(with_reason):
        segs = with_reason[reason]
        got: list[dict] = []
        for i in rng.permutation(len(segs)):
            c = segs[int(i)]
            if c.segment not in cache:
                if len(cache) >= DEAD_LETTER_TABLES:
                    break
                table = next(iter_tables(loc, [c]), None)
                cache[c.segment] = table.to_pylist() if table is not None else []
            got += [r for r in cache[c.segment] if r["reason"] == reason][: per_reason - len(got)]
            if len(got) >= per_reason:
                break
        rows += got
    rows.sort(key=lambda r: (r["reason"], r["shard"], r["member"] or ""))
    return {"rows": rows, "tables_read": len(cache), "per_reason": per_reason}


def _thumbnail_picks(rows: list[dict]) -> list[int]:
    taken: collections.Counter = collections.Counter()
    picks = []
    for i, r in enumerate(rows):
        if len(picks) < THUMBNAILS and taken[r["reason"]] < THUMBNAILS_PER_REASON:
            taken[r["reason"]] += 1
            picks.append(i)
    return picks


def build_report(url: str, deep: bool = False, sample_rows: int = 512, seed: int = 0) -> dict:
    """Everything the report shows, as data (numbers exactly as the store's records have them)."""
    from edje_indexer.pipeline.thumbnails import thumbnails
    from edje_indexer.pipeline.verify import verify

    timings: dict[str, float] = {}
    clock = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        timings[name] = round(now - clock, 3)
        clock = now

    loc = Location(url)
    meta = open_metadata(loc)
    commits = read_commits(loc)
    summary = summarize(url, check_sources=False, commits=commits)
    lap("summary")
    sources = source_states(commits)
    summary["missing_shards"] = sources["missing"]
    lap("sources")
    failed = sorted(failure_records(loc), key=lambda f: f.shard)
    segments = [segment_row(commits[s]) for s in sorted(commits)]
    dead = dead_letter_sample(loc, commits, seed)
    lap("dead_letters")
    picks = _thumbnail_picks(dead["rows"])
    for i, thumb in zip(picks, thumbnails([dead["rows"][i] for i in picks])):
        dead["rows"][i]["thumbnail"] = {"src": thumb.data_uri, "note": thumb.note}
    lap("thumbnails")
    tokens = token_stats(loc, meta, commits, sample_rows, seed)
    lap("token_stats")
    checks = verify(url, deep=deep)
    lap("verify")
    return {
        "store": url,
        "generated_at": utc_now(),
        "summary": summary,
        "segments": segments,
        "segment_table": _table_rows(segments, SEGMENT_ROWS),
        "rejected_by_reason": summary["rejected"],
        "dead_letters": dead,
        "tokens": tokens,
        "shards": {
            "missing": sources["missing"],
            "changed": sources["changed"],
            "unknown_sources": sources["unknown"],
            "failed": [{"shard": f.shard, "error": f.error, "failed_at": f.failed_at} for f in failed],
            "incomplete": [
                {"shard": c.shard, "reason": c.incomplete_reason}
                for c in sorted(commits.values(), key=lambda c: c.shard)
                if not c.complete
            ],
        },
        "verify": checks,
        "timings_s": timings,
    }


def write_report(url: str, path: str, deep: bool = False, sample_rows: int = 512, seed: int = 0) -> dict:
    """Build the report of ``url`` and write it to ``path`` (one HTML file); returns the report's data."""
    from edje_indexer.pipeline.report_html import render

    report = build_report(url, deep=deep, sample_rows=sample_rows, seed=seed)
    t0 = time.perf_counter()
    html = render(report)
    report["timings_s"]["render"] = round(time.perf_counter() - t0, 3)
    with open(path, "w", encoding="utf-8") as f:
        f.write(html)
    return report
