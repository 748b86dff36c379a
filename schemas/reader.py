"""Reading a token store: :class:`TokenStore`, the public reader.

Opening reads the store metadata and the id index pointer (index/CURRENT.json)
and memory-maps the index runs (schemas/id_runs.py; footers only): O(1) reads,
whatever the store's size, and no id is read until asked for. A batch of ids
is found with one vectorised hash + binary search per run, newest run first,
and an exact comparison of the id bytes; the rows are then gathered and
decoded by schemas/gather.py. Only the generation published when the store was
opened is visible: segments committed after it (a job still running, or one
that died before its finalize) become visible when a job publishes them.

Stores whose index predates runs (one Parquet table, format 1) are read too:
their table is loaded into memory at open (O(store)), and patched with
segments committed after it, as before; the next ``edje-index index`` (or
``edje-index upgrade``) writes runs.

``get(ids, dtype=np.float16)`` on an fp16 store is the gather alone, and
``get(ids, out=buf)`` reuses a result buffer.
"""

from __future__ import annotations

import bisect
import sys
import threading
from collections.abc import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from edje_indexer.schemas import id_runs, layout
from edje_indexer.schemas.gather import Rows
from edje_indexer.schemas.index import (
    legacy_run,
    load_index,
    open_runs,
    read_commits,
    read_duplicates,
    read_pointer,
)
from edje_indexer.schemas.records import StoreMetadata
from edje_indexer.schemas.storage import Location
from edje_indexer.schemas.store import open_metadata

# get() hands back this thread's previous result array when its caller let it go (see TokenStore._result),
# for results of this size; smaller ones are cheap to allocate, larger ones are not kept.
RECYCLE_FROM_BYTES = 1 << 20
RECYCLE_UP_TO_BYTES = 256 << 20
RECYCLE_BUFFERS = 2


class UnknownIdError(KeyError):
    def __str__(self):
        return self.args[0]


def _as_sequence(ids) -> Sequence[str]:
    if isinstance(ids, (str, bytes)):
        raise TypeError("ids must be a sequence of image ids (a list), not a single string; use [image_id]")
    if isinstance(ids, np.ndarray):
        return ids.ravel()
    return ids if isinstance(ids, (list, tuple)) else list(ids)


class TokenStore:
    """Read-only view of a store's published state at open time.

    ``get(ids)`` returns decoded tokens [k, m, d] in the order asked (repeats
    allowed); ``get_raw(ids)`` the stored values and scales (None for fp16).
    Unknown ids raise :class:`UnknownIdError` (a KeyError). Safe to share
    between threads.
    """

    def __init__(self, loc: Location, metadata: StoreMetadata, runs: list[id_runs.Run], images: int, pointer=None):
        self.location = loc
        self.metadata = metadata
        self.quantization = metadata.quantization
        self.tokens_per_image = metadata.tokens_per_image
        self.token_dim = metadata.token_dim
        self._lookup = id_runs.Lookup(runs)
        self._pointer = pointer
        self._images = images
        # segment numbers: run r's segment table rows, numbered from _bases[r]
        self._bases = np.cumsum([0] + [r.segments.num_rows for r in runs]).tolist()
        self._rows = Rows(loc, metadata, self._segment)
        self._closed = False
        self._duplicates = None
        self._recycle = threading.local()  # see _result
        self._segments_count = pointer.segments_count if pointer else self._bases[-1]

    @classmethod
    def open(cls, url: str) -> TokenStore:
        loc = Location(url)
        meta = open_metadata(loc)
        ptr = read_pointer(loc)
        if ptr is not None and ptr.format >= 2:
            return cls(loc, meta, open_runs(loc, ptr), ptr.images, ptr)
        # A store from before runs (or whose first job has not finished): its table, in memory.
        commits = read_commits(loc)
        index = load_index(loc, commits)
        store = cls(loc, meta, [legacy_run(index, commits)], index.table.num_rows)
        store._duplicates = index.duplicates
        store._segments_count = len(commits)
        return store

    def _segment(self, code: int) -> tuple[str, int]:
        r = bisect.bisect_right(self._bases, code) - 1
        seg = self._lookup.runs[r].segments
        i = code - self._bases[r]
        # a path read from a file is checked before anything is read through it (schemas/layout.py)
        return layout.check_data_path(seg["data_path"][i].as_py()), int(seg["rows"][i].as_py())

    def close(self) -> None:
        """Let go of the memory-mapped segment files; the store cannot be read through this object afterwards."""
        self._closed = True
        self._rows.close()

    def __enter__(self) -> TokenStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __len__(self) -> int:
        return self._images

    def __contains__(self, image_id) -> bool:
        if not isinstance(image_id, str):
            return False
        return bool(self._lookup.find([image_id])[0][0] >= 0)

    @property
    def segments(self) -> int:
        """Segments the published index points into."""
        return self._segments_count

    @property
    def requests(self) -> int:
        """Byte-range requests made for rows on an object store (the read benchmark reports it)."""
        return self._rows.requests

    def ids(self) -> list[str]:
        """Every visible id, sorted (UTF-8 byte order). Reads the whole index: O(store)."""
        ids = id_runs.merge_entries(self._lookup.runs)["id"]
        return ids.take(pc.sort_indices(ids)).to_pylist()

    @property
    def duplicates(self) -> pa.Table:
        """Every id stored more than once: each occurrence not served, and the one that is (read on first use)."""
        if self._duplicates is None:
            dups = read_duplicates(self.location, self._pointer)
            if dups.num_rows:  # the kept occurrence as of now (a later job may have found an earlier one)
                segs, rows = self._locate(dups["id"].to_pylist())
                names = [self._segment_name(s) for s in segs.tolist()]
                dups = dups.set_column(3, "kept_segment", pa.array(names, pa.string()))
                dups = dups.set_column(4, "kept_row", pa.array(rows, pa.int32()))
            self._duplicates = dups
        return self._duplicates

    def _segment_name(self, code: int) -> str:
        r = bisect.bisect_right(self._bases, code) - 1
        return self._lookup.runs[r].segments["segment"][code - self._bases[r]].as_py()

    # -- lookup -----------------------------------------------------------

    def _locate(self, ids: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """(segment number, row) of each id; UnknownIdError naming the first id not in the store."""
        if self._closed:
            raise ValueError(f"TokenStore of {self.location.url} is closed")
        which, pos, _ = self._lookup.find(ids)
        if len(which) and (which < 0).any():
            bad = ids[int(np.argmax(which < 0))]
            raise UnknownIdError(f"unknown image id {str(bad)!r} in store {self.location.url}")
        segs = np.empty(len(which), np.int64)
        rows = np.empty(len(which), np.int64)
        for r, run in enumerate(self._lookup.runs):
            at = np.flatnonzero(which == r)
            if len(at):
                segs[at] = run.segment[pos[at]] + self._bases[r]
                rows[at] = run.row[pos[at]]
        return segs, rows

    # -- read -------------------------------------------------------------

    def get_raw(self, ids: Sequence[str]) -> tuple[np.ndarray, np.ndarray | None]:
        """Stored values and scales, in the order asked: float16 [k, m, d] and None (fp16), int8 [k, m, d] and
        float16 scales [k, m] (int8), packed uint8 [k, m, d / 2] and scales (int4; see schemas/quantization.py)."""
        segs, rows = self._locate(_as_sequence(ids))
        return self._rows.read_raw(segs, rows, *self._rows.new_raw(len(rows)))

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
        return self._rows.get(segs, rows, self._result(shape, dtype) if out is None else out)

    def _result(self, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        """A new result array, or one of this thread's last two when nothing references it any more.

        Writing a fresh array costs a page fault per page (about as much as the gather itself at k = 1000,
        measured); a caller that lets each result go before asking again gets the same memory back. A result
        still referenced (held, viewed, wrapped by torch.from_numpy, ...) is never reused."""
        n = int(np.prod(shape))
        nbytes = n * dtype.itemsize
        if not RECYCLE_FROM_BYTES <= nbytes <= RECYCLE_UP_TO_BYTES:
            return np.empty(shape, dtype)
        pool = getattr(self._recycle, "pool", None)
        if pool is None:
            pool = self._recycle.pool = []
        for buf in pool:
            # 3 references: the pool's, ``buf`` and getrefcount's argument: no caller holds it any more
            if buf.dtype == dtype and buf.size >= n and sys.getrefcount(buf) == 3:
                break
        else:
            # two buffers: ``x = store.get(ids)`` in a loop holds the last result while asking for the next
            buf = np.empty(n, dtype)
            pool[:] = (pool + [buf])[-RECYCLE_BUFFERS:]
        del pool
        return buf[:n].reshape(shape)
