"""benchmarks/memory.py: the peak-RSS readings the benchmarks and memory tests rely on."""

from __future__ import annotations

import sys

import numpy as np
import pytest

from edje_indexer.benchmarks.memory import reset_peak_rss, ru_maxrss_kb, status_kb, status_mb

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")


@linux_only
def test_status_fields_and_a_peak_that_resets():
    assert status_kb("VmRSS") > 0 and status_mb("VmRSS") > 0
    assert status_kb("NoSuchField") is None
    if not reset_peak_rss():  # first: earlier tests in this process may have set a higher peak
        pytest.skip("this kernel does not let a process reset its peak (clear_refs)")
    before = status_kb("VmHWM")
    block = np.ones(64 << 20, dtype=np.uint8)  # 64 MiB, touched
    peak_with_block = status_kb("VmHWM")
    assert peak_with_block >= before + (60 << 10) and peak_with_block >= status_kb("VmRSS")
    del block
    assert ru_maxrss_kb() >= peak_with_block - 1024  # getrusage's peak is never reset
    assert reset_peak_rss()
    assert status_kb("VmHWM") < peak_with_block - (32 << 10)  # the freed 64 MiB block no longer counts
