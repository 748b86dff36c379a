"""An installed copy of the project works on its own: from another folder, without the repository on sys.path.

The project is built and installed with pip into a temporary ``--target`` folder, then imported by a fresh
interpreter whose working directory is another temporary folder. That interpreter runs with ``-S``: the
virtual environment's ``.pth`` files are not processed, so the editable install's import finder (which maps
``edje_indexer`` and its subpackages to the repository folders) is never installed, and a subpackage missing
from the installed copy cannot silently come from the repository. The environment's site-packages is added
*after* the target folder, for the dependencies (torch, apache_beam, ...).

pip builds from a copy of the source tree: an in-tree build would write ``build/`` into the repository
(setuptools keeps stale files there from earlier builds and would ship them).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import textwrap
from pathlib import Path

import edje_indexer

REPO = Path(edje_indexer.__file__).resolve().parent.parent  # the editable install points into the repository
VENV_BIN = Path(sys.executable).parent
PIP_TIMEOUT_S = 300
RUN_TIMEOUT_S = 180

CHECK = textwrap.dedent("""
    import importlib.metadata, importlib.util, json, os, sys
    target, site_packages, repo, store = sys.argv[1:5]
    sys.path.append(site_packages)  # dependencies only, after the target (no .pth files: python -S)
    assert not any("editable" in type(f).__name__.lower() or "editable" in getattr(f, "__module__", "")
                   for f in sys.meta_path), sys.meta_path

    import edje_indexer
    import edje_indexer.pipeline.cli
    import edje_indexer.schemas
    import edje_indexer.transforms
    import edje_indexer.rerank
    import edje_indexer.benchmarks.synthetic_store

    def under(path, folder):
        return os.path.realpath(path).startswith(os.path.realpath(folder) + os.sep)

    files = {name: mod.__file__ for name, mod in sys.modules.items()
             if name == "edje_indexer" or name.startswith("edje_indexer.")}
    assert len(files) > 10, files
    for name, f in files.items():
        assert under(f, target) and not under(f, repo), (name, f)
    for name in ("pipeline", "schemas", "transforms", "rerank", "benchmarks"):
        assert importlib.util.find_spec(name) is None, (name, importlib.util.find_spec(name))

    dist = importlib.metadata.distribution("edje-indexer")
    assert under(str(dist.locate_file("edje_indexer/__init__.py")), target), dist.locate_file("")
    assert edje_indexer.__version__ == importlib.metadata.version("edje-indexer") == dist.version
    [ep] = [e for e in dist.entry_points if e.group == "console_scripts" and e.name == "edje-index"]
    assert ep.load() is edje_indexer.pipeline.cli.main

    # and it works: a small store written and inspected with the installed copy only
    edje_indexer.benchmarks.synthetic_store.build_synthetic_store(store, 6, 4, quantization="int8", m=4, d=8, seed=1)
    rc = edje_indexer.pipeline.cli.main(["inspect", store, "--json"])
    assert rc == 0, rc
    print("INSTALLED-COPY-OK", edje_indexer.__version__, len(files))
""")


def _copy_source(dest: Path) -> Path:
    ignore = shutil.ignore_patterns(
        ".git",
        ".venv",
        "build",
        "dist",
        "*.egg-info",
        "__pycache__",
        "*.pyc",
        ".hypothesis",
        ".pytest_cache",
        "demo",
        "quality",  # make quality's unpacked packages, caches and stores (gigabytes)
        "tests",
    )
    shutil.copytree(REPO, dest, ignore=ignore)
    return dest


def test_installed_copy_imports_from_another_folder(tmp_path):
    assert (REPO / "setup.py").is_file(), REPO
    source = _copy_source(tmp_path / "source")
    target = tmp_path / "target"
    pip = subprocess.run(
        [
            str(VENV_BIN / "pip"),
            "install",
            "--no-deps",
            "--no-build-isolation",
            "--no-cache-dir",
            "--no-index",
            "--disable-pip-version-check",
            "-q",
            "--target",
            str(target),
            str(source),
        ],
        capture_output=True,
        text=True,
        timeout=PIP_TIMEOUT_S,
        cwd=tmp_path,
    )
    assert pip.returncode == 0, pip.stdout + pip.stderr
    assert (target / "edje_indexer" / "__init__.py").is_file()
    assert (target / "bin" / "edje-index").is_file()
    for sub in ("pipeline", "schemas", "transforms", "rerank", "benchmarks"):
        assert (target / "edje_indexer" / sub / "__init__.py").is_file(), sub
        assert not (target / sub).exists(), sub  # nothing lands as a top-level package

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env["PYTHONPATH"] = str(target)
    env["PYTHONNOUSERSITE"] = "1"
    site_packages = sysconfig.get_paths()["purelib"]
    run = subprocess.run(
        [sys.executable, "-S", "-c", CHECK, str(target), site_packages, str(REPO), str(elsewhere / "store")],
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT_S,
        cwd=elsewhere,
        env=env,
    )
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    assert "INSTALLED-COPY-OK" in run.stdout
    assert (elsewhere / "store" / "zarr.json").is_file()
