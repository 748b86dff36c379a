"""Reading one WebDataset shard: tar members -> samples with stable ids.

Members are grouped into samples the way WebDataset does it (consecutive
members sharing a key, ``webdataset.tariterators.base_plus_ext``: the key is
the member path up to the first dot of the file name). Errors are counted
here, per shard, by reason: nothing relies on webdataset's handlers (which
sleep) or on Python's warning deduplication. The tar stream is read here too
(as ``webdataset.tariterators.tar_file_iterator`` does), so that the offset
where it ended is known: ``tarfile`` ends an archive silently at an invalid
header, which must not pass for a complete shard.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import tarfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass

import fsspec
from webdataset.tariterators import base_plus_ext

from edje_indexer.schemas.layout import shard_stem

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


class SourceReadError(OSError):
    """Reading the shard's bytes failed (a dropped connection, an I/O error): transient, not damage.

    The attempt fails and is retried; only damage in the data itself (a bad
    tar header, a truncated gzip stream) ends a shard as "incomplete"."""


class _HashingReader(io.RawIOBase):
    """Counts and hashes the raw bytes of a shard as tarfile streams them."""

    def __init__(self, f):
        self._f = f
        self.sha = hashlib.sha256()
        self.size = 0
        self.head = b""
        self.tail = b""
        self.last_nonzero = -1  # offset of the last non-zero byte read

    def readable(self):
        return True

    def read(self, n=-1):
        try:
            b = self._f.read(n)
        except OSError as e:
            raise SourceReadError(f"reading the shard failed after {self.size} bytes: {type(e).__name__}: {e}") from e
        if b:
            self.sha.update(b)
            used = len(b.rstrip(b"\0"))
            if used:
                self.last_nonzero = self.size + used - 1
            self.size += len(b)
            if len(self.head) < 4:
                self.head = (self.head + b)[:4]
            self.tail = (self.tail + b)[-1024:]
        return b

    def drain(self):
        while self.read(1 << 20):
            pass


def _printable(text: str) -> str:
    """``text`` with undecodable bytes (surrogate escapes from tarfile) shown as \\xNN."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _image_member(members: dict[str, str]) -> str | None:
    """The extension key (e.g. ``v2.final.jpg``) of the sample's image member, or None."""
    by_last = {}
    for ext in members:
        by_last.setdefault(ext.rsplit(".", 1)[-1].lower(), ext)
    for ext in IMAGE_EXTENSIONS:
        if ext in by_last:
            return by_last[ext]
    return None


_META = re.compile(r"__[^/]*__($|/)")  # webdataset's default skip_meta


# Larger members are not read into memory: their sample is rejected ("member_too_large").
MAX_MEMBER_BYTES = 256 * 1024 * 1024
_USED = set(IMAGE_EXTENSIONS) | {"json"}


def _used(name: str) -> bool:
    """Whether a member's bytes can matter: images, and .json (ids may come from it)."""
    return name.rsplit(".", 1)[-1].lower() in _USED


def _tar_members(fileobj, state: dict) -> Iterator[tuple[str, bytes | None]]:
    """(name, data) of the regular members of a tar stream, in order.

    ``data`` is None for members whose bytes are never used (e.g. ``.txt``,
    ``.mp4``: tarfile skips over them) and for members larger than
    MAX_MEMBER_BYTES.

    Sets ``state["opened"]`` once the first header was read (``tarfile.open``
    raises before that if the stream is not a tar at all), and on a clean end
    ``state["end_offset"]`` (uncompressed offset where the stream stopped) and
    ``state["comptype"]``.
    """
    stream = tarfile.open(fileobj=fileobj, mode="r|*")
    state["opened"] = True
    state["comptype"] = getattr(stream.fileobj, "comptype", "tar")
    for info in stream:
        name = info.name
        if (
            info.isreg()
            and not _META.match(name)
            and not ("/" not in name and name.startswith("__") and name.endswith("__"))
        ):
            wanted = _used(name) and info.size <= MAX_MEMBER_BYTES
            yield name, stream.extractfile(info).read() if wanted else None
        stream.members = []
    state["end_offset"] = stream.offset


def iter_shard(url: str, id_policy: str, stats: ShardReadStats) -> Iterator[Sample | Rejection]:
    """Yield the samples of one shard in order, and a Rejection for each bad one.

    Raises ``OSError``/``tarfile.ReadError`` when the shard cannot be opened
    or is not a tar at all, and :class:`SourceReadError` when reading its
    bytes fails part-way (transient: the attempt is retried). Damage in the
    data after the first member ends the shard early with
    ``stats.complete = False``.
    """
    check_id_policy(id_policy)
    stem = shard_stem(url)
    seen: set[str] = set()

    def finish(key: str, members: dict[str, str], datas: dict[str, bytes | None]):
        stats.samples_read += 1
        names = _printable(",".join(members.values()))
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
                return Rejection(
                    None, names, "read", "bad_id", type(e).__name__, f"no id from json field {fieldname!r}: {e}"
                )
        if ident is not None and _printable(ident) != ident:
            return Rejection(
                None,
                names,
                "read",
                "bad_id",
                "UnicodeEncodeError",
                f"id {_printable(ident)!r} is not valid UTF-8 (tar member names and ids must be UTF-8)",
            )
        if chosen is None:
            return Rejection(
                ident,
                names,
                "read",
                "no_image_member",
                "NoImageMember",
                f"sample {key!r} has no member with an image extension ({', '.join(IMAGE_EXTENSIONS)})",
            )
        stats.extra_image_members += sum(1 for e in members if e != chosen and _image_member({e: ""}) is not None)
        if ident in seen:
            return Rejection(
                ident,
                names,
                "read",
                "duplicate_id",
                "DuplicateId",
                f"id {ident!r} already used earlier in this shard; the first occurrence is kept",
            )
        seen.add(ident)
        data = datas[members[chosen]]
        if data is None:
            return Rejection(
                ident,
                names,
                "read",
                "member_too_large",
                "MemberTooLarge",
                f"image member is larger than {MAX_MEMBER_BYTES} bytes; not read",
            )
        return Sample(ident, key, members[chosen], data)

    with fsspec.open(url, "rb") as raw:
        reader = _HashingReader(raw)
        current: str | None = None
        members: dict[str, str] = {}
        datas: dict[str, bytes] = {}
        errors: list[Exception] = []
        state: dict = {}

        try:
            for name, data in _tar_members(reader, state):
                key, ext = base_plus_ext(name)
                if key is None:
                    continue  # a member without an extension belongs to no sample (WebDataset's rule)
                ext = ext.lower()
                if key != current or ext in members:
                    if current is not None:
                        yield finish(current, members, datas)
                    current, members, datas = key, {}, {}
                members[ext] = name
                datas[name] = data
        except SourceReadError:
            raise  # transient: this attempt fails, a retry reads the whole shard
        except (tarfile.TarError, EOFError, OSError, zlib.error) as e:
            if not state.get("opened"):
                raise  # not a tar at all, or unreadable: a failed shard
            # damage after the first header (decompressors report it as OSError/EOFError): the shard ends here
            errors.append(e)
        if errors:
            stats.complete = False
            stats.incomplete_reason = f"{type(errors[0]).__name__}: {errors[0]}"
        if current is not None:
            # After damage, the last sample holds only the members read in full.
            yield finish(current, members, datas)
        reader.drain()  # the rest of the stream: its size and sha256 (a read error here fails the attempt)
        if not errors and state.get("comptype") == "tar" and reader.size and any(reader.tail[-1024:]):
            # A tar cut exactly at a member boundary reads cleanly; only the
            # missing end-of-archive blocks (1024 zero bytes) give it away.
            stats.complete = False
            stats.incomplete_reason = "no end-of-archive marker: the tar looks truncated"
        elif not errors and state.get("comptype") == "tar" and reader.last_nonzero >= state.get("end_offset", 0):
            # tarfile also ends silently at an invalid header after the first
            # (or at an end-of-archive marker with more data behind it): data
            # after the point where it stopped means members were skipped.
            stats.complete = False
            stats.incomplete_reason = (
                f"the tar stream ended at byte {state['end_offset']} (an invalid header or an "
                f"early end-of-archive marker), but data follows: the "
                f"{reader.size - state['end_offset']} bytes after it were not read"
            )
        stats.size = reader.size
        stats.sha256 = reader.sha.hexdigest()
