"""Reading stored rows: (segment, row) -> stored values, and their decode to floats.

The lookup (which segment and row hold an id) is the reader's (schemas/reader.py); this module only
moves bytes. It is shared by every read path of :class:`schemas.reader.TokenStore`.

Gather (local disk): each segment's token shard file is memory-mapped on
first use; the shard index at its end is checked to describe a plain
row-major block (see schemas/layout.py), after which a gather is one row copy
per id straight into the result (no temporaries, no grouping; cheaper than
fancy indexing per segment at every batch size measured). On object stores
the same layout is read by byte ranges (schemas/remote_rows.py): each
segment's shard index once, then per batch one range request per run of
nearby rows, for all segments touched concurrently. A file that does not have
that shape (or cannot be mapped) is read through zarr: one orthogonal
selection per segment touched, each row read once.

Decode: fp16 and int8 rows are decoded straight from the memory-mapped segments into the result, one
torch op per row (float16 -> float32 and int8 * scale; numpy's float16 conversion is ~7x slower on
x86); int4 rows are gathered into a per-thread scratch buffer, ~2 MB of decoded values at a time, and
decoded by :func:`schemas.quantization.dequantize` itself (numpy). The result is bit-identical to
:func:`schemas.quantization.dequantize`. Where a row does not fit one serial torch op (more than
``SERIAL_ELEMENTS`` values with several torch threads), or a segment is not memory-mapped, fp16 and int8
take the chunked path too, decoded by torch in pieces (see ``Rows.decode``).
torch is imported lazily: a reader uses it at once if the process has already
imported it, and otherwise imports it (about 2 s) only for a request of at
least ``TORCH_IMPORT_VALUES`` values or once it has decoded that many in all,
so a one-off read of a few images (``edje-index get``) never waits for it.
The decode always runs on the calling thread (see ``Rows.decode``), so
concurrent callers scale over cores and a busy machine does not stall it.

Measured here (100,000 fp16 images, 2 cores shared with other work), the gather into a new array is
within ~10% of ``tokens[rows]`` on one memory-mapped numpy array; a float32 ``get`` writes twice the
bytes of that limit into memory the kernel must first zero, which bounds it near half the limit.
"""

from __future__ import annotations

import itertools
import mmap
import os
import sys
import threading
import warnings
from collections.abc import Callable

import numpy as np
import zarr

from edje_indexer.schemas import layout, quantization, remote_rows
from edje_indexer.schemas.records import StoreMetadata
from edje_indexer.schemas.remote_rows import SHARD_INDEX_CRC, SHARD_INDEX_ENTRY, CheckedRemoteRows, RemoteRows
from edje_indexer.schemas.storage import Location
from edje_indexer.schemas.store import StoreDamaged

# get() gathers and decodes a batch this many bytes of stored values at a
# time, so the stored values are decoded from the CPU cache (local stores).
DECODE_CHUNK_BYTES = 2 << 20
# torch runs an op on the calling thread alone when it has at most this many
# values (at::internal::GRAIN_SIZE); see Rows.decode.
SERIAL_ELEMENTS = 32768
# A thread keeps its scratch buffers up to this size between calls.
SCRATCH_KEEP_BYTES = 64 << 20
# Without torch imported yet, a reader decodes with numpy until one request, or all requests together, reach
# this many values (~43 images of 64 x 384): importing torch costs ~2 s, numpy ~0.25 ms more per 43 images.
TORCH_IMPORT_VALUES = 1 << 20
_UNRESOLVED = object()


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


def _torch():
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a dependency; numpy decodes too, only slower
        return None
    return torch


class Rows:
    """Stored rows of a store's committed segments, gathered and decoded; safe to share between threads.

    ``segment(code)`` gives a segment's ``(data_path, rows)`` for the segment numbers the lookup uses; it
    is asked once per segment, when a batch first touches it (a segment never touched costs nothing).
    """

    def __init__(self, loc: Location, metadata: StoreMetadata, segment: Callable[[int], tuple[str, int]]):
        self.location = loc
        self.is_local = loc.is_local  # asked once: Location.is_local resolves the URL every time
        self.quantization = metadata.quantization
        self.tokens_per_image = metadata.tokens_per_image
        self.token_dim = metadata.token_dim
        quantization.check_encoding(metadata.quantization, metadata.token_dim, metadata.token_encoding)
        self._segment = segment
        self.stored_dtype = quantization.stored_dtype(self.quantization)
        # one image's stored values: [m, d], or [m, d / 2] for int4 (two values per byte)
        self.row_shape = quantization.stored_row_shape(self.quantization, self.tokens_per_image, self.token_dim)
        self.has_scales = quantization.has_scales(self.quantization)
        self._int4 = quantization.is_int4(self.quantization)
        # per array name, per segment number: a memory-mapped ndarray, a zarr.Array or a RemoteRows
        self._arrays: dict[str, dict[int, object]] = {layout.TOKENS: {}, layout.SCALES: {}}
        self._tensors: dict[int, object] = {}  # per segment number: its memory-mapped tokens as a torch tensor
        self._lock = threading.Lock()
        self._local = threading.local()
        self.requests = 0  # byte-range requests made for rows on an object store (the read benchmark reports it)
        self._torch_module = _UNRESOLVED  # torch, None (numpy only) or not looked up yet: see _torch_for
        self._decoded_values = 0

    def close(self) -> None:
        """Let go of the memory-mapped segment files."""
        with self._lock:
            for name in self._arrays:
                self._arrays[name] = {}
            self._tensors = {}

    @property
    def torch(self):
        """torch as the decode uses it, or None (numpy only); imports it if that was not decided yet."""
        if self._torch_module is _UNRESOLVED:
            self._torch_module = _torch()
        return self._torch_module

    @torch.setter
    def torch(self, module) -> None:
        self._torch_module = module

    def _torch_for(self, values: int):
        """torch for a decode of ``values`` values, or None (numpy), importing torch only where it pays off."""
        if self._torch_module is _UNRESOLVED:
            self._decoded_values += values
            if "torch" not in sys.modules and max(values, self._decoded_values) < TORCH_IMPORT_VALUES:
                return None
        return self.torch

    def _array(self, seg: int, name: str):
        arr = self._arrays[name].get(seg)
        if arr is not None:
            return arr
        with self._lock:
            if self._arrays[name].get(seg) is not None:
                return self._arrays[name][seg]
            data_path, n = self._segment(seg)
            shape = self.row_shape if name == layout.TOKENS else (self.tokens_per_image,)
            dtype = self.stored_dtype if name == layout.TOKENS else np.dtype(np.float16)
            arr = None
            path = self.location.path(data_path, name, "c", *(["0"] * (1 + len(shape))))
            if self.is_local and n > 0:
                arr = _mmap_rows(path, n, shape, dtype)
            elif n > 0:
                arr = RemoteRows(self.location.fs, path, n, shape, dtype)  # its index is checked on first use
            if arr is None:  # not a plain block (or empty): let zarr read it
                arr = zarr.open_array(self.location.url_of(data_path, name), mode="r")
            self._arrays[name][seg] = arr
            return arr

    def _check_remote(self, name: str, segs: list[int]) -> None:
        """Read the shard index of every remote segment not checked yet (concurrently). A file that is
        missing, of another size or with another index is damage (StoreDamaged), never zeros."""
        unchecked = [s for s in segs if type(self._arrays[name].get(s)) is RemoteRows]
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

        Memory-mapped segments: one row copy per id, straight into ``out``.
        That is a memcpy of a whole row (49 kB fp16) per id at memory bandwidth,
        the Python loop around it is ~1% of it at k = 1000 (measured here: the
        loop 3.9 ms, the same rows by ctypes.memmove from precomputed addresses
        3.9 ms, ``np.take(..., out=)`` 15 ms, ``tokens[rows]`` 9 ms plus a new
        array). Segments read through zarr: one orthogonal selection per
        segment, each stored row read once; on object stores, byte ranges.
        """
        arrays = self._arrays[name]
        seg_list = segs.tolist()
        touched = set(seg_list)
        for s in touched.difference(arrays):  # a segment's file is opened when a batch first touches it
            self._array(s, name)
        sources = [arrays[s] for s in seg_list]
        ndarray = np.ndarray
        slow = [s for s in touched if type(arrays[s]) is not ndarray]
        if not slow:
            for i, (src, r) in enumerate(zip(sources, rows.tolist())):
                out[i] = src[r]
            return
        for i, (src, r) in enumerate(zip(sources, rows.tolist())):
            if type(src) is ndarray:
                out[i] = src[r]
        todo = np.flatnonzero(np.isin(segs, np.asarray(slow, np.int64)))
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

    def new_raw(self, k: int) -> tuple[np.ndarray, np.ndarray | None]:
        """New arrays for the stored values [k, *row_shape] and scales [k, m] (None without scales) of k ids."""
        scales = np.empty((k, self.tokens_per_image), np.float16) if self.has_scales else None
        return np.empty((k, *self.row_shape), self.stored_dtype), scales

    def read_raw(
        self, segs: np.ndarray, rows: np.ndarray, values: np.ndarray | None, scales: np.ndarray | None
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """Stored values (and scales) of located ids into the given arrays (see :meth:`new_raw`), or into
        per-thread scratch (None)."""
        k = len(rows)
        if values is None:
            values = self._scratch("values", (k, *self.row_shape), self.stored_dtype)
        elif values.shape != (k, *self.row_shape) or values.dtype != self.stored_dtype:
            raise ValueError(f"stored values go into a {self.stored_dtype} array of shape {(k, *self.row_shape)}")
        self._gather(layout.TOKENS, segs, rows, values)
        if self.has_scales:
            if scales is None:
                scales = self._scratch("scales", (k, self.tokens_per_image), np.dtype(np.float16))
            self._gather(layout.SCALES, segs, rows, scales)
        return values, scales

    def get(self, segs: np.ndarray, rows: np.ndarray, out: np.ndarray) -> np.ndarray:
        """``out`` [k, m, d] filled with the decoded rows ``rows[i]`` of segments ``segs[i]``."""
        if out.dtype == self.stored_dtype and not self.has_scales:
            self._gather(layout.TOKENS, segs, rows, out)  # fp16 asked of an fp16 store: the gather is the result
            return out
        torch = self._torch_for(out.size)
        if self._decode_rows(segs, rows, out, torch):
            return out
        k = len(rows)
        step = max(k, 1)
        if self.is_local:  # decode from the CPU cache (remote: one read per segment for the batch)
            m, d = self.tokens_per_image, self.token_dim
            # int4 decodes through float32 temporaries of the decoded size: chunk by those
            image_bytes = m * d * 4 if self._int4 else m * d * self.stored_dtype.itemsize
            step = max(1, DECODE_CHUNK_BYTES // image_bytes)
        for a in range(0, k, step):
            b = min(a + step, k)
            values, scales = self.read_raw(segs[a:b], rows[a:b], None, None)
            self.decode(values, scales, out[a:b], torch)
        return out

    def _decode_rows(self, segs: np.ndarray, rows: np.ndarray, out: np.ndarray, torch) -> bool:
        """Decode each row straight from its memory-mapped segment into ``out``, one torch op per row
        (int8: two), without a scratch copy in between; False (nothing written) where that does not apply:
        no torch, int4 (its decode is many ops: chunks pay off), a segment not memory-mapped, or a row too
        big for torch to run its op serially (see :meth:`decode`).

        The same conversions as :meth:`decode` (float16 -> float32 or float16, int8 -> float32 times the
        float32 scale), so the same bits; measured here at k = 1000 (fp16 store, float32): 10-12 ms
        against 13-14 ms for chunks of a gather and a decode, memory traffic being most of either."""
        m, d = self.tokens_per_image, self.token_dim
        if (
            torch is None
            or self._int4
            or len(rows) == 0
            or out.dtype not in (np.float32, np.float16)
            or (self.has_scales and out.dtype != np.float32)
            or (m * d > SERIAL_ELEMENTS and torch.get_num_threads() > 1)
        ):
            return False
        arrays = self._arrays[layout.TOKENS]
        seg_list = segs.tolist()
        touched = set(seg_list)
        for s in touched.difference(arrays):
            self._array(s, layout.TOKENS)
        if any(type(arrays[s]) is not np.ndarray for s in touched):
            return False
        tensors = self._tensors
        for s in touched.difference(tensors):
            with warnings.catch_warnings():  # a read-only mapping: torch warns, and it is only ever read
                warnings.simplefilter("ignore", UserWarning)
                tensors[s] = torch.from_numpy(arrays[s])
        sources = [tensors[s] for s in seg_list]
        targets = torch.from_numpy(out).unbind(0)
        if not self.has_scales:
            for target, src, r in zip(targets, sources, rows.tolist()):
                target.copy_(src[r])
            return True
        scales = self._scratch("scales", (len(rows), m), np.dtype(np.float16))
        self._gather(layout.SCALES, segs, rows, scales)
        # numpy's cast (k * m values, one op torch might run on several threads): float32 [k, m, 1] scales
        factors = torch.from_numpy(scales.astype(np.float32)[..., None]).unbind(0)
        for target, src, r, f in zip(targets, sources, rows.tolist(), factors):
            target.copy_(src[r]).mul_(f)  # float32 * float32, as quantization.dequantize computes it
        return True

    def decode(self, values: np.ndarray, scales: np.ndarray | None, out: np.ndarray, torch=_UNRESOLVED) -> None:
        """out[...] = quantization.dequantize(values, scales, ...), bit for bit, with torch where it can.

        Always on the calling thread. With torch's intra-op threads (more than
        one), each op is cut into pieces of at most SERIAL_ELEMENTS values,
        which torch runs serially: an OpenMP fork-join stalls for a scheduler
        time slice whenever another thread or process holds a core (measured
        here: 8 ms p50 for k=10 on a busy 2-core machine, against 0.05 ms;
        12 ms against 0.06 ms for one 2 MB chunk), and this memory-bound copy
        gains little from more cores anyway.
        ``torch``: the module to use, or None for numpy (default: :meth:`_torch_for` decides).
        """
        if torch is _UNRESOLVED:
            torch = self._torch_for(out.size)
        usable = torch is not None and out.dtype in (np.float32, np.float16) and out.size > 0
        if scales is not None and (self._int4 or out.dtype != np.float32):
            # int4 (numpy, whatever torch: integer ops and one multiply on the calling thread; torch would
            # need pieces of many small ops to stay off its thread pool, ~5x slower here), and int8 asked for
            # float16: quantization.dequantize's float32, then the cast to float16 in torch where it can
            # (numpy's is ~7x slower); the same rounding either way
            if out.dtype == np.float32 or not usable:
                quantization.dequantize(values, scales, self.quantization, out=out)
                return
            decoded = self._scratch("decoded", out.shape, np.dtype(np.float32))
            quantization.dequantize(values, scales, self.quantization, out=decoded)
            values, scales = decoded, None
        if not usable:
            if scales is None:
                np.copyto(out, values, casting="unsafe")
            else:
                np.multiply(values, scales.astype(np.float32)[..., None], out=out)  # int8 -> float32
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
