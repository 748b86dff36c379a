"""Read benchmark: batched lookups by id through TokenStore, against plain numpy.

    python -m edje_indexer.benchmarks.read [--images 100000] [--images-per-segment 1000]
                              [--quantization fp16|int8|int4|int4-rht] [--dir DIR] [--batches-scale 1.0]
    python -m edje_indexer.benchmarks.read --store-url s3://bucket/store [--images 20000]

Builds a synthetic store with the real writer (benchmarks/synthetic_store.py)
and, from the same encoded token bytes, one big ``.npy`` file per array. With
a warm page cache (every byte read once before timing) it times random batches
of k = 10, 100 and 1000 distinct ids:

* ``get``      ``TokenStore.get(ids)``: float32 [k, m, d], a new array per batch
* ``get_out``  ``TokenStore.get(ids, out=buf)``: float32 into a reused buffer
* ``get_fp16`` ``TokenStore.get(ids, dtype=np.float16)``: float16, a new array per batch
  (the gather alone on an fp16 store)
* ``get_raw``  ``TokenStore.get_raw(ids)``: stored values (and scales), new arrays
* ``numpy_limit``  ``tokens_npy[rows]`` (and ``scales_npy[rows]``) on the
  memory-mapped ``.npy``, with the rows already known: the cost of the bytes
  alone, no id lookup, no segments, no decode (the limit on this machine)
* ``numpy_decode``  ``quantization.dequantize(numpy_limit)``: what a plain-numpy
  consumer pays for float32 (context for ``get``)

The methods take turns on every batch, so a noisy neighbour slows them alike.
Prints one JSON object: per k and method, images/s (mean, and k / p50) and
p50/p99 latency per batch (ms), and the ratio of each reader method to
``numpy_limit`` (1.0 = as fast as the bytes allow), from the means and from
the medians (``ratio_to_limit_p50``: steadier on a shared machine, where a
preempted batch moves the mean); plus store size, open time and the machine's
load. The goals are judged on the medians.
Uses a temporary folder (removed after) unless ``--dir`` is given (a store
already there with the same parameters is reused). Disk needed: about twice
the store (49 kB per fp16 image); with too little free space the image count
is lowered, and the JSON says so in ``note``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time

import numpy as np

from edje_indexer.benchmarks.synthetic_store import build_synthetic_store
from edje_indexer.schemas import quantization
from edje_indexer.schemas.reader import TokenStore
from edje_indexer.schemas.storage import Location

KS = (10, 100, 1000)
BATCHES = {10: 2000, 100: 1000, 1000: 150}
M, D = 64, 384


def _params(args) -> dict:
    return {
        "images": args.images,
        "images_per_segment": args.images_per_segment,
        "quantization": args.quantization,
        "m": M,
        "d": D,
        "seed": args.seed,
    }


def _built(folder: str, args) -> dict | None:
    """What ``folder`` holds from an earlier run with the same parameters, if anything."""
    try:
        with open(os.path.join(folder, "benchmark.json")) as f:
            info = json.load(f)
    except (OSError, ValueError):
        return None
    return info if info.get("params") == _params(args) else None


def build(folder: str, args) -> tuple[list[str], float, bool]:
    """Store + numpy copy in ``folder`` (reused if built with the same parameters)."""
    info = _built(folder, args)
    if info is not None:
        with open(os.path.join(folder, "ids.json")) as f:
            return json.load(f), info["build_s"], True
    # a different or unfinished build: start over
    shutil.rmtree(os.path.join(folder, "store"), ignore_errors=True)
    if os.path.exists(os.path.join(folder, "benchmark.json")):
        os.remove(os.path.join(folder, "benchmark.json"))
    os.makedirs(folder, exist_ok=True)
    q = args.quantization
    tokens = np.lib.format.open_memmap(
        os.path.join(folder, "tokens.npy"),
        mode="w+",
        dtype=quantization.stored_dtype(q),
        shape=(args.images, *quantization.stored_row_shape(q, M, D)),
    )
    scales = (
        np.lib.format.open_memmap(
            os.path.join(folder, "scales.npy"), mode="w+", dtype=np.float16, shape=(args.images, M)
        )
        if quantization.has_scales(q)
        else None
    )

    def copy(start, ids, values, sc):
        tokens[start : start + len(ids)] = values
        if sc is not None:
            scales[start : start + len(ids)] = sc

    t = time.perf_counter()
    built = build_synthetic_store(
        os.path.join(folder, "store"),
        args.images,
        args.images_per_segment,
        args.quantization,
        M,
        D,
        seed=args.seed,
        on_segment=copy,
    )
    tokens.flush()
    tokens = None  # release the memmap before it is read back
    if scales is not None:
        scales.flush()
        del scales
    build_s = time.perf_counter() - t
    with open(os.path.join(folder, "ids.json"), "w") as f:
        json.dump(built.ids, f)
    with open(os.path.join(folder, "benchmark.json"), "w") as f:
        json.dump({"params": _params(args), "build_s": build_s}, f)
    return built.ids, build_s, False


def _stats(lat: list[float], k: int) -> dict:
    a = np.asarray(lat)
    return {
        "images_per_s": round(k * len(a) / a.sum()),
        # k / p50: what a typical batch achieves; on a shared machine the mean is ruled by preempted batches
        "p50_images_per_s": round(k / float(np.percentile(a, 50))),
        "p50_ms": round(float(np.percentile(a, 50)) * 1e3, 3),
        "p99_ms": round(float(np.percentile(a, 99)) * 1e3, 3),
    }


def _time(methods: dict, batches) -> dict[str, list[float]]:
    """Per-batch latencies of each method. The methods take turns on each batch
    (in a rotating order), so a noisy neighbour slows them all alike."""
    for fn in methods.values():
        fn(batches[0])  # untimed: first-call effects (scratch buffers, lazy mmaps)
    names = list(methods)
    lat = {name: [] for name in names}
    for i, b in enumerate(batches):
        for j in range(len(names)):
            name = names[(i + j) % len(names)]
            t = time.perf_counter()
            methods[name](b)
            lat[name].append(time.perf_counter() - t)
    return lat


def run(args) -> dict:
    if args.torch_threads:
        import torch

        torch.set_num_threads(args.torch_threads)
    bpi = quantization.bytes_per_image(args.quantization, M, D)
    folder = args.dir or tempfile.mkdtemp(prefix="edje-read-bench-")
    os.makedirs(folder, exist_ok=True)
    note = None
    need = 2.1 * args.images * bpi  # store + numpy copy, plus slack
    free = shutil.disk_usage(folder).free
    if _built(folder, args) is None and need > 0.8 * free:
        fit = int(0.8 * free / (2.1 * bpi)) // 1000 * 1000
        note = f"--images {args.images} needs ~{need / 1e9:.1f} GB, {free / 1e9:.1f} GB free: used {fit}"
        print(note, file=sys.stderr)
        args.images = fit
    try:
        ids, build_s, reused = build(folder, args)
        n = len(ids)
        t = time.perf_counter()
        store = TokenStore.open(os.path.join(folder, "store"))
        open_s = time.perf_counter() - t
        assert len(store) == n
        tok = np.load(os.path.join(folder, "tokens.npy"), mmap_mode="r")
        sc = (
            np.load(os.path.join(folder, "scales.npy"), mmap_mode="r")
            if quantization.has_scales(args.quantization)
            else None
        )

        # Warm cache: every byte of both copies read once, through the mappings that will be timed.
        t = time.perf_counter()
        for a in range(0, n, 1000):
            store.get_raw(ids[a : a + 1000])
            np.asarray(tok[a : a + 1000]).sum(dtype=np.float64 if tok.dtype == np.float16 else np.int64)
            if sc is not None:
                np.asarray(sc[a : a + 1000]).sum()
        warm_s = time.perf_counter() - t

        rng = np.random.default_rng(args.seed + 1)
        load_before = os.getloadavg()[0]
        results = {}
        for k in KS:
            if k > n:
                continue
            nb = max(10, int(BATCHES[k] * args.batches_scale))
            rows = [rng.choice(n, k, replace=False) for _ in range(nb)]
            batches = [([ids[i] for i in r], r) for r in rows]
            buf = np.empty((k, M, D), np.float32)

            def limit(b):
                out = tok[b[1]]
                if sc is not None:
                    out = (out, sc[b[1]])
                return out

            def numpy_decode(b):
                return quantization.dequantize(tok[b[1]], None if sc is None else sc[b[1]], args.quantization)

            methods = {
                "get": lambda b: store.get(b[0]),
                "get_out": lambda b, buf=buf: store.get(b[0], out=buf),
                "get_fp16": lambda b: store.get(b[0], dtype=np.float16),
                "get_raw": lambda b: store.get_raw(b[0]),
                "numpy_limit": limit,
            }
            if not args.skip_numpy_decode:
                methods["numpy_decode"] = numpy_decode
            r = {name: _stats(lat, k) for name, lat in _time(methods, batches).items()}
            lim, lim50 = r["numpy_limit"]["images_per_s"], r["numpy_limit"]["p50_images_per_s"]
            for name in ("get", "get_out", "get_fp16", "get_raw"):
                r[name]["ratio_to_limit"] = round(r[name]["images_per_s"] / lim, 3)
                r[name]["ratio_to_limit_p50"] = round(r[name]["p50_images_per_s"] / lim50, 3)
            r["batches"] = nb
            results[str(k)] = r

        torch = store._rows.torch
        k1000 = results.get("1000", {})
        out = {
            "benchmark": "read",
            "images": n,
            "images_per_segment": args.images_per_segment,
            "segments": store.segments,
            "quantization": args.quantization,
            "tokens_per_image": M,
            "token_dim": D,
            "store_bytes": Location(os.path.join(folder, "store")).du(),
            "numpy_copy_bytes": sum(
                os.path.getsize(os.path.join(folder, f))
                for f in ("tokens.npy", "scales.npy")
                if os.path.exists(os.path.join(folder, f))
            ),
            "build_s": round(build_s, 1),
            "store_reused": reused,
            "open_s": round(open_s, 4),
            "warm_s": round(warm_s, 1),
            "results": results,
            "goals": {
                "k1000_get_at_least_50000_images_per_s": bool(k1000 and k1000["get"]["images_per_s"] >= 50000),
                "k1000_get_at_least_half_the_numpy_limit": bool(k1000 and k1000["get"]["ratio_to_limit_p50"] >= 0.5),
                "k1000_get_fp16_at_least_0.8_of_the_numpy_limit": bool(
                    k1000 and k1000["get_fp16"]["ratio_to_limit_p50"] >= 0.8
                ),
                "k1000_get_raw_at_least_0.8_of_the_numpy_limit": bool(
                    k1000 and k1000["get_raw"]["ratio_to_limit_p50"] >= 0.8
                ),
                "k100_get_p99_under_10ms": bool("100" in results and results["100"]["get"]["p99_ms"] < 10),
            },
            "machine": {
                "cpus": os.cpu_count(),
                "torch_threads": torch.get_num_threads() if torch else None,
                "numpy": np.__version__,
                "folder": folder,
                "load_avg_1min_before_after": [round(load_before, 2), round(os.getloadavg()[0], 2)],
            },
        }
        if note:
            out["note"] = note
        return out
    finally:
        if not args.dir and not args.keep:
            shutil.rmtree(folder, ignore_errors=True)


def run_remote(args) -> dict:
    """``--store-url``: build the synthetic store at an object-store URL, then time ``get`` batches there,
    counting the byte-range requests each batch makes (the reader's own counter)."""
    t = time.perf_counter()
    built = build_synthetic_store(
        args.store_url, args.images, args.images_per_segment, args.quantization, seed=args.seed
    )
    build_s = time.perf_counter() - t
    t = time.perf_counter()
    store = TokenStore.open(args.store_url)
    open_s = time.perf_counter() - t
    rng = np.random.default_rng(args.seed)
    out = {
        "benchmark": "read_remote",
        "store_url": args.store_url,
        "images": len(built.ids),
        "images_per_segment": args.images_per_segment,
        "quantization": args.quantization,
        "build_s": round(build_s, 2),
        "open_s": round(open_s, 3),
        "k": {},
    }
    for k in (10, 100, 1000):
        n_batches = max(3, int(args.batches_scale * (30 if k < 1000 else 10)))
        batches = [[built.ids[i] for i in rng.choice(len(built.ids), k, replace=False)] for _ in range(n_batches + 1)]
        store.get(batches[0])  # untimed: each touched segment's shard index is read once
        lat, requests, segments = [], [], []
        for b in batches[1:]:
            before = store.requests
            t = time.perf_counter()
            store.get(b)
            lat.append(time.perf_counter() - t)
            requests.append(store.requests - before)
            segments.append(len({built.segment_of[built.ids.index(i)] for i in b}) if k <= 100 else None)
        row = {**_stats(lat, k), "requests_per_batch": round(float(np.mean(requests)), 1)}
        if k <= 100:
            row["segments_touched_per_batch"] = round(float(np.mean(segments)), 1)
        out["k"][str(k)] = row
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m edje_indexer.benchmarks.read", description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=100_000, help="images in the store (default 100000, ~4.9 GB fp16)")
    p.add_argument("--images-per-segment", type=int, default=1000)
    p.add_argument("--quantization", default="fp16", choices=list(quantization.QUANTIZATIONS))
    p.add_argument("--dir", help="build (and keep) the store here; reused when the parameters match")
    p.add_argument("--keep", action="store_true", help="keep the temporary folder")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batches-scale", type=float, default=1.0, help="multiply the number of timed batches")
    p.add_argument("--torch-threads", type=int, help="torch.set_num_threads first (default: torch's own)")
    p.add_argument("--skip-numpy-decode", action="store_true", help="do not time the plain-numpy float32 decode")
    p.add_argument(
        "--store-url",
        help="an object-store URL (s3://bucket/store): build there and time get over it "
        "(requests per batch; the numpy limit does not apply)",
    )
    args = p.parse_args(argv)
    print(json.dumps(run_remote(args) if args.store_url else run(args), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
