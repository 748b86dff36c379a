"""The stages of indexing one shard (usable without Beam) and the Beam transform over shards.

Names are loaded on first use (importing this package imports neither torch
nor Beam), so store tools that only need one stage stay light.
"""

from __future__ import annotations

import importlib

_NAMES = {
    "AdapterConfig": "adapter",
    "EDJEAdapter": "adapter",
    "load_adapter_state": "adapter",
    "Preprocess": "preprocess",
    "Decoder": "decoders",
    "DecodeRejected": "decoders",
    "PillowDecoder": "decoders",
    "TorchvisionDecoder": "decoders",
    "decode_image": "decoders",
    "make_decoder": "decoders",
    "LoadedModel": "model",
    "ModelSpec": "model",
    "load_model": "model",
    "shared_model": "model",
    "TokenEncoder": "encoder",
    "IMAGE_EXTENSIONS": "shards",
    "Rejection": "shards",
    "Sample": "shards",
    "ShardReadStats": "shards",
    "iter_shard": "shards",
    "OrderedDecodeMap": "stages",
    "collect": "stages",
    "encode_batches": "stages",
    "fixed_batches": "stages",
    "IndexSettings": "indexer",
    "index_shard": "indexer",
    "IndexShards": "index_shards",
    "shared_encoder": "index_shards",
    "read_state_dict": "weights",
}

__all__ = sorted(_NAMES)


def __getattr__(name: str):
    if name in _NAMES:
        return getattr(importlib.import_module(f"edje_indexer.transforms.{_NAMES[name]}"), name)
    raise AttributeError(f"module 'edje_indexer.transforms' has no attribute {name!r}")
