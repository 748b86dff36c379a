"""Byte-level access to a store location, local or remote (fsspec).

The writer, the launcher and every reader go through :class:`Location`, so
the rules about atomic publication live in one place:

* on a local filesystem, a file is published by writing a temporary sibling
  and ``os.replace``-ing it (atomic on POSIX);
* on object stores (s3://, gs://, ...), a single PUT is already atomic: an
  object is either absent or complete, so it is written directly.
"""

from __future__ import annotations

import json
import os
import uuid
from dataclasses import dataclass
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem


@dataclass(frozen=True)
class Location:
    """A folder (local path or fsspec URL) and the filesystem that holds it."""

    url: str

    @property
    def fs(self) -> fsspec.AbstractFileSystem:
        fs, _ = fsspec.core.url_to_fs(self.url)
        return fs

    @property
    def root(self) -> str:
        _, path = fsspec.core.url_to_fs(self.url)
        return path.rstrip("/")

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
        return self.fs.cat_file(self.path(*parts))

    def read_json(self, *parts: str) -> Any:
        return json.loads(self.read_bytes(*parts))

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
        else:
            fs.pipe_file(target, data)

    def write_json_atomic(self, obj: Any, *parts: str) -> None:
        self.write_bytes_atomic(json.dumps(obj, indent=1, sort_keys=True).encode(), *parts)

    def list(self, *parts: str) -> list[str]:
        """Names (not paths) of the entries of a folder; empty if it is absent."""
        folder = self.path(*parts)
        try:
            entries = self.fs.ls(folder, detail=False)
        except FileNotFoundError:
            return []
        return sorted(e.rstrip("/").rsplit("/", 1)[-1] for e in entries)

    def remove(self, *parts: str) -> None:
        p = self.path(*parts)
        if self.fs.exists(p):
            self.fs.rm(p, recursive=True)

    def du(self, *parts: str) -> int:
        p = self.path(*parts)
        if not self.fs.exists(p):
            return 0
        return int(self.fs.du(p, total=True))
