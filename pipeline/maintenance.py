"""Store upkeep that only the launcher (holding the store lock) may do."""

from __future__ import annotations

import json

from edje_indexer.schemas import layout
from edje_indexer.schemas.records import CommitRecord
from edje_indexer.schemas.storage import Location, filesystem

_SIDE_FOLDERS = (layout.COMMITS, layout.REJECTED, layout.FAILED, layout.INDEX, "log")


def retire(data_paths: list[str]) -> list[str]:
    """A superseded data version and its dead-letter table: what the index pointer keeps one job longer."""
    return sorted(data_paths) + sorted("/".join(layout.rejected_path(p)) for p in data_paths)


def find_uncommitted(loc: Location, commits: dict[str, CommitRecord], keep=()) -> list[str]:
    """Relative paths no commit record refers to (crash leftovers, superseded versions
    past their grace period) and interrupted temp files; ``keep`` is spared."""
    referenced = {c.data_path for c in commits.values()} | set(keep)
    out = [
        f"{layout.SEGMENTS}/{n}"
        for n in loc.list(layout.SEGMENTS)
        if n != "zarr.json" and f"{layout.SEGMENTS}/{n}" not in referenced
    ]
    if not loc.is_local:  # object stores may list a "folder" whose objects are all gone (SeaweedFS does, a while)
        out = [rel for rel in out if _has_objects(loc, rel)]
    for folder in _SIDE_FOLDERS:
        out += [f"{folder}/{n}" for n in loc.list(folder) if n.startswith(".tmp-")]
    tables = {"/".join(layout.rejected_path(c.data_path)) for c in commits.values()} | set(keep)
    out += [
        f"{layout.REJECTED}/{n}"
        for n in loc.list(layout.REJECTED)
        if n.endswith(".parquet") and f"{layout.REJECTED}/{n}" not in tables
    ]
    return sorted(out)


def _committed_now(loc: Location, rel: str) -> bool:
    """Whether the commit record of the segment ``rel`` belongs to names it, read directly (no listing cache)."""
    name = rel.rsplit("/", 1)[-1]
    if rel.startswith(f"{layout.REJECTED}/"):
        name = name[: -len(".parquet")]
    segment = layout.data_folder_segment(name)
    if segment is None:
        return False
    raw, _ = loc.read_versioned(*layout.commit_path(segment))
    if raw is None:
        return False
    try:
        data_path = CommitRecord.from_json(json.loads(raw)).data_path
    except ValueError:
        return True  # an unreadable commit: keep everything of its segment for verify to report
    return data_path.rsplit("/", 1)[-1] == name


def _has_objects(loc: Location, rel: str) -> bool:
    """Whether any object lies under ``rel`` (not just the empty directory entry some stores keep)."""
    path = loc.path(rel).rstrip("/")
    return any(name.rstrip("/") != path for name in loc.fs.find(path))


def remove_uncommitted(loc: Location, commits: dict[str, CommitRecord], keep=()) -> list[str]:
    """Remove what :func:`find_uncommitted` finds. Only the launcher of a job whose workers can no longer
    commit (StoreLock.close_commits), or a command holding the lock, may call this; each folder's
    commit record is read again right before the folder is removed."""
    removed = []
    for rel in find_uncommitted(loc, commits, keep):
        if _committed_now(loc, rel):
            continue
        loc.remove(*rel.split("/"))
        removed.append(rel)
    return removed


def remove_leftovers(loc: Location, segments: list[str], commits, keep=()) -> list[str]:
    """Remove the data folders (and dead-letter tables) of ``segments`` that no commit record refers to:
    what attempts of a job left behind, found by one prefix listing per segment (no listing of the store).
    Same rules as :func:`remove_uncommitted`: only with commits closed, each folder's record read again."""
    referenced = {commits[s].data_path for s in segments if s in commits} | set(keep)
    tables = {"/".join(layout.rejected_path(p)) for p in referenced}
    wanted = set(segments)
    found = []
    # Local disk: one listing per folder. Object stores: a prefix listing per segment, unless listing the
    # whole folder takes fewer requests (1,000 names per page).
    whole = loc.is_local or len(wanted) > max(len(commits), 1) / 1000
    for folder in (layout.SEGMENTS, layout.REJECTED):
        if whole:
            names = [n for n in loc.list(folder) if layout.data_folder_segment(n.removesuffix(".parquet")) in wanted]
        else:
            names = [n for seg in sorted(wanted) for n in loc.list_prefix(folder, f"{seg}.")]
        found += [f"{folder}/{n}" for n in names if folder == layout.SEGMENTS or n.endswith(".parquet")]
    for folder in _SIDE_FOLDERS:  # interrupted atomic writes (local disk): a prefix listing each
        found += [f"{folder}/{n}" for n in loc.list_prefix(folder, ".tmp-")]
    removed = []
    for rel in sorted(found):
        if rel.rsplit("/", 1)[-1].startswith(".tmp-"):
            loc.remove(*rel.split("/"))
            removed.append(rel)
            continue
        if (
            rel in referenced
            or rel in tables
            or layout.data_folder_segment(rel.rsplit("/", 1)[-1].removesuffix(".parquet")) not in wanted
        ):
            continue
        if _committed_now(loc, rel):
            continue
        loc.remove(*rel.split("/"))
        removed.append(rel)
    return removed


def missing_sources(commits: dict[str, CommitRecord]) -> list[str]:
    """Committed shards whose source file no longer exists."""
    out = []
    for c in commits.values():
        try:
            fs, path = filesystem(c.shard)
        except (ValueError, ImportError):
            continue  # a protocol this machine cannot reach: unknown, not missing
        if not fs.exists(path):
            out.append(c.shard)
    return sorted(out)


def remove_segments(loc: Location, segments: list[str]) -> None:
    """Remove committed segments: the commit record first, so readers stop seeing them at once."""
    from edje_indexer.pipeline.finalize import finalize
    from edje_indexer.schemas.job_log import read_state

    state = read_state(loc)
    for seg in segments:
        rec = state[seg]
        loc.remove(*layout.commit_path(seg))
        loc.remove(*rec.data_path.split("/"))
        loc.remove(*layout.rejected_path(rec.data_path))
    finalize(loc, "remove", [], removed=list(segments), state=state)
