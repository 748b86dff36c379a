"""A job's progress, from the store's commit and failure records (the same on every runner).

:class:`JobProgress` tallies the records of the job's planned shards; the
launcher's progress thread (pipeline/job.py) shows it as a live bar when
stderr is a terminal (:class:`TerminalBar`) and as periodic log lines
otherwise (CI, log files). No dependency: a bar is one line redrawn with
``\\r``, and log lines written meanwhile (other threads of the launcher, an
in-process runner's workers) are printed above it, not through it.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import threading
import time
from dataclasses import dataclass

from edje_indexer.schemas import layout
from edje_indexer.schemas.records import CommitRecord, FailureRecord, ShardTask
from edje_indexer.schemas.storage import Location


@dataclass(frozen=True)
class Snapshot:
    planned: int
    committed: int
    failed: int
    images: int
    elapsed_s: float

    @property
    def done(self) -> int:
        return self.committed + self.failed

    @property
    def images_per_s(self) -> float:
        return self.images / self.elapsed_s if self.elapsed_s > 0 else 0.0

    @property
    def eta_s(self) -> float | None:
        """Seconds to the last planned shard at the rate shards finished so far (None before the first)."""
        if not self.done or self.done >= self.planned:
            return 0.0 if self.done >= self.planned else None
        return self.elapsed_s / self.done * (self.planned - self.done)


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "--:--"
    s = int(round(seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60:02d}:{s % 60:02d}"


def progress_line(s: Snapshot) -> str:
    """The periodic log line (no terminal)."""
    failed = f", {s.failed} failed" if s.failed else ""
    return (
        f"progress: {s.committed}/{s.planned} shards committed{failed}, {s.images} images, "
        f"{s.images_per_s:.1f} images/s, ETA {_duration(s.eta_s)}"
    )


def progress_bar(s: Snapshot, width: int) -> str:
    """One terminal line of at most ``width`` characters: a bar, then the numbers."""
    failed = f" ({s.failed} failed)" if s.failed else ""
    text = (
        f" {s.done}/{s.planned} shards{failed}  {s.images} images  {s.images_per_s:.1f} img/s  "
        f"ETA {_duration(s.eta_s)}  elapsed {_duration(s.elapsed_s)}"
    )
    cells = max(10, min(40, width - 1 - len(text) - 2))
    filled = cells * s.done // s.planned if s.planned else cells
    return ("[" + "#" * filled + "." * (cells - filled) + "]" + text)[: max(width - 1, 1)]


# Up to this many shards still pending, a poll reads their commit records (one request each) instead of
# listing commits/ (one request per 1,000 segments of the whole store on S3).
DIRECT_READS = 256


class JobProgress:
    """What the records say about ``todo`` (this job's tasks by segment) since the job started."""

    def __init__(self, loc: Location, todo: dict[str, ShardTask], t0: float):
        self.loc, self.todo, self.t0 = loc, todo, t0
        self.committed: dict[str, int] = {}  # segment -> images indexed
        self.failed: set[str] = set()
        self._failed_before = self._failure_times()  # failure records of earlier runs are not this job's

    def _failure_times(self) -> dict[str, str]:
        out = {}
        for name in self.loc.list(layout.FAILED):
            seg = name[: -len(".json")]
            if name.endswith(".json") and seg in self.todo and seg not in self.committed:
                try:
                    out[seg] = FailureRecord.from_json(self.loc.read_json(layout.FAILED, name)).failed_at
                except (OSError, ValueError):  # being replaced, or removed by a commit meanwhile
                    continue
        return out

    def poll(self) -> Snapshot:
        """Read the records that appeared since the last poll: the pending ones directly while there are few
        (a store of a million segments is not listed every few seconds), else one listing of commits/."""
        pending = [s for s in self.todo if s not in self.committed]
        if len(pending) <= DIRECT_READS:
            names = [f"{s}.json" for s in pending]
        else:
            names = [n for n in self.loc.list(layout.COMMITS) if n[: -len(".json")] in self.todo]
        wanted = [f"{layout.COMMITS}/{n}" for n in names if n[: -len(".json")] not in self.committed]
        for raw in self.loc.read_many(wanted).values():
            rec = CommitRecord.from_json(json.loads(raw))
            if rec.segment in self.todo and self.todo[rec.segment].done_by(rec):
                self.committed[rec.segment] = rec.indexed
                self.failed.discard(rec.segment)
        for seg, when in self._failure_times().items():
            if self._failed_before.get(seg) != when:
                self.failed.add(seg)
        return self.snapshot()

    def snapshot(self) -> Snapshot:
        return Snapshot(
            len(self.todo),
            len(self.committed),
            len(self.failed),
            sum(self.committed.values()),
            time.perf_counter() - self.t0,
        )


def stderr_is_terminal() -> bool:
    try:
        return sys.stderr.isatty() and os.environ.get("TERM") != "dumb"
    except (AttributeError, ValueError):  # replaced or closed stderr
        return False


class _AboveTheBar(logging.Handler):
    """Wraps a handler that writes to the terminal: clears the bar, emits the record, draws the bar again."""

    def __init__(self, inner: logging.Handler, bar: TerminalBar):
        super().__init__(inner.level)
        self.inner, self.bar = inner, bar

    def emit(self, record: logging.LogRecord) -> None:
        with self.bar.lock:
            self.bar.clear()
            self.inner.handle(record)
            self.bar.redraw()


class TerminalBar:
    """A one-line bar on a terminal stream; ``with`` it, log records go above it."""

    def __init__(self, stream=None):
        self.stream = stream or sys.stderr
        self.lock = threading.RLock()
        self.line = ""
        self._swapped: list[tuple[logging.Logger, logging.Handler, logging.Handler]] = []

    def __enter__(self) -> TerminalBar:
        for logger in (logging.getLogger(), *_loggers_with_handlers()):
            for h in list(logger.handlers):
                if getattr(h, "stream", None) is self.stream:
                    wrapped = _AboveTheBar(h, self)
                    logger.removeHandler(h)
                    logger.addHandler(wrapped)
                    self._swapped.append((logger, h, wrapped))
        return self

    def __exit__(self, *exc) -> None:
        with self.lock:
            if self.line:
                self.stream.write("\n")
                self.stream.flush()
            self.line = ""
        for logger, h, wrapped in self._swapped:
            logger.removeHandler(wrapped)
            logger.addHandler(h)

    def show(self, snapshot: Snapshot) -> None:
        width = shutil.get_terminal_size((100, 24)).columns
        with self.lock:
            self.line = progress_bar(snapshot, width)
            self.redraw()

    def clear(self) -> None:
        if self.line:
            self.stream.write("\r\x1b[2K")

    def redraw(self) -> None:
        if self.line:
            self.stream.write("\r\x1b[2K" + self.line)
            self.stream.flush()


def _loggers_with_handlers() -> list[logging.Logger]:
    return [lg for lg in logging.Logger.manager.loggerDict.values() if isinstance(lg, logging.Logger) and lg.handlers]
