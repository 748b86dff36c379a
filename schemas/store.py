"""Reading a token store: :class:`TokenStore`, the public reader.

Fast path (local disk): each segment's token shard file is memory-mapped
once; the shard index at its end is checked to describe a plain row-major
block (see schemas/layout.py), after which a gather by id is numpy fancy
indexing. Elsewhere (fsspec URLs), or if a file does not have that shape,
the reader falls back to zarr itself. Only committed segments are visible.
"""

from __future__ import annotations

import mmap
import os
import threading
from collections import defaultdict
from typing import Iterable, Sequence

import numpy as np
import zarr

from schemas import layout, quantization
from schemas.index import load_index, read_commits
from schemas.storage import Location

SHARD_INDEX_ENTRY = 16  # two little-endian uint64 per inner chunk: offset, nbytes
SHARD_INDEX_CRC = 4


class UnknownIdError(KeyError):
    def __str__(self):
        return self.args[0]


def open_metadata(loc: Location) -> dict:
    if not loc.exists("zarr.json"):
        raise FileNotFoundError(f"{loc.url} is not a token store (no zarr.json); create one with 'edje-index index'")
    meta = zarr.open_group(loc.url, mode="r").attrs.get(layout.METADATA_KEY)
    if meta is None:
        raise ValueError(f"{loc.url} is a Zarr group but not an EDJE token store (no '{layout.METADATA_KEY}' attribute)")
    return dict(meta)


def _mmap_rows(path: str, n: int, row_shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray | None:
    """A [n, *row_shape] view of a shard file, or None if it is not a plain block."""
    row_bytes = int(np.prod(row_shape)) * dtype.itemsize
    expected = n * row_bytes + n * SHARD_INDEX_ENTRY + SHARD_INDEX_CRC
    try:
        size = os.path.getsize(path)
    except OSError:
        return None
    if size != expected:
        return None
    with open(path, "rb") as f:
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    index = np.frombuffer(mm, dtype="<u8", count=2 * n, offset=n * row_bytes).reshape(n, 2)
    if not (np.array_equal(index[:, 0], np.arange(n, dtype=np.uint64) * row_bytes) and (index[:, 1] == row_bytes).all()):
        return None
    return np.frombuffer(mm, dtype=dtype.newbyteorder("<"), count=n * int(np.prod(row_shape))).reshape(n, *row_shape)


class TokenStore:
    """Read-only view of the committed state of a store at open time.

    ``get(ids)`` returns decoded tokens [k, m, d] in the order asked;
    ``get_raw(ids)`` the stored values and scales (None for fp16). Safe to
    share between threads.
    """

    def __init__(self, loc: Location, metadata: dict, commits: dict[str, dict], index):
        self.location = loc
        self.metadata = metadata
        self.commits = commits
        self._index = index
        ids = index.table["id"].to_numpy(zero_copy_only=False)
        segs = index.table["segment"].to_numpy(zero_copy_only=False)
        self._seg_names = sorted(commits)
        seg_no = {s: i for i, s in enumerate(self._seg_names)}
        self._ids = ids
        self._where = {i: (seg_no[s], int(r)) for i, s, r in zip(ids, segs, index.table["row"].to_numpy())}
        self._arrays: dict[tuple[int, str], np.ndarray | zarr.Array] = {}
        self._lock = threading.Lock()
        self.quantization = metadata["quantization"]
        self.tokens_per_image = int(metadata["model"]["tokens_per_image"])
        self.token_dim = int(metadata["model"]["token_dim"])

    @classmethod
    def open(cls, url: str) -> "TokenStore":
        loc = Location(url)
        meta = open_metadata(loc)
        commits = read_commits(loc)
        return cls(loc, meta, commits, load_index(loc, commits))

    def __len__(self) -> int:
        return len(self._ids)

    def __contains__(self, image_id: str) -> bool:
        return image_id in self._where

    def ids(self) -> list[str]:
        return list(self._ids)

    @property
    def duplicates(self):
        return self._index.duplicates

    def _array(self, seg: int, name: str):
        key = (seg, name)
        arr = self._arrays.get(key)
        if arr is not None:
            return arr
        with self._lock:
            if key in self._arrays:
                return self._arrays[key]
            rec = self.commits[self._seg_names[seg]]
            n, m, d = rec["rows"], self.tokens_per_image, self.token_dim
            shape = (m, d) if name == layout.TOKENS else (m,)
            dtype = np.dtype(np.int8 if (name == layout.TOKENS and self.quantization == "int8") else np.float16)
            arr = None
            if self.location.is_local and n > 0:
                path = self.location.path(rec["data_path"], name, "c", *(["0"] * (1 + len(shape))))
                arr = _mmap_rows(path, n, shape, dtype)
            if arr is None:  # remote, or not a plain block: let zarr read it
                arr = zarr.open_array(self.location.url_of(rec["data_path"], name), mode="r")
            self._arrays[key] = arr
            return arr

    def _locate(self, ids: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        where = self._where
        try:
            pairs = [where[i] for i in ids]
        except KeyError as e:
            raise UnknownIdError(f"unknown image id {e.args[0]!r} in store {self.location.url}") from None
        if not pairs:
            return np.zeros(0, np.int64), np.zeros(0, np.int64)
        a = np.asarray(pairs, dtype=np.int64)
        return a[:, 0], a[:, 1]

    def _gather(self, name: str, segs: np.ndarray, rows: np.ndarray, out: np.ndarray) -> None:
        if len(segs) and (segs == segs[0]).all():
            groups = {int(segs[0]): np.arange(len(segs))}
        else:
            groups = defaultdict(list)
            for pos, s in enumerate(segs.tolist()):
                groups[s].append(pos)
        for s, positions in groups.items():
            positions = np.asarray(positions)
            arr = self._array(s, name)
            wanted = rows[positions]
            if isinstance(arr, np.ndarray):
                out[positions] = arr[wanted]
            else:
                out[positions] = arr.get_orthogonal_selection((wanted,) + (slice(None),) * (arr.ndim - 1))

    def get_raw(self, ids: Sequence[str]) -> tuple[np.ndarray, np.ndarray | None]:
        segs, rows = self._locate(ids)
        m, d = self.tokens_per_image, self.token_dim
        int8 = self.quantization == "int8"
        values = np.empty((len(ids), m, d), dtype=np.int8 if int8 else np.float16)
        self._gather(layout.TOKENS, segs, rows, values)
        scales = None
        if int8:
            scales = np.empty((len(ids), m), dtype=np.float16)
            self._gather(layout.SCALES, segs, rows, scales)
        return values, scales

    def get(self, ids: Sequence[str], dtype=np.float32) -> np.ndarray:
        values, scales = self.get_raw(ids)
        return quantization.decode(values, scales, self.quantization, dtype=dtype)
