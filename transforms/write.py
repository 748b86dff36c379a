"""Writing one segment: token arrays, dead-letter table, then the commit record.

Order matters: data first, dead letters second, the commit record last. A
segment without a commit record is invisible to readers and re-runs, and is
overwritten in place (same deterministic path) by the next attempt.
"""

from __future__ import annotations

import hashlib
import io

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import zarr

from edje_indexer.schemas import layout, quantization, tables
from edje_indexer.schemas.storage import Location


def token_checksum(values: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(values).reshape(-1).view(np.uint8)).hexdigest()  # no copy


def ids_checksum(ids) -> str:
    h = hashlib.sha256()
    for i in ids:
        h.update(str(i).encode())
        h.update(b"\0")
    return h.hexdigest()


def write_segment_data(loc: Location, data_path: str, ids: list[str], values: np.ndarray,
                       scales: np.ndarray | None, quant: str) -> dict:
    """Write ``tokens`` (and ``scales``) and ``ids`` of one segment; return checksums."""
    n, m, d = values.shape
    group = zarr.open_group(loc.url_of(data_path), mode="w", zarr_format=3)
    # write_empty_chunks keeps every inner chunk in place, so each shard file
    # is exactly a row-major block (an all-zero token row is still written).
    cfg = {"write_empty_chunks": True}
    enc = quantization.ENCODINGS[quant]
    tok = group.create_array(layout.TOKENS, shape=(n, m, d), dtype=enc["tokens_dtype"], compressors=None,
                             config=cfg, attributes={"encoding": enc}, **layout.array_chunking(n, m, d))
    if n:
        tok[...] = values
    checksums = {layout.TOKENS: token_checksum(values)}
    if scales is not None:
        chunking = layout.array_chunking(n, m, 1)
        sc = group.create_array(layout.SCALES, shape=(n, m), dtype="float16", compressors=None, config=cfg,
                                chunks=chunking["chunks"][:2], shards=chunking["shards"][:2])
        if n:
            sc[...] = scales
        checksums[layout.SCALES] = token_checksum(scales)
    id_arr = group.create_array(layout.IDS, shape=(n,), dtype=str, chunks=(max(n, 1),))
    if n:
        id_arr[...] = np.array(ids, dtype=object)
    checksums[layout.IDS] = ids_checksum(ids)
    return checksums


def write_rejected(loc: Location, data_path: str, rows: list[dict]) -> None:
    table = pa.Table.from_pylist(rows, schema=tables.REJECTED_SCHEMA)
    buf = io.BytesIO()
    pq.write_table(table, buf)
    loc.write_bytes_atomic(buf.getvalue(), *layout.rejected_path(data_path))


def read_rejected(loc: Location, data_path: str) -> pa.Table:
    if not loc.exists(*layout.rejected_path(data_path)):
        return tables.REJECTED_SCHEMA.empty_table()
    return pq.read_table(io.BytesIO(loc.read_bytes(*layout.rejected_path(data_path))))
