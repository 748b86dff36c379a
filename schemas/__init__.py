"""What a token store is: layout, side-table schemas, token encoding, and the reader."""

from edje_indexer.schemas import layout, quantization, tables
from edje_indexer.schemas.index import IdIndex, load_index, read_commits, write_index
from edje_indexer.schemas.storage import Location
from edje_indexer.schemas.store import TokenStore, UnknownIdError, open_metadata

__all__ = ["IdIndex", "Location", "TokenStore", "UnknownIdError", "layout", "load_index", "open_metadata",
           "quantization", "read_commits", "tables", "write_index"]
