"""Incremental runs, crash safety, verify/repair, the store lock, removed shards."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from helpers import image_bytes, write_tar

from edje_indexer.pipeline.cli import main
from edje_indexer.schemas import Location, TokenStore, read_commits

HERE = os.path.dirname(__file__)
ROOT = os.path.dirname(HERE)
TINY = ["--preset", "tiny", "--batch-size", "2"]


def make_shard(folder, s, photos, n=3, variant=0) -> str:
    members = []
    for i in range(n):
        name, im = photos[(s * n + i) % len(photos)]
        members.append((f"k{s:02d}-{i}.jpg", image_bytes(im.rotate(10 * variant + i), "JPEG")))
    return write_tar(os.path.join(folder, f"part-{s:06d}.tar"), members)


@pytest.fixture
def shards(tmp_path, photos):
    folder = tmp_path / "corpus"
    folder.mkdir()
    for s in range(4):
        make_shard(folder, s, photos)
    return str(folder), str(folder / "part-*.tar")


def index(pattern, store, *extra, capsys=None) -> dict | int:
    rc = main(["index", "--input", pattern, "--store", store, *TINY, "--json", *extra])
    if capsys is None:
        return rc
    out = capsys.readouterr().out
    assert rc == 0, out
    return json.loads(out[out.index("{") :])


def contents(store) -> dict[str, bytes]:
    ts = TokenStore.open(store)
    ids = sorted(ts.ids())
    values, _ = ts.get_raw(ids)
    assert len(set(ids)) == len(ids) and ts.duplicates.num_rows == 0
    return {i: v.tobytes() for i, v in zip(ids, values)}


def committed(store) -> dict[str, tuple]:
    return {
        s: (c.data_path, c.rows, json.dumps(c.checksums, sort_keys=True))
        for s, c in read_commits(Location(store)).items()
    }


def committed_versions(store) -> dict[str, tuple]:
    """:func:`committed` with each data folder named by its version only: the job/attempt id at its end is
    picked anew by every attempt, so two clean runs differ there and nowhere else."""
    return {
        s: (c.data_path.rsplit(f".{c.job_id}-{c.attempt}", 1)[0], c.rows, json.dumps(c.checksums, sort_keys=True))
        for s, c in read_commits(Location(store)).items()
    }


def verify_json(store, *extra) -> dict:
    import io
    from contextlib import redirect_stdout

    buf = io.StringIO()
    with redirect_stdout(buf):
        rc = main(["verify", store, "--json", *extra])
    report = json.loads(buf.getvalue())
    assert (rc == 0) == report["ok"]
    return report


def test_new_shards_only_and_changed_shards_replaced(tmp_path, shards, photos, capsys):
    folder, pattern = shards
    store = str(tmp_path / "store")
    first = index(pattern, store, capsys=capsys)
    assert first["shards_processed"] == 4 and first["images_indexed"] == 12
    make_shard(folder, 4, photos)
    second = index(pattern, store, capsys=capsys)
    assert (second["shards_processed"], second["shards_skipped"], second["images_indexed"]) == (1, 4, 3)

    before = contents(store)
    old_paths = committed(store)
    make_shard(folder, 2, photos, variant=5)  # same keys, new pixels
    os.utime(os.path.join(folder, "part-000002.tar"), (time.time() + 5, time.time() + 5))
    third = index(pattern, store, capsys=capsys)
    assert (third["shards_processed"], third["shards_changed"]) == (1, 1)
    after = contents(store)
    assert before.keys() == after.keys()
    changed = [k for k in before if before[k] != after[k]]
    assert sorted(changed) == ["k02-0", "k02-1", "k02-2"]
    new_paths = committed(store)
    seg = [s for s in new_paths if new_paths[s][0] != old_paths[s][0]]
    assert len(seg) == 1
    old_data = os.path.join(store, old_paths[seg[0]][0])
    assert os.path.exists(old_data)  # kept one job longer for readers of the previous snapshot
    assert verify_json(store, "--deep")["ok"]
    index(pattern, store, capsys=capsys)  # the next job deletes it
    assert not os.path.exists(old_data) and verify_json(store, "--deep")["ok"]


def test_force_never_touches_committed_data_even_when_killed(tmp_path, shards):
    _, pattern = shards
    store = str(tmp_path / "store")
    assert index(pattern, store) == 0
    before = contents(store)
    cmd = [
        sys.executable,
        os.path.join(HERE, "crash_runner.py"),
        "write",
        "2",
        "--",
        "index",
        "--input",
        pattern,
        "--store",
        store,
        *TINY,
        "--force",
    ]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert contents(store) == before  # readers still see every committed row
    assert index(pattern, store, "--force") == 0
    assert contents(store) == before and verify_json(store, "--deep")["ok"]
    # every shard now lives in a new folder: r1, or r2 for the one the killed run had already redone
    revisions = sorted(c.revision for c in read_commits(Location(store)).values())
    assert revisions == [1, 1, 1, 2]


@pytest.mark.parametrize("point, nth", [("read", 2), ("write", 2), ("commit", 3), ("index", 1)])
def test_killed_job_reruns_to_the_clean_result(tmp_path, shards, point, nth):
    _, pattern = shards
    clean, crashed = str(tmp_path / "clean"), str(tmp_path / "crashed")
    assert index(pattern, clean) == 0
    cmd = [
        sys.executable,
        os.path.join(HERE, "crash_runner.py"),
        point,
        str(nth),
        "--",
        "index",
        "--input",
        pattern,
        "--store",
        crashed,
        *TINY,
    ]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]

    # what a reader sees now: only committed segments, never a half-written one
    visible = TokenStore.open(crashed)
    for image_id in visible.ids():
        assert visible.get([image_id]).shape == (1, 64, 384)
    assert len(visible) < 12 or point == "index"
    if point in ("write", "commit"):
        assert not verify_json(crashed)["ok"]  # the leftovers are reported

    assert index(pattern, crashed) == 0  # same command again
    assert contents(crashed) == contents(clean)
    assert committed_versions(crashed) == committed_versions(clean)
    report = verify_json(crashed, "--deep")
    assert report["ok"] and not report["problems"], json.dumps(report)


def test_sigkill_of_the_multiprocess_tree(tmp_path, shards):
    _, pattern = shards
    clean, crashed = str(tmp_path / "clean"), str(tmp_path / "crashed")
    assert index(pattern, clean) == 0
    cmd = [
        sys.executable,
        "-m",
        "edje_indexer.pipeline.cli",
        "index",
        "--input",
        pattern,
        "--store",
        crashed,
        *TINY,
        "--direct_num_workers=2",
        "--direct_running_mode=multi_processing",
    ]
    proc = subprocess.Popen(
        cmd, cwd=tmp_path, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if os.path.isdir(os.path.join(crashed, "commits")) and os.listdir(os.path.join(crashed, "commits")):
            break
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert index(pattern, crashed) == 0
    assert contents(crashed) == contents(clean)
    assert verify_json(crashed, "--deep")["ok"]


def test_verify_catches_corruption_and_repairs_leftovers(tmp_path, shards, capsys):
    _, pattern = shards
    store = str(tmp_path / "store")
    assert index(pattern, store) == 0
    assert verify_json(store, "--deep")["ok"]
    commits = read_commits(Location(store))
    a, b = sorted(commits)[:2]

    # one flipped byte in a token chunk: only --deep recomputes the checksum
    chunk = os.path.join(store, commits[a].data_path, "tokens", "c", "0", "0", "0")
    with open(chunk, "r+b") as f:
        f.seek(1000)
        byte = f.read(1)
        f.seek(1000)
        f.write(bytes([byte[0] ^ 0x40]))
    assert verify_json(store)["ok"]
    deep = verify_json(store, "--deep")
    assert any(a in p and "checksum" in p for p in deep["problems"])

    # a deleted segment
    import shutil

    shutil.rmtree(os.path.join(store, commits[b].data_path))
    assert any(b in p and "unreadable" in p for p in verify_json(store)["problems"])

    # a stray uncommitted segment, removed by --repair
    stray = os.path.join(store, "segments", "stray-0123456789.abcdefabcdef")
    shutil.copytree(os.path.join(store, commits[a].data_path), stray)
    assert any("uncommitted" in p for p in verify_json(store)["problems"])
    report = verify_json(store, "--repair")
    assert not os.path.exists(stray)
    assert not any("uncommitted" in p for p in report["problems"])


def test_second_job_refuses_or_waits_and_stale_locks_are_taken_over(tmp_path, shards, capsys):
    _, pattern = shards
    store = str(tmp_path / "store")
    os.makedirs(store)
    # a job that holds the lock for a while (it sleeps inside its first shard)
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from edje_indexer.transforms import index_shards as t\n"
            "f = t.index_shard_retrying; slept = []\n"
            "def slow(*a, **k):\n    slept or time.sleep(4); slept.append(1); return f(*a, **k)\n"
            "t.index_shard_retrying = slow\n"
            "from edje_indexer.pipeline.cli import main; sys.exit(main(sys.argv[1:]))",
            "index",
            "--input",
            pattern,
            "--store",
            store,
            *TINY,
        ],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 60
    while not os.path.exists(os.path.join(store, "_lock")) and time.time() < deadline:
        time.sleep(0.05)
    rc = main(["index", "--input", pattern, "--store", store, *TINY])
    assert rc == 2 and "is being written by" in capsys.readouterr().err
    assert main(["index", "--input", pattern, "--store", store, *TINY, "--lock-wait", "120"]) == 0
    assert holder.wait(120) == 0
    assert len(contents(store)) == 12 and verify_json(store, "--deep")["ok"]

    # a lock left by a dead process on this host is stale
    with open(os.path.join(store, "_lock"), "w") as f:
        json.dump({"host": os.uname().nodename, "pid": 2**22 + 12345, "token": "x", "heartbeat": time.time()}, f)
    assert main(["index", "--input", pattern, "--store", store, *TINY]) == 0
    assert not os.path.exists(os.path.join(store, "_lock"))


def test_disappeared_shards_are_reported_and_removed_explicitly(tmp_path, shards, capsys):
    folder, pattern = shards
    store = str(tmp_path / "store")
    assert index(pattern, store) == 0
    gone = os.path.join(folder, "part-000003.tar")
    os.remove(gone)
    assert index(pattern, store) == 0  # the pattern no longer names it: nothing is dropped silently
    assert len(contents(store)) == 12
    capsys.readouterr()
    assert main(["inspect", store, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["missing_shards"] == [gone]
    assert any("no longer exist" in w for w in verify_json(store)["warnings"])
    assert main(["remove", store, "--missing"]) == 0
    assert len(contents(store)) == 9 and verify_json(store, "--deep")["ok"]
