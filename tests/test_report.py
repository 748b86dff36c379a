"""The HTML report (``inspect --html``) and ``rejected``, on a store with every kind of trouble.

One job indexes a hostile corpus (tests/hostile.py: rejected samples of
several reasons, an incomplete shard, an unreadable one, a missing one);
then one committed shard is deleted from the corpus. The report's numbers
are checked against the store's own files, and the page is opened in a real
headless browser (tests/browser.py), as a person would open it.
"""

from __future__ import annotations

import collections
import contextlib
import io
import json
import os
from pathlib import Path

import browser
import hostile as H
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from edje_indexer.pipeline.cli import main
from edje_indexer.pipeline.report import build_report, write_report
from edje_indexer.schemas import layout

SHARD_CASES = ("healthy", "truncated_mid_member", "not_a_tar", "gzip_tar", "missing_file")


def cli(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(argv)
    return rc, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("report")
    samples = H.write_sample_corpus(root / "corpus")
    shards = H.write_shard_corpus(root / "corpus" / "shards", permission_case=False)
    urls = [str(p) for p in samples.values()] + [str(shards[c]) for c in SHARD_CASES]
    store = str(root / "store")
    rc, _, err = cli(["index", "--input", ",".join(urls), "--store", store, "--preset", "tiny"])
    assert rc == 0, err
    os.remove(shards["healthy"])  # committed, then gone from the corpus
    return store


def stored_dead_letters(store: str) -> list[dict]:
    """Every dead-letter row of the committed segments, read with plain pyarrow."""
    rows = []
    for name in sorted(os.listdir(Path(store) / layout.COMMITS)):
        rec = json.loads((Path(store) / layout.COMMITS / name).read_text())
        path = Path(store).joinpath(*layout.rejected_path(rec["data_path"]))
        if path.exists():
            rows += [{**r, "segment": rec["segment"]} for r in pq.read_table(path).to_pylist()]
    return rows


def commit_records(store: str) -> dict[str, dict]:
    folder = Path(store) / layout.COMMITS
    return {p.stem: json.loads(p.read_text()) for p in folder.glob("*.json")}


def test_report_numbers_are_the_stores(store):
    r = build_report(store)
    dead = stored_dead_letters(store)
    commits = commit_records(store)
    by_reason = collections.Counter(d["reason"] for d in dead)
    assert r["rejected_by_reason"] == dict(by_reason) and len(by_reason) >= 4
    assert r["summary"]["rejected_total"] == len(dead)
    # per segment: exactly the commit records' counts
    assert {s["segment"]: (s["indexed"], s["rejected"], s["complete"]) for s in r["segments"]} == {
        seg: (c["indexed"], c["rejected"], c["complete"]) for seg, c in commits.items()
    }
    for s in r["segments"]:
        assert s["rejected_by_reason"] == collections.Counter(d["reason"] for d in dead if d["segment"] == s["segment"])
    assert r["summary"]["images"] + r["summary"]["duplicate_ids"] == sum(c["rows"] for c in commits.values())
    # a small store: every dead-letter row is in the sample, as stored
    key = ("id", "shard", "member", "stage", "reason", "error_type", "message", "segment")
    assert sorted(tuple(d[k] for k in key) for d in r["dead_letters"]["rows"]) == sorted(
        tuple(d[k] for k in key) for d in dead
    )
    # shards: the unreadable ones, the incomplete one, the one deleted after its commit
    names = {k: sorted(Path(x if isinstance(x, str) else x["shard"]).name for x in v) for k, v in r["shards"].items()}
    assert names["failed"] == ["missing.tar", "not_a_tar.tar"]
    assert names["incomplete"] == ["truncated.tar"]
    assert names["missing"] == ["healthy.tar"] and names["changed"] == []
    assert r["verify"]["ok"] and any("no longer exist" in w for w in r["verify"]["warnings"])
    # token statistics from a sample of every stored row here (fewer than asked for)
    t = r["tokens"]
    assert t["rows_sampled"] == t["rows_in_store"] == sum(c["rows"] for c in commits.values())
    assert t["nonfinite_values_share"] == 0 and 0 < t["norm"]["median"] < 100


def test_thumbnails_of_rejected_images_never_break_the_report(store):
    r = build_report(store)
    thumbs = {d["member"]: d["thumbnail"] for d in r["dead_letters"]["rows"] if "thumbnail" in d}
    assert thumbs, "no thumbnail was attempted"
    dup = thumbs["dup.png"]  # the rejected twin (duplicate_id) is the second dup.png: orange, and decodable
    assert dup["src"].startswith("data:image/jpeg;base64,")
    for bomb in ("bomb_png.png", "bomb_jpg.jpg", "huge_png.png"):  # refused from the header, never decoded
        if bomb in thumbs:
            assert thumbs[bomb]["src"] is None and thumbs[bomb]["note"]
    assert thumbs["zero.jpg"] == {"src": None, "note": "empty file"}
    assert all(t["src"] or t["note"] for t in thumbs.values())


def test_rejected_command(store, tmp_path):
    dead = stored_dead_letters(store)
    rc, out, _ = cli(["rejected", store])
    with_rejects = len({d["segment"] for d in dead})
    assert rc == 0 and out.strip().endswith(f"{len(dead)} rejected sample(s) in {with_rejects} of 5 segment(s)")
    assert all(d["reason"] in out for d in dead)
    rc, out, _ = cli(["rejected", store, "--json"])
    assert rc == 0 and sorted(json.loads(out), key=json.dumps) == sorted(dead, key=json.dumps)
    rc, out, _ = cli(["rejected", store, "--reason", "too_many_pixels", "--json"])
    assert {r["id"] for r in json.loads(out)} == {"bomb_png", "bomb_jpg", "huge_png"}
    shard = next(d["shard"] for d in dead if d["shard"].endswith(H.SHARD_A))
    rc, out, _ = cli(["rejected", store, "--shard", os.path.relpath(shard), "--json"])  # any spelling of it
    assert rc == 0 and [r["shard"] for r in json.loads(out)] == [shard] * sum(d["shard"] == shard for d in dead)
    target = str(tmp_path / "dead.parquet")
    rc, out, _ = cli(["rejected", store, "--parquet", target])
    table = pq.read_table(target)
    assert rc == 0 and table.num_rows == len(dead) and "segment" in table.column_names
    assert table.schema.field("reason").type == pa.string()
    rc, _, err = cli(["rejected", store, "--shard", "/no/such/shard.tar"])
    assert rc == 2 and "not committed in this store" in err


CHECKS = """(() => {
  const q = (s) => Array.from(document.querySelectorAll(s));
  const charts = q("img.chart").map((i) => ({name: i.dataset.chart, ok: i.complete && i.naturalWidth > 0}));
  const thumbs = q("img.thumb").map((i) => i.complete && i.naturalWidth > 0);
  const segRows = () => q("#segment-table tbody tr").map((tr) => Array.from(tr.cells, (c) => c.textContent));
  const before = segRows();
  const th = q("#segment-table th").find((h) => h.textContent === "indexed");
  th.click(); th.click();  // descending by images indexed
  const sorted = segRows().map((r) => Number(r[2].replace(/,/g, "")));
  return {
    sections: q("main section h2").map((h) => h.textContent),
    charts, thumbs,
    placeholders: q(".thumb-placeholder").length,
    segmentRows: before.length, sortedIndexed: sorted,
    deadLetterRows: q("#dead-letters tbody tr").length,
    reasonRows: q("#rejects-by-reason tbody tr").map((tr) => [tr.cells[0].textContent, tr.cells[1].textContent]),
    failedRows: q("#failed-shards tbody tr").length,
    incompleteRows: q("#incomplete-shards tbody tr").length,
    banner: q(".banner").map((b) => b.textContent),
  };
})()"""


def test_report_in_a_real_browser(store, tmp_path):
    if browser.chromium() is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is not installed (.ci/run installs it)")
        pytest.skip("chromium is not installed (apt-get install chromium)")
    page_file = tmp_path / "report.html"
    write_report(store, str(page_file))
    page = browser.open_page(page_file.as_uri(), CHECKS, size=(1280, 2400))
    (tmp_path / "report.png").write_bytes(page.screenshot)
    print(f"screenshot: {tmp_path / 'report.png'}")
    v = page.value
    assert page.errors == [], page.errors
    assert browser.non_local_requests(page.requests) == [], "the report must not load anything from elsewhere"
    assert v["sections"] == ["Summary", "Segments", "Rejects", "Tokens", "Shards and integrity"]
    names = {c["name"] for c in v["charts"]}
    assert {"throughput", "rejects-per-segment", "rejects-by-reason", "norms", "dims"} <= names
    assert all(c["ok"] for c in v["charts"]), v["charts"]
    assert v["thumbs"] and all(v["thumbs"]) and v["placeholders"] > 0
    dead = stored_dead_letters(store)
    assert v["segmentRows"] == 5 and v["sortedIndexed"] == sorted(v["sortedIndexed"], reverse=True)
    assert v["deadLetterRows"] == len(dead)
    counts = collections.Counter(d["reason"] for d in dead)
    assert {k: int(n) for k, n in v["reasonRows"]} == dict(counts)
    assert (v["failedRows"], v["incompleteRows"]) == (2, 1)
    assert any("Random weights" in b for b in v["banner"]) and any("verify: ok" in b for b in v["banner"])
    assert page.screenshot[:8] == b"\x89PNG\r\n\x1a\n" and len(page.screenshot) > 20_000


def test_dead_letter_sample_is_bounded(store, monkeypatch):
    from edje_indexer.pipeline import report as report_mod

    monkeypatch.setattr(report_mod, "DEAD_LETTER_TABLES", 1)
    monkeypatch.setattr(report_mod, "DEAD_LETTER_ROWS", 2)
    dead = report_mod.build_report(store)["dead_letters"]
    assert dead["tables_read"] == 1 and dead["per_reason"] == 5
    assert 0 < len(dead["rows"]) <= 5 * len({d["reason"] for d in dead["rows"]})
