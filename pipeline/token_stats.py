"""Token statistics of a store from a sample of its rows (for the HTML report).

A fixed number of rows is drawn at random (seeded: the same store gives the
same report) from a bounded number of segments (``MIN_SEGMENTS`` to
``MAX_SEGMENTS``, enough to hold the sample) chosen in proportion to their
rows, and read straight from those segments' Zarr arrays: no id index, no
pass over the store, so the cost does not depend on the store's size.
"""

from __future__ import annotations

import math

import numpy as np
import zarr

from edje_indexer.schemas import layout, quantization
from edje_indexer.schemas.records import CommitRecord, StoreMetadata
from edje_indexer.schemas.storage import Location

MAX_SEGMENTS = 512  # segments read at most (each costs an open and a read: ~5 ms locally)
MIN_SEGMENTS = 32  # segments read at least (where there are so many), so that one odd shard cannot dominate


def sample_positions(commits: dict[str, CommitRecord], n_rows: int, seed: int = 0) -> list[tuple[CommitRecord, list]]:
    """(commit, sorted rows) of a random sample of about ``n_rows`` stored rows (fewer if the store has fewer)."""
    rng = np.random.default_rng(seed)
    segs = [commits[s] for s in sorted(commits) if commits[s].rows > 0]
    if not segs or n_rows <= 0:
        return []
    rows = np.array([c.rows for c in segs], dtype=np.float64)
    # enough segments to hold about twice the sample on average, within [MIN_SEGMENTS, MAX_SEGMENTS]
    want = int(min(MAX_SEGMENTS, max(MIN_SEGMENTS, np.ceil(2 * n_rows / rows.mean()))))
    if len(segs) > want:
        pick = np.sort(rng.choice(len(segs), want, replace=False, p=rows / rows.sum()))
        segs, rows = [segs[i] for i in pick], rows[pick]
    total = int(rows.sum())
    flat = np.sort(rng.choice(total, min(n_rows, total), replace=False))
    starts = np.concatenate([[0], np.cumsum(rows)]).astype(np.int64)
    which = np.searchsorted(starts, flat, side="right") - 1
    return [(c, (flat[which == i] - starts[i]).tolist()) for i, c in enumerate(segs) if (which == i).any()]


def read_sample(loc: Location, meta: StoreMetadata, picks: list[tuple[CommitRecord, list]]):
    """Stored values [k, m, d] (int4: [k, m, d / 2], packed) and scales [k, m] (None for fp16) of the picked
    rows, and the segments read."""
    values, scales, read = [], [], 0
    with_scales = quantization.has_scales(meta.quantization)
    for c, rows in picks:
        sel = np.asarray(rows, dtype=np.int64)
        try:
            tok = zarr.open_array(loc.url_of(c.data_path, layout.TOKENS), mode="r")
            v = tok.get_orthogonal_selection((sel, slice(None), slice(None)))
            s = None
            if with_scales:
                s = zarr.open_array(loc.url_of(c.data_path, layout.SCALES), mode="r").get_orthogonal_selection(
                    (sel, slice(None))
                )
        except (KeyError, FileNotFoundError, ValueError, OSError):
            continue  # damaged data: verify reports it; statistics use the rest
        values.append(np.asarray(v))
        scales.append(np.asarray(s) if s is not None else None)
        read += 1
    m, d = meta.tokens_per_image, meta.token_dim
    row_shape = quantization.stored_row_shape(meta.quantization, m, d)
    v = np.concatenate(values) if values else np.zeros((0, *row_shape), quantization.stored_dtype(meta.quantization))
    s = (np.concatenate(scales) if scales else np.zeros((0, m), np.float16)) if with_scales else None
    return v, s, read


def _quantiles(x: np.ndarray) -> dict:
    x = x[np.isfinite(x)]
    if not len(x):
        return {}
    q = np.quantile(x, [0.01, 0.5, 0.99])
    return {
        "mean": float(x.mean()),
        "p1": float(q[0]),
        "median": float(q[1]),
        "p99": float(q[2]),
        "max": float(x.max()),
    }


def token_stats(loc: Location, meta: StoreMetadata, commits: dict[str, CommitRecord], n_rows: int = 512, seed=0):
    """Statistics of a random sample of rows, plus the arrays the report's charts draw (``arrays``)."""
    picks = sample_positions(commits, n_rows, seed)
    values, scales, segments_read = read_sample(loc, meta, picks)
    m, d = meta.tokens_per_image, meta.token_dim
    x = quantization.dequantize(values, scales, meta.quantization) if len(values) else np.zeros((0, m, d), np.float32)
    k = x.shape[0]
    out = {
        "rows_sampled": int(k),
        "tokens_sampled": int(k * m),
        "segments_sampled": int(segments_read),
        "rows_in_store": int(sum(c.rows for c in commits.values())),
        "seed": seed,
    }
    if not k:
        return {**out, "arrays": {}}
    finite = np.isfinite(x)
    xf = np.where(finite, x, 0.0)
    norms = np.sqrt((xf.astype(np.float64) ** 2).sum(-1))  # [k, m]
    flat = xf.reshape(-1, d)
    pooled = xf.mean(1)
    unit = pooled / np.maximum(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12)
    cos = unit @ unit.T
    out.update(
        {
            "norm": _quantiles(norms.ravel()),
            "zero_values_share": float((x == 0).mean()),
            "zero_tokens_share": float((xf == 0).all(-1).mean()),
            "nonfinite_values_share": float((~finite).mean()),
            "rows_with_nonfinite": int((~finite).any((1, 2)).sum()),
            "dim_mean_abs_mean": float(np.abs(flat.mean(0)).mean()),
            "dim_std_mean": float(flat.std(0).mean()),
            "dim_std_min": float(flat.std(0).min()),
            "dim_std_max": float(flat.std(0).max()),
            "image_cosine_mean": float((cos.sum() - np.trace(cos)) / (k * (k - 1))) if k > 1 else None,
        }
    )
    arrays = {"norms": norms.ravel(), "dim_mean": flat.mean(0), "dim_std": flat.std(0)}
    if scales is not None:
        # the error of each stored value is at most scale / 2 (schemas/quantization.py); int4-rht's rotation
        # is orthogonal, so the bound on a token's L2 error is the same in its own coordinates
        s = scales.astype(np.float64)
        ok = norms > 0
        bound = (s / 2 * math.sqrt(d))[ok] / norms[ok]
        rms = (s * math.sqrt(d / 12))[ok] / norms[ok]  # rounding error uniform in [-scale/2, scale/2]
        out["int8_relative_error"] = {"expected_rms": _quantiles(rms), "bound": _quantiles(bound)}
        arrays["int8_relative_error"] = rms
    return {**out, "arrays": arrays}
