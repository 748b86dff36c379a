"""One job per store at a time, and the lease its workers commit under.

A job holds ``STORE/_lock`` (a :class:`schemas.records.LockRecord`) while it
plans, writes and finalizes. The lock is created, refreshed, taken over and
released with compare-and-swap writes (schemas/storage.py): of several
contenders exactly one wins, and a holder whose lock was taken over finds out
at its next heartbeat instead of overwriting the new holder's.

Its token is the job id: every worker checks, right before committing, that
the lock still carries it and still accepts commits (schemas/segment.py
``check_lease``), so a job that lost its lock, or a zombie worker of a job
that is finalizing, cannot commit. Before the finalize step the holder flips
the lock to ``phase = "finalizing"`` (:meth:`StoreLock.close_commits`).

A lock is stale, and taken over with a warning, when

* its holder is a process on this machine that is gone: same host name, boot
  id and pid namespace, and no live process with that pid and start time (a
  pid alone is ambiguous: containers share host names and pids); or
* its content did not change while this contender watched it for
  ``stale_after_s`` on its own monotonic clock (heartbeats of a live holder
  change it every ``heartbeat_s``; the clocks of other hosts are never
  compared); on local disk also when the file was last written more than
  ``stale_after_s`` ago by this machine's clock. An empty or unreadable lock
  file goes stale the same way.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import replace

from edje_indexer.schemas import layout
from edje_indexer.schemas.records import LockRecord
from edje_indexer.schemas.storage import Location

log = logging.getLogger(__name__)


class StoreLocked(RuntimeError):
    pass


def _read_first_line(path: str) -> str:
    try:
        with open(path) as f:
            return f.readline().strip()
    except OSError:
        return ""


def _pid_namespace() -> str:
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return ""


def _pid_start(pid: int) -> str:
    """The start time of process ``pid`` (clock ticks since boot), or "" where /proc cannot say."""
    stat = _read_first_line(f"/proc/{pid}/stat")
    if not stat:
        return ""
    return stat.rsplit(")", 1)[-1].split()[19]  # field 22 counts from the pid; fields after the command name


def _alive(pid: int, start: str) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    now = _pid_start(pid)
    return not (start and now and now != start)  # a reused pid is another process


def this_process() -> LockRecord:
    """A lock record naming this process, with a fresh token."""
    return LockRecord(
        token=uuid.uuid4().hex[:16],
        host=socket.gethostname(),
        pid=os.getpid(),
        boot_id=_read_first_line("/proc/sys/kernel/random/boot_id"),
        pid_namespace=_pid_namespace(),
        pid_start=_pid_start(os.getpid()),
    )


class StoreLock:
    def __init__(self, loc: Location, stale_after_s: float = 600.0, heartbeat_s: float = 30.0):
        self.loc = loc
        self.stale_after_s = stale_after_s
        self.heartbeat_s = heartbeat_s
        self.record = this_process()
        self._version: str | None = None  # of the lock content we wrote last
        self._write_lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def token(self) -> str:
        """The job id (ShardTask.job_id) that workers' commits check."""
        return self.record.token

    def _payload(self, record: LockRecord) -> bytes:
        return json.dumps(record.to_json(), sort_keys=True).encode()

    def _holder_gone(self, other: LockRecord) -> str | None:
        me = self.record
        same_machine = (
            other.host == me.host
            and (not other.boot_id or other.boot_id == me.boot_id)
            and (not other.pid_namespace or other.pid_namespace == me.pid_namespace)
        )
        if same_machine and not _alive(int(other.pid), other.pid_start):
            return f"its process {other.pid} on this host is gone"
        return None

    def _local_age(self) -> float | None:
        if not self.loc.is_local:
            return None
        try:
            return time.time() - os.stat(self.loc.path(layout.LOCK)).st_mtime
        except OSError:
            return None

    def acquire(self, wait_s: float = 0.0) -> StoreLock:
        deadline = time.monotonic() + wait_s
        watched: tuple[str | None, float] | None = None  # (version seen, when first seen on our clock)
        other: LockRecord | None = None
        while True:
            mine = replace(self.record, beat=0, heartbeat=time.time())
            version = self.loc.write_if(self._payload(mine), layout.LOCK, expected=None)  # create-if-absent
            if version:
                break
            raw, seen = self.loc.read_versioned(layout.LOCK)
            if raw is None:
                continue  # released in between: try to create it again
            try:
                other = LockRecord.from_json(json.loads(raw))
            except ValueError:
                other = None  # empty or unreadable (a holder died while writing it)
            if watched is None or watched[0] != seen:
                watched = (seen, time.monotonic())
            why = self._holder_gone(other) if other else None
            unchanged = time.monotonic() - watched[1]
            age = self._local_age()
            if why is None and unchanged >= self.stale_after_s:
                why = f"it did not change for {unchanged:.0f} s"
            if why is None and age is not None and age >= self.stale_after_s:
                why = f"it was last written {age:.0f} s ago"
            if why:
                version = self.loc.write_if(self._payload(mine), layout.LOCK, expected=seen)
                if version:
                    log.warning("took over a stale lock on %s (%s)", self.loc.url, why)
                    break
                continue  # another contender took it first, or the holder beat: look again
            if time.monotonic() >= deadline:
                holder = f"{other.host} pid {other.pid} (job {other.token})" if other else "another job"
                raise StoreLocked(
                    f"store {self.loc.url} is being written by {holder}; wait for it to finish or pass "
                    f"--lock-wait SECONDS (a lock whose holder is gone goes stale once it has not changed for "
                    f"{self.stale_after_s:.0f} s while a job waits for it)"
                )
            time.sleep(min(1.0, max(0.01, deadline - time.monotonic())))
        self.record, self._version = mine, version
        self._thread = threading.Thread(target=self._beat, daemon=True, name="store-lock-heartbeat")
        self._thread.start()
        return self

    def _rewrite(self, **changes) -> bool:
        """Replace our lock content (compare-and-swap on the content we wrote); False if it is not ours."""
        with self._write_lock:
            new = replace(self.record, **changes)
            version = self.loc.write_if(self._payload(new), layout.LOCK, expected=self._version)
            if not version:
                # An earlier write may have landed although it raised (a lost reply): then the lock still
                # carries our token at another version, and the swap is tried again from there.
                raw, current = self.loc.read_versioned(layout.LOCK)
                try:
                    ours = raw is not None and LockRecord.from_json(json.loads(raw)).token == self.token
                except ValueError:
                    ours = False
                if not ours:
                    return False
                version = self.loc.write_if(self._payload(new), layout.LOCK, expected=current)
                if not version:
                    return False
            self.record, self._version = new, version
            return True

    def lost(self) -> bool:
        """True if the lock file is no longer ours (taken over while we were stalled)."""
        raw, _ = self.loc.read_versioned(layout.LOCK)
        try:
            return raw is None or LockRecord.from_json(json.loads(raw)).token != self.token
        except ValueError:
            return True

    def check(self) -> None:
        """Raise before a store-level write if another job owns the store now."""
        if self.lost():
            raise StoreLocked(
                f"lost the lock on {self.loc.url} (this job stalled past {self.stale_after_s:.0f}s "
                "and another job took over); run the command again"
            )

    def close_commits(self) -> None:
        """From now on no worker of this job may commit (the finalize step may then clean up safely)."""
        if not self._rewrite(phase="finalizing"):
            self.check()
            raise StoreLocked(f"could not mark the lock on {self.loc.url} as finalizing; run the command again")

    def _beat(self):
        while not self._stop.wait(self.heartbeat_s):
            try:
                if not self._rewrite(beat=self.record.beat + 1, heartbeat=time.time()):
                    log.error(
                        "the store lock on %s was taken over by another job; this job's workers can no "
                        "longer commit and it will stop before its finalize step",
                        self.loc.url,
                    )
                    return
            except (OSError, ValueError) as e:  # a transient error: the next beat tries again
                log.warning("could not refresh the store lock on %s: %s", self.loc.url, e)

    def release(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join()
        with self._write_lock:
            if self._version is not None:
                self.loc.remove_if(layout.LOCK, expected=self._version)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()
