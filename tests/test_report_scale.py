"""The report's cost does not grow with the store: a store of 10x the segments reads the same tokens.

Two synthetic stores (the real writer, tiny tokens, one image per segment:
the worst case for per-segment overhead), 30 and 300 segments. The report of
each must read the same number of token values (a fixed sample, counted at
zarr itself), and its peak Python memory and page size must stay far from
10x. Wall time is not compared (it depends on the machine's load); the
per-segment records it does read are small.
"""

from __future__ import annotations

import os
import tracemalloc

import numpy as np
import pytest
import zarr

from edje_indexer.benchmarks.synthetic_store import build_synthetic_store
from edje_indexer.pipeline import report as report_mod
from edje_indexer.pipeline.report import build_report
from edje_indexer.pipeline.report_html import render
from edje_indexer.schemas.index import load_index

M, D = 4, 8
SAMPLE = 24


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    root = tmp_path_factory.mktemp("scale")
    fsync = os.fsync
    os.fsync = lambda fd: None  # durability is not what this test is about; 330 segments build 2x faster
    try:
        return {n: build_synthetic_store(str(root / f"s{n}"), n, 1, m=M, d=D).url for n in (30, 300)}
    finally:
        os.fsync = fsync


def measured_report(url: str, monkeypatch, warm: bool) -> dict:
    """The report of ``url`` (built and rendered), with the token values it read and its peak memory."""
    read = {"values": 0}
    original = zarr.Array.get_orthogonal_selection

    def counting(self, selection, *args, **kwargs):
        out = original(self, selection, *args, **kwargs)
        if self.path.endswith("tokens") or self.path == "":
            read["values"] += int(np.asarray(out).size)
        return out

    monkeypatch.setattr(zarr.Array, "get_orthogonal_selection", counting)
    if warm:
        render(build_report(url, sample_rows=SAMPLE))  # imports and caches warm, outside the measurement
    read["values"] = 0
    tracemalloc.start()
    try:
        r = build_report(url, sample_rows=SAMPLE)
        page = render(r)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    return {"report": r, "values_read": read["values"], "peak": peak, "page_bytes": len(page)}


def test_report_cost_is_flat_in_store_size(stores, monkeypatch):
    small, big = (measured_report(stores[n], monkeypatch, warm=n == 30) for n in (30, 300))
    for m in (small, big):
        t = m["report"]["tokens"]
        assert t["rows_sampled"] == SAMPLE and t["tokens_sampled"] == SAMPLE * M
        assert m["values_read"] == SAMPLE * M * D, "the report read tokens beyond its sample"
    assert big["report"]["summary"]["segments"] == 300 and len(big["report"]["segments"]) == 300
    print(f"peak memory {small['peak'] / 1e6:.1f} MB -> {big['peak'] / 1e6:.1f} MB")
    print(f"page {small['page_bytes']:,} -> {big['page_bytes']:,} bytes")
    print(f"timings {small['report']['timings_s']} -> {big['report']['timings_s']}")
    assert big["peak"] < 3 * small["peak"], (small["peak"], big["peak"])  # 10x the segments
    assert big["page_bytes"] < 3 * small["page_bytes"], (small["page_bytes"], big["page_bytes"])


def test_segment_table_and_dead_letter_reads_are_bounded(stores, monkeypatch):
    monkeypatch.setattr(report_mod, "SEGMENT_ROWS", 50)
    r = build_report(stores[300], sample_rows=8)
    assert len(r["segments"]) == 300 and len(r["segment_table"]) == 50  # the charts keep every segment
    rows = r["segment_table"]
    assert rows == sorted(rows, key=lambda s: s["committed_at"])
    assert r["dead_letters"]["tables_read"] == 0  # no segment counts a reject: no table is opened


def test_int8_error_estimate_is_the_real_error(tmp_path):
    """The report cannot see the floats an int8 store was made from; its estimate must match them anyway."""
    from edje_indexer.schemas import TokenStore

    built = build_synthetic_store(str(tmp_path / "i8"), 64, 16, quantization="int8", m=8, d=64, return_tokens=True)
    err = build_report(built.url, sample_rows=64)["tokens"]["int8_relative_error"]
    decoded = TokenStore.open(built.url).get(built.ids)
    real = np.linalg.norm(built.tokens - decoded, axis=-1) / np.linalg.norm(decoded, axis=-1)
    assert 0.8 < err["expected_rms"]["median"] / np.median(real) < 1.25, (err, np.median(real))
    assert err["bound"]["max"] >= real.max()


def test_summary_counts_images_from_the_pointer_or_else_the_index(tmp_path, monkeypatch):
    """A current index pointer says how many images there are; a stale one, or one of the first release
    (no counts), makes summarize load the index: the same numbers either way."""
    import json

    from edje_indexer.pipeline import summary as summary_mod

    url = build_synthetic_store(str(tmp_path / "s"), 9, 3, m=4, d=8).url
    loads = []
    monkeypatch.setattr(summary_mod, "load_index", lambda *a: loads.append(1) or load_index(*a))
    assert summary_mod.summarize(url)["images"] == 9 and loads == []
    pointer = tmp_path / "s" / "index" / "CURRENT.json"
    old = {k: v for k, v in json.loads(pointer.read_text()).items() if k not in ("images", "duplicates_count")}
    pointer.write_text(json.dumps(old))
    assert summary_mod.summarize(url)["images"] == 9 and loads == [1]
