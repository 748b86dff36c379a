"""SegmentWriter (edje_indexer.schemas.segment) and the store root (edje_indexer.schemas.store) on tiny stores."""

from __future__ import annotations

import dataclasses
import hashlib
import os

import numpy as np
import pytest
import torch
import zarr

from edje_indexer.schemas import layout, quantization, tables
from edje_indexer.schemas.index import read_commits
from edje_indexer.schemas.reader import TokenStore
from edje_indexer.schemas.records import (
    CommitRecord,
    FailureRecord,
    LockRecord,
    ModelIdentity,
    ShardTask,
    SourceVersion,
)
from edje_indexer.schemas.segment import (
    CommitConflict,
    LeaseLost,
    SegmentData,
    SegmentWriter,
    read_failure,
    read_rejected,
)
from edje_indexer.schemas.storage import Location
from edje_indexer.schemas.store import StoreMismatch, create_or_check, new_metadata, open_metadata

M, D = 4, 8


def tiny_identity(**changes) -> ModelIdentity:
    base = dict(
        backbone="test-backbone",
        backbone_kwargs={},
        backbone_sha256="1" * 64,
        random_weights=True,
        adapter={"num_queries": M, "out_dim": D},
        adapter_sha256="2" * 64,
        random_adapter=True,
        tokens="test tokens",
        preprocessing={"size": [8, 8]},
        tokens_per_image=M,
        token_dim=D,
    )
    return ModelIdentity(**{**base, **changes})


def make_store(tmp_path, quant: str, name: str = "store"):
    loc = Location(str(tmp_path / name))
    meta = create_or_check(loc, new_metadata(tiny_identity(), quant, "key"))
    return loc, meta


def task_for(url: str, version: str = "v1", revision: int = 0) -> ShardTask:
    return ShardTask(url, layout.segment_name(url), SourceVersion(1000, version), revision=revision)


def tokens(n: int, quant: str, seed: int = 0, m: int = M, d: int = D):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((n, m, d), generator=g) * torch.empty((n, m, 1)).uniform_(0.5, 3.0, generator=g)
    values, scales = quantization.quantize(x, quant)
    return values.numpy(), None if scales is None else scales.numpy()


def rejected_row(url: str, i: int, reason: str) -> dict:
    return {
        "id": f"bad-{i}",
        "shard": url,
        "member": f"bad-{i}.jpg",
        "stage": "decode",
        "reason": reason,
        "error_type": "OSError",
        "message": f"broken image {i}",
    }


def sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


def tree_bytes(root) -> dict[str, bytes]:
    out = {}
    for folder, _, files in os.walk(root):
        for f in files:
            p = os.path.join(folder, f)
            with open(p, "rb") as fh:
                out[os.path.relpath(p, root)] = fh.read()
    return out


@pytest.mark.parametrize("quant", quantization.QUANTIZATIONS)
def test_write_then_read_back_with_plain_zarr(tmp_path, quant):
    loc, meta = make_store(tmp_path, quant)
    url = "/data/shard-000001.tar"
    task = task_for(url)
    values, scales = tokens(5, quant)
    ids = ["a", "b/c", "dé", "e", "f"]
    rejected = [
        rejected_row(url, 0, "decode_error"),
        rejected_row(url, 1, "timeout"),
        rejected_row(url, 2, "decode_error"),
    ]
    rec = SegmentWriter(loc, meta).write(
        task,
        SegmentData(ids, values, scales, rejected),
        samples_read=8,
        extra_image_members=2,
        bytes_read=4321,
        sha256="9" * 64,
        timings_s={"total": 1.0},
    )

    # every attempt writes a data folder of its own, which the commit names
    assert rec.attempt and rec.data_path == task.data_path(rec.attempt)
    assert rec.writer["pid"] == os.getpid()
    group = zarr.open_group(loc.url_of(rec.data_path), mode="r")
    stored = group[layout.TOKENS][...]
    assert stored.dtype == np.dtype(quantization.encoding(quant, D)["tokens_dtype"])
    assert stored.shape == (5, M, D // 2 if quant.startswith("int4") else D)  # int4: two values per byte
    np.testing.assert_array_equal(stored, values)
    assert list(group[layout.IDS][...]) == ids
    assert group[layout.TOKENS].attrs["encoding"] == quantization.encoding(quant, D) == meta.token_encoding
    if quant != "fp16":
        np.testing.assert_array_equal(group[layout.SCALES][...], scales)
        assert group[layout.SCALES].dtype == np.float16
    else:
        assert layout.SCALES not in group

    # the commit record on disk is the one returned
    on_disk = CommitRecord.from_json(loc.read_json(*layout.commit_path(task.segment)))
    assert on_disk == rec
    assert on_disk.accounting_error() is None
    assert (on_disk.rows, on_disk.indexed, on_disk.rejected, on_disk.samples_read) == (5, 5, 3, 8)
    assert on_disk.rejected_by_reason == {"decode_error": 2, "timeout": 1}
    assert on_disk.shard == url and on_disk.segment == task.segment
    assert on_disk.identity_sha256 == meta.identity_sha256() == open_metadata(loc).identity_sha256()
    assert on_disk.source.same_version(task.source)
    assert (on_disk.source.bytes_read, on_disk.source.sha256) == (4321, "9" * 64)
    assert on_disk.extra_image_members == 2 and on_disk.complete
    assert on_disk.timings_s["total"] >= 1.0 and "write" in on_disk.timings_s
    assert on_disk.token_bytes == values.nbytes + (0 if scales is None else scales.nbytes)

    # checksums: sha256 of the stored bytes (read back), ids NUL-terminated
    assert on_disk.checksums[layout.TOKENS] == sha(np.ascontiguousarray(stored).tobytes())
    # checksum version 2: each UTF-8 id prefixed by its length (8 bytes, little-endian)
    assert on_disk.checksum_version == 2
    assert on_disk.checksums[layout.IDS] == sha(
        b"".join(len(i.encode()).to_bytes(8, "little") + i.encode() for i in ids)
    )
    if quant != "fp16":
        assert on_disk.checksums[layout.SCALES] == sha(group[layout.SCALES][...].tobytes())
    else:
        assert set(on_disk.checksums) == {layout.TOKENS, layout.IDS}
    # ... and the token shard file is a plain row-major block of exactly those bytes (then the shard index)
    shard_file = loc.path(rec.data_path, layout.TOKENS, "c", "0", "0", "0")
    with open(shard_file, "rb") as f:
        raw = f.read()
    assert sha(raw[: values.nbytes]) == on_disk.checksums[layout.TOKENS]

    # dead letters
    table = read_rejected(loc, rec.data_path)
    assert table.schema.equals(tables.REJECTED_SCHEMA)
    assert table.to_pylist() == rejected

    # the public reader sees exactly these rows
    store = TokenStore.open(loc.url)
    assert sorted(store.ids()) == sorted(ids)
    got_values, got_scales = store.get_raw(["e", "a"])
    np.testing.assert_array_equal(got_values, values[[3, 0]])
    if quant == "int8":
        np.testing.assert_array_equal(got_scales, scales[[3, 0]])
    np.testing.assert_array_equal(store.get(ids), quantization.dequantize(values, scales, quant))


@pytest.mark.parametrize("quant", ["fp16", "int8"])
def test_an_all_rejected_shard_commits_an_empty_segment(tmp_path, quant):
    loc, meta = make_store(tmp_path, quant)
    url = "/data/all-bad.tar"
    task = task_for(url)
    data = SegmentData.empty(meta)
    data.rejected = [rejected_row(url, i, "decode_error") for i in range(2)]
    rec = SegmentWriter(loc, meta).write(task, data, samples_read=2)
    assert (rec.rows, rec.rejected, rec.token_bytes) == (0, 2, 0)
    assert rec.checksums[layout.TOKENS] == sha(b"") and rec.checksums[layout.IDS] == sha(b"")
    group = zarr.open_group(loc.url_of(rec.data_path), mode="r")
    assert group[layout.TOKENS].shape == (0, M, D)
    assert len(read_rejected(loc, rec.data_path)) == 2
    store = TokenStore.open(loc.url)
    assert len(store) == 0 and task.segment in read_commits(loc) and store.segments == 1


def test_read_rejected_of_a_version_without_dead_letters_is_empty(tmp_path):
    loc, meta = make_store(tmp_path, "fp16")
    task = task_for("/data/s.tar")
    empty = read_rejected(loc, task.data_path("a1"))  # nothing written yet
    assert empty.num_rows == 0 and empty.schema.equals(tables.REJECTED_SCHEMA)
    values, _ = tokens(2, "fp16")
    rec = SegmentWriter(loc, meta).write(task, SegmentData(["x", "y"], values, None), samples_read=2)
    table = read_rejected(loc, rec.data_path)
    assert table.num_rows == 0 and table.schema.equals(tables.REJECTED_SCHEMA)


@pytest.mark.parametrize("quant", ["fp16", "int8"])
def test_uncommitted_segment_is_invisible(tmp_path, quant):
    loc, meta = make_store(tmp_path, quant)
    writer = SegmentWriter(loc, meta)
    committed, hidden = task_for("/data/shard-a.tar"), task_for("/data/shard-b.tar")
    v1, s1 = tokens(2, quant, seed=1)
    v2, s2 = tokens(3, quant, seed=2)
    writer.write(committed, SegmentData(["a0", "a1"], v1, s1), samples_read=2)
    checksums = writer.write_uncommitted(hidden, SegmentData(["b0", "b1", "b2"], v2, s2), "a1")

    assert not loc.exists(*layout.commit_path(hidden.segment))
    hidden_group = zarr.open_group(loc.url_of(hidden.data_path("a1")), mode="r")
    np.testing.assert_array_equal(hidden_group[layout.TOKENS][...], v2)
    assert checksums[layout.TOKENS] == sha(v2.tobytes())
    store = TokenStore.open(loc.url)
    assert set(read_commits(loc)) == {committed.segment} and store.segments == 1
    assert sorted(store.ids()) == ["a0", "a1"]
    assert "b0" not in store
    with pytest.raises(KeyError):
        store.get(["b1"])


def test_failure_record_then_a_successful_write_removes_it(tmp_path):
    loc, meta = make_store(tmp_path, "fp16")
    writer = SegmentWriter(loc, meta)
    task = task_for("gs://bucket/shard-000007.tar")
    assert read_failure(loc, task.segment) is None
    rec = writer.fail(task, ConnectionResetError("peer went away"))
    assert isinstance(rec, FailureRecord) and rec.failed
    back = read_failure(loc, task.segment)
    assert back == rec
    assert (back.segment, back.shard, back.error_type, back.message) == (
        task.segment,
        task.url,
        "ConnectionResetError",
        "peer went away",
    )
    assert back.error == "ConnectionResetError: peer went away"
    assert not loc.exists(*layout.commit_path(task.segment))

    values, _ = tokens(1, "fp16")
    writer.write(task, SegmentData(["only"], values, None), samples_read=1)
    assert read_failure(loc, task.segment) is None
    assert not loc.exists(*layout.failed_path(task.segment))
    assert loc.exists(*layout.commit_path(task.segment))


def test_failure_of_an_exception_without_message_says_what_it_was(tmp_path):
    loc, meta = make_store(tmp_path, "fp16")
    rec = SegmentWriter(loc, meta).fail(task_for("/x/s.tar"), EOFError())
    assert rec.error_type == "EOFError" and rec.message  # repr, never an empty message


@pytest.mark.parametrize("quant", quantization.QUANTIZATIONS)
@pytest.mark.parametrize("shape", [(3, M, 2 * D), (3, 2 * M, D)])
def test_shape_mismatch_is_refused_before_anything_is_written(tmp_path, quant, shape):
    loc, meta = make_store(tmp_path, quant)
    before = tree_bytes(loc.root)
    n, m, d = shape
    values, scales = tokens(n, quant, m=m, d=d)
    d = values.shape[-1]  # the stored width (int4: d / 2) is what the error names
    task = task_for("/data/wide.tar")
    writer = SegmentWriter(loc, meta)
    for call in (
        lambda: writer.write(task, SegmentData(["a", "b", "c"], values, scales), samples_read=3),
        lambda: writer.write_uncommitted(task, SegmentData(["a", "b", "c"], values, scales), "a1"),
    ):
        with pytest.raises(ValueError, match=f"{m}x{d}"):
            call()
    assert tree_bytes(loc.root) == before


def test_counts_that_do_not_add_up_are_never_committed(tmp_path):
    loc, meta = make_store(tmp_path, "fp16")
    task = task_for("/data/s.tar")
    values, _ = tokens(2, "fp16")
    before = tree_bytes(loc.root)
    with pytest.raises(RuntimeError, match="accounting"):
        SegmentWriter(loc, meta).write(task, SegmentData(["a", "b"], values, None), samples_read=3)
    assert not loc.exists(*layout.commit_path(task.segment))
    assert tree_bytes(loc.root) == before  # the attempt's own data is removed again
    assert len(TokenStore.open(loc.url)) == 0


def test_a_new_version_replaces_the_commit_and_keeps_the_old_data(tmp_path):
    loc, meta = make_store(tmp_path, "fp16")
    writer = SegmentWriter(loc, meta)
    old = task_for("/data/s.tar", "v1")
    v1, _ = tokens(2, "fp16", seed=1)
    v2, _ = tokens(1, "fp16", seed=2)
    first = writer.write(old, SegmentData(["a", "b"], v1, None), samples_read=2)
    new = dataclasses.replace(task_for("/data/s.tar", "v2"), replaces=first.data_path)
    assert old.segment == new.segment
    second = writer.write(new, SegmentData(["c"], v2, None), samples_read=1)
    assert second.data_path != first.data_path
    rec = CommitRecord.from_json(loc.read_json(*layout.commit_path(new.segment)))
    assert rec == second and rec.rows == 1
    assert loc.exists(first.data_path)  # superseded data stays for open readers
    store = TokenStore.open(loc.url)
    assert store.ids() == ["c"]
    np.testing.assert_array_equal(store.get(["c"]), v2.astype(np.float32))


# -- attempts: compare-and-swap commits, leases ---------------------------------------------------------------

JOB = "0a1b2c3d"


def hold_lock(loc: Location, token: str = JOB, phase: str = "running") -> None:
    loc.write_json_atomic(LockRecord(token=token, host="test-host", pid=1, phase=phase).to_json(), layout.LOCK)


def data_folders(loc: Location) -> list[str]:
    return [n for n in loc.list(layout.SEGMENTS) if not n.startswith(".") and n != "zarr.json"]


def rejected_tables(loc: Location) -> list[str]:
    return [n for n in loc.list(layout.REJECTED) if not n.startswith(".")]


def test_twin_attempts_of_one_job_commit_once_and_the_loser_removes_only_its_own_data(tmp_path):
    loc, meta = make_store(tmp_path, "fp16")
    hold_lock(loc)
    writer = SegmentWriter(loc, meta)
    task = dataclasses.replace(task_for("/data/s.tar"), job_id=JOB)
    v1, _ = tokens(2, "fp16", seed=1)
    v2, _ = tokens(2, "fp16", seed=2)
    first = writer.write(task, SegmentData(["a", "b"], v1, None), samples_read=2)
    assert first.job_id == JOB and first.data_path == task.data_path(first.attempt)
    assert first.data_path.endswith(f".{JOB}-{first.attempt}")
    assert writer.committed(task) == first
    second = writer.write(task, SegmentData(["a", "b"], v2, None), samples_read=2)
    assert second == first
    assert data_folders(loc) == [first.data_path.rsplit("/", 1)[1]]
    assert rejected_tables(loc) == [layout.rejected_path(first.data_path)[1]]
    np.testing.assert_array_equal(TokenStore.open(loc.url).get(["a", "b"]), v1.astype(np.float32))


def test_twin_attempts_without_a_job_id_keep_the_committed_data(tmp_path):
    loc, meta = make_store(tmp_path, "fp16")
    writer = SegmentWriter(loc, meta)
    task = task_for("/data/s.tar")
    v1, _ = tokens(2, "fp16", seed=1)
    v2, _ = tokens(2, "fp16", seed=2)
    first = writer.write(task, SegmentData(["a", "b"], v1, None), samples_read=2)
    second = writer.write(task, SegmentData(["a", "b"], v2, None), samples_read=2)
    assert second == first
    assert loc.exists(first.data_path, layout.TOKENS, "zarr.json")
    np.testing.assert_array_equal(TokenStore.open(loc.url).get(["a", "b"]), v1.astype(np.float32))


def test_a_commit_that_changed_since_planning_is_a_conflict(tmp_path):
    loc, meta = make_store(tmp_path, "fp16")
    writer = SegmentWriter(loc, meta)
    v1, _ = tokens(2, "fp16", seed=1)
    first = writer.write(task_for("/data/s.tar", "v1"), SegmentData(["a", "b"], v1, None), samples_read=2)
    before = tree_bytes(loc.root)
    stale = task_for("/data/s.tar", "v2")  # planned when the segment had no commit (replaces=None)
    with pytest.raises(CommitConflict, match="changed since the job planned"):
        writer.write(stale, SegmentData(["c"], tokens(1, "fp16")[0], None), samples_read=1)
    assert tree_bytes(loc.root) == before  # the commit unchanged, the attempt's data removed
    assert CommitRecord.from_json(loc.read_json(*layout.commit_path(stale.segment))) == first


@pytest.mark.parametrize("lock", ["none", "another job", "finalizing"])
def test_an_attempt_whose_job_lost_its_lease_does_not_commit(tmp_path, lock):
    loc, meta = make_store(tmp_path, "int8")
    if lock == "another job":
        hold_lock(loc, token="ffff0000")
    elif lock == "finalizing":
        hold_lock(loc, phase="finalizing")
    before = tree_bytes(loc.root)
    task = dataclasses.replace(task_for("/data/s.tar"), job_id=JOB)
    values, scales = tokens(2, "int8")
    with pytest.raises(LeaseLost, match=JOB):
        SegmentWriter(loc, meta).write(task, SegmentData(["a", "b"], values, scales), samples_read=2)
    assert not loc.exists(*layout.commit_path(task.segment))
    assert data_folders(loc) == [] and rejected_tables(loc) == []
    assert {k: v for k, v in tree_bytes(loc.root).items() if not os.path.basename(k).startswith(".")} == before


# -- the store root -------------------------------------------------------------------------------------------


def test_create_or_check_returns_the_stored_metadata_for_an_equal_identity(tmp_path):
    loc, meta = make_store(tmp_path, "int8")
    again = dataclasses.replace(
        new_metadata(tiny_identity(), "int8", "key"), created_at="2000-01-01T00:00:00+00:00", software_version="0.0.1"
    )
    before = tree_bytes(loc.root)
    got = create_or_check(loc, again)
    assert got == meta == open_metadata(loc)
    assert got.created_at == meta.created_at != again.created_at
    assert tree_bytes(loc.root) == before


@pytest.mark.parametrize(
    "job,key",
    [
        (lambda: new_metadata(tiny_identity(backbone_sha256="3" * 64), "int8", "key"), "model.backbone_sha256"),
        (lambda: new_metadata(tiny_identity(token_dim=16), "int8", "key"), "model.token_dim"),
        (lambda: new_metadata(tiny_identity(), "fp16", "key"), "quantization"),
        (lambda: new_metadata(tiny_identity(), "int8", "shard-key"), "id_policy"),
    ],
)
def test_create_or_check_refuses_another_identity_and_leaves_the_store_untouched(tmp_path, job, key):
    loc, meta = make_store(tmp_path, "int8")
    values, scales = tokens(2, "int8")
    SegmentWriter(loc, meta).write(task_for("/data/s.tar"), SegmentData(["a", "b"], values, scales), samples_read=2)
    before = tree_bytes(loc.root)
    with pytest.raises(StoreMismatch, match=key) as e:
        create_or_check(loc, job())
    assert isinstance(e.value, ValueError)
    assert loc.url in str(e.value)
    assert tree_bytes(loc.root) == before
    assert open_metadata(loc) == meta


def test_open_metadata_of_a_folder_that_is_not_a_store(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a token store"):
        open_metadata(Location(str(tmp_path / "nothing")))
    zarr.open_group(str(tmp_path / "plain"), mode="w", zarr_format=3)
    with pytest.raises(ValueError, match="not an EDJE token store"):
        open_metadata(Location(str(tmp_path / "plain")))


def test_new_metadata_refuses_an_unknown_quantization():
    with pytest.raises(ValueError, match="int3"):
        new_metadata(tiny_identity(), "int3", "key")


@pytest.mark.parametrize("quant", ["int8", "int4", "int4-rht"])
def test_values_of_another_encoding_or_without_scales_are_refused(tmp_path, quant):
    loc, meta = make_store(tmp_path, quant)
    before = tree_bytes(loc.root)
    writer = SegmentWriter(loc, meta)
    values, scales = tokens(2, quant)
    other = "int8" if quant != "int8" else "int4"
    wrong_values, wrong_scales = tokens(2, other)
    for data in (
        SegmentData(["a", "b"], values, None),  # scales missing
        SegmentData(["a", "b"], values, scales.astype(np.float32)),
        SegmentData(["a", "b"], wrong_values, wrong_scales),  # another encoding's stored values
    ):
        with pytest.raises(ValueError, match=quant):
            writer.write(task_for("/data/s.tar"), data, samples_read=2)
    assert tree_bytes(loc.root) == before
