"""The Beam transform: shard tasks -> spread over workers -> one segment each.

:class:`IndexShards` only wires; the work is :func:`transforms.indexer.index_shard`.
The unit of parallelism, retry and commit is one shard (design.md): the task
list is spread with a ``Reshuffle`` (never the images), and read, decode,
encode and write of one shard stay fused in one ``DoFn`` call.

The encoder is shared per worker process with Beam's ``Shared`` (one model
per process, whatever number of DoFn instances or threads the runner
creates; on the DaskRunner ``setup`` runs once per partition, not per process).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import apache_beam as beam
from apache_beam.metrics import Metrics
from apache_beam.utils.shared import Shared

from edje_indexer.schemas.records import ShardTask, StoreMetadata
from edje_indexer.schemas.segment import SegmentWriter
from edje_indexer.schemas.storage import Location
from edje_indexer.schemas.store import new_metadata
from edje_indexer.transforms.encoder import TokenEncoder
from edje_indexer.transforms.indexer import IndexSettings, index_shard_retrying
from edje_indexer.transforms.model import ModelSpec, shared_model

# Process-wide, so that a process keeps its encoder across jobs and DoFn instances.
_ENCODERS = Shared()


def shared_encoder(spec: ModelSpec, settings: IndexSettings, quantization: str) -> TokenEncoder:
    """This process's encoder for (model, device settings, quantization), built on first use."""
    return _ENCODERS.acquire(
        lambda: settings.encoder(shared_model(spec), quantization), tag=(spec, settings, quantization)
    )


class IndexShardFn(beam.DoFn):
    """One shard task in, a short summary of its commit (or failure) record out."""

    def __init__(self, store: str, metadata: StoreMetadata, spec: ModelSpec, settings: IndexSettings):
        self.store, self.metadata, self.spec, self.settings = store, metadata, spec, settings
        self.images = Metrics.counter("edje", "images_indexed")
        self.rejected = Metrics.counter("edje", "images_rejected")
        self.shards = Metrics.counter("edje", "shards_committed")
        self.failed = Metrics.counter("edje", "shards_failed")
        self.shard_ms = Metrics.distribution("edje", "shard_ms")

    def setup(self):
        self.encoder = shared_encoder(self.spec, self.settings, self.metadata.quantization)
        built = new_metadata(self.encoder.model.identity, self.metadata.quantization, self.metadata.id_policy)
        if built.identity_sha256() != self.metadata.identity_sha256():
            raise RuntimeError(
                "this worker built a different model than the launcher (weights or library versions differ); "
                "install the same versions of torch/timm on workers, or ship weights files rather than random init"
            )
        self.writer = SegmentWriter(Location(self.store), self.metadata)

    def process(self, task: ShardTask):
        t = time.perf_counter()
        rec = index_shard_retrying(task, self.encoder, self.writer, self.settings)
        if getattr(rec, "failed", False):
            self.failed.inc()
        else:
            self.shards.inc()
            self.images.inc(rec.indexed)
            self.rejected.inc(rec.rejected)
        self.shard_ms.update(int(1000 * (time.perf_counter() - t)))
        yield rec.segment


@dataclass(eq=False)  # Beam keeps transforms in dicts: identity equality, as PTransform has
class IndexShards(beam.PTransform):
    """``ListShards`` -> ``SpreadShards`` -> ``IndexShard``: a pipeline's whole indexing step."""

    tasks: list[ShardTask]
    store: str
    metadata: StoreMetadata
    spec: ModelSpec
    settings: IndexSettings

    def __post_init__(self):
        super().__init__()
        if not self.tasks:
            raise ValueError("IndexShards needs at least one shard task")

    def expand(self, pbegin):
        return (
            pbegin
            | "ListShards" >> beam.Create(self.tasks)
            | "SpreadShards" >> beam.Reshuffle()
            | "IndexShard" >> beam.ParDo(IndexShardFn(self.store, self.metadata, self.spec, self.settings))
        )
