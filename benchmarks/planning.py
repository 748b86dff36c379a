"""Planning cost on object storage: requests and seconds to fingerprint N shards and read N commit records.

    python -m edje_indexer.benchmarks.planning --url s3://bucket/prefix [--shards 10000] [--commits 1000]

Against any fsspec URL (the README's figures: SeaweedFS on 127.0.0.1, started
with ``make s3-server``). Writes ``--shards`` tiny objects under ``URL/shards/``
and ``--commits`` small JSON objects under ``URL/commits/``, then measures, in
one run:

* ``fingerprint_per_shard``: one ``info`` request per shard (what planning did before);
* ``fingerprints_by_listing``: :func:`pipeline.plan.fingerprints` (one listing per folder);
* ``commits_one_by_one``: one ``cat_file`` per commit record, in turn;
* ``commits_concurrent``: :meth:`schemas.storage.Location.read_many` (concurrent requests).

Requests are counted by wrapping s3fs's ``_call_s3`` (S3 only; elsewhere null).
Prints one JSON object with requests, requests per 1,000 shards and seconds,
and the ratios after/before.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from edje_indexer.pipeline.plan import fingerprint, fingerprints
from edje_indexer.schemas.storage import Location, filesystem


class _Counter:
    def __init__(self, fs):
        self.n = 0
        self._cls = type(fs) if hasattr(type(fs), "_call_s3") else None
        if self._cls is not None:
            original = self._cls._call_s3

            async def counting(inner, method, *a, **k):
                self.n += 1
                return await original(inner, method, *a, **k)

            self._original, self._cls._call_s3 = original, counting

    def take(self) -> int | None:
        n, self.n = self.n, 0
        return n if self._cls is not None else None

    def close(self):
        if self._cls is not None:
            self._cls._call_s3 = self._original


def _measure(fn, counter: _Counter) -> dict:
    counter.take()
    t = time.perf_counter()
    fn()
    seconds = time.perf_counter() - t
    return {"requests": counter.take(), "seconds": round(seconds, 3)}


def run(args) -> dict:
    fs, root = filesystem(args.url)
    root = root.rstrip("/")
    shard_paths = [f"{root}/shards/part-{i:07d}.tar" for i in range(args.shards)]
    commit_paths = [f"{root}/commits/seg-{i:07d}.json" for i in range(args.commits)]
    t = time.perf_counter()
    fs.pipe({p: b"x" * (i % 97 + 1) for i, p in enumerate(shard_paths)})
    fs.pipe({p: json.dumps({"segment": i, "pad": "x" * 600}).encode() for i, p in enumerate(commit_paths)})
    setup_s = time.perf_counter() - t
    proto = args.url.split("://", 1)[0] + "://" if "://" in args.url else ""
    urls = [proto + p for p in shard_paths]
    counter = _Counter(fs)
    try:
        before = _measure(lambda: [fingerprint(u) for u in urls], counter)
        after = _measure(lambda: fingerprints(urls), counter)
        loc = Location(args.url)
        rel = [p[len(root) + 1 :] for p in commit_paths]
        one_by_one = _measure(lambda: [loc.read_bytes(*r.split("/")) for r in rel], counter)
        concurrent = _measure(lambda: loc.read_many(rel), counter)
    finally:
        counter.close()

    def per_k(requests):
        return round(requests * 1000 / args.shards, 2) if requests is not None else None

    return {
        "benchmark": "planning",
        "url": args.url,
        "shards": args.shards,
        "commits": args.commits,
        "setup_s": round(setup_s, 2),
        "fingerprint_per_shard": {**before, "requests_per_1000_shards": per_k(before["requests"])},
        "fingerprints_by_listing": {**after, "requests_per_1000_shards": per_k(after["requests"])},
        "fingerprints_speedup": round(before["seconds"] / after["seconds"], 1) if after["seconds"] else None,
        "commits_one_by_one": one_by_one,
        "commits_concurrent": concurrent,
        "commits_speedup": round(one_by_one["seconds"] / concurrent["seconds"], 1) if concurrent["seconds"] else None,
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m edje_indexer.benchmarks.planning", description=__doc__.split("\n\n")[0])
    p.add_argument("--url", required=True, help="a folder URL to write the test objects under (s3://bucket/prefix)")
    p.add_argument("--shards", type=int, default=10_000)
    p.add_argument("--commits", type=int, default=1_000)
    print(json.dumps(run(p.parse_args(argv)), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
