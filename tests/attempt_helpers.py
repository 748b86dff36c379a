"""Attempts of one shard started by the tests themselves, in other processes (spawn, dask workers).

Module-level functions, so that multiprocessing and dask can pickle them by name
(tests/ is on sys.path: setup.cfg), plus the fault-injecting fsspec filesystem.
"""

from __future__ import annotations

import os
import signal
import time

import fsspec
from fsspec.implementations.local import LocalFileSystem

from edje_indexer.pipeline.plan import fingerprint
from edje_indexer.pipeline.presets import PRESETS
from edje_indexer.schemas import layout
from edje_indexer.schemas.records import ShardTask
from edje_indexer.schemas.segment import SegmentWriter
from edje_indexer.schemas.storage import Location
from edje_indexer.schemas.store import open_metadata
from edje_indexer.transforms.index_shards import shared_encoder
from edje_indexer.transforms.indexer import IndexSettings, index_shard


def task_for(store: str, shard: str, job_id: str = "") -> ShardTask:
    """The task a job would plan for ``shard`` on a store where it is not committed yet."""
    return ShardTask(shard, layout.segment_name(shard), fingerprint(shard), job_id=job_id)


def wait_for_files(paths: list[str], timeout_s: float = 120.0) -> None:
    """A barrier across processes: create our file, wait until every file of ``paths`` exists."""
    deadline = time.monotonic() + timeout_s
    while not all(os.path.exists(p) for p in paths):
        if time.monotonic() > deadline:
            raise TimeoutError(f"barrier: {paths} did not all appear")
        time.sleep(0.02)


def run_attempt(
    store: str,
    task: ShardTask,
    barrier: list[str] | None = None,
    me: str | None = None,
    kill_in_write_marker: str | None = None,
) -> dict:
    """One attempt of ``task`` in this process: index_shard with the tiny model.

    ``barrier``/``me``: after writing its data, the attempt creates file ``me``
    and waits for every file in ``barrier`` before committing (so two
    attempts race for the commit). ``kill_in_write_marker``: if that file does
    not exist yet, create it and SIGKILL this process half-way through writing
    the token data (once: a retry of the task then runs normally).
    """
    loc = Location(store)
    writer = SegmentWriter(loc, open_metadata(loc))
    if barrier:
        original = writer.commit

        def commit_after_barrier(t, record):
            open(me, "w").close()
            wait_for_files(barrier)
            return original(t, record)

        writer.commit = commit_after_barrier
    if kill_in_write_marker and not os.path.exists(kill_in_write_marker):
        original_arrays = writer._write_arrays

        def die_while_writing(data_path, data):
            open(kill_in_write_marker, "w").close()
            half = type(data)(
                data.ids[: len(data.ids) // 2],
                data.values[: len(data.ids) // 2],
                None if data.scales is None else data.scales[: len(data.ids) // 2],
            )
            original_arrays(data_path, half)  # some chunk files are on disk now
            os.kill(os.getpid(), signal.SIGKILL)

        writer._write_arrays = die_while_writing
    settings = IndexSettings(batch_size=4, decode_threads=1)
    encoder = shared_encoder(PRESETS["tiny"], settings, writer.metadata.quantization)
    rec = index_shard(task, encoder, writer, settings)
    return {"data_path": rec.data_path, "pid": os.getpid(), "attempt": getattr(rec, "attempt", None)}


class _DroppingFile:
    """A file object whose reads fail like a dropped connection after ``after`` bytes."""

    def __init__(self, f, after: int):
        self._f, self._left = f, after

    def read(self, n=-1):
        if self._left <= 0:
            raise ConnectionResetError(104, "Connection reset by peer (injected by the test)")
        b = self._f.read(n if n is not None and 0 <= n <= self._left else self._left)
        self._left -= len(b)
        return b

    def __getattr__(self, name):
        return getattr(self._f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._f.close()


class FlakyFileSystem(LocalFileSystem):
    """``flaky:///abs/path``: local files whose first read connection drops part-way (per file, once).

    The first ``open`` of each file leaves a ``<file>.dropped`` marker and returns a file
    that fails after ``DROP_AFTER`` bytes; later opens read normally."""

    protocol = "flaky"
    DROP_AFTER = 3000

    @classmethod
    def _strip_protocol(cls, path):
        if isinstance(path, str) and path.startswith("flaky://"):
            path = path[len("flaky://") :]
        return super()._strip_protocol(path)

    def _open(self, path, mode="rb", **kwargs):
        f = super()._open(path, mode, **kwargs)
        marker = self._strip_protocol(path) + ".dropped"
        if "r" in mode and not os.path.exists(marker):
            open(marker, "w").close()
            return _DroppingFile(f, self.DROP_AFTER)
        return f


def register_flaky_filesystem() -> None:
    fsspec.register_implementation("flaky", FlakyFileSystem, clobber=True)
