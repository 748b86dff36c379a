"""The stages of indexing one shard, each usable without Beam."""

from edje_indexer.transforms.adapter import AdapterConfig, EDJEAdapter, load_adapter_state
from edje_indexer.transforms.decode import DecodeRejected, Preprocess, decode_image
from edje_indexer.transforms.encode import LoadedModel, ModelSpec, TokenEncoder, load_model, load_model_cached
from edje_indexer.transforms.indexer import IndexSettings, ShardTask, index_shard
from edje_indexer.transforms.shards import IMAGE_EXTENSIONS, Rejection, Sample, ShardReadStats, iter_shard

__all__ = ["AdapterConfig", "DecodeRejected", "EDJEAdapter", "IMAGE_EXTENSIONS", "IndexSettings", "LoadedModel",
           "ModelSpec", "Preprocess", "Rejection", "Sample", "ShardReadStats", "ShardTask", "TokenEncoder",
           "decode_image", "index_shard", "iter_shard", "load_adapter_state", "load_model", "load_model_cached"]
