"""Byte-level access to a store location, local or remote (fsspec).

The writer, the launcher and every reader go through :class:`Location`, so
the rules about atomic publication live in one place:

* on a local filesystem, a file is published by writing a temporary sibling
  and ``os.replace``-ing it (atomic on POSIX);
* on object stores (s3://, gs://, ...), a single PUT is already atomic: an
  object is either absent or complete, so it is written directly.

Records that several writers may race for (commit records, the store lock)
use :meth:`Location.read_versioned` and :meth:`Location.write_if`: a
compare-and-swap (create-if-absent when nothing is expected). On a local
filesystem the compare and the swap run under an exclusive ``flock`` of a
file in the store's ``.cas/`` folder (one host; the flock is released if the
process dies); other backends are in schemas/conditional.py.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import uuid
from dataclasses import dataclass
from typing import Any, BinaryIO

import fsspec
from fsspec.implementations.local import LocalFileSystem


def filesystem(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """The filesystem and path of ``url``, with directory listings never cached.

    fsspec's object-store clients (s3fs, gcsfs) otherwise keep every listing
    for the life of the process: a launcher that lists ``commits/``, lets
    workers in other processes commit, and lists again would see the old
    listing and take new commits for leftovers. Credentials and endpoints come
    from the usual places (``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, profile
    files, ...).
    """
    if "://" not in url or url.startswith("file://"):
        return fsspec.core.url_to_fs(url)
    return fsspec.core.url_to_fs(url, use_listings_cache=False)


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


CAS_FOLDER = ".cas"  # flock files of local compare-and-swap (schemas/layout.py)


@dataclass(frozen=True)
class Location:
    """A folder (local path or fsspec URL) and the filesystem that holds it."""

    url: str

    @property
    def fs(self) -> fsspec.AbstractFileSystem:
        return filesystem(self.url)[0]

    @property
    def root(self) -> str:
        return filesystem(self.url)[1].rstrip("/")

    @property
    def is_local(self) -> bool:
        return isinstance(self.fs, LocalFileSystem)

    def path(self, *parts: str) -> str:
        """Filesystem path (no protocol) of a file inside the location."""
        return "/".join([self.root, *parts])

    def url_of(self, *parts: str) -> str:
        """Full URL of a file inside the location (what zarr and users see)."""
        return "/".join([self.url.rstrip("/"), *parts])

    def exists(self, *parts: str) -> bool:
        return self.fs.exists(self.path(*parts))

    def read_bytes(self, *parts: str) -> bytes:
        if self.is_local:
            return self.fs.cat_file(self.path(*parts))
        return self.fs.cat_file(self.path(*parts), start=0)  # one GET (without a range s3fs asks the size first)

    def read_json(self, *parts: str) -> Any:
        return json.loads(self.read_bytes(*parts))

    def sha256(self, *parts: str, copy_to: BinaryIO | None = None, block: int = 8 << 20) -> str:
        """The sha256 of a file, read ``block`` bytes at a time, so memory stays at one block whatever the
        file's size (an id index run of 10^9 ids is ~40 GB); ``copy_to``: also write the bytes there."""
        digest = hashlib.sha256()
        with self.fs.open(self.path(*parts), "rb", block_size=block) as f:
            while chunk := f.read(block):
                digest.update(chunk)
                if copy_to is not None:
                    copy_to.write(chunk)
        return digest.hexdigest()

    def write_bytes_atomic(self, data: bytes, *parts: str) -> None:
        target = self.path(*parts)
        fs = self.fs
        parent = target.rsplit("/", 1)[0]
        fs.makedirs(parent, exist_ok=True)
        if self.is_local:
            tmp = f"{parent}/.tmp-{uuid.uuid4().hex}-{target.rsplit('/', 1)[1]}"
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, target)
            _fsync_dir(parent)  # the rename itself survives a power loss only once its directory is synced
        else:
            fs.pipe_file(target, data)

    def write_json_atomic(self, obj: Any, *parts: str) -> None:
        self.write_bytes_atomic(json.dumps(obj, indent=1, sort_keys=True).encode(), *parts)

    def list(self, *parts: str) -> list[str]:
        """Names (not paths) of the entries of a folder; empty if it is absent. Always a fresh listing."""
        folder = self.path(*parts)
        if self.is_local:  # names only (fsspec's local ls looks up every entry: slow for big folders)
            try:
                return sorted(os.listdir(folder))
            except (FileNotFoundError, NotADirectoryError):
                return []
        try:
            entries = self.fs.ls(folder, detail=False, refresh=True)
        except FileNotFoundError:
            return []
        return sorted(e.rstrip("/").rsplit("/", 1)[-1] for e in entries)

    def list_prefix(self, folder: str, prefix: str) -> list[str]:
        """Names in ``folder`` starting with ``prefix``: on S3 a listing of that prefix alone (a few keys, not the
        folder's million), elsewhere a listing of the folder."""
        if self.is_local or type(self.fs).__name__ != "S3FileSystem":
            return [n for n in self.list(folder) if n.startswith(prefix)]
        base = self.path(folder)
        found = self.fs.find(base, prefix=prefix, withdirs=True, maxdepth=1)
        names = {p[len(base) + 1 :].split("/", 1)[0] for p in found if p.startswith(base + "/")}
        return sorted(n for n in names if n.startswith(prefix))

    def remove(self, *parts: str) -> None:
        p = self.path(*parts)
        if self.fs.exists(p):
            self.fs.rm(p, recursive=True)

    def du(self, *parts: str) -> int:
        p = self.path(*parts)
        if not self.fs.exists(p):
            return 0
        return int(self.fs.du(p, total=True))

    # -- compare-and-swap ------------------------------------------------------

    @contextlib.contextmanager
    def _local_guard(self, target: str):
        """Exclusive flock of ``.cas/<record path>`` in this location (serialises CAS on this host)."""
        rel = target[len(self.root) + 1 :] if target.startswith(self.root + "/") else target.lstrip("/")
        guard_dir = f"{self.root}/{CAS_FOLDER}"
        os.makedirs(guard_dir, exist_ok=True)
        fd = os.open(f"{guard_dir}/{rel.replace('/', '%')}", os.O_CREAT | os.O_RDWR, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the flock

    def read_versioned(self, *parts: str) -> tuple[bytes | None, str | None]:
        """``(content, version)`` of a record, ``(None, None)`` if absent. ``version`` is opaque:
        pass it to :meth:`write_if` to replace exactly this content."""
        if not self.is_local:
            from edje_indexer.schemas import conditional

            return conditional.read_versioned(self, self.path(*parts))
        try:
            with open(self.path(*parts), "rb") as f:
                data = f.read()
        except FileNotFoundError:
            return None, None
        return data, hashlib.sha256(data).hexdigest()

    def write_if(self, data: bytes, *parts: str, expected: str | None) -> str | None:
        """Write ``data`` if the record is absent (``expected`` None) or still at version ``expected``.

        Returns the new version, or None (nothing written) if another writer got there first."""
        if not self.is_local:
            from edje_indexer.schemas import conditional

            return conditional.write_if(self, self.path(*parts), data, expected)
        target = self.path(*parts)
        with self._local_guard(target):
            _, current = self.read_versioned(*parts)
            if current != expected:
                return None
            self.write_bytes_atomic(data, *parts)
            return hashlib.sha256(data).hexdigest()

    def remove_if(self, *parts: str, expected: str) -> bool:
        """Delete the record if it is still at version ``expected``."""
        if not self.is_local:
            from edje_indexer.schemas import conditional

            return conditional.remove_if(self, self.path(*parts), expected)
        target = self.path(*parts)
        with self._local_guard(target):
            _, current = self.read_versioned(*parts)
            if current != expected:
                return False
            os.remove(target)
            return True

    def read_many(self, rel_paths: list[str]) -> dict[str, bytes]:
        """The contents of many small files, fetched concurrently where the filesystem can (one request each)."""
        if not rel_paths:
            return {}
        full = [self.path(p) for p in rel_paths]
        if self.is_local or not getattr(self.fs, "async_impl", False):
            out = {}
            for rel, f in zip(rel_paths, full):
                try:
                    out[rel] = self.fs.cat_file(f)
                except FileNotFoundError:
                    pass  # removed since it was listed
            return out
        # One GET per file, all at once. (fs.cat would first look each path up, and s3fs's whole-file read
        # asks for the size first: a range from byte 0 is one request.)
        got = self.fs.cat_ranges(full, [0] * len(full), [None] * len(full), on_error="return")
        out = {}
        for rel, data in zip(rel_paths, got):
            if isinstance(data, FileNotFoundError):
                continue
            if isinstance(data, BaseException):
                raise data
            out[rel] = data
        return out

    def sync(self, *parts: str) -> int:
        """Make a written file or folder durable on local disk: fsync every file and directory under it,
        then the directory that holds it (zarr writes chunk files by rename without fsync). Object stores
        acknowledge a PUT once it is durable: nothing to do. Returns the number of fsync calls."""
        if not self.is_local:
            return 0
        top = self.path(*parts)
        calls = 0
        if os.path.isdir(top):
            for root, _dirs, files in os.walk(top, topdown=False):
                for name in files:
                    fd = os.open(os.path.join(root, name), os.O_RDONLY)
                    try:
                        os.fsync(fd)
                    finally:
                        os.close(fd)
                    calls += 1
                _fsync_dir(root)
                calls += 1
        elif os.path.exists(top):
            fd = os.open(top, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            calls += 1
        _fsync_dir(os.path.dirname(top))
        return calls + 1
