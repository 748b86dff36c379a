"""What a token store is: layout, side-table schemas, token encoding, and the reader."""

from schemas import layout, quantization, tables
from schemas.index import IdIndex, load_index, read_commits, write_index
from schemas.storage import Location
from schemas.store import TokenStore, UnknownIdError, open_metadata

__all__ = ["IdIndex", "Location", "TokenStore", "UnknownIdError", "layout", "load_index", "open_metadata",
           "quantization", "read_commits", "tables", "write_index"]
