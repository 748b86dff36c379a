"""Planning a job: which shards the pattern names, and which of them need work."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from braceexpand import braceexpand

from edje_indexer.schemas import layout
from edje_indexer.schemas.records import CommitRecord, ShardTask, SourceVersion
from edje_indexer.schemas.storage import filesystem

_GLOB_CHARS = set("*?[")


def _split_top_level_commas(pattern: str) -> list[str]:
    """``a.tar,b-{1,2}.tar`` -> ``["a.tar", "b-{1,2}.tar"]``: commas inside braces are brace lists."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(pattern):
        depth += (ch == "{") - (ch == "}")
        if ch == "," and depth == 0:
            parts.append(pattern[start:i])
            start = i + 1
    return parts + [pattern[start:]]


def canonical_url(url: str) -> str:
    """A shard's location as the job records it: local paths become absolute and normalised (``file://``
    URLs keep their scheme, normalised the same way; layout.segment_name treats ``file://x`` as ``x``);
    other URLs stay as they are."""
    if url.startswith("file://"):
        return "file://" + os.path.normpath(url[len("file://") :])
    if "://" in url:
        return url
    return os.path.normpath(os.path.abspath(os.path.expanduser(url)))


def expand_pattern(pattern: str) -> list[str]:
    """Comma lists, brace ranges, globs; local paths or fsspec URLs. Canonical, sorted, unique.

    Literal names that do not exist are kept (they are reported as failed
    shards, so a missing shard is visible, not silently skipped); a glob that
    matches nothing contributes nothing. A glob, a brace pattern and a comma
    list naming the same files give the same URLs (see :func:`canonical_url`).
    """
    urls: list[str] = []
    for part in (p.strip() for p in _split_top_level_commas(pattern)):
        if not part:
            continue
        for name in braceexpand(part):
            if _GLOB_CHARS & set(name):
                fs, path = filesystem(name)
                proto = name.split("://", 1)[0] + "://" if "://" in name else ""
                matches = fs.glob(path)
                urls += [proto + m if proto else m for m in matches if not fs.isdir(m)]
            else:
                urls.append(name)
    # One URL per shard: two spellings of one file (``file:///d/x.tar`` and ``/d/x.tar``) are one shard.
    by_shard: dict[str, str] = {}
    for u in map(canonical_url, urls):
        by_shard.setdefault(layout.shard_key(u), u)
    return sorted(by_shard.values())


_VERSION_KEYS = ("ETag", "etag", "md5Hash", "crc32c", "generation", "LastModified", "last_modified", "updated", "mtime")


def _version(fs, path: str, info: dict) -> SourceVersion:
    key = next((k for k in _VERSION_KEYS if info.get(k) is not None), None)
    version = f"{key}:{info[key]}" if key else f"ukey:{fs.ukey(path)}"
    return SourceVersion(info.get("size"), version)


def fingerprint(url: str) -> SourceVersion:
    """What identifies the current version of a shard, without reading it.

    Size plus, on local disk, the modification time (not fsspec's ``ukey``,
    which also changes with permissions, inode or ctime, so a ``chmod`` or a
    restored copy would re-index); on object stores the first of ETag /
    checksum / generation / modification time the filesystem reports.
    """
    fs, path = filesystem(url)
    try:
        info = fs.info(path)
    except (FileNotFoundError, PermissionError, OSError):
        return SourceVersion(None, None)
    return _version(fs, path, info)


# Below this many shards in one folder, one request per shard is cheaper than listing the folder.
LIST_FOLDER_FROM = 64


def fingerprints(urls: list[str]) -> dict[str, SourceVersion]:
    """:func:`fingerprint` of every URL, from one listing per folder where that is cheaper.

    A listing carries sizes and ETags / modification times, so a million
    shards in a few folders cost a few thousand listing requests (1,000 keys
    per S3 page), not a million ``HEAD`` requests.
    """
    by_folder: dict[str, list[str]] = {}
    for url in urls:
        by_folder.setdefault(url.rsplit("/", 1)[0], []).append(url)
    out: dict[str, SourceVersion] = {}
    for group in by_folder.values():
        if len(group) < LIST_FOLDER_FROM:
            out.update((u, fingerprint(u)) for u in group)
            continue
        fs, first = filesystem(group[0])
        try:
            listing = {e["name"].rstrip("/"): e for e in fs.ls(first.rsplit("/", 1)[0], detail=True, refresh=True)}
        except (FileNotFoundError, PermissionError, OSError):
            listing = {}
        for u in group:
            path = filesystem(u)[1].rstrip("/")
            info = listing.get(path)
            out[u] = _version(fs, path, info) if info and info.get("type") != "directory" else SourceVersion(None, None)
    return out


@dataclass
class Plan:
    todo: list[ShardTask] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # committed, source unchanged
    changed: list[str] = field(default_factory=list)  # committed, source changed: re-indexed
    missing_from_corpus: list[str] = field(default_factory=list)  # committed shards the pattern no longer names


def plan(urls: list[str], commits: dict[str, CommitRecord], force: bool = False, job_id: str = "") -> Plan:
    """What to do for each of ``urls`` (canonical, from :func:`expand_pattern`) given the commits.

    A shard is matched to its commit by segment name, or (stores whose
    shards were named before URLs were made canonical) by the recorded shard
    URL made absolute from the current directory, so such a shard keeps its
    segment instead of being indexed twice.
    """
    out = Plan()
    versions = fingerprints(urls)
    # segment -> shard URL without parsing every record (a StoreState has it; a dict of records is read)
    shards = getattr(commits, "shards", None) or {s: c.shard for s, c in commits.items()}
    by_url = None
    segments = set()
    for url in urls:
        seg = layout.segment_name(url)
        if seg not in commits:
            if by_url is None:  # stores whose shards were named before URLs were canonical (built once)
                by_url = {layout.shard_key(canonical_url(u)): s for s, u in shards.items()}
            seg = by_url.get(layout.shard_key(url), seg)
        segments.add(seg)
        fp = versions[url]
        old = commits.brief(seg) if hasattr(commits, "brief") else commits.get(seg)  # a StoreState: no parsing
        task = ShardTask(url, seg, fp, job_id=job_id)
        if old is not None:
            same = old.source.same_version(fp)
            if same and not force:
                out.skipped.append(url)
                continue
            if not same:
                out.changed.append(url)
            # an unchanged source re-indexed (--force) gets the next revision; a new folder either way
            task = ShardTask(url, seg, fp, old.revision + 1 if same else 0, replaces=old.data_path, job_id=job_id)
        out.todo.append(task)
    out.missing_from_corpus = sorted(u for s, u in shards.items() if s not in segments)
    return out
