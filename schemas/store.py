"""The store root: created once, by the launcher, before any data; opened by everyone else.

``zarr.json`` of the root group holds :class:`StoreMetadata` under
``attributes["edje"]``. A job may write into a store only if its metadata's
identity (schema version, model, quantization, id policy) equals the
store's; anything else is refused before a byte is written.
"""

from __future__ import annotations

import zarr

from edje_indexer.schemas import layout, quantization
from edje_indexer.schemas.records import ModelIdentity, StoreMetadata
from edje_indexer.schemas.storage import Location


class StoreMismatch(ValueError):
    """A job whose model or settings differ from the store's."""


class StoreDamaged(ValueError):
    """Stored data that is missing or not the size the layout implies: an error, never zeros."""


def new_metadata(model: ModelIdentity, quant: str, id_policy: str) -> StoreMetadata:
    """The metadata a job with this model and settings would give a new store."""
    from edje_indexer import __version__

    return StoreMetadata(
        model=model,
        quantization=quantization.check_quantization(quant),
        id_policy=id_policy,
        token_encoding=quantization.encoding(quant, model.token_dim),
        software_version=__version__,
    )


def open_metadata(loc: Location) -> StoreMetadata:
    if not loc.exists("zarr.json"):
        raise FileNotFoundError(f"{loc.url} is not a token store (no zarr.json); create one with 'edje-index index'")
    meta = zarr.open_group(loc.url, mode="r").attrs.get(layout.METADATA_KEY)
    if meta is None:
        raise ValueError(
            f"{loc.url} is a Zarr group but not an EDJE token store (no '{layout.METADATA_KEY}' attribute)"
        )
    return StoreMetadata.from_json(dict(meta))


def create_or_check(loc: Location, metadata: StoreMetadata) -> StoreMetadata:
    """Create the store (metadata first) or check that it matches ``metadata``; return the store's."""
    if loc.exists("zarr.json"):
        stored = open_metadata(loc)
        diff = stored.identity_diff(metadata)
        if diff:
            raise StoreMismatch(
                f"store {loc.url} was built with another model or settings; refusing to write into it:\n  "
                + "\n  ".join(diff)
                + "\nUse a new --store, or the store's own settings."
            )
        return stored
    root = zarr.open_group(loc.url, mode="a", zarr_format=3, attributes={layout.METADATA_KEY: metadata.to_json()})
    root.create_group(layout.SEGMENTS)
    return metadata
