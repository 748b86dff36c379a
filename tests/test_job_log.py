"""The job log, its checkpoints, the id index runs and merges, and the lazy reader (schemas/job_log.py,
schemas/id_runs.py, schemas/index.py, pipeline/finalize.py), on small synthetic stores written with the
real writer."""

from __future__ import annotations

import hashlib
import json
import os
import shutil

import numpy as np
import pyarrow as pa
import pytest

from edje_indexer.benchmarks.synthetic_store import create_store, encode_tokens, random_tokens, write_segment
from edje_indexer.pipeline import finalize as finalize_mod
from edje_indexer.pipeline.cli import main
from edje_indexer.pipeline.finalize import finalize
from edje_indexer.pipeline.verify import verify
from edje_indexer.schemas import id_runs, job_log, layout
from edje_indexer.schemas import index as id_index
from edje_indexer.schemas.index import dedupe, read_commits, read_pointer
from edje_indexer.schemas.reader import TokenStore, UnknownIdError
from edje_indexer.schemas.storage import Location

M, D = 4, 8


class Store:
    """A synthetic store and what was written to it, so every test can compare with the truth."""

    def __init__(self, root):
        self.url = str(root / "store")
        self.loc = Location(self.url)
        self.meta = create_store(self.url, "fp16", M, D)
        self.values: dict[tuple[str, int], np.ndarray] = {}  # (segment, row) -> stored values
        self.occurrences: list[tuple[str, str, int]] = []  # (id, segment, row), every one written
        self.gen = __import__("torch").Generator().manual_seed(0)

    def segment(self, shard: str, ids: list[str]):
        values, _ = encode_tokens(random_tokens(self.gen, len(ids), M, D), "fp16")
        rec = write_segment(self.loc, self.meta, f"synthetic://{shard}.tar", ids, values, None)
        self.occurrences = [o for o in self.occurrences if o[1] != rec.segment]  # a replaced segment's rows go
        for row, i in enumerate(ids):
            self.values[(rec.segment, row)] = values[row]
            self.occurrences.append((i, rec.segment, row))
        return rec

    def expected(self) -> tuple[dict[str, tuple[str, int]], int]:
        """id -> (segment, row) it must resolve to (first in (segment, row) order), and the duplicates."""
        rows = pa.table(
            {
                "id": [o[0] for o in self.occurrences],
                "segment": [o[1] for o in self.occurrences],
                "row": pa.array([o[2] for o in self.occurrences], pa.int32()),
            }
        )
        unique, dups = dedupe(rows)
        return dict(zip(unique["id"].to_pylist(), zip(unique["segment"].to_pylist(), unique["row"].to_pylist()))), (
            dups.num_rows
        )

    def check(self) -> TokenStore:
        want, dups = self.expected()
        ts = TokenStore.open(self.url)
        assert len(ts) == len(want) and sorted(ts.ids()) == sorted(want)
        ids = list(want)
        got = ts.get(ids, dtype=np.float16)
        for i, image_id in enumerate(ids):
            np.testing.assert_array_equal(got[i], self.values[want[image_id]], err_msg=image_id)
        assert ts.duplicates.num_rows == dups
        for row in ts.duplicates.to_pylist():  # each listed occurrence names the one that is served
            assert (row["kept_segment"], row["kept_row"]) == want[row["id"]]
        report = verify(self.url, deep=True)  # every stored row looked up in the runs
        assert report["ok"], report["problems"]
        ptr = read_pointer(self.loc)
        if ptr.format >= 2:
            assert id_runs.served_count(id_index.open_runs(self.loc, ptr)) == len(want)
        return ts


@pytest.fixture
def store(tmp_path):
    return Store(tmp_path)


def _fnv1a64(data: bytes) -> int:
    h = 0xCBF29CE484222325
    for b in data:
        h = ((h ^ b) * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return h


def test_the_id_hash_is_fnv1a_of_the_utf8_bytes():
    ids = ["", "a", "ab", "naïve-é", "日本語", "a\x00", "\x00", "x" * 1000, "laion/0012345/067"]
    got = id_runs.fnv1a64(ids)
    assert got.dtype == np.uint64
    assert [int(h) for h in got] == [_fnv1a64(i.encode()) for i in ids]


def test_two_jobs_in_sequence_each_log_an_entry_and_add_a_run(store):
    store.segment("a", [f"a-{i}" for i in range(30)])
    store.segment("b", [f"b-{i}" for i in range(20)])
    finalize(store.loc, "job1")
    first = read_pointer(store.loc)
    assert first.format == 2 and len(first.runs) == 1 and first.images == 50 and first.log_seq == 1
    store.check()
    store.segment("c", [f"c-{i}" for i in range(5)])
    done = finalize(store.loc, "job2", planned=[layout.segment_name("synthetic://c.tar")])
    assert set(done.added) == {layout.segment_name("synthetic://c.tar")}
    ptr = read_pointer(store.loc)
    # the first run is 6x the new one: kept as it is, the job wrote only its own
    assert [r["entries"] for r in ptr.runs] == [50, 5] and ptr.runs[0] == first.runs[0]
    assert ptr.log_seq == 2 and [r["segment"] for r in job_log.read_entry(store.loc, 2).added] == list(done.added)
    store.check()
    state = job_log.read_state(store.loc)
    assert {s: state[s].data_path for s in state} == {s: c.data_path for s, c in read_commits(store.loc).items()}
    assert verify(store.url)["ok"]


def test_duplicates_across_runs_resolve_to_the_first_occurrence(store):
    # segment names are "<stem>-<hash>": stems m < b < z order them
    store.segment("m", ["dup", "m-1", "twice"])
    finalize(store.loc, "job1")
    store.segment("z", ["z-0", "dup", "twice"])  # later segment: the stored occurrences stay served
    finalize(store.loc, "job2")
    ts = store.check()
    assert ts.get_raw(["dup"])[0][0].tobytes() == store.values[(layout.segment_name("synthetic://m.tar"), 0)].tobytes()
    store.segment("b", ["b-0", "b-1", "dup"])  # an earlier segment: its occurrence is now the one served
    finalize(store.loc, "job3")
    ts = store.check()
    assert ts.duplicates.num_rows == 3
    assert sum(r["entries"] for r in read_pointer(store.loc).runs) >= len(ts)  # shadowed entries stay in runs


def test_merges_bound_the_runs_and_keep_every_id(store, monkeypatch):
    sizes = [40, 3, 9, 1, 27, 2, 5, 12, 1, 1, 30, 4, 8, 2, 60, 1]
    for j, n in enumerate(sizes):
        store.segment(f"s{j:02d}", [f"s{j}-{i}" for i in range(n)] + (["shared"] if j % 5 == 0 else []))
        finalize(store.loc, f"job{j}", planned=[layout.segment_name(f"synthetic://s{j:02d}.tar")])
        runs = read_pointer(store.loc).runs
        sizes_now = [r["entries"] for r in runs]
        # oldest to newest, each run more than MERGE_RATIO times the next: a handful of runs
        assert all(a > id_index.MERGE_RATIO * b for a, b in zip(sizes_now, sizes_now[1:])), sizes_now
        assert len(runs) <= id_index.MAX_RUNS
    store.check()
    files = set(os.listdir(os.path.join(store.url, layout.INDEX)))
    assert len([f for f in files if f.endswith(".ids.arrow")]) <= 2 * id_index.MAX_RUNS  # old runs deleted


def test_a_replaced_segment_rebuilds_the_index_without_its_old_rows(store):
    store.segment("a", ["a-0", "a-1", "both"])
    store.segment("b", ["b-0", "both"])
    finalize(store.loc, "job1")
    store.segment("a", ["a-0", "a-new"])  # the shard changed: new data version of segment a
    done = finalize(store.loc, "job2", planned=[layout.segment_name("synthetic://a.tar")])
    assert done.retired and len(read_pointer(store.loc).runs) == 1
    ts = store.check()
    assert "a-1" not in ts and "both" in ts
    with pytest.raises(UnknownIdError):
        ts.get(["a-1"])


def test_a_job_that_died_between_commit_and_log_is_recovered_by_the_next(store):
    store.segment("a", ["a-0", "a-1"])
    finalize(store.loc, "job1")
    state = job_log.read_state(store.loc)
    seg_b, seg_c = layout.segment_name("synthetic://b.tar"), layout.segment_name("synthetic://c.tar")
    job_log.begin(store.loc, state, "dead-job", [seg_b, seg_c])
    store.segment("b", ["b-0"])  # committed; then the launcher died: no "commit" entry, no new index
    ts = TokenStore.open(store.url)
    assert "b-0" not in ts and len(ts) == 2  # readers see the last published state, never a half-finished job
    state = job_log.read_state(store.loc)
    assert state.unfinished == {"dead-job": sorted([seg_b, seg_c])} and seg_b not in state
    report = verify(store.url)
    assert report["ok"], report["problems"]  # committed but not logged yet: a warning, not damage
    done = finalize(store.loc, "next-job", planned=[])
    assert set(done.added) == {seg_b}
    entry = job_log.read_entry(store.loc, done.state.seq)
    assert entry.recovered == ["dead-job"] and not job_log.read_state(store.loc).unfinished
    store.check()


def test_a_crash_after_the_log_entry_and_before_publishing_is_mended(store, monkeypatch):
    store.segment("a", ["a-0"])
    finalize(store.loc, "job1")
    store.segment("b", ["b-0"])

    def die(*a, **k):
        raise SystemExit("killed before publishing")

    monkeypatch.setattr(id_index, "publish", die)
    with pytest.raises(SystemExit):
        finalize(store.loc, "job2")
    monkeypatch.undo()
    assert "b-0" not in TokenStore.open(store.url)  # the pointer is still the old one
    assert read_pointer(store.loc).log_seq == 1 and job_log.read_state(store.loc).seq == 2
    finalize(store.loc, "job3", planned=[])  # nothing new: publishes what the log says
    assert read_pointer(store.loc).log_seq == 2
    store.check()


def test_checkpoints_bound_the_entries_a_launcher_reads(store, monkeypatch):
    monkeypatch.setattr(job_log, "CHECKPOINT_EVERY", 3)
    reads = []
    original = job_log.read_entry
    monkeypatch.setattr(job_log, "read_entry", lambda loc, seq: reads.append(seq) or original(loc, seq))
    for j in range(8):
        store.segment(f"s{j}", [f"s{j}-0", f"s{j}-1"])
        finalize(store.loc, f"job{j}", planned=[layout.segment_name(f"synthetic://s{j}.tar")])
    pointer = json.loads(open(os.path.join(store.url, "log", job_log.CHECKPOINT_POINTER)).read())
    assert pointer["seq"] == 6 and pointer["segments"] == 6
    reads.clear()
    state = job_log.read_state(store.loc)
    assert reads == [7, 8, 9]  # the entries after the checkpoint, then the first that does not exist
    assert state.seq == 8 and {s: state[s].data_path for s in state} == {
        s: c.data_path for s, c in read_commits(store.loc).items()
    }
    checkpoints = sorted(f for f in os.listdir(os.path.join(store.url, "log")) if f.startswith("checkpoint-"))
    assert len(checkpoints) == 2  # the newest and the one before it (a launcher may be reading it)
    store.check()


def test_never_touched_segments_cost_nothing(store):
    for j in range(12):
        store.segment(f"s{j:02d}", [f"s{j}-{i}" for i in range(5)])
    finalize(store.loc, "job1")
    touched = layout.segment_name("synthetic://s07.tar")
    for name in os.listdir(os.path.join(store.url, layout.SEGMENTS)):  # every other segment's data: gone
        if name != "zarr.json" and not name.startswith(touched + "."):
            shutil.rmtree(os.path.join(store.url, layout.SEGMENTS, name))
    ts = TokenStore.open(store.url)
    assert ts._rows._arrays[layout.TOKENS] == {}  # opening maps no segment
    got = ts.get(["s7-3", "s7-0"], dtype=np.float16)
    np.testing.assert_array_equal(got[0], store.values[(touched, 3)])
    assert len(ts._rows._arrays[layout.TOKENS]) == 1  # one segment mapped: the one asked for
    assert "s3-1" in ts and "nope" not in ts  # the lookup alone never reads token data


def test_upgrade_of_a_store_without_log_or_runs(store, capsys):
    store.segment("a", ["a-0", "a-1", "x"])
    store.segment("b", ["x", "b-1"])
    # what the previous version wrote: commit records and a one-table index, no log
    legacy = id_index.load_index(store.loc, read_commits(store.loc))
    store.loc.write_bytes_atomic(id_runs.parquet_bytes(legacy.table), layout.INDEX, "ids-00000001.parquet")
    store.loc.write_bytes_atomic(id_runs.parquet_bytes(legacy.duplicates), layout.INDEX, "duplicates-00000001.parquet")
    old = id_index.IndexPointer(
        generation=1,
        ids="ids-00000001.parquet",
        duplicates="duplicates-00000001.parquet",
        segments={s: c.data_path for s, c in read_commits(store.loc).items()},
        images=legacy.table.num_rows,
        duplicates_count=legacy.duplicates.num_rows,
    )
    store.loc.write_json_atomic(old.to_json(), layout.INDEX, layout.INDEX_POINTER)
    assert not job_log.has_log(store.loc)
    store.check()  # read as it is (its table in memory)
    assert main(["upgrade", store.url]) == 0
    assert "job log at entry 1" in capsys.readouterr().out
    assert job_log.has_log(store.loc) and read_pointer(store.loc).format == 2
    store.check()
    assert main(["upgrade", store.url]) == 0 and "already current" in capsys.readouterr().out
    assert verify(store.url, deep=True)["ok"]


def test_a_log_entry_is_written_once(store):
    store.segment("a", ["a-0"])
    finalize(store.loc, "job1")
    state = job_log.read_state(store.loc)
    stale = job_log.read_state(store.loc)
    job_log.begin(store.loc, state, "job2", [])
    with pytest.raises(job_log.LogConflict):
        job_log.begin(store.loc, stale, "job3", [])  # a second launcher without the lock
    assert finalize_mod.finalize(store.loc, "job2", planned=[]).state.seq == 3


def test_lookups_of_sliced_and_taken_id_arrays():
    """The lookup reads Arrow buffers directly: offsets of a slice do not start at 0."""
    ids = [f"id-{i}" for i in range(50)] + ["naïve", "日本"]
    entries = pa.table(
        {
            "id": ids,
            "segment": ["s"] * len(ids),
            "row": pa.array(range(len(ids)), pa.int32()),
            "data_path": ["segments/s.000000000000"] * len(ids),
            "rows": pa.array([len(ids)] * len(ids), pa.int64()),
        }
    )
    run = id_runs.run_in_memory(entries)
    lookup = id_runs.Lookup([run])
    queries = pa.array(["zz", *ids[::-1], "id-5x"], pa.large_string()).slice(1, len(ids))  # offset 1
    which, pos, _ = lookup.find(queries)
    assert (which == 0).all()
    assert [int(run.row[p]) for p in pos] == list(range(len(ids)))[::-1]
    assert run.ids.take(pa.array(pos)).to_pylist() == ids[::-1]


def test_ids_of_one_hash_are_told_apart():
    """Different ids with the same 64-bit hash (possible, if rare) sit side by side; each is found exactly."""
    ids = pa.array(["a", "b", "c", "d"], pa.large_string())
    run = id_runs.Run(
        np.array([1, 7, 7, 7], np.uint64),
        ids,
        np.zeros(4, np.int32),
        np.arange(4, dtype=np.int32),
        id_runs.SEGMENTS_SCHEMA.empty_table(),
    )
    queries = pa.array(["d", "b", "c", "x", "a"], pa.large_string())
    got = run.find(np.array([7, 7, 7, 7, 1], np.uint64), queries)
    assert got.tolist() == [3, 1, 2, -1, 0]


def test_verify_looks_ids_up_in_the_runs_and_never_merges_them(store, monkeypatch):
    store.segment("m", ["dup", "twice"] + [f"m-{i}" for i in range(40)])  # a large first run, kept as it is
    finalize(store.loc, "job1")
    store.segment("z", ["z-0", "dup", "twice"])
    finalize(store.loc, "job2", planned=[layout.segment_name("synthetic://z.tar")])
    store.segment("b", ["b-0", "dup"])  # an earlier segment: its "dup" shadows job1's entry from a newer run
    finalize(store.loc, "job3", planned=[layout.segment_name("synthetic://b.tar")])
    assert len(read_pointer(store.loc).runs) >= 2
    store.check()

    def whole_index(*args, **kwargs):
        raise AssertionError("verify materialised the whole id index")

    monkeypatch.setattr(id_runs, "merge_entries", whole_index)
    monkeypatch.setattr(id_index, "load_index", whole_index)
    for deep in (False, True):
        report = verify(store.url, deep=deep)
        assert report["ok"], report["problems"]
        assert any("3 duplicate id(s)" in w for w in report["warnings"]), report["warnings"]


def _rewrite_newest_run(store: Store, rows_of) -> None:
    """Replace the ``row`` column of the newest run with ``rows_of(ids, rows)``, with a matching checksum:
    an index that is wrong but not damaged, which only reading the segments can tell."""
    pointer = os.path.join(store.url, layout.INDEX, layout.INDEX_POINTER)
    raw = json.load(open(pointer))
    run_files = raw["runs"][-1]
    ids_path = os.path.join(store.url, layout.INDEX, run_files["ids"])
    run = id_runs.open_run(open(ids_path, "rb").read(), os.path.join(store.url, layout.INDEX, run_files["segments"]))
    table = run.table()
    rows = rows_of(table["id"].to_pylist(), table["row"].to_numpy().copy())
    data = id_runs.ipc_bytes(table.set_column(3, id_runs.RUN_SCHEMA.field("row"), pa.array(rows, pa.int32())))
    open(ids_path, "wb").write(data)
    raw["checksums"][run_files["ids"]] = hashlib.sha256(data).hexdigest()
    json.dump(raw, open(pointer, "w"))


def _swap(ids, rows, a="a-0", b="a-1"):
    i, j = ids.index(a), ids.index(b)
    rows[i], rows[j] = rows[j], rows[i]
    return rows


def _to_first_row(ids, rows):
    rows[ids.index("a-2")] = 0  # a-2 (row 2) said to be at row 0, where a-0 is
    return rows


@pytest.mark.parametrize(
    "rows_of, expect",
    [(_swap, "neither this row nor an earlier occurrence"), (_to_first_row, "point at rows that hold another id")],
)
def test_deep_verify_catches_an_index_entry_that_points_at_another_row(store, rows_of, expect):
    store.segment("a", ["a-0", "a-1", "a-2", "a-3"])
    store.segment("b", ["b-0", "b-1"])
    finalize(store.loc, "job1")
    _rewrite_newest_run(store, rows_of)
    assert verify(store.url)["ok"]  # the counts still add up: only the rows can tell
    report = verify(store.url, deep=True)
    assert not report["ok"] and any(expect in p for p in report["problems"]), report["problems"]


def test_deep_verify_catches_a_stored_id_the_index_does_not_have(store):
    store.segment("a", ["a-0", "a-1"])
    finalize(store.loc, "job1")
    _rewrite_newest_run(store, lambda ids, rows: rows)  # unchanged: still ok
    assert verify(store.url, deep=True)["ok"]
    seg = layout.segment_name("synthetic://a.tar")
    rec = read_commits(store.loc)[seg]
    import zarr

    zarr.open_group(store.loc.url_of(rec.data_path), mode="r+")["ids"][1] = "a-9"  # data changed under the index
    report = verify(store.url, deep=True)
    assert any("1 stored id(s) are not in the id index (first: 'a-9')" in p for p in report["problems"]), report
