"""Arrow schemas of the store's side tables (Parquet files)."""

import pyarrow as pa

# One row per rejected sample (or per unreadable shard, with member = null).
REJECTED_SCHEMA = pa.schema(
    [
        pa.field("id", pa.string()),  # null when no id could be formed
        pa.field("shard", pa.string(), nullable=False),  # source shard URL
        pa.field("member", pa.string()),  # tar member name(s), comma-separated
        pa.field("stage", pa.string(), nullable=False),  # read | decode | encode | shard
        pa.field("reason", pa.string(), nullable=False),  # short stable code, counted in stats
        pa.field("error_type", pa.string(), nullable=False),  # exception class or reason
        pa.field("message", pa.string(), nullable=False),
    ]
)

# The id -> (segment, row) index: one file per generation, sorted by id.
INDEX_SCHEMA = pa.schema(
    [
        pa.field("id", pa.string(), nullable=False),
        pa.field("segment", pa.string(), nullable=False),
        pa.field("row", pa.int32(), nullable=False),
    ]
)

# Ids that occur in more than one place; the index keeps the first by
# (segment, row) order and lists every other occurrence here.
DUPLICATES_SCHEMA = pa.schema(
    [
        pa.field("id", pa.string(), nullable=False),
        pa.field("segment", pa.string(), nullable=False),
        pa.field("row", pa.int32(), nullable=False),
        pa.field("kept_segment", pa.string(), nullable=False),
        pa.field("kept_row", pa.int32(), nullable=False),
    ]
)
