"""benchmarks/memory.py: the peak-RSS readings the benchmarks and memory tests rely on."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from edje_indexer.benchmarks.memory import status_kb, status_mb

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")

# In a fresh process: the test process's heap (hundreds of MB after other tests) may keep a freed block resident.
PROBE = """
import json, numpy as np
from edje_indexer.benchmarks.memory import reset_peak_rss, ru_maxrss_kb, status_kb
can_reset = reset_peak_rss()
before = status_kb("VmHWM")
block = np.ones(64 << 20, dtype=np.uint8)  # 64 MiB, touched
with_block = status_kb("VmHWM")
del block
print(json.dumps({"can_reset": can_reset, "before": before, "with_block": with_block, "ru_maxrss": ru_maxrss_kb(),
                  "reset_again": reset_peak_rss(), "after_reset": status_kb("VmHWM")}))
"""


@linux_only
def test_status_fields_and_a_peak_that_resets():
    assert status_kb("VmRSS") > 0 and status_mb("VmRSS") > 0
    assert status_kb("NoSuchField") is None
    got = json.loads(subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, check=True).stdout)
    assert got["with_block"] >= got["before"] + (60 << 10)  # the peak saw the block
    assert got["ru_maxrss"] >= got["with_block"] - 1024  # getrusage's peak is never reset
    if not got["can_reset"]:
        pytest.skip("this kernel does not let a process reset its peak (clear_refs)")
    assert got["reset_again"] and got["after_reset"] < got["with_block"] - (32 << 10)  # the freed block is gone
