"""Peak RSS of ``edje-index index`` runs, in a process of their own (tests/test_hostile_memory.py).

Usage: ``python tests/rss_runner.py SPEC.json``; SPEC is ``{"warmup": ARGV | null, "runs": [[NAME, ARGV], ...]}``
(each ARGV is what ``edje_indexer.pipeline.cli.main`` takes). Prints one JSON line:
``{NAME: {"rc", "peak_kb", "start_kb", "summary"}}``.

Where Linux lets a process reset its own peak (``/proc/self/clear_refs``), each run's peak is
``VmHWM`` after a reset right before it, so one process measures every run. Elsewhere the spec
must hold one run, measured by ``ru_maxrss``.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import io
import json
import sys

from edje_indexer.benchmarks.memory import reset_peak_rss, ru_maxrss_kb, status_kb


def run(argv: list[str]) -> tuple[int, dict | None]:
    from edje_indexer.pipeline.cli import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = main(argv)
    try:
        return rc, json.loads(out.getvalue())
    except ValueError:
        return rc, None


def main() -> None:
    with open(sys.argv[1]) as f:
        spec = json.load(f)
    if spec.get("warmup"):
        run(spec["warmup"])  # imports, model, Beam: the same for every measured run
    can_reset = reset_peak_rss()
    if not can_reset and len(spec["runs"]) != 1:
        raise SystemExit("this system cannot reset a process's peak RSS: one run per process")
    results = {}
    for name, argv in spec["runs"]:
        gc.collect()
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6").malloc_trim(0)  # give freed heap back, so runs do not share it
        reset_peak_rss()
        start = status_kb("VmRSS")
        rc, summary = run(argv)
        peak = status_kb("VmHWM") if can_reset else ru_maxrss_kb()
        results[name] = {"rc": rc, "peak_kb": peak, "start_kb": start, "summary": summary}
    print(json.dumps(results))


if __name__ == "__main__":
    main()
