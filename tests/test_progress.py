"""A job's progress from the store's records: the terminal bar, the log lines, and what they count."""

from __future__ import annotations

import io
import logging
import threading
import time

from edje_indexer.benchmarks.synthetic_store import build_synthetic_store
from edje_indexer.pipeline.job import _progress
from edje_indexer.pipeline.progress import JobProgress, Snapshot, TerminalBar, progress_bar, progress_line
from edje_indexer.schemas import Location, read_commits
from edje_indexer.schemas.records import FailureRecord, ShardTask, SourceVersion


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def tasks_of(url: str) -> dict[str, ShardTask]:
    """Tasks that the store's commits complete (what the job planned, seen after the fact)."""
    return {
        s: ShardTask(c.shard, s, SourceVersion(c.source.size, c.source.version), c.revision)
        for s, c in read_commits(Location(url)).items()
    }


def test_bar_and_line_say_the_same():
    snap = Snapshot(planned=10, committed=3, failed=1, images=120, elapsed_s=8.0)
    assert snap.done == 4 and snap.images_per_s == 15.0 and snap.eta_s == 12.0
    line = progress_line(snap)
    assert line == "progress: 3/10 shards committed, 1 failed, 120 images, 15.0 images/s, ETA 00:12"
    bar = progress_bar(snap, 100)
    assert bar.startswith("[") and "4/10 shards (1 failed)" in bar and "15.0 img/s" in bar and "ETA 00:12" in bar
    assert len(bar) < 100 and len(progress_bar(snap, 40)) < 40  # never wraps the terminal's line
    assert Snapshot(5, 0, 0, 0, 3.0).eta_s is None and progress_line(Snapshot(5, 0, 0, 0, 3.0)).endswith("ETA --:--")
    assert Snapshot(2, 2, 0, 9, 3.0).eta_s == 0.0


def test_job_progress_counts_this_jobs_records(tmp_path):
    url = build_synthetic_store(str(tmp_path / "s"), 6, 2, m=4, d=8).url
    todo = tasks_of(url)
    seg = sorted(todo)[0]
    loc = Location(url)
    old = FailureRecord(segment="someother", shard="x.tar", error_type="OSError", message="old")
    loc.write_json_atomic(old.to_json(), "failed", "someother.json")  # not a task of this job
    p = JobProgress(loc, {**todo, "late": ShardTask("late.tar", "late", SourceVersion(1, "v"))}, time.perf_counter())
    snap = p.poll()
    assert (snap.planned, snap.committed, snap.failed, snap.images) == (4, 3, 0, 6)
    loc.write_json_atomic(FailureRecord("late", "late.tar", "ReadError", "bad").to_json(), "failed", "late.json")
    assert p.poll().failed == 1 and p.poll().done == 4
    assert seg in p.committed


def test_terminal_bar_keeps_log_lines_above_it():
    term = FakeTerminal()
    handler = logging.StreamHandler(term)
    log = logging.getLogger("edje_indexer.test_progress")
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False
    try:
        with TerminalBar(term) as bar:
            bar.show(Snapshot(4, 1, 0, 10, 2.0))
            log.info("committed shard-1")
            bar.show(Snapshot(4, 4, 0, 40, 4.0))
    finally:
        log.removeHandler(handler)
    out = term.getvalue()
    assert out.endswith("\n") and "committed shard-1\n" in out
    # the line is cleared before the log record and the bar drawn again after it
    assert "\r\x1b[2Kcommitted shard-1\n\r\x1b[2K[" in out
    assert "4/4 shards" in out.rsplit("\r", 1)[-1]


def test_progress_thread_logs_lines_without_a_terminal(tmp_path, caplog):
    url = build_synthetic_store(str(tmp_path / "s"), 3, 1, m=4, d=8).url
    stop = threading.Event()
    caplog.set_level(logging.INFO, logger="edje_indexer.pipeline.job")
    t = threading.Thread(target=_progress, args=(Location(url), tasks_of(url), stop, 0.05, time.perf_counter(), False))
    t.start()
    time.sleep(0.3)
    stop.set()
    t.join(5)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("progress:")]
    assert lines and lines[-1].startswith("progress: 3/3 shards committed, 3 images")


def test_progress_thread_draws_a_bar_on_a_terminal(tmp_path, monkeypatch):
    url = build_synthetic_store(str(tmp_path / "s"), 2, 1, m=4, d=8).url
    term = FakeTerminal()
    monkeypatch.setattr("sys.stderr", term)
    monkeypatch.setenv("TERM", "xterm")
    stop = threading.Event()
    stop.set()  # one final draw, then done
    _progress(Location(url), tasks_of(url), stop, 10.0, time.perf_counter(), None)
    out = term.getvalue()
    assert out.startswith("\r\x1b[2K[") and "2/2 shards" in out and out.endswith("\n")
