"""Input patterns and planning."""

from edje_indexer.pipeline.plan import expand_pattern


def test_patterns(tmp_path):
    for name in ["a-000.tar", "a-001.tar", "a-002.tar", "b.tar", "c.tar.gz"]:
        (tmp_path / name).write_bytes(b"")
    d = str(tmp_path)
    assert expand_pattern(f"{d}/a-{{000..002}}.tar") == [f"{d}/a-00{i}.tar" for i in range(3)]
    assert expand_pattern(f"{d}/a-*.tar,{d}/b.tar") == [f"{d}/a-00{i}.tar" for i in range(3)] + [f"{d}/b.tar"]
    assert expand_pattern(f"{d}/{{a-000,b}}.tar, {d}/c.tar.gz") == [f"{d}/a-000.tar", f"{d}/b.tar", f"{d}/c.tar.gz"]
    assert expand_pattern(f"file://{d}/b*.tar") == [f"file://{d}/b.tar"]
    assert expand_pattern(f"{d}/nothing-*.tar") == []
    # a literal name that does not exist is kept (and reported as a failed shard later)
    assert expand_pattern(f"{d}/missing.tar") == [f"{d}/missing.tar"]
