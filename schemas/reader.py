"""Reading a token store: :class:`TokenStore`, the public reader.

Lookup: the id index (schemas/index.py, sorted by id) is held as a sorted
fixed-width array of UTF-8 id bytes plus parallel (segment, row) arrays,
about ``longest_id_bytes + 8`` bytes per image and no Python object per id;
a batch of ids is found with one ``np.searchsorted`` and an exact-match check.

Gather (local disk): each segment's token shard file is memory-mapped on
first use; the shard index at its end is checked to describe a plain
row-major block (see schemas/layout.py), after which a gather is one row copy
per id straight into the result (no temporaries, no grouping; cheaper than
fancy indexing per segment at every batch size measured). On object stores
the same layout is read by byte ranges (schemas/remote_rows.py): each
segment's shard index once, then per batch one range request per run of
nearby rows, for all segments touched concurrently. A file that does not have
that shape (or cannot be mapped) is read through zarr: one orthogonal
selection per segment touched, each row read once. Only segments committed
when the store was opened are visible.

Decode: ``get`` gathers the stored values into a per-thread scratch buffer
and decodes them into the result: float16 -> float32 and int8 * scale go
through torch when it is importable (numpy's float16 conversion is ~7x slower
on x86); the result is bit-identical to :func:`schemas.quantization.dequantize`.
torch is imported lazily: a reader uses it at once if the process has already
imported it, and otherwise imports it (about 2 s) only for a request of at
least ``TORCH_IMPORT_VALUES`` values or once it has decoded that many in all,
so a one-off read of a few images (``edje-index get``) never waits for it.
A local batch is gathered and decoded ~2 MB at a time, from the CPU cache.
The decode always runs on the calling thread (see ``_decode``), so
concurrent callers scale over cores and a busy machine does not stall it; it
is fastest with ``torch.set_num_threads(1)`` (one torch op per chunk rather
than one per 32k values).
``get(ids, dtype=np.float16)`` on an fp16 store is the gather alone, and
``get(ids, out=buf)`` reuses a result buffer.
"""

from __future__ import annotations

import itertools
import mmap
import os
import sys
import threading
from collections.abc import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import zarr

from edje_indexer.schemas import layout, quantization, remote_rows
from edje_indexer.schemas.index import load_index, read_commits
from edje_indexer.schemas.records import CommitRecord, StoreMetadata
from edje_indexer.schemas.remote_rows import SHARD_INDEX_CRC, SHARD_INDEX_ENTRY, CheckedRemoteRows, RemoteRows
from edje_indexer.schemas.storage import Location
from edje_indexer.schemas.store import StoreDamaged, open_metadata

# get() gathers and decodes a batch this many bytes of stored values at a
# time, so the stored values are decoded from the CPU cache (local stores).
DECODE_CHUNK_BYTES = 2 << 20
# torch runs an op on the calling thread alone when it has at most this many
# values (at::internal::GRAIN_SIZE); see TokenStore._decode.
SERIAL_ELEMENTS = 32768
# A thread keeps its scratch buffers up to this size between calls.
SCRATCH_KEEP_BYTES = 64 << 20
# Without torch imported yet, a reader decodes with numpy until one request, or all requests together, reach
# this many values (~43 images of 64 x 384): importing torch costs ~2 s, numpy ~0.25 ms more per 43 images.
TORCH_IMPORT_VALUES = 1 << 20
_UNRESOLVED = object()

TERMINATOR = b"\x01"  # see _id_keys


class UnknownIdError(KeyError):
    def __str__(self):
        return self.args[0]


def _mmap_rows(path: str, n: int, row_shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray | None:
    """A [n, *row_shape] view of a shard file; None if it cannot be mapped (zarr then reads it).

    The writer stores every segment uncompressed with its rows in order, so the file's size and shard index
    are known: a missing file, another size or another index is damage (StoreDamaged), never zeros."""
    row_bytes = int(np.prod(row_shape)) * dtype.itemsize
    expected = n * row_bytes + n * SHARD_INDEX_ENTRY + SHARD_INDEX_CRC
    try:
        size = os.path.getsize(path)
    except FileNotFoundError:
        raise StoreDamaged(f"chunk file {path} is missing (a committed segment's data is gone)") from None
    if size != expected:
        raise StoreDamaged(f"chunk file {path} has {size} bytes, the layout implies {expected}")
    try:
        with open(path, "rb") as f:
            mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    except (OSError, ValueError):  # e.g. vm.max_map_count reached: zarr still reads it
        return None
    index = np.frombuffer(mm, dtype="<u8", count=2 * n, offset=n * row_bytes).reshape(n, 2)
    if not (
        np.array_equal(index[:, 0], np.arange(n, dtype=np.uint64) * row_bytes) and (index[:, 1] == row_bytes).all()
    ):
        raise StoreDamaged(f"chunk file {path} has a shard index that is not this layout's (damaged)")
    return np.frombuffer(mm, dtype=dtype.newbyteorder("<"), count=n * int(np.prod(row_shape))).reshape(n, *row_shape)


def _id_keys(column: pa.ChunkedArray | pa.Array, terminated: bool = False) -> np.ndarray:
    """Ids as a fixed-width bytes array (UTF-8, zero-padded), in the column's order.

    Built from the Arrow buffers directly: no Python object per id, so opening
    a store of many millions of ids stays fast and small. numpy ignores
    trailing NUL bytes when comparing ``S`` strings, so for a store with an id
    containing NUL every key gets ``TERMINATOR`` appended (``terminated``).
    """
    if terminated:
        return np.array([i.encode("utf-8") + TERMINATOR for i in column.to_pylist()], dtype="S")
    chunks = [c for c in (column.chunks if isinstance(column, pa.ChunkedArray) else [column]) if len(c)]
    if not chunks:
        return np.zeros(0, dtype="S1")
    width = max(1, max(pc.max(pc.binary_length(c)).as_py() or 0 for c in chunks))
    parts = []
    for c in chunks:
        off_type = np.int64 if c.type in (pa.large_string(), pa.large_binary()) else np.int32
        _, offsets_buf, data_buf = c.buffers()[:3]
        offsets = np.frombuffer(
            offsets_buf, dtype=off_type, count=len(c) + 1, offset=c.offset * np.dtype(off_type).itemsize
        )
        data = np.frombuffer(data_buf, dtype=np.uint8) if data_buf is not None else np.zeros(0, np.uint8)
        lengths = np.diff(offsets)
        block = np.zeros((len(c), width), np.uint8)
        block[np.arange(width) < lengths[:, None]] = data[offsets[0] : offsets[-1]]  # row-major: id after id
        parts.append(block.view(f"S{width}").ravel())
    return parts[0] if len(parts) == 1 else np.concatenate(parts)


def _as_sequence(ids) -> Sequence[str]:
    if isinstance(ids, (str, bytes)):
        raise TypeError("ids must be a sequence of image ids (a list), not a single string; use [image_id]")
    if isinstance(ids, np.ndarray):
        return ids.ravel()
    return ids if isinstance(ids, (list, tuple)) else list(ids)


def _query_keys(ids: Sequence[str], terminated: bool) -> tuple[np.ndarray, np.ndarray | None]:
    """Requested ids as a UTF-8 bytes array like the keys, and a mask of the
    ids that can be compared that way (None: all). TypeError for non-strings."""
    if len(ids) == 0:
        return np.zeros(0, dtype="S1"), None
    try:
        joined = "".join(ids)  # also the type check, in C
    except TypeError:
        bad = next(i for i in ids if not isinstance(i, str))
        raise TypeError(f"image ids are strings; got {type(bad).__name__} {bad!r}") from None
    if terminated:
        return np.array([i.encode("utf-8") + TERMINATOR for i in ids], dtype="S"), None
    comparable = None
    if "\x00" in joined:  # no stored id has a NUL (else the keys are terminated): these are unknown
        comparable = np.array(["\x00" not in i for i in ids], dtype=bool)
    if joined.isascii():
        return np.array(ids, dtype="S"), comparable  # one C loop
    return np.array([i.encode("utf-8") for i in ids], dtype="S"), comparable


def _torch():
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a dependency; numpy decodes too, only slower
        return None
    return torch


class TokenStore:
    """Read-only view of the committed state of a store at open time.

    ``get(ids)`` returns decoded tokens [k, m, d] in the order asked (repeats
    allowed); ``get_raw(ids)`` the stored values and scales (None for fp16).
    Unknown ids raise :class:`UnknownIdError` (a KeyError). Safe to share
    between threads.
    """

    def __init__(self, loc: Location, metadata: StoreMetadata, commits: dict[str, CommitRecord], index):
        self.location = loc
        self.metadata = metadata
        self.commits = commits
        self._index = index
        self.quantization = metadata.quantization
        self.tokens_per_image = metadata.tokens_per_image
        self.token_dim = metadata.token_dim
        self._int8 = self.quantization == "int8"
        self._stored_dtype = np.dtype(np.int8 if self._int8 else np.float16)

        table = index.table
        self._seg_names = sorted(commits)
        seg_rows = np.array([commits[s].rows for s in self._seg_names], dtype=np.int64)
        n = table.num_rows
        self._terminated = bool(n and pc.any(pc.match_substring(table["id"], "\x00")).as_py())
        keys = _id_keys(table["id"], self._terminated)
        seg_of = np.zeros(n, dtype=np.int32)
        if n:
            enc = table["segment"].combine_chunks().dictionary_encode()
            names = enc.dictionary.to_pylist()
            missing = [s for s in names if s not in commits]
            if missing:
                raise ValueError(f"index of {loc.url} refers to uncommitted segment(s) {missing[:3]}")
            seg_no = {s: i for i, s in enumerate(self._seg_names)}
            code_to_seg = np.array([seg_no[s] for s in names], dtype=np.int32)
            seg_of = code_to_seg[enc.indices.to_numpy(zero_copy_only=False)]
        row_of = table["row"].to_numpy().astype(np.int32, copy=False) if n else np.zeros(0, np.int32)
        if n and not ((row_of >= 0) & (row_of < seg_rows[seg_of])).all():
            raise ValueError(f"index of {loc.url} points past the end of a segment; rebuild it")
        if n > 1 and not (keys[1:] > keys[:-1]).all():  # the index is sorted by id; be sure (bytes order)
            order = np.argsort(keys, kind="stable")
            keys, seg_of, row_of = keys[order], seg_of[order], row_of[order]
        self._keys, self._seg_of, self._row_of = keys, seg_of, row_of
        # per array name, per segment number: a memory-mapped ndarray, a zarr.Array, or None (not opened yet)
        self._arrays: dict[str, list] = {
            layout.TOKENS: [None] * len(self._seg_names),
            layout.SCALES: [None] * len(self._seg_names),
        }
        self._lock = threading.Lock()
        self._local = threading.local()
        self._closed = False
        self.requests = 0  # byte-range requests made for rows on an object store (the read benchmark reports it)
        self._torch_module = _UNRESOLVED  # torch, None (numpy only) or not looked up yet: see _torch_for
        self._decoded_values = 0

    @property
    def _torch(self):
        """torch as the decode uses it, or None (numpy only); imports it if that was not decided yet."""
        if self._torch_module is _UNRESOLVED:
            self._torch_module = _torch()
        return self._torch_module

    @_torch.setter
    def _torch(self, module) -> None:
        self._torch_module = module

    def _torch_for(self, values: int):
        """torch for a decode of ``values`` values, or None (numpy), importing torch only where it pays off."""
        if self._torch_module is _UNRESOLVED:
            self._decoded_values += values
            if "torch" not in sys.modules and max(values, self._decoded_values) < TORCH_IMPORT_VALUES:
                return None
        return self._torch

    @classmethod
    def open(cls, url: str) -> TokenStore:
        loc = Location(url)
        meta = open_metadata(loc)
        commits = read_commits(loc)
        return cls(loc, meta, commits, load_index(loc, commits))

    def close(self) -> None:
        """Let go of the memory-mapped segment files; the store cannot be read through this object afterwards."""
        with self._lock:
            self._closed = True
            for name in self._arrays:
                self._arrays[name] = [None] * len(self._seg_names)

    def __enter__(self) -> TokenStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __len__(self) -> int:
        return len(self._keys)

    def __contains__(self, image_id) -> bool:
        if not isinstance(image_id, str):
            return False
        return bool(self._find([image_id])[0][0])

    def ids(self) -> list[str]:
        """Every visible id, sorted (UTF-8 byte order)."""
        return self._index.table["id"].to_pylist()

    @property
    def duplicates(self):
        return self._index.duplicates

    # -- lookup -----------------------------------------------------------

    def _find(self, ids: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """(found mask, position in the sorted keys) of ``ids``: one searchsorted, no Python loop."""
        q, comparable = _query_keys(ids, self._terminated)
        keys = self._keys
        if len(keys) == 0 or len(q) == 0:
            return np.zeros(len(q), bool), np.zeros(len(q), np.intp)
        width = keys.dtype.itemsize
        if q.dtype.itemsize > width:  # longer than every stored id: cannot be there
            fits = np.char.str_len(q) <= width
            comparable = fits if comparable is None else comparable & fits
            q = np.where(fits, q, b"")
        if q.dtype.itemsize != width:
            q = q.astype(keys.dtype)  # the keys' width, or numpy would cast the whole key array
        pos = np.searchsorted(keys, q)
        np.minimum(pos, len(keys) - 1, out=pos)
        found = keys[pos] == q
        if comparable is not None:
            found &= comparable
        return found, pos

    def _locate(self, ids: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """(segment number, row) of each id; UnknownIdError naming the first id not in the store."""
        if self._closed:
            raise ValueError(f"TokenStore of {self.location.url} is closed")
        found, pos = self._find(ids)
        if not found.all():
            bad = ids[int(np.argmin(found))]
            raise UnknownIdError(f"unknown image id {str(bad)!r} in store {self.location.url}")
        return self._seg_of[pos], self._row_of[pos]

    # -- gather -----------------------------------------------------------

    def _array(self, seg: int, name: str):
        arr = self._arrays[name][seg]
        if arr is not None:
            return arr
        with self._lock:
            if self._arrays[name][seg] is not None:
                return self._arrays[name][seg]
            rec = self.commits[self._seg_names[seg]]
            n, m, d = rec.rows, self.tokens_per_image, self.token_dim
            shape = (m, d) if name == layout.TOKENS else (m,)
            dtype = self._stored_dtype if name == layout.TOKENS else np.dtype(np.float16)
            arr = None
            path = self.location.path(rec.data_path, name, "c", *(["0"] * (1 + len(shape))))
            if self.location.is_local and n > 0:
                arr = _mmap_rows(path, n, shape, dtype)
            elif n > 0:
                arr = RemoteRows(self.location.fs, path, n, shape, dtype)  # its index is checked on first use
            if arr is None:  # not a plain block (or empty): let zarr read it
                arr = zarr.open_array(self.location.url_of(rec.data_path, name), mode="r")
            self._arrays[name][seg] = arr
            return arr

    def _check_remote(self, name: str, segs: list[int]) -> None:
        """Read the shard index of every remote segment not checked yet (concurrently). A file that is
        missing, of another size or with another index is damage (StoreDamaged), never zeros."""
        unchecked = [s for s in segs if type(self._arrays[name][s]) is RemoteRows]
        if not unchecked:
            return
        arrays = self._arrays[name]
        tails = remote_rows.fetch(self.location.fs, [(arrays[s].path, *arrays[s].index_range()) for s in unchecked])
        with self._lock:
            for s, tail in zip(unchecked, tails):
                arr = arrays[s]
                if type(arr) is not RemoteRows:
                    continue
                if isinstance(tail, FileNotFoundError):
                    raise StoreDamaged(f"chunk file {arr.path} is missing (a committed segment's data is gone)")
                if isinstance(tail, BaseException):
                    raise tail
                if not arr.is_plain_block(tail):
                    raise StoreDamaged(f"chunk file {arr.path} is not the size or layout its segment implies")
                arrays[s] = CheckedRemoteRows.of(arr)

    @staticmethod
    def _groups(segs: np.ndarray) -> list[tuple[int, np.ndarray]]:
        """(segment, request positions) per segment touched, with a stable argsort."""
        if len(segs) == 0:
            return []
        order = np.argsort(segs, kind="stable")
        s = segs[order]
        cut = (np.flatnonzero(s[1:] != s[:-1]) + 1).tolist()
        return [(int(s[a]), order[a:b]) for a, b in zip([0] + cut, cut + [len(s)])]

    def _gather(self, name: str, segs: np.ndarray, rows: np.ndarray, out: np.ndarray) -> None:
        """out[i] = stored ``name`` row ``rows[i]`` of segment ``segs[i]`` (out has the stored dtype).

        Memory-mapped segments: one row copy per id, straight into ``out``
        (cheaper than grouping by segment at any batch size: no temporary, no
        second copy). Segments read through zarr: one orthogonal selection per
        segment, each stored row read once.
        """
        arrays = self._arrays[name]
        ndarray = np.ndarray
        deferred = False
        for i, s, r in zip(range(len(rows)), segs.tolist(), rows.tolist()):
            arr = arrays[s]
            if arr is None:
                arr = self._array(s, name)
            if type(arr) is ndarray:
                out[i] = arr[r]
            else:
                deferred = True
        if not deferred:
            return
        slow = np.array([a is not None and type(a) is not ndarray for a in arrays], dtype=bool)
        todo = np.flatnonzero(slow[segs])
        groups = self._groups(segs[todo])
        self._check_remote(name, [s for s, _ in groups])
        ranged = []
        for s, pos in groups:
            pos = todo[pos]
            arr = arrays[s]
            if type(arr) is CheckedRemoteRows:
                ranged.append((arr, rows[pos], pos))
                continue
            uniq, inv = np.unique(rows[pos], return_inverse=True)
            block = arr.get_orthogonal_selection((uniq,) + (slice(None),) * (arr.ndim - 1))
            out[pos] = block[inv.reshape(-1)]
        self.requests += remote_rows.gather(ranged, out)  # every remote segment of the batch at once

    def _scratch(self, name: str, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        """A per-thread buffer of ``shape`` (contents undefined), reused between calls when small."""
        nbytes = int(np.prod(shape)) * dtype.itemsize
        if nbytes > SCRATCH_KEEP_BYTES:
            return np.empty(shape, dtype)
        buffers = getattr(self._local, "buffers", None)
        if buffers is None:
            buffers = self._local.buffers = {}
        buf = buffers.get(name)
        if buf is None or buf.dtype != dtype or buf.size < int(np.prod(shape)):
            buf = buffers[name] = np.empty(max(int(np.prod(shape)), 1), dtype)
        return buf[: int(np.prod(shape))].reshape(shape)

    def _read_raw(
        self, segs: np.ndarray, rows: np.ndarray, values: np.ndarray | None, scales: np.ndarray | None
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """Stored values (and scales) of located ids into the given arrays, or into per-thread scratch."""
        k = len(rows)
        m, d = self.tokens_per_image, self.token_dim
        if values is None:
            values = self._scratch("values", (k, m, d), self._stored_dtype)
        self._gather(layout.TOKENS, segs, rows, values)
        if self._int8:
            if scales is None:
                scales = self._scratch("scales", (k, m), np.dtype(np.float16))
            self._gather(layout.SCALES, segs, rows, scales)
        return values, scales

    def get_raw(self, ids: Sequence[str]) -> tuple[np.ndarray, np.ndarray | None]:
        """Stored values [k, m, d] (float16, or int8) and scales [k, m] (float16; None for fp16), in the order asked."""
        segs, rows = self._locate(_as_sequence(ids))
        m, d = self.tokens_per_image, self.token_dim
        values = np.empty((len(rows), m, d), dtype=self._stored_dtype)
        scales = np.empty((len(rows), m), dtype=np.float16) if self._int8 else None
        return self._read_raw(segs, rows, values, scales)

    def get(self, ids: Sequence[str], dtype=np.float32, out: np.ndarray | None = None) -> np.ndarray:
        """Decoded tokens [k, m, d] of ``ids``, in that order (float32 unless ``dtype`` says otherwise).

        ``out``: an optional C-contiguous, writable [k, m, d] array of ``dtype``
        to fill and return (saves allocating and page-faulting a new result
        for every batch).
        """
        ids = _as_sequence(ids)
        dtype = np.dtype(dtype)
        shape = (len(ids), self.tokens_per_image, self.token_dim)
        if out is not None and (
            out.shape != shape or out.dtype != dtype or not out.flags.c_contiguous or not out.flags.writeable
        ):
            raise ValueError(
                f"out must be a C-contiguous writable {dtype} array of shape {shape}; "
                f"got {'read-only ' if not out.flags.writeable else ''}{out.dtype} {out.shape}"
            )
        segs, rows = self._locate(ids)
        if out is None:
            out = np.empty(shape, dtype)
        if dtype == self._stored_dtype and not self._int8:
            self._read_raw(segs, rows, out, None)  # fp16 asked of an fp16 store: the gather is the result
            return out
        k = len(rows)
        step = max(k, 1)
        if self.location.is_local:  # decode from the CPU cache (remote: one read per segment for the batch)
            step = max(1, DECODE_CHUNK_BYTES // (self.tokens_per_image * self.token_dim * self._stored_dtype.itemsize))
        torch = self._torch_for(out.size)
        for a in range(0, k, step):
            b = min(a + step, k)
            values, scales = self._read_raw(segs[a:b], rows[a:b], None, None)
            self._decode(values, scales, out[a:b], torch)
        return out

    def _decode(self, values: np.ndarray, scales: np.ndarray | None, out: np.ndarray, torch=_UNRESOLVED) -> None:
        """out[...] = quantization.dequantize(values, scales, ...), bit for bit, with torch where it can.

        Always on the calling thread. With torch's intra-op threads (more than
        one), each op is cut into pieces of at most SERIAL_ELEMENTS values,
        which torch runs serially: an OpenMP fork-join stalls for a scheduler
        time slice whenever another thread or process holds a core (measured
        here: 8 ms p50 for k=10 on a busy 2-core machine, against 0.05 ms),
        and this memory-bound copy gains little from more cores anyway.
        ``torch``: the module to use, or None for numpy (default: :meth:`_torch_for` decides).
        """
        if torch is _UNRESOLVED:
            torch = self._torch_for(out.size)
        if (
            torch is None
            or out.dtype not in (np.float32, np.float16)
            or out.size == 0
            or (scales is not None and out.dtype != np.float32)
        ):
            if scales is None:
                np.copyto(out, values, casting="unsafe")
            elif out.dtype == np.float32:
                np.multiply(values, scales.astype(np.float32)[..., None], out=out)
            else:
                out[...] = quantization.dequantize(values, scales, self.quantization, dtype=out.dtype)
            return
        d = self.token_dim
        o = torch.from_numpy(out).view(-1, d)  # one row per token
        v = torch.from_numpy(values).view(-1, d)
        s = None if scales is None else torch.from_numpy(scales).view(-1, 1).float()
        if torch.get_num_threads() == 1:
            pieces = [(o, v, s)]
        else:
            step = max(1, SERIAL_ELEMENTS // d)
            pieces = zip(o.split(step), v.split(step), s.split(step) if s is not None else itertools.repeat(None))
        for op, vp, sp in pieces:
            op.copy_(vp)
            if sp is not None:
                op.mul_(sp)  # float32 * float32, as quantization.dequantize computes it
