"""Synthetic token stores written with the real writer (no model, no images).

A store built here is what ``edje-index index`` writes for the same tokens, by
construction: the root through :func:`schemas.store.create_or_check`, each
segment through :class:`schemas.segment.SegmentWriter` (data, dead letters,
commit record), and the job log and id index from :func:`pipeline.finalize.finalize`.
Only the tokens are fake: seeded random floats, quantized with
:func:`schemas.quantization.quantize` so int8 stores are realistic too.

Used by the read benchmark (``python -m edje_indexer.benchmarks.read``) and the reader tests.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from edje_indexer.schemas import layout, quantization
from edje_indexer.schemas.records import CommitRecord, ModelIdentity, ShardTask, SourceVersion, StoreMetadata
from edje_indexer.schemas.segment import SegmentData, SegmentWriter, new_attempt_id
from edje_indexer.schemas.storage import Location
from edje_indexer.schemas.store import create_or_check, new_metadata

SYNTHETIC_SHARD = "synthetic://shards/shard-{seed}-{index:06d}.tar"


def fake_model_identity(m: int = 64, d: int = 384) -> ModelIdentity:
    """A model identity saying plainly that no model made these tokens."""
    return ModelIdentity(
        backbone="synthetic",
        backbone_kwargs={},
        backbone_sha256="0" * 64,
        random_weights=True,
        adapter={"num_queries": m, "out_dim": d, "synthetic": True},
        adapter_sha256="0" * 64,
        random_adapter=True,
        tokens="synthetic: seeded standard-normal floats, no model",
        preprocessing={"synthetic": True},
        tokens_per_image=m,
        token_dim=d,
    )


def create_store(url: str, quant: str = "fp16", m: int = 64, d: int = 384, id_policy: str = "key") -> StoreMetadata:
    """Create (or check) the store root exactly like the launcher does; return its metadata."""
    return create_or_check(Location(url), new_metadata(fake_model_identity(m, d), quant, id_policy))


def random_tokens(gen, n: int, m: int, d: int) -> np.ndarray:
    """float32 [n, m, d] from a seeded ``torch.Generator``: standard normal times a
    per-token scale in [0.25, 4) (so int8 scales vary). torch: ~3x faster than numpy here."""
    import torch

    x = torch.randn((n, m, d), generator=gen)
    x *= torch.empty((n, m, 1)).uniform_(0.25, 4.0, generator=gen)
    return x.numpy()


def encode_tokens(tokens: np.ndarray, quant: str) -> tuple[np.ndarray, np.ndarray | None]:
    """float tokens -> stored (values, scales) through the project's one encoder."""
    import torch

    values, scales = quantization.quantize(torch.from_numpy(np.ascontiguousarray(tokens)), quant)
    return values.numpy(), None if scales is None else scales.numpy()


def write_segment(
    loc: Location,
    metadata: StoreMetadata,
    shard_url: str,
    ids: list[str],
    values: np.ndarray,
    scales: np.ndarray | None,
    commit: bool = True,
    fingerprint: SourceVersion | None = None,
) -> CommitRecord | None:
    """Write one segment with the job's writer: data, dead letters, then (optionally) the commit.

    ``values``/``scales`` are already quantized (:func:`encode_tokens`). With
    ``commit=False`` only the data is written (what a crash before the commit
    leaves): readers must not see it, and None is returned.
    """
    source = fingerprint or SourceVersion(int(values.nbytes), hashlib.sha256(shard_url.encode()).hexdigest())
    segment = layout.segment_name(shard_url)
    raw, _ = loc.read_versioned(*layout.commit_path(segment))
    old = CommitRecord.from_json(json.loads(raw)) if raw else None
    task = ShardTask(
        shard_url,
        segment,
        source,
        replaces=old.data_path if old else None,
        revision=old.revision + 1 if old and old.source.same_version(source) else 0,
    )
    writer = SegmentWriter(loc, metadata)
    data = SegmentData(list(ids), values, scales)
    if not commit:
        writer.write_uncommitted(task, data, new_attempt_id())
        return None
    record = writer.write(
        task,
        data,
        samples_read=len(ids),
        bytes_read=source.size,
        sha256=hashlib.sha256(f"{shard_url}:{source}".encode()).hexdigest(),
    )
    if old and old.data_path != record.data_path:
        writer.discard(old.data_path)  # no reader of this builder holds the old snapshot
    return record


def finalize_index(url: str):
    """Log every commit and publish the index: the launcher's finalize step, without a job's plan."""
    from edje_indexer.pipeline.finalize import finalize

    return finalize(Location(url), "synthetic").pointer


@dataclass
class SyntheticStore:
    url: str
    metadata: dict
    ids: list[str]  # every image id, in storage order (segment by segment)
    segments: list[str]  # segment names, in write order
    tokens: np.ndarray | None = None  # float32 [n, m, d] before encoding, if asked for
    segment_of: list[int] = field(default_factory=list)  # segment number (into ``segments``) of each id


def build_synthetic_store(
    url: str,
    n_images: int,
    images_per_segment: int,
    quantization: str = "fp16",
    m: int = 64,
    d: int = 384,
    seed: int = 0,
    return_tokens: bool = False,
    index: bool = True,
    on_segment: Callable[[int, list[str], np.ndarray, np.ndarray | None], None] | None = None,
) -> SyntheticStore:
    """Write a complete, committed, indexed store of ``n_images`` random images.

    Ids are ``img-<seed>-<number>`` with the numbers shuffled, so id order and
    storage order differ (as in a real corpus). ``on_segment(first_row, ids,
    values, scales)`` sees each segment's encoded arrays as they are written
    (the benchmark uses it to keep a plain numpy copy). ``return_tokens``
    keeps the float32 tokens (n * m * d * 4 bytes: only for small stores).
    """
    if n_images < 0 or images_per_segment < 1:
        raise ValueError("n_images must be >= 0 and images_per_segment >= 1")
    loc = Location(url)
    metadata = create_store(url, quantization, m, d)
    import torch

    rng = np.random.default_rng(seed)
    gen = torch.Generator().manual_seed(seed)
    width = max(len(str(max(n_images - 1, 0))), 6)
    numbers = rng.permutation(n_images)
    all_ids = [f"img-{seed}-{int(k):0{width}d}" for k in numbers]
    tokens = np.empty((n_images, m, d), np.float32) if return_tokens else None
    segments, segment_of = [], []
    for s, start in enumerate(range(0, n_images, images_per_segment)):
        stop = min(start + images_per_segment, n_images)
        ids = all_ids[start:stop]
        x = random_tokens(gen, stop - start, m, d)
        if tokens is not None:
            tokens[start:stop] = x
        values, scales = encode_tokens(x, quantization)
        rec = write_segment(loc, metadata, SYNTHETIC_SHARD.format(seed=seed, index=s), ids, values, scales)
        if on_segment is not None:
            on_segment(start, ids, values, scales)
        segments.append(rec.segment)
        segment_of += [s] * len(ids)
    if index:
        finalize_index(url)
    return SyntheticStore(url, metadata, all_ids, segments, tokens, segment_of)
