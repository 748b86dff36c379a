"""A job's last step: log what it committed, add it to the id index, publish, clean up after itself.

The launcher calls :func:`finalize` holding the store lock, after no attempt of
its job can commit any more (StoreLock.close_commits). It costs O(what the
job committed) plus O(1 + log entries since the last checkpoint) reads: the
commit records of the segments the job planned (and of those a dead job's
"begin" entry named), the ids arrays of the new segments, the id index runs'
footers, and writes of one run, one log entry and the index pointer. A job
that replaced or removed segments rebuilds the index (O(store), rare).
Without ``planned`` (stores written before the log, maintenance commands, the
benchmarks' builders) the commit records are listed and all read instead.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

from edje_indexer.pipeline.maintenance import retire
from edje_indexer.schemas import index as id_index
from edje_indexer.schemas import job_log
from edje_indexer.schemas.records import CommitRecord, IndexPointer
from edje_indexer.schemas.storage import Location

log = logging.getLogger(__name__)


class _After(Mapping):
    """The committed state after a finalize, as a view: ``state`` with ``added`` and without ``removed``."""

    def __init__(self, state: Mapping[str, CommitRecord], added: Mapping[str, CommitRecord], removed: set[str]):
        self._state, self._added, self._removed = state, added, removed

    def __getitem__(self, s: str) -> CommitRecord:
        if s in self._added:
            return self._added[s]
        if s in self._removed:
            raise KeyError(s)
        return self._state[s]

    def __iter__(self) -> Iterator[str]:
        yield from self._added
        yield from (s for s in self._state if s not in self._added and s not in self._removed)

    def __len__(self) -> int:
        new = sum(s not in self._state for s in self._added)
        return len(self._state) + new - sum(s in self._state for s in self._removed)


@dataclass
class Finalized:
    state: job_log.StoreState  # after the job
    pointer: IndexPointer
    added: dict = field(default_factory=dict)  # segment -> CommitRecord this finalize logged
    removed: list = field(default_factory=list)
    retired: list = field(default_factory=list)  # superseded data kept one job longer
    deleted: list = field(default_factory=list)  # what the previous job had kept for its readers, now gone


def finalize(
    loc: Location,
    job_id: str,
    planned: list[str] | None = None,
    removed: list[str] = (),
    state: job_log.StoreState | None = None,
) -> Finalized:
    """Log and index what is committed now among ``planned`` segments (None: every commit record, listed)."""
    state = job_log.read_state(loc) if state is None else state
    if planned is None or not state.logged:
        from edje_indexer.schemas.index import read_commits

        records = read_commits(loc)
        gone = {s for s in state if s not in records}
    else:
        check = set(planned).union(*state.unfinished.values()) if state.unfinished else set(planned)
        records = job_log.read_records(loc, check)
        gone = set()
    removed = set(removed) | gone
    added = {
        s: r for s, r in records.items() if s not in removed and (s not in state or state[s].data_path != r.data_path)
    }
    replaced = [s for s in added if s in state]
    stale = set(replaced) | ({s for s in removed if s in state})
    retired = retire([state[s].data_path for s in replaced])
    previous = id_index.read_pointer(loc)
    if state.index is not None:  # the log's own word wins over a pointer a crash left behind
        previous = IndexPointer.from_json(state.index)
    after = _After(state, added, {s for s in removed if s in state})
    if added or stale or previous is None or previous.format < 2:
        pointer = id_index.update(loc, previous, state, after, added, stale, state.seq + 1, retired)
    else:
        pointer = IndexPointer.from_json({**previous.to_json(), "log_seq": state.seq + 1, "retired": retired})
    deleted = list(state.retired)
    recovered = sorted(j for j in state.unfinished if j != job_id)
    wrote_begin = job_id in state.unfinished
    if not (added or stale or recovered or wrote_begin or state.retired or not state.logged):
        if id_index.read_pointer(loc) != previous:  # a crash between the last entry and its publication
            id_index.publish(loc, previous)
        return Finalized(state, previous)
    entry = job_log.LogEntry(
        0,
        "commit",
        job_id,
        added=[added[s].to_json() for s in sorted(added)],
        removed=sorted({s for s in removed if s in state}),
        recovered=recovered,
        index=pointer.to_json(),
        retired=retired,
    )
    for s in replaced:
        log.info("segment %s replaced: %s -> %s", s, state[s].data_path, added[s].data_path)
    job_log.append(loc, state, entry)
    if not state.logged:
        state.logged = True
        job_log.write_checkpoint(loc, state)  # a store from before the log: its first checkpoint
    id_index.publish(loc, pointer)
    # What the previous job kept for readers of its snapshot: those readers have had a job's time.
    for rel in deleted:
        loc.remove(*rel.split("/"))
    return Finalized(state, pointer, added, sorted(removed), retired, deleted)
