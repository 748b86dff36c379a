"""Reference reranker: EDJE's online joint encoder reading a token store (optional extra ``[rerank]``).

    from edje_indexer.rerank import Reranker, load_reranker
    from edje_indexer.schemas.store import TokenStore

    model, tokenizer = load_reranker("path/to/model_dir")
    hits = Reranker(model, tokenizer, TokenStore.open(url)).rerank("a dog on a beach", candidate_ids)

The model code (rerank/model.py) needs ``transformers``
(``pip install 'edje-indexer[rerank]'``). This package itself imports nothing
heavy, so ``edje-index`` can register its ``rerank`` subcommand (rerank/cli.py)
without the extra; the names below load rerank.model on first use, and an
ImportError then says which extra is missing.
"""

from __future__ import annotations

_MODEL_NAMES = (
    "CheckpointError", "EdjeJointEncoder", "LoadReport", "Reranker", "TextBatch", "convert_state_dict",
    "load_reranker", "load_tokenizer", "minilm_l12_h384_config", "save_pretrained", "tokenize",
)

__all__ = list(_MODEL_NAMES)


def __getattr__(name: str):
    if name in _MODEL_NAMES:
        from edje_indexer.rerank import model

        return getattr(model, name)
    raise AttributeError(f"module 'rerank' has no attribute {name!r}")
