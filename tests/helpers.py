"""Small builders the tests share (tests/ is on pytest's pythonpath; see setup.cfg)."""

from __future__ import annotations

import io
import json
import tarfile
import time

from PIL import Image

from edje_indexer.pipeline.lock import StoreLock, StoreLocked
from edje_indexer.schemas.storage import Location


def image_bytes(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def write_tar(path, members: list[tuple[str, bytes]]) -> str:
    """A tar with exactly these members, in this order."""
    with tarfile.open(path, "w") as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mtime = 0
            tf.addfile(info, io.BytesIO(data))
    return str(path)


def lock_contender(store: str, barrier, out: str, hold_s: float = 0.5) -> None:
    """One of several processes racing for a store lock (a module function: spawn pickles it by name)."""
    barrier.wait()
    try:
        lock = StoreLock(Location(store)).acquire(wait_s=0)
    except StoreLocked:
        return
    t0 = time.time()
    time.sleep(hold_s)
    held_alone = not lock.lost()
    lock.release()
    with open(out, "a") as f:
        f.write(json.dumps([t0, time.time(), held_alone]) + "\n")
