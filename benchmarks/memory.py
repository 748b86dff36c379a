"""This process's resident memory, from Linux's ``/proc`` and ``getrusage``: one definition for the
benchmarks (benchmarks/throughput.py) and the memory tests (tests/rss_runner.py, tests/test_hostile_memory.py)."""

from __future__ import annotations

import resource
import sys


def status_kb(field: str) -> int | None:
    """A field of /proc/self/status (``VmRSS``, ``VmHWM``) in kB; None where there is no /proc."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def status_mb(field: str) -> float | None:
    kb = status_kb(field)
    return None if kb is None else round(kb / 1024, 1)


def reset_peak_rss() -> bool:
    """Reset the peak (``VmHWM``) to the current RSS (Linux ``clear_refs`` 5): one process can then measure
    the peak of each phase on its own. False where that is not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def ru_maxrss_kb() -> int:
    """The process's peak RSS since it started (never reset), in kB (macOS reports bytes)."""
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r // 1024 if sys.platform == "darwin" else r


def ru_maxrss_mb() -> float:
    return round(ru_maxrss_kb() / 1024, 1)
