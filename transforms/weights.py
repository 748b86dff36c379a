"""Model files (backbone weights, adapters, checkpoints) from local paths or fsspec URLs.

``--weights s3://bucket/model.safetensors`` has to work on a remote worker,
where the launcher's local paths mean nothing. Files are opened through
fsspec; a remote file is copied once per worker process into a temporary
folder (keeping its name's suffix, which says safetensors or pickle) and then
read by timm's own loader, which knows safetensors, ``.pth``/``.bin``,
``{"state_dict": ...}`` / ``{"model": ...}`` wrappers and ``module.``
prefixes. Pickles are read with ``weights_only=True``: a checkpoint cannot run
code.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import threading

from fsspec.implementations.local import LocalFileSystem

from edje_indexer.schemas.storage import filesystem

_COPIES: dict[str, str] = {}  # url -> local copy, for this process
_COPIES_LOCK = threading.Lock()
_COPY_DIR: list[str] = []


def _copy_dir() -> str:
    if not _COPY_DIR:
        _COPY_DIR.append(tempfile.mkdtemp(prefix="edje-weights-"))
    return _COPY_DIR[0]


def local_path(url: str) -> str:
    """A local file with the contents of ``url`` (the file itself when it is local)."""
    fs, path = filesystem(url)
    if isinstance(fs, LocalFileSystem):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"weights file {url} does not exist")
        return path
    with _COPIES_LOCK:
        if url in _COPIES and os.path.exists(_COPIES[url]):
            return _COPIES[url]
        if not fs.isfile(path):
            raise FileNotFoundError(f"weights file {url} does not exist (or is not a file)")
        name = path.rstrip("/").rsplit("/", 1)[-1]
        dest = os.path.join(_copy_dir(), f"{hashlib.sha256(url.encode()).hexdigest()[:16]}-{name}")
        fs.get_file(path, dest + ".part")
        os.replace(dest + ".part", dest)
        _COPIES[url] = dest
        return dest


def read_state_dict(url: str) -> dict:
    """The tensors of a weights file or checkpoint (unwrapped, ``module.`` stripped)."""
    from timm.models import load_state_dict

    path = local_path(url)
    try:
        return load_state_dict(path, use_ema=False, device="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as e:  # noqa: BLE001 -- any unreadable file: say which, and why
        raise ValueError(f"cannot read weights file {url}: {type(e).__name__}: {e}") from e
