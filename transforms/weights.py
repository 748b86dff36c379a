"""Model files (backbone weights, adapters, checkpoints) from local paths or fsspec URLs.

``--weights s3://bucket/model.safetensors`` has to work on a remote worker,
where the launcher's local paths mean nothing. Files are opened through
fsspec; a remote file is copied once per worker process into a temporary
folder (keeping its name's suffix, which says safetensors or pickle) and then
read by timm's own loader, which knows safetensors, ``.pth``/``.bin``,
``{"state_dict": ...}`` / ``{"model": ...}`` wrappers and ``module.``
prefixes. Pickles are read with ``weights_only=True``: a checkpoint cannot run
code.

:func:`read_checkpoint` reads a whole training checkpoint (the EDJE authors'
``torch.save`` of ``{"model", "optimizer", "config", "epoch", "global_step"}``)
the same way, memory-mapped where torch can (only the tensors a caller keeps
are read), and says which objects stopped ``weights_only`` if any did.
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


def _unsafe_globals(path: str) -> str:
    import torch

    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception:  # noqa: BLE001 -- only for the message
        return ""
    return f" (it needs {', '.join(names)})" if names else ""


def read_checkpoint(url: str) -> dict:
    """The model state dict of a training checkpoint: ``{"model": ...}`` or ``{"state_dict": ...}`` unwrapped,
    or a bare state dict; safetensors too (a subset someone extracted). Tensors keep their dtype (bf16 stays bf16).

    Pickles are loaded with ``weights_only=True`` (memory-mapped when the file is in torch's zip format): the
    entries next to the model (optimizer state, a config dict, counters) are plain containers in the authors'
    files; anything else in the pickle is refused with the names of the objects it would construct, never
    unpickled.
    """
    import pickle

    import torch

    path = local_path(url)
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        try:
            return load_file(path, device="cpu")
        except Exception as e:  # noqa: BLE001
            raise ValueError(f"cannot read checkpoint {url}: {type(e).__name__}: {e}") from e
    try:
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:  # e.g. the legacy (non-zip) format cannot be memory-mapped
            if "mmap" not in str(e):
                raise
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise ValueError(
            f"checkpoint {url} holds objects other than tensors and plain containers{_unsafe_globals(path)}; "
            "it is not unpickled, since that could run code from the file. Re-save just the weights where the "
            "file is trusted: torch.save({'model': torch.load(f, weights_only=False)['model']}, out)"
        ) from None
    except Exception as e:  # noqa: BLE001 -- any unreadable file: say which, and why
        raise ValueError(f"cannot read checkpoint {url}: {type(e).__name__}: {e}") from e
    if not isinstance(ckpt, dict):
        raise ValueError(f"checkpoint {url} is a {type(ckpt).__name__}, not a state dict or {{'model': ...}}")
    for key in ("model", "state_dict"):
        if isinstance(ckpt.get(key), dict):
            ckpt = ckpt[key]
            break
    state = {k: v for k, v in ckpt.items() if torch.is_tensor(v)}
    if not state:
        raise ValueError(f"checkpoint {url} holds no tensors (its keys: {sorted(map(str, ckpt))[:8]})")
    if all(k.startswith("module.") for k in state):
        state = {k[len("module.") :]: v for k, v in state.items()}
    return state
