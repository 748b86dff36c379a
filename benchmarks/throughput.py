"""Throughput benchmark: the full indexing job against the model alone, on real JPEG photos.

    python -m edje_indexer.benchmarks.throughput
        [--preset tiny | --backbone TIMM_NAME --random-weights --random-adapter]
        [-n 512] [--shards 4] [--batch-size 32] [--decode-threads 4]
                                    [--device cpu|cuda] [--precision fp32|bf16|fp16] [--compile]
                                    [--quantize fp16|int8|int4|int4-rht] [--torch-threads T] [--dir DIR]
    python -m edje_indexer.benchmarks.throughput --rss-scaling [-n 256] [--shards 4] [--rss-factor 10] ...

One command:

1. **corpus** -- ``N`` real photos (the sample photos that scikit-image and
   scikit-learn ship, ``pipeline.demo.packaged_photos``), re-encoded as JPEG
   (quality 90) at 640x480, 800x600, 1024x768, 1280x960 and 1600x1200, squashed
   or center-cropped, written into ``--shards`` WebDataset shards with
   webdataset's ``TarWriter``. Built in ``--dir`` (default: a temporary
   folder) and reused when already there with the same parameters.
2. **limit** -- the model alone: ``TokenEncoder.__call__`` (backbone + adapter
   + quantization, results copied back to the host) on uint8 batches that are
   already decoded and resized in memory (every image decoded once with
   ``transforms.decoders.decode_image`` before timing), batched exactly as the
   job batches them (per shard, ``--batch-size``), same device and precision.
   Warmed up first on every batch shape the job will see, then timed over all
   ``N`` images.
3. **job** -- the real ``edje-index index`` job, end to end: ``run_job`` with a
   ``JobConfig`` (Beam, FnApiRunner) into a fresh store, in-process, so the
   encoder the job uses is the one ``transforms.index_shards.shared_encoder`` builds,
   warmed up the same way before the clock starts (compilation and oneDNN
   setup are one-time costs, not throughput). Reported: the wall time of the
   ``run_job`` call (planning, lock, Beam, finalize: the primary number) and
   the job's own ``seconds`` (the Beam part).

Each phase runs in its own fresh process (multiprocessing, spawn) so its peak
RSS is its own: ``peak_rss_mb`` (the process's VmHWM), and for the job also
``job_only_peak_rss_mb``, the peak while ``run_job`` ran (the high-water mark
is reset after the model is loaded and warmed up). ``--in-process`` runs
everything here instead (faster to start; RSS figures then include both
phases).

Prints one JSON object: images/s of limit and job, ``ratio`` = job / limit
(the goal: at least 0.85), peak RSS, and the setup (device and its name,
model, batch size, decode and torch threads, N, CPU count, versions). To say
what bounds the job it also reports:

* ``job.time_s``: the shards' own timings summed: ``encode`` (inside the
  encoder), ``waiting_for_decode_and_read`` (the shard loop not encoding:
  decode not ready, e.g. the first batch of every shard, tar reading and
  hashing), ``write``, and ``outside_shards`` (Beam, planning, lock, finalize);
* ``job.cpu_s_by_thread``: CPU seconds of the decode threads, of the other
  Python threads (the Beam worker that runs ``index_shard`` and calls the
  encoder) and of native threads (torch's intra-op pool), from ``/proc``;
* ``limit.decode``: Pillow decode + resize cost per image on one core, and
  ``ratio_if_cpu_bound``: the best ratio a CPU-only job could reach if the
  machine's cores did nothing but the model and the decoding;
* ``other_processes_cores_busy`` per phase (from ``/proc/stat``) and a
  ``warning`` when other processes competed for the CPU: on a shared machine
  use ``--repeats`` (best of R timings per phase);
* ``--sample-stacks``: a small sampling profiler of the job's Python threads.

``--decode-threads 1,2,4`` runs the job once per value (one limit run) and
reports the best, with the sweep. ``--torch-threads`` sets the job's torch
intra-op threads; the limit always runs with torch's default (all cores: the
machine's best for the model alone). With ``--decoder torchvision`` the limit
still pre-decodes with Pillow (same shapes; the model's cost is the same).

``--rss-scaling`` is the memory check: the job phase alone, each in a fresh
process, on ``N`` images in ``S`` shards and on ``--rss-factor`` x as many
shards of the same size; the goal is a peak-RSS ratio of at most 1.10
(shards stream: memory does not grow with the corpus). Images per shard stay
the same in both runs because ``index_shard`` holds one shard's tokens until
it writes them.

On a GPU machine (the paper's model; random weights unless they are in the
local Hugging Face cache or given with ``--weights``/``--adapter``; without
local weights the preset needs both ``--random-weights`` and
``--random-adapter``)::

    python -m edje_indexer.benchmarks.throughput --preset edje-siglip2-l16-384 --random-weights --random-adapter \\
        --device cuda --batch-size 128 --compile -n 4096 --shards 8 --decode-threads 4,8,16

(``make bench BENCH_ARGS='...'`` runs the same; add ``--decoder torchvision``
to decode JPEGs with nvJPEG on the GPU). Use ``-n`` a multiple of
``--shards`` x ``--batch-size`` so every batch is full. On CUDA the default
precision is bf16; ``torch_device_name`` names the card. There the limit is
the GPU and a Pillow job is bounded by JPEG decoding on the host as well:
``decode_bound_images_per_s`` (decode threads, at most the cores, over the
per-image decode cost) should be well above ``limit_images_per_s``.

A small real-size ViT for CPU runs (ViT-S/16)::

    python -m edje_indexer.benchmarks.throughput --backbone vit_small_patch16_224 --random-weights --random-adapter \\
        -n 256 --batch-size 32 --decode-threads 1,2,4
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import importlib
import inspect
import io
import json
import logging
import multiprocessing
import os
import platform
import resource
import shutil
import sys
import tempfile
import threading
import time
import uuid

from edje_indexer.benchmarks.memory import reset_peak_rss, ru_maxrss_mb, status_mb

SIZES = [(640, 480), (800, 600), (1024, 768), (1280, 960), (1600, 1200)]
MODES = ("squash", "crop")
CORPUS_VERSION = 2
GOAL_RATIO = 0.85
GOAL_RSS_RATIO = 1.10
ENV_KEYS = ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "MKL_NUM_THREADS", "CUDA_VISIBLE_DEVICES")


# --------------------------------------------------------------------------- corpus


def shard_counts(n: int, shards: int) -> list[int]:
    """Images in each shard: as even as possible, earlier shards take the remainder."""
    shards = max(1, min(shards, n))
    return [n // shards + (1 if s < n % shards else 0) for s in range(shards)]


def _variants(grain: float) -> list[bytes]:
    """Every photo x mode x size once, as JPEG bytes; the corpus cycles through them (sizes fastest)."""
    import numpy as np
    from PIL import Image, ImageOps

    from edje_indexer.pipeline.demo import packaged_photos

    out = []
    rng = np.random.default_rng(0)
    for _, path in packaged_photos():
        with Image.open(path) as src:
            src = src.convert("RGB")
        for mode in MODES:
            for size in SIZES:
                if mode == "squash":
                    im = src.resize(size, Image.Resampling.BICUBIC)
                else:
                    im = ImageOps.fit(src, size, Image.Resampling.BICUBIC)
                if grain > 0:  # sensor-like noise: upscaled small photos compress (and decode) easier than real ones
                    a = np.asarray(im, dtype=np.float32) + rng.normal(0.0, grain, (size[1], size[0], 3))
                    im = Image.fromarray(np.clip(a, 0, 255).astype(np.uint8))
                buf = io.BytesIO()
                im.save(buf, "JPEG", quality=90)
                out.append(buf.getvalue())
    return out


def build_corpus(folder: str, n: int, shards: int, grain: float = 0.0) -> dict:
    """``n`` JPEG photos in ``shards`` tar shards under ``folder`` (reused if built with the same parameters)."""
    from webdataset import TarWriter

    params = {
        "version": CORPUS_VERSION,
        "images": n,
        "shards": len(shard_counts(n, shards)),
        "grain": grain,
        "sizes": SIZES,
        "modes": list(MODES),
    }
    name = f"corpus-n{n}-s{params['shards']}" + (f"-g{grain:g}" if grain else "")
    path = os.path.join(folder, name)
    marker = os.path.join(path, "corpus.json")
    if os.path.exists(marker):
        with open(marker) as f:
            info = json.load(f)
        if info.get("params") == json.loads(json.dumps(params)):
            info.update(cached=True, pattern=os.path.join(path, "bench-*.tar"))  # the folder may have moved
            return info
    t = time.perf_counter()
    tmp = path + f".tmp-{uuid.uuid4().hex[:8]}"
    os.makedirs(tmp)
    variants = _variants(grain)
    counts = shard_counts(n, shards)
    i = total = 0
    for s, count in enumerate(counts):
        with TarWriter(os.path.join(tmp, f"bench-{s:06d}.tar")) as w:
            for _ in range(count):
                data = variants[i % len(variants)]
                w.write({"__key__": f"img{i:08d}", "jpg": data})
                total += len(data)
                i += 1
    info = {
        "params": params,
        "pattern": os.path.join(path, "bench-*.tar"),
        "counts": counts,
        "mean_jpeg_kb": round(total / n / 1024, 1),
        "distinct_images": min(n, len(variants)),
        "build_s": round(time.perf_counter() - t, 2),
    }
    with open(os.path.join(tmp, "corpus.json"), "w") as f:
        json.dump(info, f, indent=1)
    shutil.rmtree(path, ignore_errors=True)
    os.rename(tmp, path)
    info["cached"] = False
    return info


# --------------------------------------------------------------------------- measuring helpers


def _cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _machine_busy_s() -> float | None:
    """CPU seconds all processes on the machine have used (/proc/stat), None where unknown."""
    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()[1:]
    except OSError:
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in fields[:8])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


class Meter:
    """Wall time, this process's CPU, and the CPU other processes used meanwhile (noise on a shared machine)."""

    def __enter__(self):
        self.machine0, self.cpu0, self.t0 = _machine_busy_s(), _cpu_s(), time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.t0
        self.cpu = _cpu_s() - self.cpu0
        m1 = _machine_busy_s()
        self.others = None if m1 is None or self.machine0 is None else max(0.0, m1 - self.machine0 - self.cpu)
        return False

    def result(self, n: int) -> dict:
        return {
            "images_per_s": round(n / self.seconds, 2),
            "seconds": round(self.seconds, 3),
            "cpu_cores_busy": round(self.cpu / self.seconds, 2),
            "other_processes_cores_busy": None if self.others is None else round(self.others / self.seconds, 2),
        }


class ThreadCpuSampler:
    """Per-thread CPU seconds from /proc/self/task, grouped by what the thread is.

    Groups: ``decode`` (the indexer's decode pool threads, by Python name),
    ``python_other`` (other Python threads: the Beam worker that runs
    ``index_shard`` and calls the encoder, gRPC, progress...), ``native`` (threads
    Python does not know: torch's intra-op/OpenMP pool, mostly). Threads that
    end between two samples lose their last interval, so the sum is a little
    under the process total (reported alongside).
    """

    def __init__(self, interval_s: float = 0.1):
        self.interval_s = interval_s
        self.totals: dict[str, float] = {}
        self._last: dict[int, float] = {}
        self._names: dict[int, str] = {}
        self._stop = threading.Event()
        self._tick = os.sysconf("SC_CLK_TCK")
        self._thread = threading.Thread(target=self._run, name="bench-cpu-sampler", daemon=True)

    @staticmethod
    def _group(name: str | None) -> str:
        if name is None:
            return "native"
        if name.startswith("decode"):
            return "decode"
        if name == "bench-cpu-sampler":
            return "sampler"
        return "python_other"

    def _sample(self):
        for t in threading.enumerate():
            if t.native_id is not None:
                self._names[t.native_id] = t.name
        try:
            tids = os.listdir("/proc/self/task")
        except OSError:
            return
        for tid in tids:
            try:
                with open(f"/proc/self/task/{tid}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            cpu = (int(fields[11]) + int(fields[12])) / self._tick
            tid = int(tid)
            prev = self._last.get(tid, 0.0)  # a thread born during the run: all its CPU counts
            self._last[tid] = cpu
            g = self._group(self._names.get(tid))
            self.totals[g] = self.totals.get(g, 0.0) + (cpu - prev)

    def _run(self):
        while not self._stop.wait(self.interval_s):
            self._sample()

    def start(self):
        for tid in os.listdir("/proc/self/task"):  # what each existing thread had used before
            try:
                with open(f"/proc/self/task/{tid}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            self._last[int(tid)] = (int(fields[11]) + int(fields[12])) / self._tick
        self._thread.start()
        return self

    def stop(self) -> dict[str, float]:
        self._stop.set()
        self._thread.join()
        self._sample()
        return {k: round(v, 2) for k, v in sorted(self.totals.items())}


class StackSampler:
    """A poor man's sampling profiler of the Python threads (what py-spy would say, roughly).

    Every ``interval_s`` it looks at each thread's current frame and counts,
    per group (``decode`` threads vs the ``worker``: the other threads doing
    work), the innermost function (``leaf``) and the innermost function of this
    project (``project``: transforms/, pipeline/, schemas/). A thread blocked
    in C (a lock, a future, torch) shows as the Python function that called it.
    Idle threads (waiting in threading/queue/selectors/grpc internals) are not counted.
    """

    IDLE = (
        "threading.py:wait",
        "threading.py:_wait_for_tstate_lock",
        "queue.py:get",
        "selectors.py:select",
        "thread.py:_worker",
        "_channel.py:",
        "_server.py:",
        "threading.py:_bootstrap_inner",
        "threading.py:run",
    )  # a Thread.run blocked in C: Beam's state sampler
    PROJECT = (os.sep + "transforms" + os.sep, os.sep + "pipeline" + os.sep, os.sep + "schemas" + os.sep)

    def __init__(self, interval_s: float = 0.005):
        self.interval_s = interval_s
        self.leaf: dict[str, dict[str, int]] = {}
        self.project: dict[str, dict[str, int]] = {}
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bench-stack-sampler", daemon=True)

    def _run(self):
        me = threading.get_ident()
        while not self._stop.wait(self.interval_s):
            names = {t.ident: t.name for t in threading.enumerate()}
            self.samples += 1
            for ident, frame in sys._current_frames().items():
                if ident == me or names.get(ident, "").startswith("bench-"):
                    continue
                code = frame.f_code
                leaf = f"{os.path.basename(code.co_filename)}:{code.co_name}"
                if any(leaf.startswith(x) for x in self.IDLE):
                    continue
                group = "decode" if names.get(ident, "").startswith("decode") else "worker"
                self.leaf.setdefault(group, {})
                self.leaf[group][leaf] = self.leaf[group].get(leaf, 0) + 1
                f = frame
                while f is not None and not any(x in f.f_code.co_filename for x in self.PROJECT):
                    f = f.f_back
                proj = f"{os.path.basename(f.f_code.co_filename)}:{f.f_code.co_name}:{f.f_lineno}" if f else "(other)"
                self.project.setdefault(group, {})
                self.project[group][proj] = self.project[group].get(proj, 0) + 1

    def start(self):
        self._thread.start()
        return self

    def stop(self, top: int = 12) -> dict:
        self._stop.set()
        self._thread.join()

        def best(d):
            return {k: round(v * self.interval_s, 3) for k, v in sorted(d.items(), key=lambda kv: -kv[1])[:top]}

        return {
            "approx_s_per_entry": self.interval_s,
            "samples": self.samples,
            "leaf": {g: best(d) for g, d in self.leaf.items()},
            "project": {g: best(d) for g, d in self.project.items()},
        }


# --------------------------------------------------------------------------- phases (each may run in a child)


def _spec(p: dict):
    from edje_indexer.pipeline.presets import resolve_spec

    kw = dict(
        weights=p["weights"],
        adapter=p["adapter"],
        random_weights=p["random_weights"],
        random_adapter=p["random_adapter"],
        jpeg_draft=p["jpeg_draft"],
    )
    if p.get("decoder") and "decoder" in inspect.signature(resolve_spec).parameters:
        kw["decoder"] = p["decoder"]
    return resolve_spec(p["preset"], p["backbone"], **kw)


def _settings(p: dict):
    from edje_indexer.transforms.indexer import IndexSettings

    return IndexSettings(
        batch_size=p["batch_size"],
        decode_threads=p["decode_threads"],
        device=p["device"],
        precision=p["precision"],
        compile=p["compile"],
    )


def _encoder(p: dict, spec):
    """The encoder the job's DoFn will use: the process's shared one for these settings."""
    from edje_indexer.transforms.index_shards import shared_encoder

    return shared_encoder(spec, _settings(p), p["quantize"])


def _setup_process(p: dict, torch_threads: int = 0):
    logging.basicConfig(level=logging.WARNING)
    import torch

    if torch_threads:
        torch.set_num_threads(torch_threads)
    return torch


def _batch_shapes(counts: list[int], batch_size: int) -> list[int]:
    """The distinct batch sizes the job will run: full ones and each shard's remainder."""
    sizes = set()
    for c in counts:
        if c >= batch_size:
            sizes.add(batch_size)
        if c % batch_size:
            sizes.add(c % batch_size)
    return sorted(sizes, reverse=True)


def _warm_up(encoder, shapes: list[int], image_hw: tuple[int, int], repeats: int, sample=None) -> float:
    import numpy as np

    t = time.perf_counter()
    rng = np.random.default_rng(0)
    for bs in shapes:
        if sample is not None and len(sample) >= bs:
            batch = sample[:bs]
        else:
            batch = rng.integers(0, 256, (bs, *image_hw, 3), dtype=np.uint8)
        for _ in range(repeats):
            encoder(batch)
    return time.perf_counter() - t


def _device_sync(torch, device: str):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def phase_limit(p: dict) -> dict:
    """The model alone on pre-decoded images, batched as the job batches them (torch's default threads)."""
    torch = _setup_process(p)
    import numpy as np

    from edje_indexer.pipeline.plan import expand_pattern
    from edje_indexer.transforms.decoders import decode_image
    from edje_indexer.transforms.shards import Sample, ShardReadStats, iter_shard

    spec = _spec(p)
    encoder = _encoder(p, spec)
    pp = encoder.model.preprocess
    # Decode every image once (one thread: also the decode cost per image per core).
    shards = []
    decode_s = 0.0
    for url in expand_pattern(p["pattern"]):
        images = []
        for item in iter_shard(url, "key", ShardReadStats()):
            if isinstance(item, Sample):
                t = time.perf_counter()
                images.append(decode_image(item.data, pp, jpeg_draft=spec.jpeg_draft))
                decode_s += time.perf_counter() - t
        shards.append(images)
    n = sum(len(s) for s in shards)
    batches = [np.stack(s[i : i + p["batch_size"]]) for s in shards for i in range(0, len(s), p["batch_size"])]
    del shards
    warm_s = _warm_up(encoder, _batch_shapes(p["counts"], p["batch_size"]), pp.size, p["warmup"], batches[0])
    runs = []
    for _ in range(p["repeats"]):
        _device_sync(torch, p["device"])
        with Meter() as m:
            for b in batches:
                encoder(b)  # returns host numpy arrays: the device work has finished
            _device_sync(torch, p["device"])
        runs.append(m.result(n))
    best = max(runs, key=lambda r: r["images_per_s"])
    return {
        "images": n,
        **best,
        "images_per_s_runs": [r["images_per_s"] for r in runs],
        "warmup_s": round(warm_s, 2),
        "peak_rss_mb": status_mb("VmHWM"),
        "ru_maxrss_mb": ru_maxrss_mb(),
        "decoded_bytes_mb": round(sum(b.nbytes for b in batches) / 2**20, 1),
        "decode": {
            "images_per_s_per_thread": round(n / decode_s, 2),
            "ms_per_image": round(1000 * decode_s / n, 3),
            "input_size": list(pp.size),
            "resize": pp.resize,
            "jpeg_draft": spec.jpeg_draft,
        },
        "torch_threads": torch.get_num_threads(),
    }


def _one_job(p: dict, spec, store: str) -> dict:
    from edje_indexer.pipeline.job import JobConfig, run_job

    cfg = JobConfig(input=p["pattern"], store=store, spec=spec, quantization=p["quantize"], settings=_settings(p))
    sampler = ThreadCpuSampler().start() if os.path.isdir("/proc/self/task") else None
    stacks = StackSampler().start() if p.get("sample_stacks") else None
    with Meter() as m:
        result = run_job(cfg)
    by_thread = sampler.stop() if sampler else None
    stack_profile = stacks.stop() if stacks else None
    if result.failed or result.not_finished or result.indexed != sum(p["counts"]):
        raise RuntimeError(f"benchmark job did not index the whole corpus: {json.dumps(result.to_dict())}")
    sums = {k: 0.0 for k in ("read_decode_encode", "encode", "write", "total")}
    for rec in result.committed:
        for k in sums:
            sums[k] += rec.timings_s[k]
    n = result.indexed
    out = m.result(n)
    wall = out.pop("seconds")
    return {
        "images_per_s": out.pop("images_per_s"),
        "images_per_s_job_seconds": round(n / result.seconds, 2),
        "run_job_wall_s": round(wall, 3),
        "job_seconds": round(result.seconds, 3),
        # Summed over shards (FnApiRunner runs them one after another in one worker thread):
        # encode = inside TokenEncoder; waiting = the shard loop not encoding (decode not ready, tar reading,
        # batching); write = segment + rejected files; outside_shards = Beam, planning, lock, finalize.
        "time_s": {
            "encode": round(sums["encode"], 3),
            "waiting_for_decode_and_read": round(sums["read_decode_encode"] - sums["encode"], 3),
            "write": round(sums["write"], 3),
            "shards_total": round(sums["total"], 3),
            "outside_shards": round(wall - sums["total"], 3),
        },
        "encode_images_per_s_in_job": round(n / sums["encode"], 2) if sums["encode"] else None,
        **out,
        "cpu_s_by_thread": by_thread,
        "shards": len(result.committed),
        **({"stack_profile": stack_profile} if stack_profile else {}),
    }


def phase_job(p: dict) -> dict:
    """``run_job`` on the corpus into a fresh store, the encoder loaded and warmed up first."""
    torch = _setup_process(p, p["torch_threads"])
    spec = _spec(p)
    encoder = _encoder(p, spec)
    warm_s = _warm_up(encoder, _batch_shapes(p["counts"], p["batch_size"]), encoder.model.preprocess.size, p["warmup"])
    load_peak = status_mb("VmHWM")
    reset = reset_peak_rss()
    rss_before = status_mb("VmRSS")
    runs = []
    for r in range(p["repeats"]):
        store = f"{p['store']}-{r}"
        try:
            runs.append(_one_job(p, spec, store))
        finally:
            if not p.get("keep_store"):
                shutil.rmtree(store, ignore_errors=True)
    job_peak = status_mb("VmHWM")
    best = max(runs, key=lambda j: j["images_per_s"])
    return {
        "images": sum(p["counts"]),
        **best,
        "images_per_s_runs": [j["images_per_s"] for j in runs],
        "warmup_s": round(warm_s, 2),
        "encoder_reused": _encoder(p, spec) is encoder,  # the job's workers got this process's shared encoder
        "rss_before_job_mb": rss_before,
        "job_only_peak_rss_mb": job_peak if reset else None,
        "peak_rss_mb": max(x for x in (load_peak, job_peak) if x is not None) if load_peak else None,
        "ru_maxrss_mb": ru_maxrss_mb(),
        "torch_threads": torch.get_num_threads(),
    }


def _run(fn, p: dict, in_process: bool) -> dict:
    if in_process:
        return fn(p)
    # A fresh interpreter per phase: its peak RSS is its own, nothing is shared (model, threads, caches).
    # By the importable name, so the child imports this module (not __main__) to find it.
    target = getattr(importlib.import_module("edje_indexer.benchmarks.throughput"), fn.__name__)
    with cf.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as ex:
        return ex.submit(target, p).result()


# --------------------------------------------------------------------------- main


def _environment(p: dict) -> dict:
    import timm
    import torch

    if p["device"].startswith("cuda") and torch.cuda.is_available():
        name = torch.cuda.get_device_name(torch.device(p["device"]))
    else:
        name = platform.processor() or platform.machine()
        try:
            with open("/proc/cpuinfo") as f:
                name = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), name)
        except OSError:
            pass
    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:
        affinity = os.cpu_count()
    return {
        "device": p["device"],
        "torch_device_name": name,
        "cpu_count": os.cpu_count(),
        "cpus_usable": affinity,
        "torch": torch.__version__,
        "timm": timm.__version__,
        "python": platform.python_version(),
        # Threading settings that change CPU results (OpenMP threads spin between parallel regions by default).
        "env": {k: os.environ[k] for k in ENV_KEYS if k in os.environ},
    }


def _model_info(p: dict) -> dict:
    spec = _spec(p)
    return {
        "preset": p["preset"],
        "backbone": spec.backbone,
        "random_weights": spec.random_weights,
        "random_adapter": spec.random_adapter,
        "tokens": [spec.num_queries, spec.out_dim],
    }


def _params(args, corpus: dict, work: str, decode_threads: int) -> dict:
    return {
        "preset": args.preset,
        "backbone": args.backbone,
        "weights": args.weights,
        "adapter": args.adapter,
        "random_weights": args.random_weights,
        "random_adapter": args.random_adapter,
        "decoder": args.decoder,
        "jpeg_draft": args.jpeg_draft,
        "device": args.device,
        "precision": args.precision,
        "compile": args.compile,
        "quantize": args.quantize,
        "batch_size": args.batch_size,
        "decode_threads": decode_threads,
        "torch_threads": args.torch_threads,
        "warmup": args.warmup,
        "repeats": max(1, args.repeats),
        "pattern": corpus["pattern"],
        "counts": corpus["counts"],
        "store": os.path.join(work, f"store-{uuid.uuid4().hex[:10]}"),
        "keep_store": args.keep_store,
        "sample_stacks": args.sample_stacks,
    }


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m edje_indexer.benchmarks.throughput",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--preset", help="named model configuration (default: tiny unless --backbone is given)")
    ap.add_argument("--backbone", help="a bare timm ViT (its own timm preprocessing), e.g. vit_small_patch16_224")
    ap.add_argument("--weights", help="backbone weights file")
    ap.add_argument("--adapter", help="adapter weights file")
    ap.add_argument("--random-weights", action="store_true")
    ap.add_argument("--random-adapter", action="store_true")
    ap.add_argument("--decoder", help="pillow (the default) or torchvision (nvJPEG on a GPU), as edje-index index")
    ap.add_argument(
        "--no-jpeg-draft",
        dest="jpeg_draft",
        action="store_false",
        help="decode JPEGs at full size (as edje-index index --no-jpeg-draft)",
    )
    ap.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    ap.add_argument("--precision", choices=["fp32", "bf16", "fp16"], help="default: bf16 on cuda, fp32 on cpu")
    ap.add_argument("--compile", action="store_true")
    ap.add_argument(
        "--quantize",
        default="fp16",
        choices=["fp16", "int8", "int4", "int4-rht"],  # quantization.QUANTIZATIONS (no numpy at import)
        help="the stored quantization name",
    )
    ap.add_argument("-n", "--images", type=int, default=512)
    ap.add_argument("--shards", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--decode-threads", default="4", help="an int, or a comma list to sweep (e.g. 1,2,4)")
    ap.add_argument(
        "--torch-threads",
        type=int,
        default=0,
        help="torch.set_num_threads for the job phase (default 0: torch's own choice); the limit "
        "always runs with torch's default, the machine's best for the model alone",
    )
    ap.add_argument(
        "--repeats",
        type=int,
        default=1,
        help="time each phase this many times in its process and keep the best (noisy machines)",
    )
    ap.add_argument("--warmup", type=int, default=2, help="warm-up calls per batch shape before timing")
    ap.add_argument(
        "--grain",
        type=float,
        default=0.0,
        help="add gaussian noise (sigma, 0-255 scale) to the photos before JPEG encoding (more "
        "realistic entropy: upscaled sample photos are smoother than camera photos)",
    )
    ap.add_argument("--dir", help="work folder: corpus cache and stores (default: a temporary one, removed)")
    ap.add_argument("--keep-store", action="store_true", help="do not remove the job's store")
    ap.add_argument(
        "--sample-stacks",
        action="store_true",
        help="sample the job's Python stacks (a small profiler: where the worker and decode threads are)",
    )
    ap.add_argument("--in-process", action="store_true", help="run the phases in this process (no spawn)")
    ap.add_argument(
        "--rss-scaling",
        action="store_true",
        help="memory check: job phase on N images and on --rss-factor x N (more shards of the same size)",
    )
    ap.add_argument("--rss-factor", type=int, default=10)
    return ap


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    if not args.preset and not args.backbone:
        args.preset = "tiny"
    threads = [int(x) for x in str(args.decode_threads).split(",") if x.strip()]
    if args.images < 1 or args.batch_size < 1 or not threads or min(threads) < 1:
        raise SystemExit("-n, --batch-size and --decode-threads must be at least 1")
    logging.basicConfig(level=logging.WARNING)
    work = args.dir or tempfile.mkdtemp(prefix="edje-bench-tput-")
    os.makedirs(work, exist_ok=True)
    try:
        if args.rss_scaling:
            out = _rss_scaling(args, work, threads[0])
        else:
            out = _throughput(args, work, threads)
    finally:
        if not args.dir:
            shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(out, indent=1))
    # Speed is reported, not judged; the memory check is pass/fail (as benchmarks.incremental's byte check).
    return 1 if args.rss_scaling and not out["within_goal"] else 0


def _throughput(args, work: str, threads: list[int]) -> dict:
    corpus = build_corpus(work, args.images, args.shards, args.grain)
    p0 = _params(args, corpus, work, threads[0])
    limit = _run(phase_limit, p0, args.in_process)
    jobs = []
    for t in threads:
        jobs.append(_run(phase_job, _params(args, corpus, work, t), args.in_process))
        jobs[-1]["decode_threads"] = t
    best = max(jobs, key=lambda j: j["images_per_s"])
    n = limit["images"]
    per_img_model = 1.0 / limit["images_per_s"]
    per_img_decode = limit["decode"]["ms_per_image"] / 1000
    usable = _environment(p0)["cpus_usable"]
    out = {
        "benchmark": "throughput",
        "images": n,
        "limit_images_per_s": limit["images_per_s"],
        "job_images_per_s": best["images_per_s"],
        "ratio": round(best["images_per_s"] / limit["images_per_s"], 3),
        "ratio_job_seconds": round(best["images_per_s_job_seconds"] / limit["images_per_s"], 3),
        "goal_ratio_at_least": GOAL_RATIO,
        "run_job_wall_s": best["run_job_wall_s"],
        "job_seconds": best["job_seconds"],
        "peak_rss_mb": {
            "job_phase": best["peak_rss_mb"],
            "job_only": best["job_only_peak_rss_mb"],
            "limit_phase": limit["peak_rss_mb"],
            "this_process": status_mb("VmHWM"),
        },
        "ru_maxrss_mb": {
            "job_phase": best["ru_maxrss_mb"],
            "limit_phase": limit["ru_maxrss_mb"],
            "this_process": ru_maxrss_mb(),
        },
        **_environment(p0),
        "model": _model_info(p0),
        "precision": args.precision or ("bf16" if args.device.startswith("cuda") else "fp32"),
        "compile": args.compile,
        "quantization": args.quantize,
        "batch_size": args.batch_size,
        "decode_threads": best["decode_threads"],
        "torch_threads": {"limit": limit["torch_threads"], "job": best["torch_threads"]},
        "shards": len(corpus["counts"]),
        "corpus": {k: corpus[k] for k in ("mean_jpeg_kb", "distinct_images", "cached", "build_s")},
        "limit": limit,
        "job": best,
        # If host CPU is the only resource (CPU device): model seconds + decode seconds spread over all cores.
        "ratio_if_cpu_bound": round(per_img_model / (per_img_model + per_img_decode / usable), 3)
        if not args.device.startswith("cuda")
        else None,
        # On a GPU: the host can decode at most this many images/s with the decode threads given.
        "decode_bound_images_per_s": round(min(best["decode_threads"], usable) / per_img_decode, 1),
    }
    noise = max([limit["other_processes_cores_busy"] or 0.0] + [j["other_processes_cores_busy"] or 0.0 for j in jobs])
    if noise > 0.1:
        out["warning"] = (
            f"other processes kept up to {noise:.2f} CPU cores busy during a timed phase: the numbers "
            f"are not this machine's best (use --repeats, or a quiet machine)"
        )
    if len(jobs) > 1:
        out["decode_threads_sweep"] = [
            {
                "decode_threads": j["decode_threads"],
                "job_images_per_s": j["images_per_s"],
                "ratio": round(j["images_per_s"] / limit["images_per_s"], 3),
                "cpu_cores_busy": j["cpu_cores_busy"],
                "other_processes_cores_busy": j["other_processes_cores_busy"],
                "time_s": j["time_s"],
                "cpu_s_by_thread": j["cpu_s_by_thread"],
                **({"stack_profile": j["stack_profile"]} if "stack_profile" in j else {}),
            }
            for j in jobs
        ]
    return out


def _rss_scaling(args, work: str, decode_threads: int) -> dict:
    runs = {}
    for label, factor in (("small", 1), ("large", args.rss_factor)):
        corpus = build_corpus(work, args.images * factor, args.shards * factor, args.grain)
        job = _run(phase_job, _params(args, corpus, work, decode_threads), False)
        runs[label] = {
            "images": job["images"],
            "shards": job["shards"],
            "images_per_shard": max(corpus["counts"]),
            "peak_rss_mb": job["peak_rss_mb"],
            "job_only_peak_rss_mb": job["job_only_peak_rss_mb"],
            "rss_before_job_mb": job["rss_before_job_mb"],
            "ru_maxrss_mb": job["ru_maxrss_mb"],
            "images_per_s": job["images_per_s"],
        }
    s, big = runs["small"], runs["large"]
    ratio = big["peak_rss_mb"] / s["peak_rss_mb"] if s["peak_rss_mb"] else None
    job_only = (
        big["job_only_peak_rss_mb"] / s["job_only_peak_rss_mb"]
        if s["job_only_peak_rss_mb"] and big["job_only_peak_rss_mb"]
        else None
    )
    p0 = _params(args, {"pattern": "", "counts": []}, work, decode_threads)
    return {
        "benchmark": "rss_scaling",
        "factor": args.rss_factor,
        "small": s,
        "large": big,
        "peak_rss_ratio": round(ratio, 3) if ratio else None,
        "job_only_peak_rss_ratio": round(job_only, 3) if job_only else None,
        "job_growth_mb": {
            "small": round(s["job_only_peak_rss_mb"] - s["rss_before_job_mb"], 1),
            "large": round(big["job_only_peak_rss_mb"] - big["rss_before_job_mb"], 1),
        }
        if s["job_only_peak_rss_mb"] and big["job_only_peak_rss_mb"]
        else None,
        "goal_ratio_at_most": GOAL_RSS_RATIO,
        "within_goal": bool(ratio and ratio <= GOAL_RSS_RATIO),
        **_environment(p0),
        "model": _model_info(p0),
        "batch_size": args.batch_size,
        "decode_threads": decode_threads,
    }


if __name__ == "__main__":
    raise SystemExit(main())
