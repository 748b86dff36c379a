"""A shard's bytes as a stream of tar members, read with bounded memory.

* :class:`HashingReader` counts and hashes the raw bytes as ``tarfile`` streams
  them, and keeps the last bytes read (transforms/shards.py uses them to tell a
  complete tar from a truncated one).
* :func:`tar_members` yields the regular members in order, each with a
  ``read()`` that must be called (or not) before the next member: bytes that are
  never used are skipped unread.
* Tar headers are bounded. ``tarfile`` reads a GNU long-name/long-link header,
  a pax header or a GNU sparse map whole, whatever size it declares (a 1 MB
  ``.tar.gz`` can declare a 1.5 GiB long name), and follows chained extension
  headers by recursion. Here the extension headers of one member may hold at
  most :data:`MAX_TAR_HEADER_BYTES` in all and be at most
  :data:`MAX_EXTENSION_HEADERS` deep; a member over either limit, or whose
  extension headers ``tarfile`` cannot parse (a sparse map cut short, numbers
  that are not numbers), raises :class:`TarHeaderRefused`, a ``tarfile.TarError``:
  the shard ends there as damaged ("incomplete", with this message as its reason).
"""

from __future__ import annotations

import hashlib
import io
import struct
import tarfile
from collections.abc import Callable, Iterator

# All extension headers of one member together (GNU long name and long link,
# pax records, GNU sparse maps). Real ones are a few hundred bytes; pax records
# carrying extended attributes can reach tens of KiB (a Linux xattr value is at
# most 64 KiB), so the limit leaves room for those.
MAX_TAR_HEADER_BYTES = 1 << 20
# Extension headers chained before one member (a pax global header, a pax
# header, a GNU long name and long link: 4 at most in practice).
MAX_EXTENSION_HEADERS = 16


class SourceReadError(OSError):
    """Reading the shard's bytes failed (a dropped connection, an I/O error): transient, not damage.

    The attempt fails and is retried; only damage in the data itself (a bad
    tar header, a truncated gzip stream) ends a shard as "incomplete"."""


class TarHeaderRefused(tarfile.TarError):
    """A member's extension headers are over the limits, or cannot be parsed: treated as tar damage."""


class HashingReader(io.RawIOBase):
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


class _HeaderBudget:
    """Stands in for ``TarFile.fileobj`` while one member's headers are read: refuses a read
    that would take the member's headers past MAX_TAR_HEADER_BYTES, before anything is read."""

    def __init__(self, fileobj):
        self._f = fileobj
        self.used = 0
        self.depth = 0

    def read(self, n: int) -> bytes:
        if self.used + n > MAX_TAR_HEADER_BYTES + tarfile.BLOCKSIZE * (MAX_EXTENSION_HEADERS + 1):
            raise TarHeaderRefused(
                f"a tar member's extension headers (GNU long name, pax records, sparse map) declare "
                f"{self.used + n} bytes, over the limit of {MAX_TAR_HEADER_BYTES}; not read"
            )
        self.used += n
        return self._f.read(n)

    def __getattr__(self, name):  # tell(), seek(), ... of the real stream
        return getattr(self._f, name)


class BoundedTarInfo(tarfile.TarInfo):
    """A TarInfo whose headers are read under :class:`_HeaderBudget` (``tarfile.open(tarinfo=...)``)."""

    @classmethod
    def fromtarfile(cls, tarfile_):
        budget = tarfile_.fileobj
        if isinstance(budget, _HeaderBudget):  # an extension header's next header: same member
            budget.depth += 1
            if budget.depth > MAX_EXTENSION_HEADERS:
                raise TarHeaderRefused(f"a tar member has more than {MAX_EXTENSION_HEADERS} chained extension headers")
            return super().fromtarfile(tarfile_)
        tarfile_.fileobj = budget = _HeaderBudget(budget)
        try:
            return super().fromtarfile(tarfile_)
        except (ValueError, IndexError, struct.error, RecursionError) as e:
            # tarfile's parsers of sparse maps and pax records fail this way on malformed input
            raise TarHeaderRefused(f"malformed tar extension header: {type(e).__name__}: {e}") from None
        finally:
            tarfile_.fileobj = budget._f


def tar_members(fileobj, state: dict) -> Iterator[tuple[tarfile.TarInfo, Callable[[], bytes]]]:
    """(info, read) for every regular member of a tar stream, in order.

    ``read()`` returns the member's bytes; it works only until the next member
    is asked for (the stream moves on), and members it is not called for are
    skipped over unread.

    Sets ``state["opened"]`` once the first header was read (``tarfile.open``
    raises before that if the stream is not a tar at all), and on a clean end
    ``state["end_offset"]`` (uncompressed offset where the stream stopped) and
    ``state["comptype"]``.
    """
    stream = tarfile.open(fileobj=fileobj, mode="r|*", tarinfo=BoundedTarInfo)
    state["opened"] = True
    state["comptype"] = getattr(stream.fileobj, "comptype", "tar")
    for info in stream:
        if info.isreg():
            yield info, lambda info=info: stream.extractfile(info).read()
        stream.members = []
    state["end_offset"] = stream.offset
