"""Which shard a pattern names, and so which segment it is indexed into: however a pattern names a file
(glob, brace range, comma list; absolute, relative, file://), the same file is the same shard, and a relative
name means the file it names from the current directory."""

from __future__ import annotations

import json
import os

import pytest
from helpers import image_bytes, write_tar

from edje_indexer.pipeline.cli import main
from edje_indexer.pipeline.plan import canonical_url, expand_pattern, fingerprint, plan
from edje_indexer.schemas import Location, TokenStore, layout, read_commits
from edje_indexer.schemas.records import CommitRecord, Source

TINY = ["--preset", "tiny", "--batch-size", "4"]
NAMES = [f"shard-{i:06d}.tar" for i in range(3)]


def index(pattern: str, store: str, capsys) -> dict:
    rc = main(["index", "--input", pattern, "--store", store, *TINY, "--json"])
    out = capsys.readouterr().out
    assert rc == 0, out
    return json.loads(out[out.index("{") :])


def segments(urls: list[str]) -> list[str]:
    return [layout.segment_name(u) for u in urls]


@pytest.fixture
def files(tmp_path):
    """Three (empty) shard files in tmp_path/corpus; the pattern functions only look at names."""
    folder = tmp_path / "corpus"
    folder.mkdir()
    for name in NAMES:
        (folder / name).write_bytes(b"")
    return str(folder)


def test_glob_brace_and_comma_list_name_the_same_shards(files, tmp_path, monkeypatch):
    expected = [os.path.join(files, n) for n in NAMES]
    assert expand_pattern(f"{files}/shard-*.tar") == expected
    assert expand_pattern(f"{files}/shard-{{000000..000002}}.tar") == expected
    assert expand_pattern(",".join(expected)) == expected

    monkeypatch.chdir(tmp_path)
    forms = {
        "absolute glob": f"{files}/shard-*.tar",
        "relative glob": "corpus/shard-*.tar",
        "relative brace": "corpus/shard-{000000..000002}.tar",
        "relative comma list": "corpus/shard-000000.tar, ./corpus/shard-000001.tar,corpus/../corpus/shard-000002.tar",
        "absolute comma list": ",".join(expected),
        "mixed, repeated": f"corpus/shard-00000{{0,1}}.tar,{files}/shard-00000[12].tar,corpus//shard-000000.tar",
    }
    for what, pattern in forms.items():
        urls = expand_pattern(pattern)
        assert urls == expected, what
        assert segments(urls) == segments(expected), what

    monkeypatch.chdir(files)  # from inside the corpus folder: the same files, the same segments
    for pattern in ["shard-{000000..000002}.tar", "shard-*.tar", ",".join(NAMES), "../corpus/shard-*.tar"]:
        assert expand_pattern(pattern) == expected, pattern
    assert len(set(segments(expected))) == 3


def test_file_url_and_local_path_are_the_same_shard(files):
    path = os.path.join(files, NAMES[0])
    assert layout.segment_name(f"file://{path}") == layout.segment_name(path)
    assert layout.shard_key(f"file://{path}") == path
    assert segments(expand_pattern(f"file://{files}/shard-*.tar")) == segments(expand_pattern(f"{files}/shard-*.tar"))

    # a commit made under the plain path is found by the file:// URL (skipped, not re-indexed)
    fp = fingerprint(path)
    commits = {layout.segment_name(path): commit_record(layout.segment_name(path), path, fp)}
    the_plan = plan([f"file://{path}"], commits)
    assert the_plan.todo == [] and the_plan.skipped == [f"file://{path}"]


def test_a_file_url_and_the_same_path_in_one_pattern_are_one_shard(files):
    path = os.path.join(files, NAMES[0])
    urls = expand_pattern(f"file://{path},{path}")
    tasks = plan(urls, {}).todo
    assert len({t.segment for t in tasks}) == 1
    assert len(tasks) == 1


def test_a_non_normalised_file_url_names_the_same_shard(files):
    path = os.path.join(files, NAMES[0])
    (url,) = expand_pattern(f"file://{files}/./{NAMES[0]}")
    assert layout.segment_name(url) == layout.segment_name(path)


def test_the_same_relative_name_in_two_folders_names_two_shards(tmp_path, monkeypatch):
    for d in ("a", "b"):
        (tmp_path / d).mkdir()
        (tmp_path / d / "x.tar").write_bytes(b"")
    monkeypatch.chdir(tmp_path / "a")
    (in_a,) = expand_pattern("x.tar")
    monkeypatch.chdir(tmp_path / "b")
    (in_b,) = expand_pattern("x.tar")
    assert in_a == str(tmp_path / "a" / "x.tar") and in_b == str(tmp_path / "b" / "x.tar")
    assert layout.segment_name(in_a) != layout.segment_name(in_b)
    assert canonical_url("x.tar") == in_b


# -- end to end ------------------------------------------------------------------------------------------------


def test_a_relative_pattern_from_another_directory_finds_the_committed_shards(corpus, tmp_path, monkeypatch, capsys):
    brace, images, _bad = corpus
    folder = os.path.dirname(brace)
    store = str(tmp_path / "store")

    first = index(f"{folder}/shard-*.tar", store, capsys)
    assert first["shards_processed"] == 3
    commits = read_commits(Location(store))
    assert sorted(c.shard for c in commits.values()) == [os.path.join(folder, n) for n in NAMES]

    monkeypatch.chdir(folder)
    again = index("shard-{000000..000002}.tar", store, capsys)
    assert again["shards_processed"] == 0 and again["shards_skipped"] == 3
    assert read_commits(Location(store)) == commits  # nothing rewritten

    ts = TokenStore.open(store)
    assert ts.duplicates.num_rows == 0
    assert len(ts) == len(images)
    assert sorted(ts.ids()) == sorted(images)


def test_the_same_relative_name_from_two_directories_is_indexed_twice_into_two_segments(
    tmp_path, photos, monkeypatch, capsys
):
    store = str(tmp_path / "store")
    for d in ("a", "b"):
        (tmp_path / d).mkdir()
        members = [(f"{d}-{i}.jpg", image_bytes(photos[i][1], "JPEG")) for i in range(2)]
        write_tar(tmp_path / d / "x.tar", members)

    monkeypatch.chdir(tmp_path / "a")
    assert index("x.tar", store, capsys)["shards_processed"] == 1
    monkeypatch.chdir(tmp_path / "b")
    second = index("x.tar", store, capsys)
    assert second["shards_processed"] == 1 and second["shards_skipped"] == 0

    commits = read_commits(Location(store))
    assert sorted(c.shard for c in commits.values()) == [str(tmp_path / d / "x.tar") for d in ("a", "b")]
    assert len(commits) == 2
    ts = TokenStore.open(store)
    assert sorted(ts.ids()) == ["a-0", "a-1", "b-0", "b-1"]
    assert ts.duplicates.num_rows == 0


# -- stores whose commits recorded relative shard paths (the previous version) ---------------------------------


def commit_record(segment: str, shard: str, fp, data_path: str | None = None) -> CommitRecord:
    return CommitRecord(
        segment=segment,
        data_path=data_path or f"segments/{segment}.{layout.short_hash(fp.key(), 12)}",
        shard=shard,
        source=Source(fp.size, fp.version, fp.size, None),
        identity_sha256="0" * 64,
        quantization="fp16",
        rows=1,
        samples_read=1,
        indexed=1,
        rejected=0,
        rejected_by_reason={},
        complete=True,
        checksums={},
        token_bytes=0,
        timings_s={},
        software_version="previous",
    )


@pytest.mark.parametrize("style", ["corpus/{}", "./corpus/{}", "corpus/../corpus/{}"])
def test_commits_recorded_with_relative_paths_keep_their_segments(files, tmp_path, monkeypatch, style):
    monkeypatch.chdir(tmp_path)  # where the previous version ran, so its relative names resolve from here
    urls = expand_pattern(f"{files}/shard-*.tar")
    commits = {}
    for name, url in zip(NAMES, urls):
        rel = style.format(name)
        assert not os.path.isabs(rel)
        seg = layout.segment_name(rel)  # the previous version hashed the name as given
        assert seg != layout.segment_name(url)
        commits[seg] = commit_record(seg, rel, fingerprint(url))

    unchanged = plan(urls, commits, job_id="j1")
    assert unchanged.todo == [] and unchanged.changed == []
    assert unchanged.skipped == urls
    assert unchanged.missing_from_corpus == []

    # a changed shard is re-indexed into its existing segment, replacing the committed version
    with open(urls[1], "wb") as f:
        f.write(b"new content")
    changed = plan(urls, commits, job_id="j1")
    assert changed.skipped == [urls[0], urls[2]] and changed.changed == [urls[1]]
    (task,) = changed.todo
    old_seg = layout.segment_name(style.format(NAMES[1]))
    assert task.url == urls[1] and task.segment == old_seg
    assert task.replaces == commits[old_seg].data_path
    assert changed.missing_from_corpus == []
