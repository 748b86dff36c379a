"""The store's JSON records, as typed values: the one definition of each.

Every record a store holds is one of these frozen dataclasses; writers build
them and call :meth:`to_json`, readers call :meth:`from_json`, which checks
the schema version (a record written by a newer version of this project is
refused with a message saying so, never half-understood). The JSON layout is
unchanged from schema version 1, so stores written before these classes
existed read the same.

* :class:`StoreMetadata`: ``zarr.json`` attributes["edje"], written once by the launcher.
* :class:`ModelIdentity`: its ``model`` part (what built the tokens).
* :class:`CommitRecord`: ``commits/<segment>.json``, the commit point of one segment version.
* :class:`FailureRecord`: ``failed/<segment>.json``, a shard that could not be read at all.
* :class:`IndexPointer`: ``index/CURRENT.json``, the published id index generation.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import json
from dataclasses import dataclass, field
from typing import ClassVar

from edje_indexer.schemas.layout import (
    SCHEMA_VERSION,
    UnsafePath,
    check_data_path,
    check_index_file,
    check_segment_name,
)


class SchemaVersionError(ValueError):
    """A record written by a newer version of this project than the one reading it."""


def utc_now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def check_schema_version(d: dict, what: str) -> int:
    version = int(d.get("schema_version", 1))  # records of the first release may lack it
    if version > SCHEMA_VERSION:
        raise SchemaVersionError(
            f"{what} has schema version {version}, newer than this edje-indexer understands ({SCHEMA_VERSION}); "
            f"upgrade edje-indexer to read it"
        )
    return version


def _fields_of(cls, d: dict) -> dict:
    """The keys of ``d`` that are fields of ``cls`` (unknown keys of newer minor writers are ignored)."""
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in d.items() if k in names}


class _Record:
    """to_json/from_json for flat records; subclasses with nested values override them."""

    WHAT: ClassVar[str] = "record"

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, d: dict):
        if not isinstance(d, dict):
            raise ValueError(f"{cls.WHAT} is not a JSON object: {str(d)[:80]!r}")
        check_schema_version(d, cls.WHAT)
        try:
            return cls(**_fields_of(cls, d))
        except TypeError as e:  # a required field missing
            raise ValueError(f"malformed {cls.WHAT}: {e}") from None


@dataclass(frozen=True)
class ModelIdentity(_Record):
    """What produced a store's tokens; two jobs may write one store only if theirs are equal."""

    WHAT: ClassVar[str] = "model identity"

    backbone: str
    backbone_kwargs: dict
    backbone_sha256: str
    random_weights: bool
    adapter: dict
    adapter_sha256: str
    random_adapter: bool
    tokens: str  # which backbone outputs are the adapter's input
    preprocessing: dict
    tokens_per_image: int
    token_dim: int

    @classmethod
    def from_json(cls, d: dict) -> ModelIdentity:
        if not isinstance(d, dict):  # versioned by the metadata that holds it
            raise ValueError(f"malformed model identity: {str(d)[:80]!r}")
        try:
            return cls(**_fields_of(cls, d))
        except TypeError as e:
            raise ValueError(f"malformed model identity: {e}") from None


# Store metadata fields that must match for a job to write into a store.
IDENTITY_FIELDS = ("schema_version", "model", "quantization", "id_policy")


@dataclass(frozen=True)
class StoreMetadata(_Record):
    WHAT: ClassVar[str] = "store metadata"

    model: ModelIdentity
    quantization: str
    id_policy: str
    token_encoding: dict  # quantization.ENCODINGS[quantization]: how to decode, for readers that know only Zarr
    software_version: str
    created_at: str = field(default_factory=utc_now)
    schema_version: int = SCHEMA_VERSION

    def to_json(self) -> dict:
        return {**dataclasses.asdict(self), "model": self.model.to_json()}

    @classmethod
    def from_json(cls, d: dict) -> StoreMetadata:
        if not isinstance(d, dict) or "model" not in d:
            raise ValueError(f"malformed store metadata: {str(d)[:80]!r}")
        check_schema_version(d, cls.WHAT)
        try:
            return cls(**{**_fields_of(cls, d), "model": ModelIdentity.from_json(d["model"])})
        except TypeError as e:  # a required field missing
            raise ValueError(f"malformed store metadata: {e}") from None

    @property
    def tokens_per_image(self) -> int:
        return int(self.model.tokens_per_image)

    @property
    def token_dim(self) -> int:
        return int(self.model.token_dim)

    def identity(self) -> dict:
        """The fields that must match for a job to write into this store."""
        return {k: v for k, v in self.to_json().items() if k in IDENTITY_FIELDS}

    def identity_sha256(self) -> str:
        """Recorded in every commit: which identity wrote it."""
        return hashlib.sha256(json.dumps(self.identity(), sort_keys=True).encode()).hexdigest()

    def identity_diff(self, other: StoreMetadata) -> list[str]:
        """Human-readable differences of identity (nested), ``self`` being the store's."""
        return _diff(self.identity(), other.identity())


def _diff(stored: dict, wanted: dict, prefix: str = "") -> list[str]:
    out = []
    for key in sorted(set(stored) | set(wanted)):
        a, b = stored.get(key), wanted.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _diff(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: store has {a!r}, job has {b!r}")
    return out


@dataclass(frozen=True)
class SourceVersion:
    """What identifies the version of a shard without reading it (see pipeline/plan.py)."""

    size: int | None
    version: str | None

    def key(self) -> str:
        return f"{self.size}:{self.version}"


@dataclass(frozen=True)
class ShardTask:
    """One unit of work: index the shard at ``url`` into segment ``segment`` (the element the job spreads)."""

    url: str
    segment: str
    source: SourceVersion  # the version planned; recorded in the commit
    revision: int = 0  # > 0: re-indexing an unchanged source (--force)
    replaces: str | None = None  # data_path of the committed version this task supersedes (None: first commit)
    job_id: str = ""  # the launcher's store-lock token: the lease every commit of this job checks

    def data_path(self, attempt: str) -> str:
        from edje_indexer.schemas.layout import segment_data_path

        return segment_data_path(self.segment, self.source, self.revision, self.job_id or None, attempt)

    def done_by(self, record: CommitRecord | None) -> bool:
        """Whether ``record`` already commits what this task is asked to index (same source, same revision)."""
        return record is not None and record.source.same_version(self.source) and record.revision == self.revision


@dataclass(frozen=True)
class Source:
    """A committed shard's source: the version planned, and what was actually read."""

    size: int | None
    version: str | None
    bytes_read: int | None = None
    sha256: str | None = None

    def same_version(self, other: SourceVersion) -> bool:
        return (self.size, self.version) == (other.size, other.version)


@dataclass(frozen=True)
class CommitRecord(_Record):
    """A committed segment version; the segment exists for readers only through it."""

    WHAT: ClassVar[str] = "commit record"

    segment: str
    data_path: str
    shard: str
    source: Source
    identity_sha256: str
    quantization: str
    rows: int
    samples_read: int
    indexed: int
    rejected: int
    rejected_by_reason: dict
    complete: bool
    checksums: dict  # array name -> sha256 (schemas/segment.py says of what)
    token_bytes: int
    timings_s: dict
    software_version: str
    revision: int = 0
    checksum_version: int = 1  # 1: ids hashed id + NUL (ambiguous); 2: each id length-prefixed (schemas/segment.py)
    job_id: str = ""  # the job (store-lock token) whose attempt committed this; "" before attempts had ids
    attempt: str = ""
    writer: dict = field(default_factory=dict)  # host and pid of the process that wrote the data
    extra_image_members: int = 0
    incomplete_reason: str | None = None
    committed_at: str = field(default_factory=utc_now)
    schema_version: int = SCHEMA_VERSION

    def accounting_error(self) -> str | None:
        """What does not add up in the counts (every sample read is stored or rejected), or None."""
        if self.samples_read != self.indexed + self.rejected or self.rows != self.indexed:
            return (
                f"counts do not add up (read {self.samples_read}, indexed {self.indexed}, "
                f"rejected {self.rejected}, rows {self.rows})"
            )
        return None

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> CommitRecord:
        if not isinstance(d, dict) or not isinstance(d.get("source"), dict):
            raise ValueError(f"malformed commit record: {str(d)[:80]!r}")
        check_schema_version(d, cls.WHAT)
        try:
            record = cls(**{**_fields_of(cls, d), "source": Source(**_fields_of(Source, d["source"]))})
        except TypeError as e:
            raise ValueError(f"malformed commit record: {e}") from None
        check_segment_name(record.segment)
        check_data_path(record.data_path)
        if not record.data_path.split("/", 1)[1].startswith(record.segment + "."):
            raise UnsafePath(f"commit of {record.segment} names the data of another segment: {record.data_path!r}")
        return record


@dataclass(frozen=True)
class FailureRecord(_Record):
    """A shard that could not be read at all; the next run retries it."""

    WHAT: ClassVar[str] = "failure record"

    segment: str
    shard: str
    error_type: str
    message: str
    failed: bool = True
    failed_at: str = field(default_factory=utc_now)
    schema_version: int = SCHEMA_VERSION

    def __post_init__(self):
        check_segment_name(self.segment)

    @property
    def error(self) -> str:
        return f"{self.error_type}: {self.message}"


@dataclass(frozen=True)
class IndexPointer(_Record):
    """Which id index generation is current: ``runs`` (format 2, schemas/id_runs.py), or one ``ids`` table
    plus ``duplicates`` (format 1, stores written before runs, which also listed every segment covered)."""

    WHAT: ClassVar[str] = "index pointer"

    generation: int
    ids: str = ""  # format 1: file name in index/
    duplicates: str = ""  # format 1: file name in index/
    segments: dict = field(default_factory=dict)  # format 1: segment -> data_path the generation covers
    retired: list = field(default_factory=list)  # superseded data kept one job longer for open readers
    images: int = 0
    duplicates_count: int = 0
    checksums: dict = field(default_factory=dict)  # file name -> sha256 of its bytes
    runs: list = field(
        default_factory=list
    )  # format 2: oldest first, each {"ids", "segments", "duplicates", "entries"}
    segments_count: int = 0  # format 2: committed segments
    log_seq: int = 0  # format 2: the job log entry (schemas/job_log.py) this generation reflects
    format: int = 1
    schema_version: int = SCHEMA_VERSION

    def __post_init__(self):
        if self.format == 1:
            check_index_file(self.ids)
            check_index_file(self.duplicates)
        for run in self.runs:
            for key in ("ids", "segments", "duplicates"):
                check_index_file(run[key])
        for segment, path in self.segments.items():
            check_segment_name(segment)
            check_data_path(path)
        for path in self.retired:
            if path.startswith("rejected/"):
                if not path.endswith(".parquet"):
                    raise UnsafePath(f"retired path {path!r} is not a dead-letter table")
                check_data_path("segments/" + path[len("rejected/") : -len(".parquet")])
            else:
                check_data_path(path)

    def files(self) -> list[str]:
        """Every file of this generation in index/."""
        if self.format == 1:
            return [self.ids, self.duplicates]
        return [run[k] for run in self.runs for k in ("ids", "segments", "duplicates")]


@dataclass(frozen=True)
class LockRecord(_Record):
    """``STORE/_lock``: the job holding the store, and the lease its workers' commits check.

    ``beat`` grows with every heartbeat, so a contender judges staleness on its
    own clock by watching it not change (clocks of other hosts are not compared).
    ``host``, ``boot_id``, ``pid_namespace``, ``pid`` and ``pid_start`` together
    say which process holds it: a pid alone is ambiguous across containers.
    """

    WHAT: ClassVar[str] = "store lock"

    token: str  # the job id; ShardTask.job_id
    host: str
    pid: int
    boot_id: str = ""
    pid_namespace: str = ""
    pid_start: str = ""
    beat: int = 0
    heartbeat: float = 0.0  # the holder's wall clock at its last beat (for people; never compared)
    phase: str = "running"  # "finalizing": workers may no longer commit
    schema_version: int = SCHEMA_VERSION

    def __post_init__(self):
        # A lock file is written by other processes, maybe by a dying one: a wrong type makes it unreadable.
        for name, kind in (("token", str), ("host", str), ("pid", int), ("beat", int), ("phase", str)):
            value = getattr(self, name)
            if not isinstance(value, kind) or isinstance(value, bool):
                raise ValueError(f"malformed store lock: {name} is {value!r}")


def as_json_bytes(record: _Record) -> bytes:
    return json.dumps(record.to_json(), indent=1, sort_keys=True).encode()


__all__ = [
    "CommitRecord",
    "FailureRecord",
    "IDENTITY_FIELDS",
    "IndexPointer",
    "ModelIdentity",
    "SchemaVersionError",
    "ShardTask",
    "Source",
    "SourceVersion",
    "StoreMetadata",
    "as_json_bytes",
    "check_schema_version",
    "utc_now",
]
