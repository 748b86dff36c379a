"""Reference reranker: EDJE's online joint encoder reading a token store (optional extra ``[rerank]``).

    from edje_indexer.rerank import Reranker, load_reranker
    from edje_indexer.schemas import TokenStore

    model, tokenizer = load_reranker("path/to/model_dir")
    hits = Reranker(model, tokenizer, TokenStore.open(url)).rerank("a dog on a beach", candidate_ids)

The EDJE authors' checkpoint: ``model, tokenizer = load_authors_checkpoint(path, tokenizer=TOKENIZER_DIR)``.

The modules: rerank/joint_encoder.py (the model, the input layout, the
tokenizer), rerank/checkpoint.py (parameter names, weights files, model
folders), rerank/authors.py (the authors' checkpoint), rerank/text.py (their
caption cleaning), rerank/reranker.py (scoring a store's images), rerank/cli.py (the
``rerank`` subcommand). The first three need ``transformers``
(``pip install 'edje-indexer[rerank]'``). This package itself imports nothing
heavy, so ``edje-index`` can register its ``rerank`` subcommand (rerank/cli.py)
without the extra; the names below load their module on first use, and an
ImportError then says which extra is missing.
"""

from __future__ import annotations

import importlib

_MODULE_OF = {
    "EdjeJointEncoder": "joint_encoder",
    "TextBatch": "joint_encoder",
    "load_tokenizer": "joint_encoder",
    "minilm_l12_h384_config": "joint_encoder",
    "tokenize": "joint_encoder",
    "CheckpointError": "checkpoint",
    "LoadReport": "checkpoint",
    "convert_state_dict": "checkpoint",
    "load_reranker": "checkpoint",
    "save_pretrained": "checkpoint",
    "Reranker": "reranker",
    "load_authors_checkpoint": "authors",
    "clean_caption": "text",
}
_MODEL_NAMES = tuple(sorted(_MODULE_OF))

__all__ = list(_MODEL_NAMES)


def __getattr__(name: str):
    if name in _MODEL_NAMES:
        return getattr(importlib.import_module(f"{__name__}.{_MODULE_OF[name]}"), name)
    raise AttributeError(f"module 'rerank' has no attribute {name!r}")
