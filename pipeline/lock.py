"""One job per store at a time.

A job holds ``STORE/_lock`` while it plans, writes and finalizes. On local
disk the lock is created with O_EXCL (atomic). It records host, pid and a
heartbeat that the holder refreshes; a lock is stale (and taken over, with a
warning) when its process is gone on this host, or when its heartbeat is
older than ``stale_after_s`` (a holder on another machine that died).

Object stores (s3://, gs://): most have no create-if-absent, so two jobs
started within the same second may both take the lock. There the lock is a
courtesy, not a guarantee: launch one job per store (commit records and the
one-writer-per-segment rule still keep the data consistent; only the index
generation could be written twice, and the later one wins, still complete).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time

from edje_indexer.schemas import layout
from edje_indexer.schemas.storage import Location

log = logging.getLogger(__name__)


class StoreLocked(RuntimeError):
    pass


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class StoreLock:
    def __init__(self, loc: Location, stale_after_s: float = 600.0, heartbeat_s: float = 30.0):
        self.loc = loc
        self.stale_after_s = stale_after_s
        self.heartbeat_s = heartbeat_s
        self.info = {"host": socket.gethostname(), "pid": os.getpid(), "token": os.urandom(8).hex()}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _payload(self) -> bytes:
        return json.dumps({**self.info, "heartbeat": time.time()}).encode()

    def _is_stale(self, other: dict) -> str | None:
        if other.get("host") == self.info["host"] and not _alive(int(other.get("pid", -1))):
            return f"its process {other.get('pid')} on this host is gone"
        age = time.time() - float(other.get("heartbeat", 0))
        if age > self.stale_after_s:
            return f"its heartbeat is {age:.0f}s old"
        return None

    def _try_create(self) -> bool:
        path = self.loc.path(layout.LOCK)
        if self.loc.is_local:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                return False
            with os.fdopen(fd, "wb") as f:
                f.write(self._payload())
            return True
        if self.loc.exists(layout.LOCK):
            return False
        self.loc.fs.pipe_file(path, self._payload())
        return True

    def acquire(self, wait_s: float = 0.0) -> StoreLock:
        deadline = time.monotonic() + wait_s
        while True:
            if self._try_create():
                break
            try:
                other = json.loads(self.loc.read_bytes(layout.LOCK))
            except (FileNotFoundError, json.JSONDecodeError):
                other = None  # being created or removed right now: look again
            if other is not None:
                why = self._is_stale(other)
                if why and self._break(other):
                    log.warning("took over a stale lock on %s (%s)", self.loc.url, why)
                    continue
            if time.monotonic() >= deadline:
                holder = f"{other.get('host')} pid {other.get('pid')}" if other else "another job"
                raise StoreLocked(
                    f"store {self.loc.url} is being written by {holder}; wait for it to finish or pass "
                    f"--lock-wait SECONDS (if that job is dead, its lock goes stale after {self.stale_after_s:.0f}s)"
                )
            time.sleep(min(1.0, max(0.0, deadline - time.monotonic())))
        self._thread = threading.Thread(target=self._beat, daemon=True, name="store-lock-heartbeat")
        self._thread.start()
        return self

    def _break(self, stale: dict) -> bool:
        """Remove the stale lock ``stale``, and only it.

        Locally the lock is first renamed to a name of our own (atomic: of
        several contenders exactly one gets it), then checked to be the stale
        one we judged; if another job had just replaced it, it is put back.
        """
        if not self.loc.is_local:
            self.loc.remove(layout.LOCK)
            return True
        path = self.loc.path(layout.LOCK)
        mine = f"{path}.breaking-{self.info['token']}"
        try:
            os.rename(path, mine)
        except FileNotFoundError:
            return False  # someone else broke it first
        with open(mine, "rb") as f:
            taken = json.loads(f.read() or b"{}")
        if taken.get("token") == stale.get("token"):
            os.remove(mine)
            return True
        try:  # a live lock: give it back unless a third job holds the name now
            os.link(mine, path)
        except FileExistsError:
            pass
        os.remove(mine)
        return False

    def lost(self) -> bool:
        """True if the lock file is no longer ours (taken over while we were stalled)."""
        try:
            return json.loads(self.loc.read_bytes(layout.LOCK)).get("token") != self.info["token"]
        except (FileNotFoundError, json.JSONDecodeError):
            return True

    def check(self) -> None:
        """Raise before a store-level write if another job owns the store now."""
        if self.lost():
            raise StoreLocked(
                f"lost the lock on {self.loc.url} (this job stalled past {self.stale_after_s:.0f}s "
                "and another job took over); run the command again"
            )

    def _beat(self):
        while not self._stop.wait(self.heartbeat_s):
            if self.lost():
                log.error(
                    "the store lock on %s was taken over by another job; this job will stop before its finalize step",
                    self.loc.url,
                )
                return
            try:
                self.loc.write_bytes_atomic(self._payload(), layout.LOCK)
            except OSError as e:
                log.warning("could not refresh the store lock: %s", e)

    def release(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join()
        try:
            other = json.loads(self.loc.read_bytes(layout.LOCK))
            if other.get("token") == self.info["token"]:
                self.loc.remove(layout.LOCK)
        except FileNotFoundError:
            pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()
