"""What a token store looks like on disk: the single source of truth.

::

    STORE/                         a Zarr v3 group
      zarr.json                    attributes["edje"] = store metadata (written once, before data)
      segments/                    Zarr group
        <segment>.<source>/        one Zarr group per input shard version, one writer
          tokens  [n, m, d]        float16 (fp16) or int8 (int8); sharded, 1 image per inner chunk;
                  [n, m, d / 2]    uint8 (int4, int4-rht): two 4-bit values per byte
          scales  [n, m]           float16, all but fp16 (int8: value = tokens * scales[..., None]);
                                   each token array's attributes["encoding"] say how to decode
                                   (schemas/quantization.py encoding(): nibble order, rotation, ...)
          ids     [n]              string (vlen-utf8)
      commits/<segment>.json       commit record: the segment exists for readers only through it
      rejected/<segment>.<source>.parquet  dead-letter rows of that data version (schemas.tables.REJECTED_SCHEMA)
      failed/<segment>.json        a shard that could not be read at all (retried by the next run)
      log/<seq>.json               the job log: what each job committed (schemas/job_log.py)
      log/checkpoint-<seq>.parquet every commit record as of entry <seq>; log/_checkpoint.json names the newest
      index/CURRENT.json           the id index readers open: its runs (schemas/index.py)
      index/run-<gen>.ids.arrow    id -> (segment, row) of one job's segments, sorted by id hash (schemas/id_runs.py)
      index/run-<gen>.segments.arrow    the segments that run points into (data path, rows)
      index/run-<gen>.duplicates.parquet  occurrences of ids already stored, found by that job
      (index/ids-<gen>.parquet, index/duplicates-<gen>.parquet: the one-table index of stores written before runs)
      _lock                        held by a running job (see pipeline/lock.py)
      .cas/                        local disk only: flock files that serialise compare-and-swap writes

Names:

* ``<segment>`` is the shard's file stem plus a hash of its canonical URL
  (local paths made absolute: pipeline/plan.py), so the same shard always
  maps to the same segment, however the pattern named it.
* ``<source>`` is a hash of the shard's source fingerprint (size, and mtime
  on local disk or the ETag/checksum on object stores), plus ``.r<N>`` when a
  shard is re-indexed from an unchanged source (``--force``), plus
  ``.<job>-<attempt>``: every attempt writes its own data folder (and
  dead-letter table), and commits by a compare-and-swap of the commit record
  (schemas/segment.py), so exactly one attempt of a shard wins, readers see
  either the old rows or the new ones, and nothing ever writes into committed data.
  Superseded versions stay one job longer (listed as ``retired`` in
  index/CURRENT.json) so that readers holding the previous snapshot keep
  working; the next job's finalize step deletes them.

Token arrays use Zarr's sharding codec with one shard per segment and one
image per inner chunk, uncompressed (fp16 tokens barely compress). Any Zarr v3
reader can read them; because the inner chunks are written in order, each
shard file is also a plain row-major block of ``n * m * d`` values (int4: ``n * m * d / 2`` bytes) followed by
the shard index, which the project's own reader (schemas.store) verifies and
memory-maps for fast gathers by id.
"""

from __future__ import annotations

import hashlib
import re

SCHEMA_VERSION = 1
METADATA_KEY = "edje"

SEGMENTS = "segments"
COMMITS = "commits"
REJECTED = "rejected"
FAILED = "failed"
INDEX = "index"
LOCK = "_lock"

TOKENS = "tokens"
SCALES = "scales"
IDS = "ids"

INDEX_POINTER = "CURRENT.json"


def short_hash(text: str, n: int = 10) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:n]


def shard_stem(url: str) -> str:
    """File name of a shard without its tar extension (``.../shard-000001.tar`` -> ``shard-000001``)."""
    stem = url.rstrip("/").rsplit("/", 1)[-1]
    for ext in (".tar.gz", ".tgz", ".tar"):
        if stem.endswith(ext):
            return stem[: -len(ext)]
    return stem


def shard_key(shard_url: str) -> str:
    """What names a shard's segment: its URL, with ``file://`` dropped (a local path is a local path)."""
    return shard_url[len("file://") :] if shard_url.startswith("file://") else shard_url


def segment_name(shard_url: str) -> str:
    """Deterministic segment name of an input shard (``shard_url`` canonical: pipeline/plan.py)."""
    stem = re.sub(r"[^A-Za-z0-9_-]+", "_", shard_stem(shard_url))[:80] or "shard"
    return f"{stem}-{short_hash(shard_key(shard_url))}"


def segment_data_path(
    segment: str, source, revision: int = 0, job: str | None = None, attempt: str | None = None
) -> str:
    """Relative path of the data group one attempt writes (``source``: a records.SourceVersion).

    ``<segment>.<source hash>[.r<revision>].<job>-<attempt>`` (job ``0``: a
    writer outside any job, e.g. the benchmarks): every attempt writes its own folder, so no attempt can touch data that
    another one wrote or committed. (Stores written before attempts had
    folders of their own name them without the ``.<job>-<attempt>`` part.)
    """
    name = f"{SEGMENTS}/{segment}.{short_hash(source.key(), 12)}" + (f".r{revision}" if revision else "")
    return name + (f".{job or '0'}-{attempt}" if attempt else "")


_DATA_FOLDER = re.compile(
    r"^(?P<segment>[^.]+)\.(?P<source>[0-9a-f]{12})(\.r(?P<revision>\d+))?"
    r"(\.(?P<job>[0-9a-f]+)-(?P<attempt>[0-9a-f]+))?$"
)


_SEGMENT_NAME = re.compile(r"^[A-Za-z0-9_-]{1,200}$")
_INDEX_FILE = re.compile(
    r"^((ids|duplicates)-[0-9]{1,12}\.parquet|run-[0-9]{1,12}\.(ids\.arrow|segments\.arrow|duplicates\.parquet))$"
)


class UnsafePath(ValueError):
    """A path read from a record that does not have the layout's shape (it might point outside the store)."""


def check_segment_name(name: str) -> str:
    if not isinstance(name, str) or not _SEGMENT_NAME.match(name):
        raise UnsafePath(f"segment name {name!r} is not one this layout writes")
    return name


def check_data_path(path: str) -> str:
    """``path`` if it is ``segments/<data folder>`` as this layout names them, else UnsafePath.

    Every path taken from a record goes through here before anything reads or deletes it: a record
    saying ``segments/../../victim`` must not make ``remove`` delete a folder outside the store."""
    if not isinstance(path, str) or path.count("/") != 1:
        raise UnsafePath(f"data path {path!r} is not segments/<folder>")
    top, name = path.split("/")
    if top != SEGMENTS or not _DATA_FOLDER.match(name):
        raise UnsafePath(f"data path {path!r} is not segments/<folder> of this layout")
    return path


def check_index_file(name: str) -> str:
    if not isinstance(name, str) or not _INDEX_FILE.match(name):
        raise UnsafePath(f"index file name {name!r} is not one this layout writes")
    return name


def data_folder_segment(name: str) -> str | None:
    """The segment a data folder (or its dead-letter table's stem) belongs to, or None for foreign names."""
    m = _DATA_FOLDER.match(name)
    return m.group("segment") if m else None


def data_folder_job(name: str) -> str | None:
    """The job id in a data folder's name (``segments/<name>``), or None (older stores, foreign names)."""
    m = _DATA_FOLDER.match(name)
    return m.group("job") if m else None


def commit_path(segment: str) -> tuple[str, str]:
    return (COMMITS, f"{segment}.json")


def rejected_path(data_path: str) -> tuple[str, str]:
    """Dead-letter table of one data version (named after its data folder)."""
    return (REJECTED, f"{data_path.rsplit('/', 1)[-1]}.parquet")


def failed_path(segment: str) -> tuple[str, str]:
    return (FAILED, f"{segment}.json")


def array_chunking(rows: int, tokens: int, dim: int) -> dict:
    """Chunk/shard shapes of a segment's token array (see module docstring)."""
    rows = max(rows, 1)  # zarr needs a positive shard shape, even for empty segments
    return {"chunks": (1, tokens, dim), "shards": (rows, tokens, dim)}
