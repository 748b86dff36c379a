"""Quality on real data: a miniature of the paper's experiment through the project's own job, store and reranker.

    python -m edje_indexer.benchmarks.quality --data quality/data --weights quality/models/dinov2-....safetensors \\
        --run quality/run --work quality/bench [--steps N] [--no-i2t]          (make quality)

1. **Train** (training/train.py), or reuse ``--run`` when it holds a run of the same configuration.
2. **First stage on the held-out split** (a fixed 30% of the images, never seen by training): the backbone's
   global features of the test images (computed as the indexer computes tokens, training/features.py),
   MiniLM sentence embeddings of their captions, the run's ridge map; text -> image and image -> text
   rankings, each query's top ``k`` (10) kept as the reranker's candidates.
3. **Index** the test shards with the trained adapter through the real job (``edje-index index``:
   pipeline/cli.py ``main``) into one store per quantization: fp16, int8, and int4 when ``schemas/quantization.py``
   lists it (every choice of an ``--int4-*rotation*`` flag if the job has one, each a store of its own).
4. **Rerank** every query's candidates with the trained joint encoder reading each store
   (rerank/reranker.py ``Reranker``: ``score`` for text -> image, ``score_pairs`` for image -> text).
5. **Print one JSON object**: recall at 1/5/10 of the first stage and reranked per store (fractions),
   bytes per image of each store measured on disk (the token arrays, and the whole store folder), the
   top-1 agreement and mean Kendall tau of each store's reranked order against fp16's, wall times.

Relevance is by caption text (training/metrics.py): stamps sharing a description are all right answers,
and each distinct caption is one query.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time

import numpy as np

K = 10


def int4_variants() -> list[tuple[str, list[str]]]:
    """``(name, index flags)`` for int4: none if the job has no int4 yet, one per rotation choice if it has
    a rotation flag (the flag's default first, so it is the one reported as plain ``int4``)."""
    from edje_indexer.pipeline.flags import add_index_flags
    from edje_indexer.schemas.quantization import QUANTIZATIONS

    if "int4" not in QUANTIZATIONS:
        return []
    parser = add_index_flags(argparse.ArgumentParser())
    for action in parser._actions:
        flag = next((o for o in action.option_strings if "rotation" in o), None)
        if flag and action.choices:
            choices = sorted(action.choices, key=lambda c: c != action.default)
            return [(f"int4-{c}", ["--quantize", "int4", flag, str(c)]) for c in choices]
    return [("int4", ["--quantize", "int4"])]


def store_bytes(store: str) -> tuple[int, int]:
    """(bytes of the token arrays: every array of every segment but ``ids``, bytes of the whole folder)."""
    tokens = total = 0
    for root, _, files in os.walk(store):
        rel = os.path.relpath(root, store).split(os.sep)
        size = sum(os.path.getsize(os.path.join(root, f)) for f in files)
        total += size
        if len(rel) >= 3 and rel[0] == "segments" and rel[2] != "ids":
            tokens += size
    return tokens, total


def index_store(pattern: str, store: str, cfg, adapter: str, precision: str, flags: list[str]) -> tuple[dict, float]:
    """Run ``edje-index index`` (pipeline/cli.py ``main``, in this process) into a fresh ``store``;
    (its ``--json`` summary, wall seconds)."""
    import contextlib
    import io

    from edje_indexer.pipeline.cli import main as edje_index

    if os.path.exists(store):
        shutil.rmtree(store)
    argv = ["index", "--input", pattern, "--store", store, "--preset", cfg.preset, "--adapter", adapter]
    argv += ["--precision", precision, "--json", *flags]
    argv += ["--weights", cfg.weights] if cfg.weights else ["--random-weights"]
    out = io.StringIO()
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(out):
        rc = edje_index(argv)
    seconds = time.perf_counter() - t0
    if rc != 0:
        raise RuntimeError(f"edje-index {' '.join(argv)} failed with exit code {rc}")
    return json.loads(out.getvalue()), seconds


def rerank_store(store: str, joint, tokenizer, precision: str, t2i, t2i_texts, i2t, i2t_images, image_ids, queries):
    """Reranked orders and scores of every query's candidates, read from ``store``: ``t2i[j]`` are image
    indices for the text ``t2i_texts[j]``, ``i2t[j]`` caption indices (into ``queries``) for ``i2t_images[j]``."""
    from edje_indexer.rerank.reranker import Reranker
    from edje_indexer.schemas import TokenStore

    with TokenStore.open(store) as ts:
        rr = Reranker(joint, tokenizer, ts, batch_size=64, precision=precision)
        out = {"t2i_orders": [], "t2i_scores": [], "i2t_orders": [], "i2t_scores": []}
        for q, cands in zip(t2i_texts, t2i):
            s = rr.score(q, [image_ids[c] for c in cands])
            out["t2i_scores"].append(s)
            out["t2i_orders"].append([int(cands[i]) for i in np.argsort(-s, kind="stable")])
        for image, cands in zip(i2t_images, i2t if i2t is not None else []):
            s = rr.score_pairs([queries[c] for c in cands], [image] * len(cands))
            out["i2t_scores"].append(s)
            out["i2t_orders"].append([int(cands[i]) for i in np.argsort(-s, kind="stable")])
    return out


def _subset(items: list[str], limit: int | None) -> np.ndarray:
    """Indices of all ``items``, or of a fixed ``limit`` of them (by a hash of each), in their order."""
    import hashlib

    if limit is None or limit >= len(items):
        return np.arange(len(items))
    ranked = sorted(range(len(items)), key=lambda i: hashlib.sha256(items[i].encode()).hexdigest())
    return np.array(sorted(ranked[:limit]))


def _recalls(prefix: str, orders, relevant) -> dict:
    from edje_indexer.training.metrics import recall

    return {f"{prefix}_{k}": round(v, 4) for k, v in recall(orders, relevant).items()}


def run_benchmark(args: argparse.Namespace) -> dict:
    from edje_indexer.pipeline.plan import expand_pattern
    from edje_indexer.rerank.checkpoint import load_reranker
    from edje_indexer.training.data import read_captions, read_manifest
    from edje_indexer.training.features import cached_features
    from edje_indexer.training.first_stage import RidgeMap, caption_relevance
    from edje_indexer.training.metrics import agreement, top_k
    from edje_indexer.training.sentence import SentenceEncoder, minilm_folder
    from edje_indexer.training.train import (
        ADAPTER_NAME,
        FIRST_STAGE_NAME,
        RERANKER_DIR,
        config_from_args,
        load_run,
        load_spec,
        resolve_precision,
        train,
    )
    from edje_indexer.transforms.model import load_model

    t_start = time.perf_counter()
    load_before = os.getloadavg()[0]
    wall: dict[str, float] = {}
    cfg = config_from_args(args)
    record = None if args.force else load_run(cfg.run, cfg)
    reused = record is not None
    if record is None:
        record = train(cfg)
    wall["train_s"] = record["timings"]["total_s"]
    precision = record["precision"]
    rerank_precision = resolve_precision(args.rerank_precision) if args.rerank_precision != "train" else precision

    # 2. the first stage on the held-out split
    manifest = read_manifest(cfg.data)
    test = manifest["splits"]["test"]
    pattern = test["pattern"]
    caption_of = {r["id"]: r["caption"] for r in read_captions(cfg.data, "test")}
    t0 = time.perf_counter()
    model = load_model(load_spec(cfg))
    feats, _ = cached_features(
        os.path.join(args.work, "cache", "test"), expand_pattern(pattern), model, precision, 32, test["images"], "test"
    )
    wall["test_backbone_s"] = round(time.perf_counter() - t0, 2)
    image_ids = feats.ids
    image_caps = [caption_of[i] for i in image_ids]
    queries = sorted(set(image_caps))
    t0 = time.perf_counter()
    text = SentenceEncoder(cfg.text_model or minilm_folder()).encode(queries)
    ridge = RidgeMap.load(os.path.join(cfg.run, FIRST_STAGE_NAME))
    scores = text @ ridge.embed(feats.global_features(ridge.feature)).T  # [queries, images]
    t2i = top_k(scores, K)
    i2t = None if args.no_i2t else top_k(scores.T, K)
    t2i_rel = caption_relevance(queries, image_caps)
    query_of = {q: i for i, q in enumerate(queries)}
    i2t_rel = [{query_of[c]} for c in image_caps]
    first_all = _recalls("t2i", t2i, t2i_rel)
    if i2t is not None:
        first_all.update(_recalls("i2t", i2t, i2t_rel))
    # the reranked queries: all, or a fixed subset (a hash of the text / id) to bound the reranking time
    t2i_q = _subset(queries, args.max_queries)
    i2t_q = _subset(image_ids, args.max_queries)
    t2i, t2i_rel = t2i[t2i_q], [t2i_rel[i] for i in t2i_q]
    t2i_texts = [queries[i] for i in t2i_q]
    if i2t is not None:
        i2t, i2t_rel = i2t[i2t_q], [i2t_rel[i] for i in i2t_q]
    i2t_images = [image_ids[i] for i in i2t_q]
    first = _recalls("t2i", t2i, t2i_rel)
    if i2t is not None:
        first.update(_recalls("i2t", i2t, i2t_rel))
    wall["first_stage_s"] = round(time.perf_counter() - t0, 2)

    # 3-4. index into each store through the real job, rerank from it
    joint, tokenizer = load_reranker(os.path.join(cfg.run, RERANKER_DIR))
    variants = [("fp16", ["--quantize", "fp16"]), ("int8", ["--quantize", "int8"])] + int4_variants()
    results, orders = {}, {}
    for name, flags in variants:
        store = os.path.join(args.work, f"store-{name}")
        summary, index_s = index_store(pattern, store, cfg, os.path.join(cfg.run, ADAPTER_NAME), precision, flags)
        wall[f"index_{name}_s"] = round(index_s, 2)
        t0 = time.perf_counter()
        out = rerank_store(
            store, joint, tokenizer, rerank_precision, t2i, t2i_texts, i2t, i2t_images, image_ids, queries
        )
        wall[f"rerank_{name}_s"] = round(time.perf_counter() - t0, 2)
        token_bytes, folder_bytes = store_bytes(store)
        n = summary["store_images"]
        res = _recalls("t2i", out["t2i_orders"], t2i_rel)
        if i2t is not None:
            res.update(_recalls("i2t", out["i2t_orders"], i2t_rel))
        res.update(
            bytes_per_image=round(token_bytes / n, 1),
            store_bytes_per_image=round(folder_bytes / n, 1),
            job_bytes_per_image=summary["bytes_per_image"],
            images=n,
            flags=flags,
        )
        results[name], orders[name] = res, out
    agree = {}
    for name in results:
        if name == "fp16":
            continue
        a, ref = orders[name], orders["fp16"]
        agree[name] = {
            **agreement(a["t2i_orders"], ref["t2i_orders"], a["t2i_scores"], ref["t2i_scores"]),
        }
        if i2t is not None:
            i2t_agree = agreement(a["i2t_orders"], ref["i2t_orders"], a["i2t_scores"], ref["i2t_scores"])
            agree[name].update({f"i2t_{k}": v for k, v in i2t_agree.items()})
        agree[name] = {k: round(v, 4) for k, v in agree[name].items()}
    int4 = [n for n in results if n.startswith("int4")]
    if int4:  # the job's default int4 (the rotation flag's default) under the plain name
        results["int4"], agree["int4"] = results[int4[0]], agree[int4[0]]
    else:
        results["int4"] = agree["int4"] = {"available": False, "reason": "schemas/quantization.py has no int4 yet"}
    wall["total_s"] = round(time.perf_counter() - t_start, 2)
    return {
        "data": {
            "train": record["images"],
            "test": {
                "images": len(image_ids),
                "queries": len(queries),
                "reranked_queries": {"t2i": len(t2i_texts), "i2t": 0 if i2t is None else len(i2t_images)},
                "split": manifest["split_rule"],
            },
        },
        "k": K,
        "first_stage": first,
        "first_stage_all_queries": first_all,
        "reranked": results,
        "agreement": agree,
        "gain_t2i_r1": {n: round(r["t2i_r1"] - first["t2i_r1"], 4) for n, r in results.items() if "t2i_r1" in r},
        "training": {
            "reused": reused,
            "steps_done": record["steps_done"],
            "stopped_early": record["stopped_early"],
            "loss": record["loss"],
            "validation": record["validation"],
            "first_stage_lambda": record["first_stage"]["lambda"],
            "timings": record["timings"],
        },
        "precision": {"backbone_and_training": precision, "rerank": rerank_precision},
        "wall_s": wall,
        "machine": {"cpus": os.cpu_count(), "load_1min_before": load_before, "load_1min_after": os.getloadavg()[0]},
    }


def main(argv: list[str] | None = None) -> int:
    from edje_indexer.training.train import add_arguments

    p = add_arguments(
        argparse.ArgumentParser(prog="python -m edje_indexer.benchmarks.quality", description=__doc__.split("\n")[0])
    )
    p.add_argument("--work", required=True, help="folder for the test stores and the test feature cache")
    p.add_argument("--no-i2t", action="store_true", help="text -> image only (half the reranking time)")
    p.add_argument(
        "--rerank-precision",
        default="train",
        choices=["train", "fp32", "bf16"],
        help="the reranker's precision (default: the one training used)",
    )
    p.add_argument(
        "--max-queries",
        type=int,
        help="rerank a fixed subset of this many queries per direction (all metrics on it; first_stage_all_queries "
        "has the first stage on every query)",
    )
    p.add_argument("--out", help="also write the JSON here (default: WORK/quality.json)")
    args = p.parse_args(argv)
    os.makedirs(args.work, exist_ok=True)
    result = run_benchmark(args)
    text = json.dumps(result, indent=1)
    with open(args.out or os.path.join(args.work, "quality.json"), "w") as f:
        f.write(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
