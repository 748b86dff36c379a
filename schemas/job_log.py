"""The store's state from a few reads: a log of what each job committed, with checkpoints.

Commit records (``commits/<segment>.json``) stay the truth a crash cannot
corrupt; the log is how a launcher learns the committed state without listing
and reading every one of them (as Delta Lake and Iceberg keep table state)::

    log/<seq>.json           one entry per job step, created once (never replaced):
                             "begin" (the segments a job may commit) or
                             "commit" (the records it committed, the segments it
                             removed, and the id index after it)
    log/checkpoint-<seq>.parquet  every committed record as of entry <seq> (zstd)
    log/_checkpoint.json     which checkpoint is newest (a hint: entries after it are probed)

:func:`read_state` reads the newest checkpoint and then entries ``seq + 1``,
``seq + 2`` ... until one is missing: O(1 + entries since the checkpoint)
reads. A job that died after committing segments but before its "commit"
entry left a "begin" entry naming them; the next :func:`finalize` reads those
segments' commit records (a few reads, not a listing) and logs what it finds.
Readers do not read the log: the id index pointer (schemas/index.py) is their
snapshot, published after each "commit" entry.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.parquet as pq

from edje_indexer.schemas import layout
from edje_indexer.schemas.records import CommitRecord, Source, utc_now
from edje_indexer.schemas.storage import Location

log = logging.getLogger(__name__)

LOG = "log"
CHECKPOINT_POINTER = "_checkpoint.json"
# A checkpoint after this many entries: a launcher then reads at most this many entries past it.
CHECKPOINT_EVERY = 20
LOG_FORMAT = 1


def entry_name(seq: int) -> str:
    return f"{seq:012d}.json"


def checkpoint_name(seq: int) -> str:
    return f"checkpoint-{seq:012d}.parquet"


class LogConflict(RuntimeError):
    """Another launcher wrote the log entry this one meant to write (the store lock was not held)."""


@dataclass(frozen=True)
class Brief:
    """What planning needs of a committed segment (duck-types the CommitRecord fields it reads)."""

    shard: str
    data_path: str
    rows: int
    revision: int
    source: Source


# Columns of a checkpoint besides ``record`` (the full JSON, read only when a record is asked for).
BRIEF_COLUMNS = ("segment", "shard", "data_path", "rows", "revision", "source_size", "source_version")


class StoreState(Mapping):
    """segment -> CommitRecord of every committed segment, parsed on first access.

    A store of a million segments is a checkpoint table plus the records logged after it: planning reads
    :meth:`brief` (typed columns), and the full records of the checkpoint are read only if asked for."""

    def __init__(self, base: pa.Table | None = None, seq: int = 0, index=None, retired=(), logged=True, full=None):
        self._base = base  # checkpoint columns BRIEF_COLUMNS, or None
        self._base_row = dict(zip(base["segment"].to_pylist(), range(base.num_rows))) if base is not None else {}
        self._base_records = None  # the checkpoint's record column, read on first use (``full`` reads it)
        self._full = full
        self._raw: dict[str, str] = {}  # segment -> commit record JSON, logged after the checkpoint
        self._removed: set[str] = set()  # checkpoint segments removed since
        self._parsed: dict[str, CommitRecord] = {}
        self._shards: dict[str, str] | None = None
        self.seq = seq  # the last log entry applied (0: none)
        self.index = index  # the id index descriptor of the last "commit" entry (schemas/index.py), or None
        self.retired = list(retired)  # superseded paths the last "commit" entry kept for readers, one job longer
        self.logged = logged  # False: a store written before the log (state from a listing of commits/)
        self.unfinished: dict[str, list[str]] = {}  # job id -> segments its "begin" entry named, no "commit" after

    def _in_base(self, segment: str) -> bool:
        return segment in self._base_row and segment not in self._removed and segment not in self._raw

    def raw(self, segment: str) -> str:
        if segment in self._raw:
            return self._raw[segment]
        if not self._in_base(segment):
            raise KeyError(segment)
        if self._base_records is None:
            self._base_records = self._full()
        return self._base_records[self._base_row[segment]].as_py()

    def __getitem__(self, segment: str) -> CommitRecord:
        rec = self._parsed.get(segment)
        if rec is None:
            rec = self._parsed[segment] = CommitRecord.from_json(json.loads(self.raw(segment)))
        return rec

    def brief(self, segment: str) -> Brief | None:
        """Shard, data path, rows, revision and source version of a committed segment, or None."""
        if segment in self._raw or segment in self._parsed:
            rec = self[segment] if segment in self else None
            if rec is None:
                return None
            return Brief(rec.shard, rec.data_path, rec.rows, rec.revision, rec.source)
        if not self._in_base(segment):
            return None
        i = self._base_row[segment]
        col = {c: self._base[c][i].as_py() for c in BRIEF_COLUMNS[1:]}
        return Brief(
            col["shard"],
            col["data_path"],
            col["rows"],
            col["revision"],
            Source(col["source_size"], col["source_version"]),
        )

    def __contains__(self, segment) -> bool:
        return segment in self._raw or self._in_base(segment)

    def __iter__(self) -> Iterator[str]:
        yield from (s for s in self._base_row if self._in_base(s))
        yield from self._raw

    def __len__(self) -> int:
        # a checkpoint segment logged again later is both in _removed and in _raw (see put)
        return len(self._base_row) - len(self._removed) + len(self._raw)

    @property
    def shards(self) -> dict[str, str]:
        """segment -> shard URL of every committed segment (planning needs them all; no record is parsed)."""
        if self._shards is None:
            base = dict(zip(self._base["segment"].to_pylist(), self._base["shard"].to_pylist())) if self._base else {}
            for s in self._removed:
                base.pop(s, None)
            for s in self._raw:
                base[s] = self[s].shard
            self._shards = base
        return self._shards

    def forget(self, segment: str) -> None:
        self._raw.pop(segment, None)
        self._parsed.pop(segment, None)
        if segment in self._base_row:
            self._removed.add(segment)
        if self._shards is not None:
            self._shards.pop(segment, None)

    def put(self, segment: str, record_json: str, shard: str) -> None:
        self.forget(segment)
        self._raw[segment] = record_json
        if self._shards is not None:
            self._shards[segment] = shard

    def apply(self, added: Mapping[str, CommitRecord], removed=()) -> None:
        for s in removed:
            self.forget(s)
        for s, rec in added.items():
            self.put(s, json.dumps(rec.to_json(), sort_keys=True), rec.shard)
            self._parsed[s] = rec


@dataclass
class LogEntry:
    seq: int
    kind: str  # "begin" | "commit"
    job_id: str
    planned: list = field(default_factory=list)  # begin: segments the job may commit
    added: list = field(default_factory=list)  # commit: commit records (JSON) it logs
    removed: list = field(default_factory=list)  # commit: segments no longer in the store
    recovered: list = field(default_factory=list)  # commit: jobs whose commits this entry also logs
    index: dict | None = None  # commit: the id index after this entry (schemas/index.py)
    retired: list = field(default_factory=list)  # commit: superseded data kept one job longer
    at: str = field(default_factory=utc_now)
    format: int = LOG_FORMAT

    def to_json(self) -> dict:
        return dict(self.__dict__)

    @classmethod
    def from_json(cls, d: dict) -> LogEntry:
        if not isinstance(d, dict) or d.get("kind") not in ("begin", "commit"):
            raise ValueError(f"malformed log entry: {str(d)[:80]!r}")
        if d.get("format", 1) > LOG_FORMAT:
            raise ValueError(f"log entry format {d['format']} is newer than this software ({LOG_FORMAT}): upgrade it")
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        try:
            return cls(**known)
        except TypeError as e:
            raise ValueError(f"malformed log entry: {e}") from None


def has_log(loc: Location) -> bool:
    return loc.exists(LOG, CHECKPOINT_POINTER) or loc.exists(LOG, entry_name(1))


def read_entry(loc: Location, seq: int) -> LogEntry | None:
    raw, _ = loc.read_versioned(LOG, entry_name(seq))
    if raw is None:
        return None
    try:
        return LogEntry.from_json(json.loads(raw))
    except ValueError as e:
        raise ValueError(f"log entry {loc.url_of(LOG, entry_name(seq))} is unusable: {e}") from e


def _read_checkpoint(loc: Location) -> StoreState:
    raw, _ = loc.read_versioned(LOG, CHECKPOINT_POINTER)
    if raw is None:
        return StoreState()
    ptr = json.loads(raw)
    name = checkpoint_name(int(ptr["seq"]))
    data = loc.read_bytes(LOG, name)
    if ptr.get("sha256") and hashlib.sha256(data).hexdigest() != ptr["sha256"]:
        raise ValueError(f"log checkpoint {loc.url_of(LOG, name)} does not match its checksum (damaged)")
    table = pq.read_table(io.BytesIO(data), columns=list(BRIEF_COLUMNS))

    def records() -> pa.ChunkedArray:
        return pq.read_table(io.BytesIO(data), columns=["record"])["record"]

    state = StoreState(table, int(ptr["seq"]), ptr.get("index"), ptr.get("retired", ()), full=records)
    state.unfinished = dict(ptr.get("unfinished", {}))
    return state


def read_state(loc: Location) -> StoreState:
    """The committed state as the log says: newest checkpoint plus the entries after it.

    A store written before the log has none: its state comes from listing
    commits/ (once; the next job's finalize writes the log)."""
    if not has_log(loc):
        from edje_indexer.schemas.index import read_commits

        commits = read_commits(loc)
        state = StoreState(logged=False)
        state.apply(commits)
        return state
    state = _read_checkpoint(loc)
    while (entry := read_entry(loc, state.seq + 1)) is not None:
        _apply(state, entry)
    return state


def _apply(state: StoreState, entry: LogEntry) -> None:
    state.seq = entry.seq
    if entry.kind == "begin":
        state.unfinished[entry.job_id] = list(entry.planned)
        return
    for job in [entry.job_id, *entry.recovered]:
        state.unfinished.pop(job, None)
    for s in entry.removed:
        state.forget(s)
    for d in entry.added:
        state.put(d["segment"], json.dumps(d, sort_keys=True), d["shard"])
    state.index = entry.index
    state.retired = list(entry.retired)


def append(loc: Location, state: StoreState, entry: LogEntry) -> None:
    """Write ``entry`` as the next one (create-only) and apply it to ``state``; checkpoint when due."""
    entry.seq = state.seq + 1
    data = json.dumps(entry.to_json(), sort_keys=True).encode()
    if loc.write_if(data, LOG, entry_name(entry.seq), expected=None) is None:
        raise LogConflict(
            f"log entry {loc.url_of(LOG, entry_name(entry.seq))} was written by another job: "
            "two launchers ran on this store without its lock"
        )
    _apply(state, entry)
    if entry.kind == "commit" and (entry.seq // CHECKPOINT_EVERY) > ((entry.seq - 1) // CHECKPOINT_EVERY):
        write_checkpoint(loc, state)


def write_checkpoint(loc: Location, state: StoreState) -> None:
    """Every record as of ``state.seq`` in one file, then the hint that points to it; older ones go."""
    names = sorted(state)
    briefs = [state.brief(s) for s in names]
    table = pa.table(
        {
            "segment": pa.array(names, pa.string()),
            "shard": pa.array([b.shard for b in briefs], pa.string()),
            "data_path": pa.array([b.data_path for b in briefs], pa.string()),
            "rows": pa.array([b.rows for b in briefs], pa.int64()),
            "revision": pa.array([b.revision for b in briefs], pa.int64()),
            "source_size": pa.array([b.source.size for b in briefs], pa.int64()),
            "source_version": pa.array([b.source.version for b in briefs], pa.string()),
            "record": pa.array([state.raw(s) for s in names], pa.string()),
        }
    )
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    data = buf.getvalue()
    loc.write_bytes_atomic(data, LOG, checkpoint_name(state.seq))
    pointer = {
        "sha256": hashlib.sha256(data).hexdigest(),
        "seq": state.seq,
        "segments": len(names),
        "index": state.index,
        "retired": state.retired,
        "unfinished": state.unfinished,
        "format": LOG_FORMAT,
    }
    previous, _ = loc.read_versioned(LOG, CHECKPOINT_POINTER)
    loc.write_json_atomic(pointer, LOG, CHECKPOINT_POINTER)
    keep = {checkpoint_name(state.seq)}
    if previous:
        keep.add(checkpoint_name(int(json.loads(previous)["seq"])))  # a launcher may be reading it
    for name in loc.list(LOG):
        if name.startswith("checkpoint-") and name not in keep:
            loc.remove(LOG, name)


def begin(loc: Location, state: StoreState, job_id: str, planned: list[str]) -> None:
    """Name the segments this job may commit, before any worker starts (so a crash is recoverable)."""
    if not state.logged:
        return  # the first finalize on a store without a log lists commits/ anyway
    append(loc, state, LogEntry(0, "begin", job_id, planned=sorted(planned)))


def read_records(loc: Location, segments) -> dict[str, CommitRecord]:
    """The commit records of ``segments`` that exist (concurrent reads, no listing)."""
    names = [layout.commit_path(s) for s in sorted(set(segments))]
    got = loc.read_many([f"{a}/{b}" for a, b in names])
    out = {}
    for rel, raw in got.items():
        try:
            rec = CommitRecord.from_json(json.loads(raw))
        except ValueError as e:
            raise ValueError(f"commit record {loc.url_of(rel)} is unusable: {e}") from e
        if rel.rsplit("/", 1)[1] != f"{rec.segment}.json":
            raise layout.UnsafePath(f"commit record {loc.url_of(rel)} names segment {rec.segment!r}")
        out[rec.segment] = rec
    return out
