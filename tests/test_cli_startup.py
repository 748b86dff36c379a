"""Store commands start fast: no Beam, no torch, no matplotlib, and no command prints Beam's import noise.

Each command runs in a fresh interpreter, as a person runs it; what it
imported is read from ``sys.modules`` at exit. Times are printed (``-s``) and
bounded loosely (the machine may be busy); the import checks are the exact part.
"""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from edje_indexer.benchmarks.synthetic_store import build_synthetic_store

PROBE = (
    "import sys; from edje_indexer.pipeline.cli import main; rc = main(sys.argv[1:]); "
    "print('IMPORTED', ','.join(m for m in ('torch', 'apache_beam', 'matplotlib') if m in sys.modules)); "
    "sys.exit(rc)"
)


def run(*argv: str) -> tuple[subprocess.CompletedProcess, float]:
    t0 = time.perf_counter()
    res = subprocess.run([sys.executable, "-c", PROBE, *argv], capture_output=True, text=True, timeout=120)
    return res, time.perf_counter() - t0


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    for quant in ("fp16", "int8"):
        built = build_synthetic_store(str(tmp_path_factory.mktemp(quant) / "s"), 12, 4, quantization=quant)
    return built  # int8: the decode path with scales


@pytest.mark.parametrize(
    "command",
    [["get", "{store}", "{id}"], ["inspect", "{store}"], ["inspect", "{store}", "--json"], ["verify", "{store}"]]
    + [["rejected", "{store}"], ["rejected", "{store}", "--json"]],
    ids=lambda c: " ".join(x for x in c if not x.startswith("{")),
)
def test_store_commands_import_neither_beam_nor_torch(store, command):
    argv = [a.format(store=store.url, id=store.ids[3]) for a in command]
    res, seconds = run(*argv)
    print(f"edje-index {' '.join(command)}: {seconds:.2f} s")
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip().endswith("IMPORTED"), res.stdout[-200:]
    assert "apitools" not in res.stderr and "WARNING" not in res.stderr, res.stderr
    assert seconds < 5, f"{command[0]} took {seconds:.1f} s to run"


def test_get_without_torch_gives_the_same_tokens(store, tmp_path):
    import numpy as np

    from edje_indexer.schemas import TokenStore

    out = str(tmp_path / "t.npy")
    res, _ = run("get", store.url, store.ids[5], "--out", out)
    assert res.returncode == 0 and res.stdout.strip().endswith("IMPORTED"), res.stdout + res.stderr
    np.testing.assert_array_equal(np.load(out), TokenStore.open(store.url).get([store.ids[5]])[0])


def test_index_prints_no_beam_import_noise(tmp_path):
    """``index`` imports Beam (it runs the job), but its import-time warning is not shown."""
    res, _ = run("index", "--input", str(tmp_path / "none-*.tar"), "--store", str(tmp_path / "s"), "--preset", "tiny")
    assert res.returncode == 2 and "matched no shards" in res.stderr
    assert "apache_beam" in res.stdout and "apitools" not in res.stderr, res.stderr


def test_int4_stores_read_verify_and_inspect_without_torch(tmp_path):
    """The int4 decodes (nibbles, the rotation) have a numpy path: store commands still never import torch."""
    import numpy as np

    from edje_indexer.schemas import TokenStore

    for quant in ("int4", "int4-rht"):
        built = build_synthetic_store(str(tmp_path / quant), 6, 3, quantization=quant)
        out = str(tmp_path / f"{quant}.npy")
        for argv in (["get", built.url, built.ids[2], "--out", out], ["inspect", built.url], ["verify", built.url]):
            res, _ = run(*argv)
            assert res.returncode == 0, res.stderr
            assert res.stdout.strip().endswith("IMPORTED"), res.stdout[-200:]
        np.testing.assert_array_equal(np.load(out), TokenStore.open(built.url).get([built.ids[2]])[0])


def test_the_preset_help_names_every_preset():
    """pipeline/flags.py stays free of model imports, so its help lists the presets by hand: keep it whole."""
    import argparse

    from edje_indexer.pipeline.flags import add_index_flags
    from edje_indexer.pipeline.presets import PRESETS

    parser = add_index_flags(argparse.ArgumentParser())
    (action,) = [a for a in parser._actions if "--preset" in a.option_strings]
    assert all(name in action.help for name in PRESETS), action.help
