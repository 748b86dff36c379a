"""Every attempt harmless: retries, duplicate attempts, transient errors, cleanup during an attempt.

Runners execute a shard at least once: a retry after a failure, a second copy
started speculatively, a worker that lost its lease and keeps running. These
tests start such attempts themselves (threads, spawned processes) against a
real store and check that readers only ever see the committed tokens.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import os
import subprocess
import sys
import threading

import numpy as np
import pytest
from attempt_helpers import register_flaky_filesystem, run_attempt, task_for
from helpers import image_bytes, write_tar

from edje_indexer.pipeline.cli import main
from edje_indexer.pipeline.lock import StoreLock, StoreLocked
from edje_indexer.pipeline.maintenance import remove_uncommitted
from edje_indexer.pipeline.presets import PRESETS
from edje_indexer.schemas import TokenStore, layout, read_commits
from edje_indexer.schemas.segment import LeaseLost, SegmentWriter
from edje_indexer.schemas.storage import Location
from edje_indexer.schemas.store import create_or_check, new_metadata, open_metadata
from edje_indexer.transforms import indexer
from edje_indexer.transforms.index_shards import shared_encoder
from edje_indexer.transforms.indexer import IndexSettings, index_shard, index_shard_retrying
from edje_indexer.transforms.model import shared_model

TINY = ["--preset", "tiny"]
SETTINGS = IndexSettings(batch_size=4, decode_threads=1)


@pytest.fixture
def shard(tmp_path, photos):
    """One shard of 10 real photos (several batches, a few kB each)."""
    members = [(f"img{i:02d}.jpg", image_bytes(photos[i % len(photos)][1].rotate(7 * i), "JPEG")) for i in range(10)]
    return write_tar(tmp_path / "shard-000000.tar", members)


def new_store(path) -> tuple[Location, SegmentWriter]:
    loc = Location(str(path))
    meta = create_or_check(loc, new_metadata(shared_model(PRESETS["tiny"]).identity, "fp16", "key"))
    return loc, SegmentWriter(loc, meta)


def encoder():
    return shared_encoder(PRESETS["tiny"], SETTINGS, "fp16")


def tree(store) -> dict[str, str]:
    """Every file of the store and its sha256 (lock and CAS bookkeeping aside)."""
    out = {}
    for root, _, files in os.walk(store):
        for f in files:
            p = os.path.join(root, f)
            rel = os.path.relpath(p, store)
            if not rel.startswith((".cas", "_lock")):
                out[rel] = hashlib.sha256(open(p, "rb").read()).hexdigest()
    return out


def data_folders(store) -> list[str]:
    return sorted(n for n in os.listdir(os.path.join(store, layout.SEGMENTS)) if n != "zarr.json")


def test_a_retry_of_a_committed_shard_returns_the_commit_without_writing(tmp_path, shard):
    loc, writer = new_store(tmp_path / "store")
    task = task_for(loc.url, shard)
    first = index_shard(task, encoder(), writer, SETTINGS)
    before = tree(loc.url)
    again = index_shard(task, encoder(), writer, SETTINGS)
    assert again == first and tree(loc.url) == before


def test_two_attempts_at_once_exactly_one_commit_wins(tmp_path, shard):
    """Both attempts write their data, then race for the commit: one wins, the other removes only its own."""
    loc, writer = new_store(tmp_path / "store")
    task = task_for(loc.url, shard)
    ctx = mp.get_context("spawn")
    marks = [str(tmp_path / f"ready-{i}") for i in range(2)]
    with ctx.Pool(2) as pool:
        results = pool.starmap(run_attempt, [(loc.url, task, marks, marks[i]) for i in range(2)])
    assert results[0]["pid"] != results[1]["pid"]
    assert results[0]["data_path"] == results[1]["data_path"]  # both report the one winner
    (winner,) = read_commits(loc).values()
    assert winner.data_path == results[0]["data_path"]
    assert data_folders(loc.url) == [winner.data_path.rsplit("/", 1)[1]]  # the loser's folder is gone
    assert sorted(os.listdir(os.path.join(loc.url, layout.REJECTED))) == [layout.rejected_path(winner.data_path)[1]]
    ts = TokenStore.open(loc.url)
    assert len(ts) == 10 and ts.get(ts.ids()).shape == (10, 64, 384)


def test_an_attempt_killed_mid_write_never_touches_committed_tokens(tmp_path, shard):
    """A second attempt of a committed shard (one that started before the commit landed) is killed while
    writing: readers keep getting the committed tokens, and cleanup removes only the dead attempt's data."""
    store = str(tmp_path / "store")
    assert main(["index", "--input", shard, "--store", store, *TINY]) == 0
    ts = TokenStore.open(store)
    ids = ts.ids()
    committed = ts.get(ids).copy()
    before = tree(store)
    task = task_for(store, os.path.abspath(shard))
    code = (
        "import sys; from attempt_helpers import run_attempt; import edje_indexer.schemas.segment as s\n"
        "s.SegmentWriter.committed = lambda self, task: None  # it started before the commit landed\n"
        f"run_attempt({store!r}, __import__('pickle').loads(bytes.fromhex({_pickled(task)!r})), "
        f"kill_in_write_marker={str(tmp_path / 'killed')!r})\n"
    )
    env = {**os.environ, "PYTHONPATH": os.path.dirname(__file__)}
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert os.path.exists(tmp_path / "killed")
    assert len(data_folders(store)) == 2  # the dead attempt left half a folder beside the committed one
    np.testing.assert_array_equal(TokenStore.open(store).get(ids), committed)  # readers: untouched
    assert {k: v for k, v in tree(store).items() if k in before} == before  # no committed byte changed
    assert main(["verify", store, "--repair"]) == 0
    assert tree(store) == before
    np.testing.assert_array_equal(TokenStore.open(store).get(ids), committed)


def _pickled(obj) -> str:
    import pickle

    return pickle.dumps(obj).hex()


def test_cleanup_while_an_attempt_writes_stops_that_attempt_from_committing(tmp_path, shard, monkeypatch):
    """The finalize step closes the job's lease before it removes leftovers, so an attempt that was still
    writing cannot commit a segment whose data was removed under it."""
    loc, writer = new_store(tmp_path / "store")
    lock = StoreLock(loc).acquire()
    try:
        task = task_for(loc.url, shard, job_id=lock.token)
        written, resume = threading.Event(), threading.Event()
        original = writer._write_arrays

        def slow_write(data_path, data):
            out = original(data_path, data)
            written.set()
            assert resume.wait(60)
            return out

        monkeypatch.setattr(writer, "_write_arrays", slow_write)
        outcome = {}

        def attempt():
            try:
                outcome["record"] = index_shard(task, encoder(), writer, SETTINGS)
            except Exception as e:  # noqa: BLE001 -- the test inspects it
                outcome["error"] = e

        t = threading.Thread(target=attempt)
        t.start()
        assert written.wait(60)
        lock.close_commits()  # what the finalize step does first
        removed = remove_uncommitted(loc, read_commits(loc))
        assert any(r.startswith(layout.SEGMENTS) for r in removed)  # the running attempt's folder
        resume.set()
        t.join(60)
    finally:
        lock.release()
    assert isinstance(outcome.get("error"), (LeaseLost, RuntimeError)) and "record" not in outcome
    assert read_commits(loc) == {}  # nothing committed that names missing data
    assert len(TokenStore.open(loc.url)) == 0


def test_repair_refuses_while_a_job_holds_the_store(tmp_path, shard, capsys):
    store = str(tmp_path / "store")
    assert main(["index", "--input", shard, "--store", store, *TINY]) == 0
    with StoreLock(Location(store)).acquire():
        assert main(["verify", store, "--repair"]) == 2
    assert "is being written by" in capsys.readouterr().err


def test_a_job_that_lost_its_lock_does_not_commit(tmp_path, shard):
    loc, writer = new_store(tmp_path / "store")
    lock = StoreLock(loc).acquire()
    task = task_for(loc.url, shard, job_id=lock.token)
    other = StoreLock(loc)
    loc.write_bytes_atomic(json.dumps(other.record.to_json()).encode(), layout.LOCK)  # taken over
    with pytest.raises(LeaseLost, match="lost the lock"):
        index_shard(task, encoder(), writer, SETTINGS)
    assert read_commits(loc) == {} and data_folders(loc.url) == []  # its own data went with it
    lock.release()  # and it does not remove the new holder's lock
    assert json.loads(open(os.path.join(loc.url, layout.LOCK)).read())["token"] == other.token
    with pytest.raises(StoreLocked):
        StoreLock(loc).acquire()


def test_a_dropped_connection_fails_the_attempt_and_the_retry_commits_the_whole_shard(tmp_path, shard):
    """A transient read error part-way through a shard is not "the end of the shard"."""
    register_flaky_filesystem()
    url = "flaky://" + os.path.abspath(shard)
    loc, writer = new_store(tmp_path / "store")
    task = task_for(loc.url, url)
    with pytest.raises(OSError, match="Connection reset"):
        index_shard(task, encoder(), writer, SETTINGS)
    assert read_commits(loc) == {} and not os.path.exists(os.path.join(loc.url, layout.FAILED))
    rec = index_shard(task, encoder(), writer, SETTINGS)  # the runner's retry: a new attempt
    assert rec.complete and rec.indexed == 10 and rec.samples_read == 10
    assert len(TokenStore.open(loc.url)) == 10


def test_the_job_retries_a_dropped_connection_itself(tmp_path, shard, monkeypatch, capsys):
    register_flaky_filesystem()
    monkeypatch.setattr(indexer, "RETRY_WAIT_S", (0.01,))
    store = str(tmp_path / "store")
    url = "flaky://" + os.path.abspath(shard)
    assert main(["index", "--input", url, "--store", store, *TINY, "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["images_indexed"] == 10 and summary["shards_incomplete"] == []
    (rec,) = read_commits(Location(store)).values()
    assert rec.complete and rec.indexed == 10
    assert data_folders(store) == [rec.data_path.rsplit("/", 1)[1]]


def test_a_shard_that_keeps_failing_fails_the_job_without_a_commit(tmp_path, shard, monkeypatch):
    loc, writer = new_store(tmp_path / "store")
    calls = []

    def always_reset(*a, **k):
        calls.append(1)
        raise ConnectionResetError(104, "Connection reset by peer")

    monkeypatch.setattr(indexer, "index_shard", always_reset)
    settings = IndexSettings(batch_size=4, decode_threads=1, shard_attempts=3)
    with pytest.raises(ConnectionResetError):
        index_shard_retrying(task_for(loc.url, shard), encoder(), writer, settings, sleep=lambda s: None)
    assert len(calls) == 3 and read_commits(loc) == {}
    assert open_metadata(loc).quantization == "fp16"
