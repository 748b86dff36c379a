"""The store's JSON records (edje_indexer.schemas.records): round trips, schema versions, identity."""

from __future__ import annotations

import dataclasses
import json
import pickle

import pytest

from edje_indexer.schemas import layout
from edje_indexer.schemas.records import (
    CommitRecord,
    FailureRecord,
    IndexPointer,
    LockRecord,
    ModelIdentity,
    SchemaVersionError,
    ShardTask,
    Source,
    SourceVersion,
    StoreMetadata,
    as_json_bytes,
)
from edje_indexer.schemas.store import new_metadata


def identity(**changes) -> ModelIdentity:
    base = dict(
        backbone="vit_tiny_patch16_224",
        backbone_kwargs={"depth": 2, "img_size": 64},
        backbone_sha256="ab" * 32,
        random_weights=True,
        adapter={"num_queries": 4, "out_dim": 8, "mlp_hidden": 16},
        adapter_sha256="cd" * 32,
        random_adapter=True,
        tokens="forward_features, 1 prefix token(s) dropped",
        preprocessing={"size": [64, 64], "resize": "squash", "mean": [0.5, 0.5, 0.5], "jpeg_draft": True},
        tokens_per_image=4,
        token_dim=8,
    )
    return ModelIdentity(**{**base, **changes})


def metadata(**changes) -> StoreMetadata:
    return dataclasses.replace(new_metadata(identity(), "int8", "key"), **changes)


def commit(**changes) -> CommitRecord:
    base = dict(
        segment="shard-000001-0123456789",
        data_path="segments/shard-000001-0123456789.abcdefabcdef",
        shard="/data/shard-000001.tar",
        source=Source(size=1234, version="mtime:1.5", bytes_read=1234, sha256="ee" * 32),
        identity_sha256="ff" * 32,
        quantization="int8",
        rows=5,
        samples_read=7,
        indexed=5,
        rejected=2,
        rejected_by_reason={"decode_error": 1, "timeout": 1},
        complete=False,
        checksums={"tokens": "01" * 32, "scales": "02" * 32, "ids": "03" * 32},
        token_bytes=5 * 4 * 8 + 5 * 4 * 2,
        timings_s={"write": 0.01, "total": 0.5},
        software_version="0.2.0",
        revision=2,
        job_id="0a1b2c3d",
        attempt="c0ffee12",
        writer={"host": "worker-7", "pid": 4242},
        extra_image_members=3,
        incomplete_reason="truncated tar",
        committed_at="2024-01-02T03:04:05+00:00",
    )
    return CommitRecord(**{**base, **changes})


def failure(**changes) -> FailureRecord:
    base = dict(
        segment="shard-000002-abc",
        shard="gs://b/shard-000002.tar",
        error_type="OSError",
        message="connection reset",
        failed_at="2024-01-02T03:04:05+00:00",
    )
    return FailureRecord(**{**base, **changes})


def pointer(**changes) -> IndexPointer:
    base = dict(
        generation=3,
        ids="ids-000003.parquet",
        duplicates="duplicates-000003.parquet",
        segments={"a-1": "segments/a-1.0123456789ab.0-1a2b3c4d", "b-2": "segments/b-2.ba9876543210.r1"},
        retired=["segments/a-1.aaaaaaaaaaaa", "rejected/a-1.aaaaaaaaaaaa.parquet"],
        images=11,
        duplicates_count=1,
    )
    return IndexPointer(**{**base, **changes})


def lock(**changes) -> LockRecord:
    base = dict(
        token="0a1b2c3d",
        host="worker-7",
        pid=4242,
        boot_id="boot-1",
        pid_namespace="pid:[4026531836]",
        pid_start="123456",
        beat=17,
        heartbeat=1700000000.25,
        phase="finalizing",
    )
    return LockRecord(**{**base, **changes})


RECORDS = {
    "store metadata": (StoreMetadata, metadata),
    "model identity": (ModelIdentity, identity),
    "commit record": (CommitRecord, commit),
    "failure record": (FailureRecord, failure),
    "index pointer": (IndexPointer, pointer),
    "store lock": (LockRecord, lock),
}
# The records that carry their own schema version (ModelIdentity is versioned by the metadata holding it).
VERSIONED = [k for k in RECORDS if k != "model identity"]


def through_json(d: dict) -> dict:
    return json.loads(json.dumps(d))


@pytest.mark.parametrize("kind", RECORDS)
def test_json_round_trip(kind):
    cls, make = RECORDS[kind]
    rec = make()
    back = cls.from_json(through_json(rec.to_json()))
    assert back == rec
    assert type(back) is cls
    # as_json_bytes is the stored form: it reads back to the same record too
    assert cls.from_json(json.loads(as_json_bytes(rec))) == rec


def test_round_trip_keeps_nested_types():
    meta = metadata()
    back = StoreMetadata.from_json(through_json(meta.to_json()))
    assert isinstance(back.model, ModelIdentity)
    assert back.tokens_per_image == 4 and back.token_dim == 8
    rec = CommitRecord.from_json(through_json(commit().to_json()))
    assert isinstance(rec.source, Source)
    assert rec.source.same_version(SourceVersion(1234, "mtime:1.5"))
    assert not rec.source.same_version(SourceVersion(1234, "mtime:2.5"))


def test_defaults_survive_a_round_trip():
    """Records built with defaults (created_at now, schema_version current) read back equal."""
    for rec in (
        new_metadata(identity(), "fp16", "shard-key"),
        FailureRecord("s", "u", "OSError", "m"),
        IndexPointer(0, "ids-0.parquet", "duplicates-0.parquet", {}),
    ):
        d = through_json(rec.to_json())
        assert d["schema_version"] == layout.SCHEMA_VERSION
        assert type(rec).from_json(d) == rec


@pytest.mark.parametrize("kind", VERSIONED)
def test_newer_schema_version_is_refused(kind):
    cls, make = RECORDS[kind]
    d = through_json(make().to_json())
    d["schema_version"] = layout.SCHEMA_VERSION + 1
    with pytest.raises(SchemaVersionError, match="upgrade") as e:
        cls.from_json(d)
    assert kind in str(e.value)
    assert str(layout.SCHEMA_VERSION + 1) in str(e.value)
    assert isinstance(e.value, ValueError)  # callers that catch ValueError still report it


@pytest.mark.parametrize("kind", VERSIONED)
def test_first_release_records_without_schema_version_load(kind):
    cls, make = RECORDS[kind]
    rec = make()
    d = through_json(rec.to_json())
    del d["schema_version"]
    back = cls.from_json(d)
    assert back.schema_version == 1
    assert dataclasses.replace(back, schema_version=rec.schema_version) == rec


@pytest.mark.parametrize("kind", RECORDS)
def test_unknown_extra_keys_are_ignored(kind):
    cls, make = RECORDS[kind]
    rec = make()
    d = through_json(rec.to_json())
    d["written_by_a_newer_minor_version"] = {"x": 1}
    if kind == "store metadata":
        d["model"]["new_model_field"] = 1
    if kind == "commit record":
        d["source"]["new_source_field"] = "z"
    assert cls.from_json(d) == rec


@pytest.mark.parametrize("kind", VERSIONED)
@pytest.mark.parametrize("bad", [[1, 2], "a string", None, 3])
def test_not_a_dict_is_a_value_error_naming_the_kind(kind, bad):
    cls, _ = RECORDS[kind]
    with pytest.raises(ValueError, match=kind):
        cls.from_json(bad)


@pytest.mark.parametrize(
    "kind,field",
    [
        ("commit record", "rows"),
        ("commit record", "segment"),
        ("commit record", "source"),
        ("failure record", "error_type"),
        ("index pointer", "generation"),
        ("store lock", "token"),
        ("store lock", "pid"),
        ("store metadata", "model"),
    ],
)
def test_missing_field_is_a_value_error_naming_the_kind(kind, field):
    cls, make = RECORDS[kind]
    d = through_json(make().to_json())
    del d[field]
    with pytest.raises(ValueError, match=kind):
        cls.from_json(d)


def test_missing_field_of_the_commit_source_is_a_value_error():
    d = through_json(commit().to_json())
    del d["source"]["size"]
    with pytest.raises(ValueError, match="commit record"):
        CommitRecord.from_json(d)


@pytest.mark.parametrize("field", ["quantization", "id_policy", "token_encoding", "software_version"])
def test_store_metadata_missing_a_flat_field_is_a_value_error(field):
    d = through_json(metadata().to_json())
    del d[field]
    with pytest.raises(ValueError, match="store metadata"):
        StoreMetadata.from_json(d)


@pytest.mark.parametrize("model", ["not a dict", None, "missing backbone"])
def test_store_metadata_with_malformed_model_is_a_value_error(model):
    d = through_json(metadata().to_json())
    if model == "missing backbone":
        del d["model"]["backbone"]
    else:
        d["model"] = model
    with pytest.raises(ValueError, match="model identity|store metadata"):
        StoreMetadata.from_json(d)


# -- identity -------------------------------------------------------------------------------------------------


def test_equal_identities_hash_equal_whatever_the_creation_time_and_software():
    a = metadata()
    b = metadata(created_at="1999-01-01T00:00:00+00:00", software_version="9.9.9")
    assert a != b
    assert a.identity_sha256() == b.identity_sha256()
    assert a.identity_diff(b) == []
    # a fresh copy of the identity (nothing shared) hashes the same
    c = StoreMetadata.from_json(through_json(a.to_json()))
    assert c.identity_sha256() == a.identity_sha256()


@pytest.mark.parametrize(
    "change",
    [
        {"model": identity(backbone_sha256="00" * 32)},
        {"model": identity(preprocessing={**identity().preprocessing, "jpeg_draft": False})},
        {"model": identity(backbone_kwargs={"depth": 3, "img_size": 64})},
        {"model": identity(token_dim=16)},
        {"quantization": "fp16"},
        {"id_policy": "shard-key"},
        {"schema_version": layout.SCHEMA_VERSION + 1},
    ],
)
def test_identity_hash_changes_with_every_identity_field(change):
    a = metadata()
    b = metadata(**change)
    assert a.identity_sha256() != b.identity_sha256()
    assert a.identity_diff(b)


@pytest.mark.parametrize(
    "change,key",
    [
        ({"model": identity(backbone_sha256="00" * 32)}, "model.backbone_sha256"),
        (
            {"model": identity(preprocessing={**identity().preprocessing, "jpeg_draft": False})},
            "model.preprocessing.jpeg_draft",
        ),
        ({"model": identity(backbone_kwargs={"depth": 3, "img_size": 64})}, "model.backbone_kwargs.depth"),
        ({"quantization": "fp16"}, "quantization"),
        ({"id_policy": "json:uid"}, "id_policy"),
    ],
)
def test_identity_diff_names_the_differing_nested_key(change, key):
    store = metadata()
    job = metadata(**change)
    diff = store.identity_diff(job)
    assert len(diff) == 1, diff
    assert diff[0].startswith(f"{key}: ")
    want_store = store.to_json()
    want_job = job.to_json()
    for part in key.split("."):
        want_store, want_job = want_store[part], want_job[part]
    # "store has X, job has Y", in that order
    assert diff[0] == f"{key}: store has {want_store!r}, job has {want_job!r}"


def test_identity_diff_lists_every_difference():
    store = metadata()
    job = metadata(model=identity(backbone_sha256="00" * 32, adapter_sha256="11" * 32), id_policy="shard-key")
    keys = [line.split(":")[0] for line in store.identity_diff(job)]
    assert keys == ["id_policy", "model.adapter_sha256", "model.backbone_sha256"]


def test_identity_diff_of_a_key_only_one_side_has():
    store = metadata(model=identity(preprocessing={"size": [64, 64]}))
    job = metadata(model=identity(preprocessing={"size": [64, 64], "decoder": "torchvision"}))
    assert store.identity_diff(job) == ["model.preprocessing.decoder: store has None, job has 'torchvision'"]


# -- counts ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "rows,samples_read,indexed,rejected,ok",
    [
        (5, 7, 5, 2, True),
        (0, 0, 0, 0, True),
        (0, 3, 0, 3, True),
        (5, 8, 5, 2, False),  # a sample neither stored nor rejected
        (5, 6, 5, 2, False),  # one counted twice
        (4, 7, 5, 2, False),  # rows and indexed disagree
    ],
)
def test_accounting_error(rows, samples_read, indexed, rejected, ok):
    rec = commit(rows=rows, samples_read=samples_read, indexed=indexed, rejected=rejected)
    err = rec.accounting_error()
    if ok:
        assert err is None
    else:
        assert err is not None
        for n in (samples_read, indexed, rejected, rows):
            assert str(n) in err


# -- tasks ----------------------------------------------------------------------------------------------------


def test_shard_task_data_path_depends_on_source_revision_job_and_attempt():
    url = "/data/shard-000001.tar"
    seg = layout.segment_name(url)
    v1, v2 = SourceVersion(10, "a"), SourceVersion(10, "b")
    t = ShardTask(url, seg, v1, job_id="0a1b")
    p = t.data_path("c0ffee")
    assert p == ShardTask(url, seg, SourceVersion(10, "a"), job_id="0a1b").data_path("c0ffee")
    assert p.startswith(f"{layout.SEGMENTS}/{seg}.") and p.endswith(".0a1b-c0ffee")
    assert layout.data_folder_segment(p.rsplit("/", 1)[1]) == seg
    assert layout.data_folder_job(p.rsplit("/", 1)[1]) == "0a1b"
    others = [
        t.data_path("c0ffef"),  # another attempt
        ShardTask(url, seg, v1, job_id="0a1c").data_path("c0ffee"),  # another job
        ShardTask(url, seg, v2, job_id="0a1b").data_path("c0ffee"),  # another source version
        ShardTask(url, seg, SourceVersion(11, "a"), job_id="0a1b").data_path("c0ffee"),
        ShardTask(url, seg, v1, revision=1, job_id="0a1b").data_path("c0ffee"),  # --force
    ]
    assert len(set(others + [p])) == len(others) + 1
    assert ".r1." in others[-1]
    assert v1.key() != v2.key()


def test_shard_task_done_by():
    t = ShardTask("/d/s.tar", "s-1", SourceVersion(10, "a"), revision=1)
    assert t.done_by(commit(source=Source(10, "a", 10, None), revision=1))
    assert not t.done_by(None)
    assert not t.done_by(commit(source=Source(10, "b"), revision=1))  # another version of the shard
    assert not t.done_by(commit(source=Source(10, "a"), revision=0))  # the version --force re-indexes


def test_shard_task_pickles():
    """Beam pickles tasks to ship them to workers."""
    t = ShardTask(
        "gs://b/s.tar", "s-123", SourceVersion(None, "etag"), revision=3, replaces="segments/s-123.x", job_id="abc"
    )
    back = pickle.loads(pickle.dumps(t))
    assert back == t and back.data_path("a1") == t.data_path("a1")
