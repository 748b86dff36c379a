"""Compare-and-swap of small records on filesystems other than local disk.

Object stores have no rename and no flock; what they have is conditional
writes. Until a backend's conditional requests are wired in here, records
are compared and written in two steps (not atomic): correct with one writer
at a time, which is what the store lock arranges, and said once per backend
at run time so nobody mistakes it for a guarantee.
"""

from __future__ import annotations

import hashlib
import logging

log = logging.getLogger(__name__)
_WARNED: set[str] = set()


def _warn_once(loc) -> None:
    proto = type(loc.fs).__name__
    if proto not in _WARNED:
        _WARNED.add(proto)
        log.warning(
            "%s has no conditional writes wired in: commit records and the store lock on %s are "
            "compared and written in two steps (safe with one job per store)",
            proto,
            loc.url,
        )


def read_versioned(loc, path: str) -> tuple[bytes | None, str | None]:
    try:
        data = loc.fs.cat_file(path)
    except FileNotFoundError:
        return None, None
    return data, hashlib.sha256(data).hexdigest()


def write_if(loc, path: str, data: bytes, expected: str | None) -> str | None:
    _warn_once(loc)
    _, current = read_versioned(loc, path)
    if current != expected:
        return None
    loc.fs.pipe_file(path, data)
    return hashlib.sha256(data).hexdigest()


def remove_if(loc, path: str, expected: str) -> bool:
    _warn_once(loc)
    _, current = read_versioned(loc, path)
    if current != expected:
        return False
    loc.fs.rm(path)
    return True
