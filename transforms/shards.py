"""Reading one WebDataset shard: tar members -> samples with stable ids.

Members are grouped into samples the way WebDataset does it (consecutive
members sharing a key, ``webdataset.tariterators.base_plus_ext``: the key is
the member path up to the first dot of the file name). Errors are counted
here, per shard, by reason: nothing relies on webdataset's handlers (which
sleep) or on Python's warning deduplication.
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from dataclasses import dataclass, field
from typing import Iterator

import fsspec
from webdataset.tariterators import base_plus_ext, tar_file_iterator

# The image member of a sample is the first of these extensions it has; any
# other image members are ignored (counted as ``extra_image_members``).
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "gif", "bmp", "tif", "tiff")

ID_POLICIES = ("key", "shard-key", "json:FIELD")


def check_id_policy(policy: str) -> str:
    if policy in ("key", "shard-key") or (policy.startswith("json:") and len(policy) > 5):
        return policy
    raise ValueError(f"unknown id policy {policy!r}; use 'key', 'shard-key' or 'json:FIELD'")


@dataclass
class Sample:
    id: str
    key: str
    member: str  # tar member name of the image
    data: bytes


@dataclass
class Rejection:
    id: str | None
    member: str | None
    stage: str
    reason: str
    error_type: str
    message: str


@dataclass
class ShardReadStats:
    """Filled in while a shard is read; final once iteration ends."""

    samples_read: int = 0
    extra_image_members: int = 0
    complete: bool = True
    incomplete_reason: str | None = None
    size: int = 0
    sha256: str | None = None


class _HashingReader(io.RawIOBase):
    """Counts and hashes the raw bytes of a shard as tarfile streams them."""

    def __init__(self, f):
        self._f = f
        self.sha = hashlib.sha256()
        self.size = 0
        self.head = b""
        self.tail = b""

    def readable(self):
        return True

    def read(self, n=-1):
        b = self._f.read(n)
        if b:
            self.sha.update(b)
            self.size += len(b)
            if len(self.head) < 4:
                self.head = (self.head + b)[:4]
            self.tail = (self.tail + b)[-1024:]
        return b

    def drain(self):
        while self.read(1 << 20):
            pass


def shard_stem(url: str) -> str:
    stem = url.rstrip("/").rsplit("/", 1)[-1]
    for ext in (".tar.gz", ".tgz", ".tar"):
        if stem.endswith(ext):
            return stem[: -len(ext)]
    return stem


def _image_member(members: dict[str, str]) -> str | None:
    by_last = {}
    for ext, name in members.items():
        by_last.setdefault(ext.rsplit(".", 1)[-1].lower(), name)
    for ext in IMAGE_EXTENSIONS:
        if ext in by_last:
            return ext
    return None


def iter_shard(url: str, id_policy: str, stats: ShardReadStats) -> Iterator[Sample | Rejection]:
    """Yield the samples of one shard in order, and a Rejection for each bad one.

    Raises ``OSError``/``tarfile.ReadError`` only when the shard cannot be
    opened or is not a tar at all; damage after the first member ends the
    shard early with ``stats.complete = False``.
    """
    check_id_policy(id_policy)
    stem = shard_stem(url)
    seen: set[str] = set()

    def finish(key: str, members: dict[str, str], datas: dict[str, bytes]):
        stats.samples_read += 1
        names = ",".join(members.values())
        chosen = _image_member(members)
        ident: str | None = key
        if id_policy == "shard-key":
            ident = f"{stem}/{key}"
        elif id_policy.startswith("json:"):
            fieldname = id_policy[5:]
            jext = next((e for e in members if e.rsplit(".", 1)[-1].lower() == "json"), None)
            try:
                if jext is None:
                    raise KeyError("sample has no .json member")
                value = json.loads(datas[members[jext]])[fieldname]
                if not isinstance(value, (str, int)) or isinstance(value, bool) or str(value) == "":
                    raise TypeError(f"field {fieldname!r} is {value!r}, not a string or integer")
                ident = str(value)
            except Exception as e:  # noqa: BLE001 -- any malformed metadata is a rejection
                return Rejection(None, names, "read", "bad_id", type(e).__name__, f"no id from json field {fieldname!r}: {e}")
        if chosen is None:
            return Rejection(ident, names, "read", "no_image_member", "NoImageMember",
                             f"sample {key!r} has no member with an image extension ({', '.join(IMAGE_EXTENSIONS)})")
        stats.extra_image_members += sum(1 for e in members if e != chosen and _image_member({e: ""}) is not None)
        if ident in seen:
            return Rejection(ident, names, "read", "duplicate_id", "DuplicateId",
                             f"id {ident!r} already used earlier in this shard; the first occurrence is kept")
        seen.add(ident)
        return Sample(ident, key, members[chosen], datas[members[chosen]])

    with fsspec.open(url, "rb") as raw:
        reader = _HashingReader(raw)
        current: str | None = None
        members: dict[str, str] = {}
        datas: dict[str, bytes] = {}
        errors: list[Exception] = []

        def on_member_error(exn: Exception) -> bool:
            errors.append(exn)
            return False  # a damaged member ends the tar stream: stop reading

        try:
            for item in tar_file_iterator(reader, handler=on_member_error):
                name = item["fname"]
                key, ext = base_plus_ext(name)
                if key is None:
                    continue  # a member without an extension belongs to no sample (WebDataset's rule)
                ext = ext.lower()
                if key != current or ext in members:
                    if current is not None:
                        yield finish(current, members, datas)
                    current, members, datas = key, {}, {}
                members[ext] = name
                datas[name] = item["data"]
        except (tarfile.ReadError, EOFError, OSError) as e:
            if stats.samples_read == 0 and current is None:
                raise
            errors.append(e)
        if errors:
            stats.complete = False
            stats.incomplete_reason = f"{type(errors[0]).__name__}: {errors[0]}"
        if current is not None:
            # After damage, the last sample holds only the members read in full.
            yield finish(current, members, datas)
        try:
            reader.drain()
        except OSError:
            pass
        if not errors and reader.head[:2] != b"\x1f\x8b" and reader.size and any(reader.tail[-1024:]):
            # A tar cut exactly at a member boundary reads cleanly; only the
            # missing end-of-archive blocks (1024 zero bytes) give it away.
            stats.complete = False
            stats.incomplete_reason = "no end-of-archive marker: the tar looks truncated"
        stats.size = reader.size
        stats.sha256 = reader.sha.hexdigest()
