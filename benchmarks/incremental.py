"""Incremental indexing cost: adding 1 shard to a store of N shards vs indexing it alone.

    python -m edje_indexer.benchmarks.incremental [--shards 50] [--images-per-shard 4] [--repeats 3]

Builds N small shards of real photos, indexes them (tiny preset), then, in
the same run, times (a) the incremental job after one new shard appears and
(b) indexing that same shard into an empty store; each `repeats` times with
a different new shard, median reported. Both go through ``run_job`` in this
process with the model already loaded, so the difference is planning,
lock, store checks, finalize and index upkeep. Also checks that the bytes of
the existing segments are untouched (sha256 of every file before and after).
Prints one JSON object.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import logging
import os
import statistics
import tempfile
import time

from PIL import Image
from webdataset import TarWriter

from edje_indexer.pipeline.demo import packaged_photos
from edje_indexer.pipeline.job import JobConfig, run_job
from edje_indexer.pipeline.presets import resolve_spec
from edje_indexer.transforms.indexer import IndexSettings
from edje_indexer.transforms.model import shared_model


def _photos(size=160):
    out = []
    for _, path in packaged_photos():
        with Image.open(path) as im:
            im = im.convert("RGB")
            im.thumbnail((size, size))
            buf = io.BytesIO()
            im.save(buf, "JPEG", quality=90)
            out.append(buf.getvalue())
    return out


def write_shard(folder: str, s: int, photos: list[bytes], n: int) -> str:
    path = os.path.join(folder, f"shard-{s:06d}.tar")
    with TarWriter(path) as w:
        for i in range(n):
            w.write({"__key__": f"s{s:06d}-{i:03d}", "jpg": photos[(s * n + i) % len(photos)]})
    return path


def tree_digest(root: str) -> dict[str, str]:
    out = {}
    for d, _, files in os.walk(root):
        for f in files:
            p = os.path.join(d, f)
            with open(p, "rb") as fh:
                out[os.path.relpath(p, root)] = hashlib.sha256(fh.read()).hexdigest()
    return out


def timed(cfg: JobConfig) -> float:
    t = time.perf_counter()
    result = run_job(cfg)
    elapsed = time.perf_counter() - t
    if result.failed or result.not_finished:
        raise RuntimeError(f"benchmark job failed: {result.to_dict()}")
    return elapsed


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shards", type=int, default=50)
    ap.add_argument("--images-per-shard", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dir", help="work folder (default: a temporary one)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    work = args.dir or tempfile.mkdtemp(prefix="edje-bench-incr-")
    corpus = os.path.join(work, "corpus")
    os.makedirs(corpus, exist_ok=True)
    photos = _photos()
    for s in range(args.shards):
        write_shard(corpus, s, photos, args.images_per_shard)
    spec = resolve_spec("tiny")
    model = shared_model(spec)  # noqa: F841 -- both timings start with the model in memory (held here for the whole run)
    store = os.path.join(work, "store")
    base = dict(spec=spec, settings=IndexSettings(batch_size=32), progress_every_s=3600)
    t_full = timed(JobConfig(input=os.path.join(corpus, "*.tar"), store=store, **base))

    segments_before = tree_digest(os.path.join(store, "segments"))
    incremental, alone = [], []
    for r in range(args.repeats):
        new = write_shard(corpus, args.shards + r, photos, args.images_per_shard)
        incremental.append(timed(JobConfig(input=os.path.join(corpus, "*.tar"), store=store, **base)))
        alone.append(timed(JobConfig(input=new, store=os.path.join(work, f"alone-{r}"), **base)))
    segments_after = tree_digest(os.path.join(store, "segments"))
    untouched = all(segments_after.get(k) == v for k, v in segments_before.items())

    inc, one = statistics.median(incremental), statistics.median(alone)
    print(
        json.dumps(
            {
                "benchmark": "incremental",
                "existing_shards": args.shards,
                "images_per_shard": args.images_per_shard,
                "initial_full_run_s": round(t_full, 3),
                "incremental_run_s": round(inc, 3),
                "one_shard_empty_store_s": round(one, 3),
                "ratio": round(inc / one, 3),
                "goal_ratio_at_most": 1.25,
                "existing_segment_files_untouched": untouched,
                "existing_segment_files_checked": len(segments_before),
                "runs_s": {
                    "incremental": [round(x, 3) for x in incremental],
                    "empty_store": [round(x, 3) for x in alone],
                },
            },
            indent=1,
        )
    )
    return 0 if untouched else 1


if __name__ == "__main__":
    raise SystemExit(main())
