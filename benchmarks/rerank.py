"""Reranker benchmark: pairs/s of EDJE's joint encoder, alone and reading its tokens from a store.

    python -m edje_indexer.benchmarks.rerank [--device cpu|cuda] [--layers 12] [--batch-size N] [--pairs N]
                                [--text-len 24] [--quantization fp16|int8|int4|int4-rht] [--store-images N]
                                [--repeats 3] [--precision fp32|bf16] [--torch-threads N]

The model is MiniLM-L12-H384 (rerank.joint_encoder.minilm_l12_h384_config, random
weights; ``--layers`` changes the depth), in eval mode; bf16 autocast on
CUDA, fp32 on the CPU (``--precision`` overrides). Each pair is one query of
``--text-len`` tokens ([CLS] and [SEP] included; the paper's timing uses 24)
and 64 image tokens, 384 wide: sequence length text-len + 65.

* ``encoder``: the model on pre-built inputs already on the device (token ids
  and float32 image tokens), ``--pairs`` pairs in batches of ``--batch-size``:
  the limit.
* ``with_store``: ``Reranker.score(query, ids)`` for ``--pairs`` ids drawn from
  a synthetic store (benchmarks/synthetic_store.py, the real writer; page
  cache warm): tokenizing, reading the tokens by id (``get`` on the CPU,
  ``get_raw`` + decode on the device elsewhere, the next batch read ahead on a
  thread), transfer, the model, the scores back as numpy.

Each is run once to warm up, then ``--repeats`` times, taking turns (a noisy
neighbour slows both alike); the JSON gives the median pairs/s of each, the
1-minute load average before and after, and ``ratio`` = with_store / encoder (1.0 = reading
the store costs nothing). The goal on a GPU (H100/H200, bf16, batch >= 1024)
is >= 50,000 pairs/s (``goal_pairs_per_s``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time

import numpy as np
import torch

from edje_indexer.schemas.quantization import QUANTIZATIONS

GOAL_PAIRS_PER_S = 50_000
M, D = 64, 384


def _tokenizer(folder: str, n_words: int = 512):
    """A BERT WordPiece tokenizer over made-up words ``w0`` .. (no download), and a query of n words -> n pieces."""
    from transformers import BertTokenizerFast

    words = [f"w{i}" for i in range(n_words)]
    with open(os.path.join(folder, "vocab.txt"), "w") as f:
        f.write("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + words) + "\n")
    return BertTokenizerFast.from_pretrained(folder)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fns: list, device: torch.device, repeats: int) -> list[list[float]]:
    """Seconds per run of each function; they take turns, so a noisy neighbour slows them alike."""
    for fn in fns:  # warm-up (kernels, allocator, page cache)
        fn()
    _sync(device)
    out = [[] for _ in fns]
    for _ in range(repeats):
        for fn, times in zip(fns, out):
            t0 = time.perf_counter()
            fn()
            _sync(device)
            times.append(time.perf_counter() - t0)
    return out


def run(args) -> dict:
    from edje_indexer.benchmarks.synthetic_store import build_synthetic_store
    from edje_indexer.rerank import EdjeJointEncoder, Reranker, minilm_l12_h384_config, tokenize
    from edje_indexer.schemas import TokenStore

    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no CUDA GPU")
    if args.text_len < 2 or args.text_len > 66:
        raise SystemExit("--text-len counts [CLS] and [SEP]: 2 .. 66")
    precision = args.precision or ("bf16" if device.type == "cuda" else "fp32")
    batch = args.batch_size or (1024 if device.type == "cuda" else 32)
    pairs = args.pairs or (32 * batch if device.type == "cuda" else 4 * batch)
    n_store = args.store_images or min(pairs, 8192)

    torch.manual_seed(0)
    model = EdjeJointEncoder(minilm_l12_h384_config(num_hidden_layers=args.layers)).to(device).eval()
    params = sum(p.numel() for p in model.parameters())

    tmp = tempfile.mkdtemp(prefix="edje-rerank-bench-")
    try:
        tok = _tokenizer(tmp)
        query = " ".join(f"w{i}" for i in range(args.text_len - 2))
        text = tokenize(tok, [query])
        assert text.input_ids.shape[1] == args.text_len, text.input_ids.shape

        # encoder alone, on pre-built device inputs
        ids_dev = text.input_ids.to(device).expand(batch, -1)
        images = torch.randn((batch, M, D), generator=torch.Generator().manual_seed(1)).to(device)
        n_batches = -(-pairs // batch)

        @torch.inference_mode()
        def encoder():
            with torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext():
                done = 0
                for _ in range(n_batches):
                    k = min(batch, pairs - done)
                    model(ids_dev[:k], None, images[:k])
                    done += k

        # the same pairs through Reranker.score, tokens read by id from a store
        t0 = time.perf_counter()
        url = os.path.join(tmp, "store")
        built = build_synthetic_store(url, n_store, max(1, min(1000, n_store)), quantization=args.quantization, seed=0)
        build_s = time.perf_counter() - t0
        store = TokenStore.open(url)
        rng = np.random.default_rng(0)
        order = rng.permutation(len(built.ids))
        cand = [built.ids[i] for i in np.resize(order, pairs)]  # distinct while pairs <= store size
        store.get_raw(built.ids)  # page cache warm: every stored byte read once
        rr = Reranker(model, tok, store, device=device, batch_size=batch, precision=precision)
        load_before = os.getloadavg()
        t_enc, t_store = _timed([encoder, lambda: rr.score(query, cand)], device, args.repeats)
        load_after = os.getloadavg()

        enc = pairs / statistics.median(t_enc)
        withs = pairs / statistics.median(t_store)
        return {
            "device": str(device),
            "torch_device_name": torch.cuda.get_device_name(device)
            if device.type == "cuda"
            else platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "precision": precision,
            "model": {
                "config": "MiniLM-L12-H384",
                "layers": args.layers,
                "hidden": 384,
                "heads": 12,
                "parameters": params,
                "random_weights": True,
            },
            "batch_size": batch,
            "pairs": pairs,
            "text_len": args.text_len,
            "image_tokens": M,
            "sequence_len": args.text_len + M + 1,
            "quantization": args.quantization,
            "store_images": n_store,
            "store_build_s": round(build_s, 2),
            "repeats": args.repeats,
            "encoder_pairs_per_s": round(enc, 1),
            "with_store_pairs_per_s": round(withs, 1),
            "ratio": round(withs / enc, 3),
            "encoder_seconds": [round(t, 4) for t in t_enc],
            "with_store_seconds": [round(t, 4) for t in t_store],
            "loadavg_1min": [round(load_before[0], 2), round(load_after[0], 2)],
            "goal_pairs_per_s": GOAL_PAIRS_PER_S if device.type == "cuda" else None,
            "torch": torch.__version__,
            "transformers": __import__("transformers").__version__,
            "attn_implementation": getattr(model.config, "_attn_implementation", None),
        }
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m edje_indexer.benchmarks.rerank", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda[:N]")
    p.add_argument("--layers", type=int, default=12, help="encoder layers (MiniLM-L12: 12)")
    p.add_argument("--batch-size", type=int, help="pairs per forward pass (default: 1024 on cuda, 32 on cpu)")
    p.add_argument("--pairs", type=int, help="pairs per timed run (default: 32 batches on cuda, 4 on cpu)")
    p.add_argument("--text-len", type=int, default=24, help="text tokens per pair, [CLS] and [SEP] included")
    p.add_argument("--quantization", default="fp16", choices=list(QUANTIZATIONS), help="of the synthetic store")
    p.add_argument("--store-images", type=int, help="images in the synthetic store (default: min(pairs, 8192))")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--precision", choices=["fp32", "bf16"], help="default: bf16 on cuda, fp32 elsewhere")
    p.add_argument("--torch-threads", type=int, help="torch.set_num_threads first")
    args = p.parse_args(argv)
    if (
        args.repeats < 1
        or (args.batch_size is not None and args.batch_size < 1)
        or (args.pairs is not None and args.pairs < 1)
    ):
        p.error("--repeats, --batch-size and --pairs must be >= 1")
    print(json.dumps(run(args), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
