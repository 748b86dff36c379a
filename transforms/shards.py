"""Reading one WebDataset shard: tar members -> samples with stable ids.

Members are grouped into samples the way WebDataset does it (consecutive
members sharing a key, ``webdataset.tariterators.base_plus_ext``: the key is
the member path up to the first dot of the file name). Errors are counted
here, per shard, by reason: nothing relies on webdataset's handlers (which
sleep) or on Python's warning deduplication. The tar stream is read here too
(transforms/tar_stream.py, as ``webdataset.tariterators.tar_file_iterator``
does), so that the offset where it ended is known: ``tarfile`` ends an archive
silently at an invalid header, which must not pass for a complete shard.

What a sample may be (each refusal is a dead-letter row, never an error):

* Member names must be UTF-8 and safe relative paths (:func:`unsafe_member_name`:
  not absolute, no ``..`` component, nothing that normalises to another path
  such as ``./a.jpg`` or ``a//b.jpg``, no NUL), else ``bad_id``. Ids may
  contain ``/`` (``dir/img.jpg`` is id ``dir/img``).
* Ids are at most :data:`MAX_ID_BYTES` (1 KiB) of UTF-8, whichever policy
  formed them, else ``bad_id``.
* Bytes held per sample are bounded: an image member is read only if it
  outranks (comes earlier in :data:`IMAGE_EXTENSIONS` than) the one already
  held, which is then dropped, and only if it is at most
  :data:`MAX_MEMBER_BYTES` (else ``member_too_large``); the first ``.json``
  member is read only for ``json:FIELD`` ids, and only up to
  :data:`MAX_JSON_BYTES` (else ``bad_id``). Every other member is skipped
  unread. So a sample holds one image and one JSON member at most (the
  outranked image is dropped before the next is read; if damage cuts that one
  short, the sample is left without an image: ``no_image_member``).
* Tar headers are bounded (transforms/tar_stream.py): a member whose extension
  headers exceed 1 MiB ends the shard as "incomplete", like other tar damage.
"""

from __future__ import annotations

import json
import posixpath
import re
import tarfile
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import fsspec
from webdataset.tariterators import base_plus_ext

from edje_indexer.schemas.layout import shard_stem
from edje_indexer.transforms.tar_stream import HashingReader, SourceReadError, TarHeaderRefused, tar_members

__all__ = ["SourceReadError", "Sample", "Rejection", "ShardReadStats", "iter_shard", "unsafe_member_name"]

# The image member of a sample is the first of these extensions it has; any
# other image members are ignored (counted as ``extra_image_members``).
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "gif", "bmp", "tif", "tiff")
_RANK = {ext: i for i, ext in enumerate(IMAGE_EXTENSIONS)}

ID_POLICIES = ("key", "shard-key", "json:FIELD")

# Larger image members are not read into memory: their sample is rejected ("member_too_large").
MAX_MEMBER_BYTES = 256 * 1024 * 1024
# Larger .json members are not read: a json:FIELD id cannot come from them ("bad_id").
MAX_JSON_BYTES = 16 * 1024 * 1024
# Longer ids (UTF-8 bytes) are rejected ("bad_id"), from member names and json fields alike.
MAX_ID_BYTES = 1024

_META = re.compile(r"__[^/]*__($|/)")  # webdataset's default skip_meta
_REPORTED_NAMES = 64  # member names a dead-letter row lists (then a count)


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


def _printable(text: str) -> str:
    """``text`` with undecodable bytes (surrogate escapes from tarfile) shown as \\xNN."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def unsafe_member_name(name: str) -> str | None:
    """Why a tar member name is not a plain relative path, or None if it is.

    The rules of ``tarfile``'s ``data`` extraction filter, made strict: where that
    filter would strip a leading ``/`` or resolve ``a/../b``, the sample is refused.
    """
    if "\0" in name:
        return "it contains a NUL character"
    if name.startswith("/"):
        return "it is an absolute path"
    if ".." in name.split("/"):
        return "it has a '..' component"
    normal = posixpath.normpath(name)
    if normal != name:
        return f"it normalises to {_printable(normal)!r}"
    return None


class _Parts:
    """One sample's members as they are read; holds the bytes of one image and one JSON member at most."""

    def __init__(self, key: str):
        self.key = key
        self.exts: set[str] = set()
        self.names: list[str] = []  # the first _REPORTED_NAMES, for dead-letter rows
        self.count = 0
        self.images = 0  # image members seen
        self.image: tuple[int, str, bytes | None] | None = None  # (rank, member name, bytes or None: not read)
        self.json: tuple[str, bytes | None] | None = None  # the first .json member
        self.unsafe: tuple[str, str] | None = None  # (member name, why)

    def add(self, name: str, ext: str, size: int, read: Callable[[], bytes], want_json: bool) -> None:
        last = ext.rsplit(".", 1)[-1]
        rank = _RANK.get(last)
        unsafe = self.unsafe or ((name, why) if (why := unsafe_member_name(name)) else None)
        # Read what may be used before recording the member: damage mid-read leaves it out of the sample.
        image = json_member = None
        if rank is not None and (self.image is None or rank < self.image[0]):
            readable = size <= MAX_MEMBER_BYTES and not unsafe
            if readable:
                # The outranked member goes before the new one is read (one image's bytes held, not
                # two); if damage cuts the new one, the sample has no image left (no_image_member).
                self.image = None
            image = (rank, name, read() if readable else None)
        elif last == "json" and self.json is None:
            json_member = (name, read() if want_json and size <= MAX_JSON_BYTES and not unsafe else None)
        self.exts.add(ext)
        self.count += 1
        if len(self.names) < _REPORTED_NAMES:
            self.names.append(name if len(name) <= 2048 else name[:2048] + "...")
        self.images += rank is not None
        self.unsafe = unsafe
        if image is not None:
            self.image = image  # an outranked image member is dropped here
        if json_member is not None:
            self.json = json_member

    def report(self) -> str:
        names = _printable(",".join(self.names))
        return names if self.count == len(self.names) else f"{names},... ({self.count} members)"


def iter_shard(url: str, id_policy: str, stats: ShardReadStats) -> Iterator[Sample | Rejection]:
    """Yield the samples of one shard in order, and a Rejection for each bad one.

    Raises ``OSError``/``tarfile.ReadError`` when the shard cannot be opened
    or is not a tar at all, and :class:`SourceReadError` when reading its
    bytes fails part-way (transient: the attempt is retried). Damage in the
    data after the first member, and a tar header over the limits anywhere,
    end the shard early with ``stats.complete = False``.
    """
    check_id_policy(id_policy)
    stem = shard_stem(url)
    seen: set[str] = set()
    want_json = id_policy.startswith("json:")

    def reject(ident, names, error_type, message, reason="bad_id") -> Rejection:
        return Rejection(ident, names, "read", reason, error_type, message)

    def finish(parts: _Parts) -> Sample | Rejection:
        stats.samples_read += 1
        key, names = parts.key, parts.report()
        if parts.unsafe is not None:
            name, why = parts.unsafe
            return reject(
                key if _printable(key) == key else None,
                names,
                "UnsafeMemberName",
                f"member name {_printable(name)!r} is not a plain relative path: {why}",
            )
        ident: str = key
        if id_policy == "shard-key":
            ident = f"{stem}/{key}"
        elif want_json:
            fieldname = id_policy[5:]
            try:
                if parts.json is None:
                    raise KeyError("sample has no .json member")
                jname, jdata = parts.json
                if jdata is None:
                    raise ValueError(f"{_printable(jname)!r} is larger than {MAX_JSON_BYTES} bytes; not read")
                value = json.loads(jdata)[fieldname]
                if not isinstance(value, (str, int)) or isinstance(value, bool) or str(value) == "":
                    raise TypeError(f"field {fieldname!r} is {value!r}, not a string or integer")
                ident = str(value)
            except Exception as e:  # noqa: BLE001 -- any malformed metadata is a rejection
                return reject(None, names, type(e).__name__, f"no id from json field {fieldname!r}: {e}")
        if _printable(ident) != ident:
            return reject(
                None,
                names,
                "UnicodeEncodeError",
                f"id {_printable(ident)!r} is not valid UTF-8 (tar member names and ids must be UTF-8)",
            )
        n = len(ident.encode("utf-8"))
        if n > MAX_ID_BYTES:
            return reject(
                None,
                names,
                "IdTooLong",
                f"id of {n} bytes (UTF-8) is over the {MAX_ID_BYTES}-byte limit: {ident[:64]!r}...",
            )
        if parts.image is None:
            return reject(
                ident,
                names,
                "NoImageMember",
                f"sample {key!r} has no member with an image extension ({', '.join(IMAGE_EXTENSIONS)})",
                "no_image_member",
            )
        stats.extra_image_members += parts.images - 1
        if ident in seen:
            return reject(
                ident,
                names,
                "DuplicateId",
                f"id {ident!r} already used earlier in this shard; the first occurrence is kept",
                "duplicate_id",
            )
        seen.add(ident)
        _, member, data = parts.image
        if data is None:
            return reject(
                ident,
                names,
                "MemberTooLarge",
                f"image member is larger than {MAX_MEMBER_BYTES} bytes; not read",
                "member_too_large",
            )
        return Sample(ident, key, member, data)

    with fsspec.open(url, "rb") as raw:
        reader = HashingReader(raw)
        parts: _Parts | None = None
        errors: list[Exception] = []
        state: dict = {}

        try:
            for info, read in tar_members(reader, state):
                name = info.name
                if _META.match(name) or ("/" not in name and name.startswith("__") and name.endswith("__")):
                    continue
                key, ext = base_plus_ext(name)
                if key is None:
                    continue  # a member without an extension belongs to no sample (WebDataset's rule)
                ext = ext.lower()
                if parts is None or key != parts.key or ext in parts.exts:
                    if parts is not None:
                        yield finish(parts)
                    parts = _Parts(key)
                parts.add(name, ext, info.size, read, want_json)
        except SourceReadError:
            raise  # transient: this attempt fails, a retry reads the whole shard
        except TarHeaderRefused as e:
            errors.append(e)  # refused before reading it, even as the first header: the shard ends here
        except (tarfile.TarError, EOFError, OSError, zlib.error) as e:
            if not state.get("opened"):
                raise  # not a tar at all, or unreadable: a failed shard
            # damage after the first header (decompressors report it as OSError/EOFError): the shard ends here
            errors.append(e)
        if errors:
            stats.complete = False
            stats.incomplete_reason = f"{type(errors[0]).__name__}: {errors[0]}"
        if parts is not None and parts.count:
            # After damage, the last sample holds only the members read in full (none: no sample).
            yield finish(parts)
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
