"""Memory stays bounded on hostile shards: the peak RSS of indexing each memory case (tests/hostile.py)
against that of an ordinary shard, measured in a separate process (tests/rss_runner.py).

Each case is a small file (a few MB at most) that used to make the worker hold hundreds of MB to
GBs: image members read and kept though one is used, tar headers read whole, a decode window of
large encoded images, every frame of a GIF. Each may add at most ``MAX_EXTRA_MB`` to the peak.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import hostile as H
import pytest

from edje_indexer.benchmarks.memory import reset_peak_rss

MAX_EXTRA_MB = 200
RUNNER = Path(__file__).with_name("rss_runner.py")

# case: (writer, decoder, extra flags, what the job must report)
CASES = {
    "many_image_members": (
        H.write_many_image_members,
        "pillow",
        (),
        dict(indexed=2, rejected={"decode_error": 2}, complete=True, extra_image_members=14),
    ),
    "gnu_long_name_header": (H.write_gnu_long_name, "pillow", (), dict(indexed=1, rejected={}, complete=False)),
    "pax_header": (H.write_pax_header, "pillow", (), dict(indexed=1, rejected={}, complete=False)),
    "prefetch_window": (
        H.write_prefetch_window,
        "pillow",
        ("--batch-size", "4", "--decode-threads", "2"),
        dict(indexed=12, rejected={}, complete=True),
    ),
    "gif_frames_torchvision": (H.write_gif_frames, "torchvision", (), dict(indexed=3, rejected={}, complete=True)),
}


def _argv(shard: Path, store: Path, decoder: str, extra=()) -> list[str]:
    return [
        "index",
        "--input",
        str(shard),
        "--store",
        str(store),
        "--preset",
        "tiny",
        "--json",
        "--decoder",
        decoder,
        *extra,
    ]


def _measure(tmp: Path, runs: list, warmup) -> dict:
    spec = tmp / f"spec-{len(list(tmp.glob('spec-*')))}.json"
    spec.write_text(json.dumps({"warmup": warmup, "runs": runs}))
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(
        [sys.executable, str(RUNNER), str(spec)], capture_output=True, text=True, timeout=600, env=env
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def measured(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("hostile_memory")
    normal = H.write_normal_shard(tmp / "normal.tar.gz")
    runs = []
    for decoder in ("pillow", "torchvision"):
        runs.append([f"normal_{decoder}", _argv(normal, tmp / f"store-normal-{decoder}", decoder)])
    for name, (writer, decoder, extra, _) in CASES.items():
        runs.append([name, _argv(writer(tmp / f"{name}.tar.gz"), tmp / f"store-{name}", decoder, extra)])
    warmup = _argv(normal, tmp / "store-warmup", "pillow")
    if reset_peak_rss():
        results = _measure(tmp, runs, warmup)
    else:  # one process per run, each measured by ru_maxrss
        results = {}
        for run in runs:
            results.update(_measure(tmp, [run], warmup))
    for name, r in results.items():
        print(f"peak RSS {name}: {r['peak_kb'] / 1024:.0f} MB (start {r['start_kb'] / 1024:.0f} MB)")
    return SimpleNamespace(results=results)


@pytest.mark.parametrize("case", list(CASES))
def test_hostile_case_adds_little_peak_memory(measured, case):
    _, decoder, _, want = CASES[case]
    r, base = measured.results[case], measured.results[f"normal_{decoder}"]
    assert base["rc"] == 0 and base["summary"]["images_indexed"] == 12
    extra_mb = (r["peak_kb"] - base["peak_kb"]) / 1024
    assert extra_mb <= MAX_EXTRA_MB, (
        f"{case}: peak RSS {r['peak_kb'] // 1024} MB, {extra_mb:.0f} MB over a normal shard"
    )
    s = r["summary"]
    assert r["rc"] == 0, r
    assert s["images_indexed"] == want["indexed"], s
    assert s["rejected_by_reason"] == want["rejected"], s
    assert (s["shards_incomplete"] == []) == want["complete"], s
