"""The backbone's raw tokens of a corpus, computed once and kept: what the adapter is trained on.

Training runs the frozen backbone once per image, not once per step: :func:`compute_features`
reads the shards the way the indexer does (transforms/shards.py ``iter_shard``, the spec's decoder
and preprocessing, transforms/encoder.py ``TokenEncoder.encode_backbone`` with the same precision),
so the tokens the adapter learns from are the ones it will meet inside ``edje-index index``.

A cache folder holds::

    tokens.npy    float16 [N, n, d_v]  patch tokens (the backbone's forward_features, prefix tokens dropped)
    global.npz    cls [N, d_v], mean [N, d_v] (float32): the class token and the mean patch token
    ids.json      the N image ids, in shard order
    cache.json    what made it (backbone identity, preprocessing, precision, shards): reuse checks this

The global features are the first stage's image side (training/first_stage.py).
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch

from edje_indexer.transforms.model import LoadedModel

TOKENS_NAME, GLOBAL_NAME, IDS_NAME, INFO_NAME = "tokens.npy", "global.npz", "ids.json", "cache.json"


@dataclass
class Features:
    ids: list[str]
    tokens: np.ndarray  # float16 [N, n, d_v] (memory-mapped when read from a cache folder)
    cls: np.ndarray  # float32 [N, d_v]
    mean: np.ndarray  # float32 [N, d_v]

    def rows(self, ids: list[str]) -> np.ndarray:
        """Row numbers of ``ids`` (KeyError naming the first unknown one)."""
        where = {i: r for r, i in enumerate(self.ids)}
        return np.array([where[i] for i in ids], dtype=np.int64)

    def global_features(self, kind: str = "cls+mean") -> np.ndarray:
        """float32 [N, D] image features for the first stage: ``cls``, ``mean`` or ``cls+mean`` (concatenated)."""
        parts = {"cls": [self.cls], "mean": [self.mean], "cls+mean": [self.cls, self.mean]}
        if kind not in parts:
            raise ValueError(f"unknown global feature {kind!r}; use one of {sorted(parts)}")
        return np.concatenate(parts[kind], axis=1).astype(np.float32)


def cache_info(model: LoadedModel, shards: list[str], precision: str) -> dict:
    """What a cache's tokens depend on; a cache is reused only if this is equal."""
    ident = model.identity
    return {
        "backbone": ident.backbone,
        "backbone_kwargs": ident.backbone_kwargs,
        "backbone_sha256": ident.backbone_sha256,
        "preprocessing": ident.preprocessing,
        "precision": precision,
        "shards": [os.path.abspath(s) for s in shards],
    }


def _batches(shards: list[str], decoder, batch_size: int):
    """(ids, uint8 batch) from the shards, in order; undecodable samples are skipped, as the indexer rejects them."""
    from edje_indexer.transforms.shards import Sample, ShardReadStats, iter_shard

    ids, items = [], []
    for url in shards:
        for s in iter_shard(url, "key", ShardReadStats()):
            if not isinstance(s, Sample):
                continue
            try:
                items.append(decoder.prepare(s.data))
            except Exception:  # noqa: BLE001 -- a bad image: the index job rejects it too
                continue
            ids.append(s.id)
            if len(items) == batch_size:
                yield ids, items
                ids, items = [], []
    if items:
        yield ids, items


def compute_features(
    shards: list[str],
    model: LoadedModel,
    precision: str = "fp32",
    batch_size: int = 32,
    total: int | None = None,
    desc: str = "backbone tokens",
) -> Features:
    """Run the backbone over every image of ``shards`` (float16 tokens kept in memory)."""
    from tqdm import tqdm

    from edje_indexer.transforms.decoders import make_decoder
    from edje_indexer.transforms.encoder import TokenEncoder

    encoder = TokenEncoder(model, "fp16", "cpu", precision)
    decoder = make_decoder(model.spec.decoder, model.preprocess, encoder.device, model.spec.jpeg_draft)
    prefix = model.num_prefix_tokens
    ids, tokens, cls, mean = [], [], [], []
    with tqdm(total=total, desc=desc, unit="img", file=sys.stderr, mininterval=2.0) as bar:
        for batch_ids, items in _batches(shards, decoder, batch_size):
            pixels, errors = decoder.assemble(items)
            keep = [i for i, e in zip(batch_ids, errors) if e is None]
            feats = encoder.encode_backbone(pixels)  # [B, prefix + n, d_v]
            patches = feats[:, prefix:]
            ids += keep
            tokens.append(patches.to(torch.float16).numpy())
            cls.append((feats[:, 0] if prefix else patches.mean(1)).numpy())
            mean.append(patches.mean(1).numpy())
            bar.update(len(batch_ids))
    if not ids:
        raise ValueError(f"no image could be read from {len(shards)} shard(s)")
    return Features(ids, np.concatenate(tokens), np.concatenate(cls), np.concatenate(mean))


def save_features(features: Features, folder: str, info: dict) -> None:
    os.makedirs(folder, exist_ok=True)
    np.save(os.path.join(folder, TOKENS_NAME), features.tokens)
    np.savez(os.path.join(folder, GLOBAL_NAME), cls=features.cls, mean=features.mean)
    with open(os.path.join(folder, IDS_NAME), "w") as f:
        json.dump(features.ids, f)
    with open(os.path.join(folder, INFO_NAME), "w") as f:  # written last: a cache without it is incomplete
        json.dump(info, f, indent=1)


def load_features(folder: str, info: dict | None = None) -> Features | None:
    """A cache folder's features, or None if it is missing, incomplete or was made differently than ``info``."""
    try:
        with open(os.path.join(folder, INFO_NAME)) as f:
            stored = json.load(f)
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    if info is not None and stored != json.loads(json.dumps(info)):
        return None
    with open(os.path.join(folder, IDS_NAME)) as f:
        ids = json.load(f)
    g = np.load(os.path.join(folder, GLOBAL_NAME))
    tokens = np.load(os.path.join(folder, TOKENS_NAME), mmap_mode="r")
    return Features(ids, tokens, g["cls"], g["mean"])


def cached_features(
    folder: str,
    shards: list[str],
    model: LoadedModel,
    precision: str = "fp32",
    batch_size: int = 32,
    total: int | None = None,
    desc: str = "backbone tokens",
) -> tuple[Features, float]:
    """(features, seconds spent computing them: 0 when the cache in ``folder`` was reused)."""
    info = cache_info(model, shards, precision)
    found = load_features(folder, info)
    if found is not None:
        return found, 0.0
    t0 = time.perf_counter()
    features = compute_features(shards, model, precision, batch_size, total, desc)
    save_features(features, folder, info)
    return load_features(folder, info), time.perf_counter() - t0


def auto_precision() -> str:
    """bf16 where the CPU computes it natively (AVX512-BF16 or AMX: about 1.7x faster for the backbone and
    2-2.5x for training the joint encoder here), else fp32 (emulated bf16 would be slower than fp32)."""
    cpu = getattr(torch, "cpu", None)
    native = any(
        getattr(cpu, name, lambda: False)() for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    )
    return "bf16" if native else "fp32"
