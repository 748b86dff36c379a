"""Metadata at scale: what a job and a reader pay for a store of N segments, N up to 10^5 (10^7 ids).

    python -m edje_indexer.benchmarks.scale [--segments 1000,10000,100000] [--ids-per-segment 100]

For each N, a synthetic store is built with the project's own writer, job
log and index code (benchmarks/synthetic_store.py, schemas/job_log.py,
schemas/id_runs.py): every segment has a real commit record in commits/, a
log checkpoint lists them all and one id index run holds all N x 100 ids
(ids like ``laion/0012345/067``), as a store that many jobs built and merged
looks. Only ``--data-segments`` of them (spread over the id space) have token
data; the others are metadata only (nothing in this benchmark reads it).
Then, each in a fresh process (imports and a cold start included):

* ``job_s``: wall time of ``edje-index index --preset tiny`` adding one new
  4-image shard (median of ``--repeats``), and ``job_ratio`` against the same
  job on an empty store, each repeat run right before it (so both see the
  same load); ``launcher_reads``: the store reads (files
  read, listings) that job's launcher made, counted by wrapping
  schemas.storage.Location.
* ``open_s``: ``TokenStore.open`` (imports excluded), the process's RSS after
  it (``rss_after_open_mb``) and after 1,000 random ``get`` of k = 100 ids
  (``rss_after_gets_mb``; ``anon`` excludes the memory-mapped token and index
  pages the gets touched, which the kernel can drop), and
  ``k1000_get_images_per_s`` (``get(ids, dtype=float16)``, k = 1000; the
  random ids come from the segments with data).

Prints one JSON object ``{"runs": [...], ...}``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

GOALS = {"job_ratio_at_most": 1.25, "open_s_at_most": 0.5, "rss_after_open_mb_below": 200}
ID_PREFIX = "laion/"


def _ids(first_segment: int, segments: int, per: int):
    import pyarrow as pa
    import pyarrow.compute as pc

    seg = np.repeat(np.arange(first_segment, first_segment + segments, dtype=np.int64), per)
    row = np.tile(np.arange(per, dtype=np.int64), segments)
    s = pc.utf8_lpad(pc.cast(pa.array(seg), pa.string()), 7, "0")
    r = pc.utf8_lpad(pc.cast(pa.array(row), pa.string()), 3, "0")
    return pc.binary_join_element_wise(pa.scalar(ID_PREFIX + "x").cast(pa.string()), s, r, "/"), seg, row


def build(url: str, n_segments: int, per: int, data_segments: int, seed: int = 0) -> dict:
    """A store of ``n_segments`` committed segments of ``per`` ids; see the module docstring."""
    import pyarrow as pa
    import torch

    from edje_indexer.benchmarks.synthetic_store import encode_tokens, random_tokens, write_segment
    from edje_indexer.pipeline.presets import resolve_spec
    from edje_indexer.schemas import id_runs, job_log, layout, tables
    from edje_indexer.schemas import index as id_index
    from edje_indexer.schemas.records import CommitRecord, IndexPointer, Source, SourceVersion
    from edje_indexer.schemas.storage import Location
    from edje_indexer.schemas.store import create_or_check, new_metadata
    from edje_indexer.transforms.model import shared_model

    loc = Location(url)
    meta = create_or_check(loc, new_metadata(shared_model(resolve_spec("tiny")).identity, "fp16", "key"))
    m, d = meta.tokens_per_image, meta.token_dim
    rng = np.random.default_rng(seed)
    with_data = set(rng.choice(n_segments, size=min(data_segments, n_segments), replace=False).tolist())
    gen = torch.Generator().manual_seed(seed)
    ids_all, seg_no, row_no = _ids(0, n_segments, per)
    state = job_log.StoreState()
    records = {}
    data_ids = []
    t0 = time.perf_counter()
    shard_of = [f"s3://corpus/shards/{i // 10000:03d}/{i:07d}.tar" for i in range(n_segments)]
    for i in sorted(with_data):  # real segments: data, dead letters, commit record (the job's writer)
        ids = ids_all.slice(i * per, per).to_pylist()
        values, scales = encode_tokens(random_tokens(gen, per, m, d), "fp16")
        records[i] = write_segment(loc, meta, shard_of[i], ids, values, scales)
        data_ids += ids
    template = records[min(records)].__dict__
    for i in range(n_segments):  # the others: a real commit record each, no data
        if i in records:
            continue
        seg = layout.segment_name(shard_of[i])
        version = SourceVersion(per * 20000, f"ETag:{i:032x}")
        rec = CommitRecord(
            **{
                **template,
                "segment": seg,
                "data_path": layout.segment_data_path(seg, version, 0, "0", "bench"),
                "shard": shard_of[i],
                "source": Source(version.size, version.version, version.size, "0" * 64),
            }
        )
        with open(loc.path(*layout.commit_path(seg)), "w") as f:  # no fsync: a benchmark's scratch store
            f.write(json.dumps(rec.to_json()))
        records[i] = rec
    state.apply({r.segment: r for r in records.values()})
    names = [records[i].segment for i in range(n_segments)]
    paths = [records[i].data_path for i in range(n_segments)]
    t_records = time.perf_counter() - t0
    entries = pa.table(
        {
            "id": ids_all,
            "segment": pa.array(names, pa.string()).take(pa.array(seg_no)),
            "row": pa.array(row_no.astype(np.int32)),
            "data_path": pa.array(paths, pa.string()).take(pa.array(seg_no)),
            "rows": pa.array(np.full(len(seg_no), per, np.int64)),
        }
    )
    t1 = time.perf_counter()
    ids_bytes, seg_bytes = id_runs.build_run(entries)
    files = {k: f"run-00000001.{k}.arrow" for k in ("ids", "segments")}
    files["duplicates"] = "run-00000001.duplicates.parquet"
    no_duplicates = id_runs.duplicates_bytes(tables.DUPLICATES_SCHEMA.empty_table())
    blobs = {"ids": ids_bytes, "segments": seg_bytes, "duplicates": no_duplicates}
    for k, data in blobs.items():
        loc.write_bytes_atomic(data, layout.INDEX, files[k])
    pointer = IndexPointer(
        generation=1,
        images=entries.num_rows,
        checksums={files[k]: hashlib.sha256(v).hexdigest() for k, v in blobs.items()},
        runs=[{**files, "entries": entries.num_rows, "duplicates_count": 0}],
        segments_count=len(state),
        log_seq=1,
        format=2,
    )
    state.seq, state.index = 1, pointer.to_json()
    job_log.write_checkpoint(loc, state)
    id_index.publish(loc, pointer)
    return {"data_ids": data_ids, "records_s": round(t_records, 1), "index_s": round(time.perf_counter() - t1, 1)}


_JOB_DRIVER = r"""
import json, sys, time
t0 = time.perf_counter()
from edje_indexer.schemas import storage
counts = {}
def counted(name, fn):
    def wrapper(self, *a, **k):
        counts[name] = counts.get(name, 0) + (len(a[0]) if name == "read_many" else 1)
        return fn(self, *a, **k)
    return wrapper
for name in ("read_bytes", "read_versioned", "read_many", "list", "list_prefix", "exists"):
    setattr(storage.Location, name, counted(name, getattr(storage.Location, name)))
from edje_indexer.pipeline.cli import main
rc = main(sys.argv[2:])
json.dump({"rc": rc, "reads": counts, "in_process_s": time.perf_counter() - t0}, open(sys.argv[1], "w"))
"""

_READ_DRIVER = r"""
import json, sys, time
import numpy as np
from edje_indexer.schemas.reader import TokenStore
def rss():
    got = {}
    for line in open("/proc/self/status"):
        if line.startswith(("VmRSS", "RssAnon")):
            got[line.split(":")[0]] = int(line.split()[1]) / 1024
    return round(got["VmRSS"], 1), round(got["RssAnon"], 1)
url, ids_file = sys.argv[1], sys.argv[2]
ids = json.load(open(ids_file))
before = rss()
t = time.perf_counter()
store = TokenStore.open(url)
open_s = time.perf_counter() - t
after_open = rss()
rng = np.random.default_rng(0)
for _ in range(1000):
    store.get([ids[i] for i in rng.integers(0, len(ids), 100)], dtype=np.float16)
after_gets = rss()
batches = [[ids[i] for i in rng.integers(0, len(ids), 1000)] for _ in range(20)]
out = np.empty((1000, store.tokens_per_image, store.token_dim), np.float16)
t = time.perf_counter()
for b in batches:
    store.get(b, dtype=np.float16, out=out)
k1000 = 20 * 1000 / (time.perf_counter() - t)
json.dump({"open_s": open_s, "rss_before_open_mb": before[0], "rss_after_open_mb": after_open[0],
           "rss_anon_after_open_mb": after_open[1], "rss_after_gets_mb": after_gets[0],
           "rss_anon_after_gets_mb": after_gets[1], "k1000_get_images_per_s": k1000, "images": len(store)},
          open(sys.argv[3], "w"))
"""


def _job(store: str, shard: str, work: str) -> dict:
    out = os.path.join(work, "job.json")
    cmd = [sys.executable, "-c", _JOB_DRIVER, out, "index", "--input", shard, "--store", store, "--preset", "tiny"]
    t = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t
    if proc.returncode != 0:
        raise RuntimeError(f"index job failed: {proc.stderr[-3000:]}")
    got = json.load(open(out))
    return {"job_s": wall, **got}


def _read(store: str, ids: list[str], work: str) -> dict:
    ids_file, out = os.path.join(work, "ids.json"), os.path.join(work, "read.json")
    json.dump(ids, open(ids_file, "w"))
    proc = subprocess.run([sys.executable, "-c", _READ_DRIVER, store, ids_file, out], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"reader failed: {proc.stderr[-3000:]}")
    return json.load(open(out))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--segments", default="1000,10000,100000")
    ap.add_argument("--ids-per-segment", type=int, default=100)
    ap.add_argument("--data-segments", type=int, default=50)
    ap.add_argument("--repeats", type=int, default=3, help="job runs per N (and as many on an empty store)")
    ap.add_argument("--dir", help="work folder (default: a temporary one, removed afterwards)")
    args = ap.parse_args(argv)
    from edje_indexer.benchmarks.incremental import _photos, write_shard

    work = args.dir or tempfile.mkdtemp(prefix="edje-bench-scale-")
    photos = _photos()
    corpus = os.path.join(work, "corpus")
    os.makedirs(corpus, exist_ok=True)
    try:
        runs, empty_all = [], []
        shard_no = iter(range(10**6))
        for n in [int(x) for x in args.segments.split(",")]:
            store = os.path.join(work, f"store-{n}")
            t = time.perf_counter()
            built = build(store, n, args.ids_per_segment, args.data_segments)
            build_s = time.perf_counter() - t
            jobs, empties = [], []
            for _ in range(args.repeats):  # interleaved, so both see the same load on a shared machine
                empty_store = os.path.join(work, "empty-store")
                shutil.rmtree(empty_store, ignore_errors=True)
                empties.append(_job(empty_store, write_shard(corpus, next(shard_no), photos, 4), work))
                jobs.append(_job(store, write_shard(corpus, next(shard_no), photos, 4), work))
            job_s = statistics.median(j["job_s"] for j in jobs)
            empty_s = statistics.median(j["job_s"] for j in empties)
            empty_all += empties
            read = _read(store, built["data_ids"], work)
            runs.append(
                {
                    "segments": n,
                    "ids": n * args.ids_per_segment,
                    "job_s": round(job_s, 2),
                    "job_ratio": round(job_s / empty_s, 3),
                    "empty_store_job_s": round(empty_s, 2),
                    "job_runs_s": [round(j["job_s"], 2) for j in jobs],
                    "empty_store_job_runs_s": [round(j["job_s"], 2) for j in empties],
                    "launcher_reads": jobs[-1]["reads"],
                    "open_s": round(read["open_s"], 4),
                    "rss_after_open_mb": read["rss_after_open_mb"],
                    "rss_anon_after_open_mb": read["rss_anon_after_open_mb"],
                    "rss_after_gets_mb": read["rss_after_gets_mb"],
                    "rss_anon_after_gets_mb": read["rss_anon_after_gets_mb"],
                    "rss_before_open_mb": read["rss_before_open_mb"],
                    "k1000_get_images_per_s": round(read["k1000_get_images_per_s"], 1),
                    "store_images_after_jobs": read["images"],
                    "build_s": round(build_s, 1),
                }
            )
            print(json.dumps(runs[-1]), file=sys.stderr)
            shutil.rmtree(store, ignore_errors=True)
        print(
            json.dumps(
                {
                    "benchmark": "scale",
                    "empty_store_launcher_reads": empty_all[-1]["reads"],
                    "runs": runs,
                    "goals_at_100000_segments": GOALS,
                    "load_average": os.getloadavg(),
                },
                indent=1,
            )
        )
    finally:
        if not args.dir:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
