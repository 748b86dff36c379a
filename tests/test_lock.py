"""The store lock under contention: at most one holder, also when a stale lock is broken."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import socket
import time

from helpers import lock_contender

from edje_indexer.pipeline.lock import StoreLock, StoreLocked
from edje_indexer.schemas.storage import Location


def test_one_holder_when_several_jobs_break_a_stale_lock(tmp_path):
    store = str(tmp_path / "store")
    os.makedirs(store)
    out = str(tmp_path / "holders.jsonl")
    ctx = mp.get_context("spawn")
    for trial in range(3):
        with open(os.path.join(store, "_lock"), "w") as f:  # left by a dead process on this host
            json.dump(
                {"host": socket.gethostname(), "pid": 2**22 + 999, "token": f"dead{trial}", "heartbeat": time.time()}, f
            )
        barrier = ctx.Barrier(6)
        procs = [ctx.Process(target=lock_contender, args=(store, barrier, out)) for _ in range(6)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(60)
            assert p.exitcode == 0
    holds = sorted(json.loads(line) for line in open(out))
    assert len(holds) >= 3  # somebody got it each trial
    assert all(alone for _, _, alone in holds)
    for (_, e1, _), (s2, _, _) in zip(holds, holds[1:]):
        assert s2 >= e1 - 0.01, f"two holders at once: {holds}"


def test_a_stalled_holder_notices_the_takeover(tmp_path):
    loc = Location(str(tmp_path))
    a = StoreLock(loc, stale_after_s=0.2, heartbeat_s=3600).acquire()
    time.sleep(0.3)  # a's heartbeat is now older than stale_after_s
    b = StoreLock(loc, stale_after_s=0.2, heartbeat_s=3600).acquire()
    assert a.lost() and not b.lost()
    try:
        a.check()
        raise AssertionError("check() must raise")
    except StoreLocked as e:
        assert "lost the lock" in str(e)
    a.release()  # must not remove b's lock
    assert not b.lost()
    b.release()
    assert not os.path.exists(tmp_path / "_lock")
