"""What a token store is, as a small library: layout, records, token encoding, writer, index, reader.

Everything that reads or writes a store goes through this package; it imports
neither Beam nor the model code, so readers and tools stay light.
"""

from edje_indexer.schemas import job_log, layout, quantization, tables
from edje_indexer.schemas.index import IdIndex, load_index, read_commits, read_pointer
from edje_indexer.schemas.reader import TokenStore, UnknownIdError
from edje_indexer.schemas.records import (
    CommitRecord,
    FailureRecord,
    IndexPointer,
    ModelIdentity,
    SchemaVersionError,
    ShardTask,
    Source,
    SourceVersion,
    StoreMetadata,
)
from edje_indexer.schemas.segment import SegmentData, SegmentWriter, read_failure, read_rejected
from edje_indexer.schemas.storage import Location
from edje_indexer.schemas.store import StoreMismatch, create_or_check, new_metadata, open_metadata

__all__ = [
    "CommitRecord",
    "FailureRecord",
    "IdIndex",
    "IndexPointer",
    "Location",
    "ModelIdentity",
    "SchemaVersionError",
    "SegmentData",
    "SegmentWriter",
    "ShardTask",
    "Source",
    "SourceVersion",
    "StoreMetadata",
    "StoreMismatch",
    "TokenStore",
    "UnknownIdError",
    "create_or_check",
    "job_log",
    "layout",
    "load_index",
    "new_metadata",
    "open_metadata",
    "quantization",
    "read_commits",
    "read_failure",
    "read_pointer",
    "read_rejected",
    "tables",
]
