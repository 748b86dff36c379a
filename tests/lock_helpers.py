"""Process bodies for the store-lock races of test_lock_robust.py (module functions: spawn pickles them by name)."""

from __future__ import annotations

import json
import os
import random
import time

from edje_indexer.pipeline.lock import StoreLock, StoreLocked
from edje_indexer.schemas.storage import Location


def turn_taking_contender(store: str, barrier, out: str, hold_s: float, deadline_s: float) -> None:
    """Race for the lock of ``store`` (``acquire(wait_s=0)``, again after a short random pause while another
    process holds it) until this process has held it once for ``hold_s``, checking all along that it stays ours.

    Appends one JSON line to ``out``: ``[t0, t1, alone, token, refusals]``. ``[t0, t1]`` lies inside the real
    hold (t0 after acquire returned, t1 before release started), so two recorded holds overlap only if two
    processes really held the lock at once.
    """
    rng = random.Random(os.getpid())
    barrier.wait()
    give_up = time.monotonic() + deadline_s
    refusals = 0
    while True:
        try:
            lock = StoreLock(Location(store), heartbeat_s=0.05).acquire(wait_s=0)
            break
        except StoreLocked:
            refusals += 1
            if time.monotonic() > give_up:
                raise
            time.sleep(rng.uniform(0.005, 0.05))
    t0 = time.time()
    alone = True
    while time.time() < t0 + hold_s:
        with open(os.path.join(store, "_lock"), "rb") as f:
            alone &= json.loads(f.read())["token"] == lock.token
        time.sleep(0.02)
    alone &= not lock.lost()
    t1 = time.time()
    lock.release()
    with open(out, "a") as f:
        f.write(json.dumps([t0, t1, alone, lock.token, refusals]) + "\n")
