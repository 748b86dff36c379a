"""Stores written by the first release (0.1.0, commit cedf645) still open, read and verify.

The test checks that release's code out of this repository's history into a
temporary folder, indexes a small corpus with it in a subprocess, and then
reads the store with the current code: the same ids and token bytes as the
first release's own reader returns, and ``verify --deep`` is clean.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from edje_indexer.pipeline.verify import verify
from edje_indexer.schemas import TokenStore

FIRST_RELEASE = "cedf645"
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _checkout(dest) -> bool:
    archive = subprocess.run(["git", "-C", REPO, "archive", FIRST_RELEASE], capture_output=True)
    if archive.returncode != 0:
        return False
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive.stdout, check=True)
    return True


def test_a_store_of_the_first_release_opens_reads_and_verifies(tmp_path, corpus):
    old = tmp_path / "release-0.1.0"
    old.mkdir()
    if not _checkout(old):
        pytest.skip(f"this checkout has no history back to {FIRST_RELEASE} (a shallow clone)")
    pattern, images, _ = corpus
    store = str(tmp_path / "old-store")
    code = (
        "import json, sys\n"
        "from pipeline.cli import main\n"
        "from schemas import TokenStore\n"
        f"assert main(['index', '--input', {pattern!r}, '--store', {store!r}, '--preset', 'tiny',"
        " '--quantize', 'int8']) == 0\n"
        f"ts = TokenStore.open({store!r})\n"
        "ids = sorted(ts.ids())\n"
        "print(json.dumps({'ids': ids, 'tokens': ts.get(ids).tolist()}))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = str(old)  # the first release's top-level packages, not the installed one
    proc = subprocess.run([sys.executable, "-c", code], cwd=old, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    then = json.loads(proc.stdout.strip().splitlines()[-1])

    now = TokenStore.open(store)
    assert sorted(now.ids()) == then["ids"] == sorted(images)
    np.testing.assert_array_equal(now.get(then["ids"]), np.array(then["tokens"], dtype=np.float32))
    assert now.metadata.software_version == "0.1.0" and now.metadata.quantization == "int8"
    report = verify(store, deep=True)
    assert report["ok"], report["problems"]
