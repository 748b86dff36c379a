"""``edje-index rerank STORE --query TEXT --ids ID... [--model DIR | --checkpoint FILE] [--json]``.

Scores each candidate image of the store against the query with the EDJE
joint encoder and prints them best first. ``--model``: a folder with
``config.json``, the weights (``model.safetensors``, ``pytorch_model.bin``,
``*.pt``/``*.pth``, Hugging Face BERT parameter names: see
rerank/checkpoint.py) and the BERT tokenizer files (``vocab.txt`` or
``tokenizer.json``); default ``$EDJE_RERANK_MODEL``. ``--checkpoint``: the
EDJE authors' checkpoint file or URL (rerank/authors.py: their names, their
joint input and query cleaning), with ``--tokenizer DIR`` (MiniLM-L12-H384's
tokenizer files; default: the checkpoint's folder). Loaded offline.

This module imports nothing heavy at import time: ``pipeline/cli.py`` calls
:func:`add_arguments` to build its subcommand whether or not the ``[rerank]``
extra is installed, and :func:`run` says which extra is missing.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

MODEL_ENV = "EDJE_RERANK_MODEL"


def add_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("store", help="token store folder or fsspec URL")
    p.add_argument("--query", required=True, help="the text to match")
    p.add_argument(
        "--ids", nargs="+", required=True, metavar="ID", help="candidate image ids (e.g. a first stage's top-k)"
    )
    p.add_argument(
        "--model",
        default=os.environ.get(MODEL_ENV),
        help=f"reranker folder: config.json, weights, tokenizer (default: ${MODEL_ENV})",
    )
    p.add_argument(
        "--checkpoint",
        help="the EDJE authors' checkpoint file or URL (torch.save of {'model': ...}); instead of --model",
    )
    p.add_argument(
        "--tokenizer",
        help="with --checkpoint: folder of the joint encoder's BERT tokenizer (vocab.txt or tokenizer.json); "
        "default: the checkpoint's folder",
    )
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda[:N]")
    p.add_argument("--batch-size", type=int, default=256, help="pairs per forward pass")
    p.add_argument("--precision", choices=["fp32", "bf16"], help="default: bf16 on cuda, fp32 on cpu")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    return p


def run(args: argparse.Namespace) -> int:
    checkpoint = getattr(args, "checkpoint", None)
    if checkpoint and args.model and args.model != os.environ.get(MODEL_ENV):
        raise ValueError("pass either --model DIR or --checkpoint FILE, not both")
    if not checkpoint and not args.model:
        raise ValueError(
            f"no reranker model: pass --model DIR (config.json, weights, tokenizer files), --checkpoint FILE "
            f"(the authors' checkpoint) or set {MODEL_ENV}"
        )
    if getattr(args, "tokenizer", None) and not checkpoint:
        raise ValueError("--tokenizer goes with --checkpoint (a --model folder holds its own tokenizer)")
    try:
        from edje_indexer.rerank import Reranker, load_authors_checkpoint, load_reranker
    except ImportError as e:
        msg = str(e)
        if "edje-indexer[rerank]" not in msg:
            msg = f"the rerank command needs the [rerank] extra: pip install 'edje-indexer[rerank]' ({msg})"
        raise RuntimeError(msg) from e
    from edje_indexer.schemas import TokenStore

    store = TokenStore.open(args.store)
    if checkpoint:
        model, tokenizer = load_authors_checkpoint(checkpoint, tokenizer=args.tokenizer)
    else:
        model, tokenizer = load_reranker(args.model)
    ranked = Reranker(
        model, tokenizer, store, device=args.device, batch_size=args.batch_size, precision=args.precision
    ).rerank(args.query, args.ids)
    if args.json:
        print(
            json.dumps(
                {
                    "query": args.query,
                    "store": args.store,
                    "model": checkpoint or args.model,
                    "results": [{"rank": r + 1, "id": i, "score": s} for r, (i, s) in enumerate(ranked)],
                },
                indent=1,
            )
        )
    else:
        for r, (i, s) in enumerate(ranked):
            print(f"{r + 1}\t{s:.6f}\t{i}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry point (``python -m edje_indexer.rerank.cli``): the subcommand's arguments and exit codes."""
    args = add_arguments(
        argparse.ArgumentParser(prog="python -m edje_indexer.rerank.cli", description=__doc__.split("\n\n")[0])
    ).parse_args(argv)
    try:
        return run(args)
    except (ValueError, KeyError, FileNotFoundError, RuntimeError) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
        print(f"rerank: error: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
