"""Nothing silently wrong in the store: damaged data, a damaged index, paths from records, durability.

Each case damages a real store (built by the indexing job or the synthetic
builder, which uses the same writer) the way a disk or a hostile record
would, and checks that readers and ``verify`` report it instead of serving
zeros or another image's tokens, and that no command acts on a path that a
record makes up.
"""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest

from edje_indexer.benchmarks.synthetic_store import build_synthetic_store
from edje_indexer.pipeline.cli import main
from edje_indexer.pipeline.verify import verify
from edje_indexer.schemas import TokenStore, layout, read_commits, read_pointer
from edje_indexer.schemas import storage as storage_module
from edje_indexer.schemas.index import IndexDamaged
from edje_indexer.schemas.segment import ids_checksum
from edje_indexer.schemas.storage import Location
from edje_indexer.schemas.store import StoreDamaged


@pytest.fixture
def store(tmp_path):
    url = str(tmp_path / "store")
    built = build_synthetic_store(url, n_images=60, images_per_segment=20, quantization="int8", seed=1)
    return url, built


def first_commit(url):
    return sorted(read_commits(Location(url)).values(), key=lambda c: c.segment)[0]


@pytest.mark.parametrize("damage", ["delete", "truncate", "grow"])
def test_a_missing_or_resized_chunk_file_is_an_error_never_zeros(store, damage):
    url, built = store
    c = first_commit(url)
    chunk = os.path.join(url, c.data_path, "tokens", "c", "0", "0", "0")
    if damage == "delete":
        os.remove(chunk)
    else:
        size = os.path.getsize(chunk)
        with open(chunk, "r+b") as f:
            f.truncate(size - 1 if damage == "truncate" else size + 16)
    ids = [i for i, s in zip(built.ids, built.segment_of) if built.segments[s] == c.segment][:3]
    with TokenStore.open(url) as ts, pytest.raises(StoreDamaged, match="chunk file"):
        ts.get(ids)
    report = verify(url)  # plain verify, no --deep
    assert not report["ok"] and any("tokens chunk file" in p for p in report["problems"]), report


def test_a_missing_segment_folder_is_reported_by_deep_verify(store, capsys):
    url, _ = store
    shutil.rmtree(os.path.join(url, first_commit(url).data_path))
    assert main(["verify", url, "--deep"]) == 1  # a problem, not a traceback
    assert "PROBLEM" in capsys.readouterr().out


def test_every_flipped_byte_of_the_id_index_is_caught(store):
    url, built = store
    loc = Location(url)
    ptr = read_pointer(loc)
    assert ptr.format == 2 and len(ptr.runs) == 1
    for name in ptr.files():  # the run's ids, its segment table and its duplicates
        path = os.path.join(url, layout.INDEX, name)
        original = open(path, "rb").read()
        positions = np.linspace(0, len(original) - 1, 25).astype(int)
        for pos in positions:
            data = bytearray(original)
            data[pos] ^= 0x10
            open(path, "wb").write(bytes(data))
            with pytest.raises(IndexDamaged):
                store = TokenStore.open(url)  # small run files are checked at open; duplicates when first read
                assert store.duplicates is not None
            assert any("id index is unusable" in p for p in verify(url)["problems"]), name
        open(path, "wb").write(original)
    ts = TokenStore.open(url)
    assert len(ts) == 60 and verify(url)["ok"]


def test_paths_from_records_are_validated_before_anything_is_read_or_deleted(store, tmp_path, capsys):
    url, _ = store
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "precious.txt").write_text("keep me")
    c = first_commit(url)
    record_file = os.path.join(url, *layout.commit_path(c.segment))
    rec = json.load(open(record_file))
    rec["data_path"] = "segments/../../victim"
    json.dump(rec, open(record_file, "w"))
    assert main(["remove", url, "--shard", c.shard]) == 2
    assert "unusable" in capsys.readouterr().err
    assert (victim / "precious.txt").read_text() == "keep me"
    # Readers take data paths from the published index (checked the same way), never from this record.
    ts = TokenStore.open(url)
    assert len(ts) == 60 and ts.get([ts.ids()[0]]).shape[0] == 1
    report = verify(url)
    assert not report["ok"] and any("unusable commit record" in p for p in report["problems"])
    assert (victim / "precious.txt").read_text() == "keep me"


def test_ids_checksum_is_unambiguous_and_old_stores_still_verify():
    assert ids_checksum(["a\0b"]) != ids_checksum(["a", "b"])
    assert ids_checksum(["ab"]) != ids_checksum(["a", "b"])
    assert ids_checksum(["a\0b"], version=1) == ids_checksum(["a", "b"], version=1)  # why version 2 exists


def test_a_record_with_checksum_version_1_verifies_with_its_own_algorithm(store):
    url, _ = store
    c = first_commit(url)
    record_file = os.path.join(url, *layout.commit_path(c.segment))
    rec = json.load(open(record_file))
    import zarr

    ids = zarr.open_group(os.path.join(url, c.data_path), mode="r")["ids"][...].tolist()
    rec["checksum_version"] = 1
    rec["checksums"]["ids"] = ids_checksum(ids, version=1)
    json.dump(rec, open(record_file, "w"))
    assert verify(url, deep=True)["ok"]
    rec["checksums"]["ids"] = ids_checksum(ids, version=2)  # the wrong algorithm for this record
    json.dump(rec, open(record_file, "w"))
    assert not verify(url, deep=True)["ok"]


def test_segments_are_fsynced_before_their_commit(tmp_path, monkeypatch):
    synced: list[str] = []
    real_fsync = os.fsync

    def counting_fsync(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        return real_fsync(fd)

    monkeypatch.setattr(storage_module.os, "fsync", counting_fsync)
    url = str(tmp_path / "store")
    build_synthetic_store(url, n_images=8, images_per_segment=8, quantization="int8", seed=2, index=False)
    c = first_commit(url)
    data = os.path.join(url, c.data_path)
    files = [os.path.join(r, f) for r, _, fs in os.walk(data) for f in fs]
    dirs = [r for r, _, _ in os.walk(data)]
    assert set(files) <= set(synced) and set(dirs) <= set(synced)  # every chunk file and folder of the segment
    assert os.path.join(url, *layout.rejected_path(c.data_path)) in synced
    assert os.path.join(url, layout.COMMITS) in synced  # the folder of the renamed commit record
    commit_at = max(i for i, p in enumerate(synced) if p.startswith(os.path.join(url, layout.COMMITS)))
    assert all(synced.index(f) < commit_at for f in files)  # data durable before the commit is


def test_token_store_closes_and_is_a_context_manager(store):
    url, built = store
    with TokenStore.open(url) as ts:
        assert ts.get(built.ids[:2]).shape == (2, 64, 384)
    with pytest.raises(ValueError, match="closed"):
        ts.get(built.ids[:2])


def test_files_are_hashed_and_copied_a_block_at_a_time(tmp_path):
    # verify hashes every id index file and remote readers copy runs to a local cache: never the whole file
    # in memory (a run of 10^9 ids is ~40 GB), so the digest and the copy must come out of many blocks right
    import hashlib
    import io

    data = np.random.default_rng(0).integers(0, 256, 10_000, dtype=np.uint8).tobytes()
    (tmp_path / "blob").write_bytes(data)
    copy = io.BytesIO()
    assert Location(str(tmp_path)).sha256("blob", copy_to=copy, block=4096) == hashlib.sha256(data).hexdigest()
    assert copy.getvalue() == data
