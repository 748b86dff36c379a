"""Compare-and-swap of small records on object stores (local disk: schemas/storage.py).

Object stores have no rename and no flock; what they have is conditional
requests, which is all a commit protocol or a lock needs:

* S3 (and S3-compatible servers that honour them, e.g. SeaweedFS, MinIO):
  ``PutObject`` with ``If-None-Match: *`` (create-if-absent) or ``If-Match:
  <ETag>`` (replace exactly what was read), ``DeleteObject`` with
  ``If-Match``; the version of a record is its ETag, read together with its
  content by one ``GetObject``. A lost race is HTTP 412, which s3fs reports
  as ``OSError(EINVAL)``.
* Any other backend (GCS through gcsfs included, for now): the record is
  compared and written in two steps, which is not atomic. That is correct
  with one writer at a time, which the store lock arranges, but the lock
  itself is then advisory: a warning naming the backend says so once per
  process, and the README lists what is atomic where.
"""

from __future__ import annotations

import errno
import hashlib
import logging

import fsspec.asyn

log = logging.getLogger(__name__)
_WARNED: set[str] = set()


def _is_s3(fs) -> bool:
    return "s3" in (fs.protocol if isinstance(fs.protocol, (tuple, list)) else (fs.protocol,))


def _lost_race(e: OSError) -> bool:
    """A failed precondition (HTTP 412) or a conflicting concurrent write (409)."""
    text = str(e)
    return isinstance(e, FileExistsError) or e.errno == errno.EINVAL and "pre-condition" in text or "409" in text


def _warn_once(loc) -> None:
    name = type(loc.fs).__name__
    if name not in _WARNED:
        _WARNED.add(name)
        log.warning(
            "%s (%s) has no conditional writes wired in: commit records and the store lock are compared and "
            "written in two steps, so the lock is advisory there; run one job per store",
            name,
            loc.url,
        )


def _bucket_key(fs, path: str) -> tuple[str, str]:
    bucket, key, _ = fs.split_path(path)
    return bucket, key


async def _get_object(fs, bucket: str, key: str) -> tuple[bytes, str]:
    resp = await fs._call_s3("get_object", Bucket=bucket, Key=key)
    async with resp["Body"] as stream:
        data = await stream.read()
    return data, resp["ETag"]


def read_versioned(loc, path: str) -> tuple[bytes | None, str | None]:
    fs = loc.fs
    try:
        if _is_s3(fs):
            return fsspec.asyn.sync(fs.loop, _get_object, fs, *_bucket_key(fs, path))  # content and ETag, one GET
        data = fs.cat_file(path)
    except FileNotFoundError:
        return None, None
    return data, hashlib.sha256(data).hexdigest()


def write_if(loc, path: str, data: bytes, expected: str | None) -> str | None:
    fs = loc.fs
    if _is_s3(fs):
        try:
            if expected is None:
                out = fs.pipe_file(path, data, mode="create")
            else:
                out = fs.pipe_file(path, data, IfMatch=expected)
        except OSError as e:
            if _lost_race(e):
                return None
            raise
        return (out or {}).get("ETag") or read_versioned(loc, path)[1]
    _warn_once(loc)
    _, current = read_versioned(loc, path)
    if current != expected:
        return None
    fs.pipe_file(path, data)
    return hashlib.sha256(data).hexdigest()


def remove_if(loc, path: str, expected: str) -> bool:
    fs = loc.fs
    if _is_s3(fs):
        bucket, key = _bucket_key(fs, path)
        try:
            fs.call_s3("delete_object", Bucket=bucket, Key=key, IfMatch=expected)
        except FileNotFoundError:
            return False
        except OSError as e:
            if _lost_race(e):
                return False
            raise
        return True
    _warn_once(loc)
    _, current = read_versioned(loc, path)
    if current != expected:
        return False
    fs.rm(path)
    return True


def supports_conditional_writes(fs) -> bool:
    return _is_s3(fs)
