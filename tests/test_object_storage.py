"""Corpus and store on a real S3 server (SeaweedFS on 127.0.0.1, the ``s3`` fixture).

Every client finds the server through ``AWS_ENDPOINT_URL`` and the AWS_* keys,
as users' clients do: no flag names it.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import s3fs
from attempt_helpers import run_attempt, task_for
from helpers import image_bytes, lock_contender, write_tar

from edje_indexer.pipeline.cli import main
from edje_indexer.pipeline.plan import fingerprint, fingerprints
from edje_indexer.schemas import TokenStore, layout, read_commits
from edje_indexer.schemas.storage import Location

TINY = ["--preset", "tiny"]


def fs() -> s3fs.S3FileSystem:
    return s3fs.S3FileSystem(use_listings_cache=False)


@pytest.fixture
def local_shards(tmp_path, photos):
    folder = tmp_path / "shards"
    folder.mkdir()
    for s in range(4):
        members = [
            (f"s{s}-{i}.jpg", image_bytes(photos[(s + i) % len(photos)][1].rotate(9 * i + s), "JPEG")) for i in range(3)
        ]
        write_tar(folder / f"shard-{s:06d}.tar", members)
    return folder


def upload(local_folder, bucket: str, names: list[str]) -> None:
    for n in names:
        fs().put_file(str(local_folder / n), f"{bucket[len('s3://') :]}/{n}")


def contents(store: str) -> dict[str, str]:
    ts = TokenStore.open(store)
    ids = ts.ids()
    values, _ = ts.get_raw(ids)
    return {i: hashlib.sha256(v.tobytes()).hexdigest() for i, v in zip(ids, values)}


def run_json(argv, capsys) -> dict:
    capsys.readouterr()
    assert main([*argv, "--json"]) in (0, 1)
    return json.loads(capsys.readouterr().out)


def test_end_to_end_on_s3_equals_local_disk(tmp_path, s3, local_shards, capsys):
    corpus, bucket = s3("corpus"), s3("store")
    upload(local_shards, corpus, ["shard-000000.tar", "shard-000001.tar"])
    store = f"{bucket}/x"
    first = run_json(["index", "--input", f"{corpus}/shard-*.tar", "--store", store, *TINY], capsys)
    assert first["shards_processed"] == 2 and first["images_indexed"] == 6

    local = str(tmp_path / "local")
    assert main(["index", "--input", str(local_shards / "shard-{000000..000001}.tar"), "--store", local, *TINY]) == 0
    assert contents(store) == contents(local)  # ids and token bytes equal those indexed to local disk

    # incremental: a new shard in the bucket, re-run: only it is indexed
    upload(local_shards, corpus, ["shard-000002.tar"])
    second = run_json(["index", "--input", f"{corpus}/shard-*.tar", "--store", store, *TINY], capsys)
    assert (second["shards_processed"], second["shards_skipped"]) == (1, 2)
    # the second job logged a begin and a commit entry after the first job's; its run of 3 ids was merged
    # into the first run of 6 (not more than MERGE_RATIO times larger)
    pointer = json.loads(fs().cat_file(f"{store[len('s3://') :]}/index/CURRENT.json"))
    assert pointer["format"] == 2 and [r["entries"] for r in pointer["runs"]] == [9] and pointer["generation"] == 2
    log_dir = f"{store[len('s3://') :]}/log"
    entries = sorted(n.rsplit("/", 1)[1] for n in fs().ls(log_dir, detail=False) if n[-6].isdigit())
    assert entries == ["000000000001.json", "000000000002.json", "000000000003.json"]
    kinds = [json.loads(fs().cat_file(f"{log_dir}/{n}"))["kind"] for n in entries]
    assert kinds == ["commit", "begin", "commit"]

    capsys.readouterr()
    assert main(["inspect", store, "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["images"] == 9 and summary["segments"] == 3 and summary["missing_shards"] == []
    assert main(["get", store, "s2-1"]) == 0 and "float32 [64, 384]" in capsys.readouterr().out
    assert main(["verify", store, "--deep"]) == 0
    assert main(["remove", store, "--shard", f"{corpus}/shard-000002.tar"]) == 0
    assert len(TokenStore.open(store)) == 6 and main(["verify", store, "--deep"]) == 0


def test_a_commit_by_another_process_is_seen_not_cleaned_up(s3, local_shards, capsys):
    """The regression: the launcher's client cached ``commits/`` and deleted a worker's new segment."""
    corpus, bucket = s3("corpus"), s3("store")
    upload(local_shards, corpus, ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar"])
    store = f"{bucket}/store"
    two = f"{corpus}/shard-{{000000..000001}}.tar"
    assert main(["index", "--input", two, "--store", store, *TINY]) == 0
    reader = TokenStore.open(store)  # a long-lived reader in this process
    out = run_json(
        [
            "index",
            "--input",
            f"{corpus}/shard-{{000000..000002}}.tar",
            "--store",
            store,
            *TINY,
            "--direct_num_workers=2",
            "--direct_running_mode=multi_processing",
        ],
        capsys,
    )
    assert out["shards_committed"] == 1 and out["store_images"] == 9
    assert len(reader) == 6 and len(TokenStore.open(store)) == 9  # re-opening sees the new commit
    assert main(["verify", store, "--deep"]) == 0


def test_dask_runner_on_s3(s3, local_shards, capsys):
    corpus, bucket = s3("corpus"), s3("store")
    upload(local_shards, corpus, ["shard-000000.tar", "shard-000001.tar"])
    store = f"{bucket}/store"
    out = run_json(
        [
            "index",
            "--input",
            f"{corpus}/shard-*.tar",
            "--store",
            store,
            *TINY,
            "--runner",
            "DaskRunner",
            "--dask-local-workers",
            "2",
        ],
        capsys,
    )
    assert out["shards_committed"] == 2
    writers = {r.writer["pid"] for r in read_commits(Location(store)).values()}
    assert os.getpid() not in writers
    assert main(["verify", store, "--deep"]) == 0


def test_sigkill_mid_run_then_rerun_gives_the_clean_store(tmp_path, s3, local_shards):
    corpus, bucket = s3("corpus"), s3("store")
    upload(local_shards, corpus, [f"shard-{s:06d}.tar" for s in range(4)])
    pattern = f"{corpus}/shard-*.tar"
    clean, crashed = f"{bucket}/clean", f"{bucket}/crashed"
    assert main(["index", "--input", pattern, "--store", clean, *TINY]) == 0
    cmd = [
        sys.executable,
        os.path.join(os.path.dirname(__file__), "crash_runner.py"),
        "write",
        "2",
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
    assert len(TokenStore.open(crashed)) < 12  # readers see committed segments only
    assert main(["index", "--input", pattern, "--store", crashed, *TINY]) == 0
    assert contents(crashed) == contents(clean)
    assert main(["verify", crashed, "--deep"]) == 0


def test_eight_jobs_race_for_one_s3_store_lock(tmp_path, s3):
    store = f"{s3('store')}/locked"
    out = str(tmp_path / "holders.jsonl")
    ctx = mp.get_context("spawn")
    barrier = ctx.Barrier(8)
    # each holds it for 5 s: long enough that all 8 try while the winner holds it
    procs = [ctx.Process(target=lock_contender, args=(store, barrier, out, 5.0)) for _ in range(8)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    holds = [json.loads(line) for line in open(out)] if os.path.exists(out) else []
    assert len(holds) == 1 and holds[0][2]  # exactly one ran (and held it alone); the others refused


def test_a_second_job_on_an_s3_store_refuses(s3, local_shards, capsys):
    from edje_indexer.pipeline.lock import StoreLock

    corpus, bucket = s3("corpus"), s3("store")
    upload(local_shards, corpus, ["shard-000000.tar"])
    store = f"{bucket}/store"
    with StoreLock(Location(store)).acquire():
        assert main(["index", "--input", f"{corpus}/shard-000000.tar", "--store", store, *TINY]) == 2
    assert "is being written by" in capsys.readouterr().err
    assert main(["index", "--input", f"{corpus}/shard-000000.tar", "--store", store, *TINY]) == 0


def test_two_attempts_on_s3_one_commit_wins(tmp_path, s3, local_shards):
    corpus, bucket = s3("corpus"), s3("store")
    upload(local_shards, corpus, ["shard-000000.tar", "shard-000001.tar"])
    store = f"{bucket}/store"
    assert main(["index", "--input", f"{corpus}/shard-000001.tar", "--store", store, *TINY]) == 0
    task = task_for(store, f"{corpus}/shard-000000.tar")
    marks = [str(tmp_path / f"ready-{i}") for i in range(2)]
    with mp.get_context("spawn").Pool(2) as pool:
        results = pool.starmap(run_attempt, [(store, task, marks, marks[i]) for i in range(2)])
    assert results[0]["pid"] != results[1]["pid"] and results[0]["data_path"] == results[1]["data_path"]
    assert read_commits(Location(store))[task.segment].data_path == results[0]["data_path"]
    # objects under the segment's folders (SeaweedFS may list a removed folder a while as an empty directory)
    keys = fs().find(f"{store[5:]}/{layout.SEGMENTS}")
    folders = {k.split("/")[3] for k in keys if k.split("/")[3].startswith(task.segment) and k.count("/") > 3}
    assert folders == {results[0]["data_path"].rsplit("/", 1)[1]}


def test_planning_lists_folders_instead_of_one_request_per_shard(s3, monkeypatch):
    bucket = s3("many")
    n = 300
    client = fs()
    client.pipe({f"{bucket[5:]}/part-{i:06d}.tar": b"x" * (i % 7 + 1) for i in range(n)})
    urls = [f"{bucket}/part-{i:06d}.tar" for i in range(n)]
    calls = []
    original = s3fs.S3FileSystem._call_s3

    async def counting(self, method, *a, **k):
        calls.append(method)
        return await original(self, method, *a, **k)

    monkeypatch.setattr(s3fs.S3FileSystem, "_call_s3", counting)
    t = time.perf_counter()
    versions = fingerprints(urls)
    listed_s = time.perf_counter() - t
    assert len(calls) <= 2, calls  # one listing (300 keys < one 1,000-key page), not 300 HEADs
    assert versions[urls[5]] == fingerprint(urls[5])  # the same version a HEAD gives
    assert versions[urls[5]].size == 6 and versions[urls[5]].version.startswith(("ETag:", "etag:"))
    assert listed_s < 30


@pytest.mark.parametrize("quant", ["int8", "int4", "int4-rht"])
def test_reads_over_s3_use_byte_ranges_from_the_layout(s3, quant):
    """get over s3:// equals the local read, with at most one request per run of nearby rows per batch."""
    from edje_indexer.benchmarks.synthetic_store import build_synthetic_store
    from edje_indexer.schemas.quantization import dequantize

    store = f"{s3('read')}/store"
    built = build_synthetic_store(store, n_images=300, images_per_segment=100, quantization=quant, seed=3)
    ts = TokenStore.open(store)
    rng = np.random.default_rng(0)
    ids = [built.ids[i] for i in rng.choice(300, 40, replace=False)]
    got = ts.get(ids)
    requests_first = ts.requests
    again = ts.get(ids)
    per_batch = ts.requests - requests_first
    np.testing.assert_array_equal(got, again)
    raw, scales = ts.get_raw(ids)
    assert raw.shape == (40, 64, 384 if quant == "int8" else 192)  # int4: two values per byte
    np.testing.assert_array_equal(got, dequantize(raw, scales, quant))
    from edje_indexer.schemas.remote_rows import RemoteRows

    rows_by_segment: dict[int, set[int]] = {}
    for i in ids:
        n = built.ids.index(i)
        rows_by_segment.setdefault(built.segment_of[n], set()).add(n % 100)
    runs = sum(len(RemoteRows.runs(np.array(sorted(r)))) for r in rows_by_segment.values())
    assert per_batch == 2 * runs  # tokens and scales: one request per run of nearby rows, all segments at once
    assert len(rows_by_segment) <= runs < len(ids)
    assert all(type(a).__name__ == "CheckedRemoteRows" for a in ts._rows._arrays["tokens"].values())


def test_weights_and_adapters_from_s3_urls(tmp_path, s3, local_shards):
    from safetensors.torch import save_file

    from edje_indexer.pipeline.presets import PRESETS
    from edje_indexer.transforms import weights
    from edje_indexer.transforms.model import load_model

    tiny = load_model(PRESETS["tiny"])
    save_file({k: v.contiguous() for k, v in tiny.backbone.state_dict().items()}, tmp_path / "backbone.safetensors")
    save_file({k: v.contiguous() for k, v in tiny.adapter.state_dict().items()}, tmp_path / "adapter.safetensors")
    models, corpus, bucket = s3("models"), s3("corpus"), s3("store")
    for name in ("backbone.safetensors", "adapter.safetensors"):
        fs().put_file(str(tmp_path / name), f"{models[5:]}/{name}")
    upload(local_shards, corpus, ["shard-000000.tar"])
    store = f"{bucket}/store"
    argv = [
        "index",
        "--input",
        f"{corpus}/shard-000000.tar",
        "--store",
        store,
        *TINY,
        "--weights",
        f"{models}/backbone.safetensors",
        "--adapter",
        f"{models}/adapter.safetensors",
    ]
    assert main(argv) == 0
    model = TokenStore.open(store).metadata.model
    assert model.backbone_sha256 == tiny.identity.backbone_sha256 and model.random_weights is False
    assert model.adapter_sha256 == tiny.identity.adapter_sha256 and model.random_adapter is False
    copy = weights.local_path(f"{models}/backbone.safetensors")
    assert weights.local_path(f"{models}/backbone.safetensors") == copy  # fetched once per process
