"""The store lock when things go wrong: transient write errors, skewed clocks, corrupt lock files, pids that
mean nothing on their own, a job that lost its lease, and many processes racing for a fresh store.

Every wait is bounded (small stale_after_s / heartbeat_s, explicit join timeouts).
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import socket
import time
from dataclasses import replace

import pytest
from lock_helpers import turn_taking_contender

from edje_indexer.pipeline.lock import StoreLock, StoreLocked, this_process
from edje_indexer.schemas import layout
from edje_indexer.schemas.records import LockRecord, ShardTask, SourceVersion
from edje_indexer.schemas.segment import LeaseLost, check_lease
from edje_indexer.schemas.storage import Location

DEAD_PID = 2**22 + 999  # above Linux's largest pid_max: never a live process


class FlakyLocation:
    """A Location whose ``write_if`` raises OSError for calls ``skip + 1 .. skip + failures``.

    ``write_first``: the failing calls do write, then raise (an ambiguous outcome: the request reached the
    store, the answer was lost)."""

    def __init__(self, loc: Location, failures: int, skip: int = 1, write_first: bool = False):
        self._loc, self.failures, self.skip, self.write_first = loc, failures, skip, write_first
        self.calls = 0
        self.raised = 0

    def __getattr__(self, name):
        return getattr(self._loc, name)

    def write_if(self, data, *parts, expected):
        self.calls += 1
        if self.skip < self.calls <= self.skip + self.failures:
            if self.write_first:
                self._loc.write_if(data, *parts, expected=expected)
            self.raised += 1
            raise OSError("injected transient error")
        return self._loc.write_if(data, *parts, expected=expected)


def lock_on_disk(loc: Location) -> dict:
    return json.loads(loc.read_bytes(layout.LOCK))


def write_lock(loc: Location, record: LockRecord | None = None, raw: bytes | None = None) -> None:
    loc.write_bytes_atomic(raw if raw is not None else json.dumps(record.to_json()).encode(), layout.LOCK)


def wait_until(cond, timeout_s: float = 3.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.02)
    return cond()


# -- heartbeat ------------------------------------------------------------------------------------------------


def test_heartbeat_survives_transient_write_errors(tmp_path):
    loc = Location(str(tmp_path / "store"))
    flaky = FlakyLocation(loc, failures=2)  # call 1 (the create in acquire) passes; the first 2 beats fail
    holder = StoreLock(flaky, stale_after_s=60, heartbeat_s=0.05).acquire()
    try:
        time.sleep(0.5)
        assert flaky.raised == 2, "the injected errors were not hit"
        assert holder._thread.is_alive(), "a transient error stopped the heartbeat"
        assert holder.record.beat >= 3
        assert wait_until(lambda: lock_on_disk(loc)["beat"] >= 3)
        assert lock_on_disk(loc)["token"] == holder.token

        contender = StoreLock(Location(loc.url), stale_after_s=0.5, heartbeat_s=3600)
        with pytest.raises(StoreLocked):
            contender.acquire(wait_s=1.5)
        assert not holder.lost()
        assert holder._thread.is_alive()
    finally:
        holder.release()
    assert not os.path.exists(loc.path(layout.LOCK))


def test_heartbeat_survives_a_write_that_landed_but_raised(tmp_path):
    loc = Location(str(tmp_path / "store"))
    flaky = FlakyLocation(loc, failures=1, write_first=True)
    holder = StoreLock(flaky, stale_after_s=60, heartbeat_s=0.05).acquire()
    try:
        time.sleep(0.5)
        assert flaky.raised == 1
        assert not holder.lost()  # the lock on disk is still ours...
        assert holder._thread.is_alive()  # ...so the heartbeat must go on
        assert lock_on_disk(loc)["beat"] >= 3
    finally:
        holder.release()


class SkewedClockLock(StoreLock):
    """A holder whose wall clock is far off: the heartbeat time it writes is ``wall``."""

    wall = 0.0

    def _payload(self, record: LockRecord) -> bytes:
        return super()._payload(replace(record, heartbeat=self.wall))


@pytest.mark.parametrize("wall", [0.0, 4e9], ids=["clock-in-the-past", "clock-in-the-future"])
def test_a_beating_holder_with_a_skewed_clock_is_not_taken_over(tmp_path, wall):
    loc = Location(str(tmp_path / "store"))
    holder = SkewedClockLock(loc, stale_after_s=60, heartbeat_s=0.1)
    holder.wall = wall
    holder.acquire()
    try:
        assert lock_on_disk(loc)["heartbeat"] == wall
        contender = StoreLock(Location(loc.url), stale_after_s=0.5, heartbeat_s=3600)
        with pytest.raises(StoreLocked):
            contender.acquire(wait_s=1.5)
        assert not holder.lost()
        assert lock_on_disk(loc)["beat"] >= 5  # it did beat while the contender watched

        # once the holder stalls (no more beats), the same contender takes over within stale_after_s
        holder._stop.set()
        holder._thread.join(2)
        t0 = time.monotonic()
        contender.acquire(wait_s=3.0)
        assert time.monotonic() - t0 < 3.0
        assert holder.lost() and not contender.lost()
        contender.release()
    finally:
        holder.release()


# -- empty and unreadable lock files --------------------------------------------------------------------------

CORRUPT = [b"", b"{not json", b"[1, 2]", b'{"token": "only-a-token"}']
CORRUPT_IDS = ["empty", "not-json", "not-an-object", "missing-fields"]


@pytest.mark.parametrize("raw", CORRUPT[:2], ids=CORRUPT_IDS[:2])
def test_a_corrupt_lock_goes_stale_once_unchanged_for_stale_after_s(tmp_path, raw):
    loc = Location(str(tmp_path / "store"))
    write_lock(loc, raw=raw)
    future = time.time() + 3600  # mtime ahead: only watching the content unchanged can make it stale
    os.utime(loc.path(layout.LOCK), (future, future))
    lock = StoreLock(loc, stale_after_s=0.5, heartbeat_s=3600)
    t0 = time.monotonic()
    lock.acquire(wait_s=2.5)
    try:
        assert time.monotonic() - t0 >= 0.5, "taken over before it was watched unchanged for stale_after_s"
        assert lock_on_disk(loc)["token"] == lock.token
    finally:
        lock.release()


@pytest.mark.parametrize("raw", CORRUPT, ids=CORRUPT_IDS)
def test_a_corrupt_lock_written_long_ago_is_taken_over_at_once(tmp_path, raw):
    loc = Location(str(tmp_path / "store"))
    write_lock(loc, raw=raw)
    past = time.time() - 3600
    os.utime(loc.path(layout.LOCK), (past, past))
    lock = StoreLock(loc, stale_after_s=0.5, heartbeat_s=3600)
    t0 = time.monotonic()
    lock.acquire(wait_s=0)
    try:
        assert time.monotonic() - t0 < 0.5
        assert lock_on_disk(loc)["token"] == lock.token
    finally:
        lock.release()


@pytest.mark.parametrize("raw", CORRUPT, ids=CORRUPT_IDS)
def test_a_fresh_corrupt_lock_is_refused_when_the_wait_is_shorter_than_stale_after_s(tmp_path, raw):
    loc = Location(str(tmp_path / "store"))
    write_lock(loc, raw=raw)
    t0 = time.monotonic()
    with pytest.raises(StoreLocked, match="--lock-wait"):
        StoreLock(loc, stale_after_s=5, heartbeat_s=3600).acquire(wait_s=0.2)
    assert time.monotonic() - t0 < 2
    assert loc.read_bytes(layout.LOCK) == raw  # refused without touching it


def test_a_lock_with_a_non_integer_pid_is_treated_as_unreadable(tmp_path):
    loc = Location(str(tmp_path / "store"))
    me = this_process()
    write_lock(loc, raw=json.dumps({"token": "weird", "host": me.host, "pid": "not-a-pid"}).encode())
    lock = StoreLock(loc, stale_after_s=0.3, heartbeat_s=3600)
    lock.acquire(wait_s=1.5)
    lock.release()


# -- who holds the lock: host, boot id, pid namespace, pid and its start time --------------------------------


def other_process(**changes) -> LockRecord:
    """A lock record of a process on this host (same boot id and pid namespace unless changed)."""
    return replace(this_process(), token="other", beat=7, heartbeat=time.time(), **changes)


@pytest.mark.parametrize(
    "changes",
    [
        {"pid_namespace": "pid:[4026599999]"},
        {"boot_id": "00000000-0000-0000-0000-000000000000"},
        {"host": "some-other-host"},
    ],
    ids=["other-pid-namespace", "other-boot", "other-host"],
)
def test_a_dead_pid_elsewhere_is_not_a_dead_holder(tmp_path, changes):
    loc = Location(str(tmp_path / "store"))
    write_lock(loc, other_process(pid=DEAD_PID, pid_start="12345", **changes))
    with pytest.raises(StoreLocked, match="--lock-wait"):
        StoreLock(loc, stale_after_s=30, heartbeat_s=3600).acquire(wait_s=0)
    assert lock_on_disk(loc)["token"] == "other"


def test_a_dead_pid_of_this_machine_and_namespace_is_taken_over_at_once(tmp_path):
    loc = Location(str(tmp_path / "store"))
    me = this_process()
    assert me.host == socket.gethostname() and me.pid == os.getpid()
    write_lock(loc, other_process(pid=DEAD_PID, pid_start="12345"))
    lock = StoreLock(loc, stale_after_s=30, heartbeat_s=3600).acquire(wait_s=0)
    try:
        assert lock_on_disk(loc)["token"] == lock.token
    finally:
        lock.release()


@pytest.mark.skipif(not os.path.exists(f"/proc/{os.getpid()}/stat"), reason="needs /proc")
def test_a_live_pid_with_another_start_time_is_a_reused_pid(tmp_path):
    loc = Location(str(tmp_path / "store"))
    me = this_process()
    assert me.pid_start  # /proc said when this process started

    # the record names this (live) process exactly: a live holder, not taken over
    write_lock(loc, other_process())
    with pytest.raises(StoreLocked):
        StoreLock(loc, stale_after_s=30, heartbeat_s=3600).acquire(wait_s=0)

    # the same pid, started at another time: that process is gone, the pid was reused
    write_lock(loc, other_process(pid_start=str(int(me.pid_start) + 1)))
    lock = StoreLock(loc, stale_after_s=30, heartbeat_s=3600).acquire(wait_s=0)
    try:
        assert lock_on_disk(loc)["token"] == lock.token
    finally:
        lock.release()


# -- the lease: a job that lost its lock cannot commit --------------------------------------------------------


def takeover_by_acquire(loc: Location) -> StoreLock:
    return StoreLock(Location(loc.url), stale_after_s=0, heartbeat_s=3600).acquire(wait_s=0)


def takeover_by_write(loc: Location) -> LockRecord:
    b = replace(this_process(), token="jobb0000000000bb")
    write_lock(loc, b)
    return b


@pytest.mark.parametrize("how", ["acquire", "write"])
def test_a_job_that_lost_its_lock_cannot_commit(tmp_path, how):
    loc = Location(str(tmp_path / "store"))
    a = StoreLock(loc, stale_after_s=60, heartbeat_s=0.05).acquire()
    b_lock = None
    try:
        task = ShardTask("/corpus/x.tar", layout.segment_name("/corpus/x.tar"), SourceVersion(1, "v"), job_id=a.token)
        check_lease(loc, task.job_id)  # a holds the store and is running: commits allowed
        assert not a.lost()

        if how == "acquire":
            b_lock = takeover_by_acquire(loc)
            b_token = b_lock.token
        else:
            b_token = takeover_by_write(loc).token
        assert b_token != a.token

        with pytest.raises(LeaseLost, match=b_token):
            check_lease(loc, task.job_id)
        check_lease(loc, b_token)

        assert a.lost()
        a._thread.join(3)  # a's next beat fails its compare-and-swap: the heartbeat stops
        assert not a._thread.is_alive(), "the old holder kept beating over the new holder's lock"
        assert lock_on_disk(loc)["token"] == b_token
        with pytest.raises(StoreLocked, match="lost the lock"):
            a.check()
        with pytest.raises(StoreLocked):
            a.close_commits()
        assert lock_on_disk(loc)["token"] == b_token and lock_on_disk(loc)["phase"] == "running"
    finally:
        a.release()
    # a's release did not delete b's lock
    assert lock_on_disk(loc)["token"] == b_token
    check_lease(loc, b_token)
    if b_lock is not None:
        assert not b_lock.lost()
        b_lock.release()
        assert not os.path.exists(loc.path(layout.LOCK))


def test_no_commits_once_finalizing_even_while_the_heartbeat_goes_on(tmp_path):
    loc = Location(str(tmp_path / "store"))
    a = StoreLock(loc, stale_after_s=60, heartbeat_s=0.05).acquire()
    try:
        check_lease(loc, a.token)
        a.close_commits()
        with pytest.raises(LeaseLost, match="finalizing"):
            check_lease(loc, a.token)
        beat = lock_on_disk(loc)["beat"]
        assert wait_until(lambda: lock_on_disk(loc)["beat"] >= beat + 3)
        assert lock_on_disk(loc)["phase"] == "finalizing"  # heartbeats keep the phase
        with pytest.raises(LeaseLost, match="finalizing"):
            check_lease(loc, a.token)
        assert not a.lost()
        a.check()
    finally:
        a.release()
    assert not os.path.exists(loc.path(layout.LOCK))
    with pytest.raises(LeaseLost):
        check_lease(loc, a.token)  # no lock at all: no lease either


# -- many processes, a fresh store ----------------------------------------------------------------------------


def test_eight_processes_race_for_a_fresh_store(tmp_path):
    """8 processes race for the lock of a store that does not exist yet; the losers race again (after a short
    random pause) each time it is released, until each has held it once: never two holders at a time."""
    store = str(tmp_path / "store")  # fresh: no folder, no lock, nothing stale to break
    out = str(tmp_path / "holds.jsonl")
    n = 8
    ctx = mp.get_context("spawn")
    barrier = ctx.Barrier(n)
    procs = [ctx.Process(target=turn_taking_contender, args=(store, barrier, out, 0.15, 30)) for _ in range(n)]
    for p in procs:
        p.start()
    try:
        for p in procs:
            p.join(60)
            assert p.exitcode == 0, f"a contender failed (exit code {p.exitcode})"
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
    with open(out) as f:
        holds = sorted((json.loads(line) for line in f), key=lambda h: h[0])
    assert len(holds) == n
    assert all(alone for _, _, alone, _, _ in holds), f"a holder saw another token in the lock: {holds}"
    assert len({token for _, _, _, token, _ in holds}) == n
    assert sum(refusals for *_, refusals in holds) >= n - 1  # they did contend
    for (_, e1, *_), (s2, *_) in zip(holds, holds[1:]):
        assert s2 >= e1, f"two holders at once: {holds}"
    assert not os.path.exists(os.path.join(store, "_lock"))
