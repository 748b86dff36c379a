"""A real distributed engine: Beam's DaskRunner on a dask.distributed cluster of worker processes.

The scheduler and two workers are separate processes talking TCP on 127.0.0.1
(started here, stopped with the module). The job must give the store an
in-process FnApiRunner run gives, with the shards processed in the workers,
survive a worker SIGKILLed in the middle of a shard, and stay harmless under
duplicate attempts that the test starts on the workers itself.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import threading
import time

import distributed  # noqa: E402 -- a test dependency (apache-beam[dask]): missing is an error
import numpy as np
import pytest
from attempt_helpers import run_attempt, task_for
from helpers import image_bytes, write_tar

from edje_indexer.pipeline.cli import main
from edje_indexer.schemas import TokenStore, layout, read_commits
from edje_indexer.schemas.storage import Location

TINY = ["--preset", "tiny"]


@pytest.fixture(scope="module")
def cluster():
    with (
        distributed.LocalCluster(
            n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1", dashboard_address=None
        ) as c,
        distributed.Client(c) as client,
    ):
        yield c, client


@pytest.fixture(scope="module")
def shards(tmp_path_factory, photos):
    """4 shards of 12 photos: long enough (several batches) that a worker can be killed inside one."""
    folder = tmp_path_factory.mktemp("dask-corpus")
    for s in range(4):
        members = [
            (f"s{s}-{i:02d}.jpg", image_bytes(photos[(s + i) % len(photos)][1].rotate(5 * i + s), "JPEG"))
            for i in range(12)
        ]
        write_tar(folder / f"shard-{s:06d}.tar", members)
    return str(folder / "shard-{000000..000003}.tar")


def contents(store) -> dict[str, str]:
    ts = TokenStore.open(store)
    ids = ts.ids()
    values, _ = ts.get_raw(ids)
    assert ts.duplicates.num_rows == 0
    return {i: hashlib.sha256(v.tobytes()).hexdigest() for i, v in zip(ids, values)}


def verify_ok(store) -> dict:
    from edje_indexer.pipeline.verify import verify

    return verify(store, deep=True)


@pytest.fixture(scope="module")
def clean(tmp_path_factory, shards):
    store = str(tmp_path_factory.mktemp("clean") / "store")
    assert main(["index", "--input", shards, "--store", store, *TINY, "--batch-size", "4"]) == 0
    return store, contents(store)


def test_dask_runner_indexes_in_the_workers_like_fnapi(tmp_path, cluster, shards, clean):
    c, client = cluster
    store = str(tmp_path / "store")
    argv = [
        "index",
        "--input",
        shards,
        "--store",
        store,
        *TINY,
        "--batch-size",
        "4",
        "--runner",
        "DaskRunner",
        "--dask_client_address",
        c.scheduler_address,
    ]
    assert main(argv) == 0
    assert contents(store) == clean[1]  # ids and token bytes identical to the in-process run
    writers = {r.writer["pid"] for r in read_commits(Location(store)).values()}
    worker_pids = set(client.run(os.getpid).values())
    assert writers and writers <= worker_pids and os.getpid() not in writers
    assert verify_ok(store)["ok"]


def test_a_worker_killed_mid_shard_still_gives_the_clean_store(tmp_path, cluster, shards, clean):
    c, client = cluster
    store = str(tmp_path / "store")
    argv = [
        "index",
        "--input",
        shards,
        "--store",
        store,
        *TINY,
        "--batch-size",
        "2",
        "--runner",
        "DaskRunner",
        "--dask_client_address",
        c.scheduler_address,
    ]
    result = {}
    job = threading.Thread(target=lambda: result.setdefault("rc", main(argv)))
    job.start()
    killed = None
    deadline = time.monotonic() + 120
    while killed is None and job.is_alive() and time.monotonic() < deadline:
        busy = [w for w, tasks in client.processing().items() if tasks]
        if (
            busy
            and os.path.exists(os.path.join(store, layout.COMMITS))
            and os.listdir(os.path.join(store, layout.COMMITS))
        ):
            pid = client.run(os.getpid, workers=[busy[0]])[busy[0]]
            os.kill(pid, signal.SIGKILL)  # in the middle of its shard: one is committed, others are running
            killed = pid
        time.sleep(0.05)
    job.join(300)
    assert killed is not None, "no worker was busy while the job ran"
    if result.get("rc") != 0:  # the runner gave up: running the same command again completes it
        assert main(argv) == 0
    assert contents(store) == clean[1]
    report = verify_ok(store)
    assert report["ok"], report["problems"]
    client.wait_for_workers(2, timeout=60)  # the nanny restarted the killed one


def test_duplicate_attempts_on_two_workers_one_commit_wins(tmp_path, cluster, shards, clean):
    c, client = cluster
    client.wait_for_workers(2, timeout=60)
    store = str(tmp_path / "store")
    assert main(["index", "--input", shards.replace("{000000..000003}", "000001"), "--store", store, *TINY]) == 0
    shard = shards.replace("{000000..000003}", "000000")
    task = task_for(store, shard)
    marks = [str(tmp_path / f"ready-{i}") for i in range(2)]
    workers = list(client.scheduler_info()["workers"])[:2]
    futures = [
        client.submit(run_attempt, store, task, marks, marks[i], workers=[workers[i]], pure=False) for i in range(2)
    ]
    results = client.gather(futures)
    assert results[0]["pid"] != results[1]["pid"] and results[0]["data_path"] == results[1]["data_path"]
    commits = read_commits(Location(store))
    assert commits[task.segment].data_path == results[0]["data_path"]
    folders = [n for n in os.listdir(os.path.join(store, layout.SEGMENTS)) if n.startswith(task.segment)]
    assert folders == [results[0]["data_path"].rsplit("/", 1)[1]]


def test_a_retry_killed_mid_write_on_a_worker_leaves_the_committed_tokens(tmp_path, cluster, shards, clean):
    """Dask reruns a task whose worker died; the rerun finds the shard committed and writes nothing."""
    c, client = cluster
    client.wait_for_workers(2, timeout=60)
    store = str(tmp_path / "store")
    shard = shards.replace("{000000..000003}", "000002")
    assert main(["index", "--input", shard, "--store", store, *TINY]) == 0
    ts = TokenStore.open(store)
    ids = ts.ids()
    committed = ts.get(ids).copy()
    (before,) = read_commits(Location(store)).values()

    def attempt_started_before_the_commit(store, task, marker):
        import edje_indexer.schemas.segment as segment

        if not os.path.exists(marker):  # the first run of the task: it had passed the committed() check
            segment.SegmentWriter.committed = lambda self, t: None
        return run_attempt(store, task, kill_in_write_marker=marker)

    marker = str(tmp_path / "killed")
    fut = client.submit(attempt_started_before_the_commit, store, task_for(store, shard), marker, pure=False)
    out = fut.result(timeout=240)  # the worker died once; dask reran the task elsewhere
    assert os.path.exists(marker)
    assert out["data_path"] == before.data_path  # the rerun returned the existing commit
    np.testing.assert_array_equal(TokenStore.open(store).get(ids), committed)
    assert json.loads(open(os.path.join(store, *layout.commit_path(before.segment))).read()) == before.to_json()


def test_the_job_can_start_its_own_local_cluster(tmp_path, shards, clean):
    store = str(tmp_path / "store")
    two = shards.replace("{000000..000003}", "{000000..000001}")
    argv = [
        "index",
        "--input",
        two,
        "--store",
        store,
        *TINY,
        "--batch-size",
        "4",
        "--runner",
        "DaskRunner",
        "--dask-local-workers",
        "2",
    ]
    assert main(argv) == 0
    writers = {r.writer["pid"] for r in read_commits(Location(store)).values()}
    assert len(writers) >= 1 and os.getpid() not in writers
    assert contents(store) == {k: v for k, v in clean[1].items() if k.startswith(("s0-", "s1-"))}
