"""The EDJE authors' checkpoint as the reranker (``edje-index rerank --checkpoint FILE``).

Their model (``shahafwa/EDJE``, ``pretrain_model.py``) is saved as
``torch.save({"model": state_dict, "optimizer", "config", "epoch",
"global_step"})``, tensors probably bf16. The parts the reranker uses, and
where they go in :class:`EdjeJointEncoder`:

==============================================  ==============================================
authors' name                                   ``EdjeJointEncoder``
==============================================  ==============================================
``language_model.bert.{embeddings,encoder}.*``  ``bert.*`` (a ``BertForMaskedLM``: no ``bert.pooler``)
``classification_head.0.dense.*``               ``bert.pooler.dense.*`` (a ``BertPooler``: dense + tanh
                                                on [CLS] of the last hidden state)
``classification_head.1.*`` [1, H]              ``itm_head.*`` (Linear(H, 1): the score)
``text_embeddings.weight``                      the word embeddings again (checked equal)
``vision_projection.query`` [1, m, d_v]         m: the store must have m tokens per image
==============================================  ==============================================

``language_model.cls.*`` (the MLM head), ``clip.*`` (the frozen SigLIP
teacher), ``text_projection.*`` (training only), ``vision_encoder.*`` and the
rest of ``vision_projection.*`` (indexing: transforms/siglip_checkpoint.py)
are ignored. The vocabulary has one row more than the tokenizer's (their
``<image>`` token, 30,523 rows for MiniLM's 30,522): the tokenizer given gets
``<image>`` added and must then have exactly as many tokens as there are rows.

The joint input is theirs (rerank/joint_encoder.py, "The authors' model"):
captions cut at 61 word pieces (their ``max_length = 64 + m`` over the pair)
and cleaned like open_clip's ``canonicalize_text(basic_clean(...))``
(rerank/text.py). The BERT config is not in the file: it is MiniLM-L12-H384's
with the sizes the weights show, and ``num_attention_heads`` (12 for MiniLM).
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import torch

from edje_indexer.rerank.checkpoint import CheckpointError, _infer_config
from edje_indexer.rerank.joint_encoder import MAX_TEXT_TOKENS, EdjeJointEncoder, load_tokenizer

IMAGE_TOKEN = "<image>"
# Their pair [CLS] caption [SEP] <image>*m [SEP] has max_length = 64 + m: 61 caption pieces at most.
AUTHORS_CAPTION_PIECES = MAX_TEXT_TOKENS - 3
AUTHORS_CLEANING = "open_clip"
TEXT = "language_model.bert."
POOLER = "classification_head.0.dense."
HEAD = "classification_head.1."
EMBEDDINGS_ALIAS = "text_embeddings.weight"
IGNORED = ("language_model.cls.", "clip.", "text_projection.", "vision_encoder.", "vision_projection.")
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt")


def is_authors_state_dict(state: Mapping) -> bool:
    return f"{TEXT}embeddings.word_embeddings.weight" in state or any(k.startswith(POOLER) for k in state)


def convert_authors_state_dict(state: Mapping[str, torch.Tensor]) -> tuple[dict, list[str]]:
    """(``bert.*`` / ``itm_head.*`` names for :func:`rerank.checkpoint.convert_state_dict`, the keys ignored).

    A key of no known part is a :class:`CheckpointError` naming it; so is a word-embedding alias that differs
    from the word embeddings."""
    out, ignored, unknown = {}, [], []
    for k, v in state.items():
        if k.startswith(TEXT):
            rest = k[len(TEXT) :]
            if rest.startswith("pooler."):
                unknown.append(k)  # a BertForMaskedLM has none; the pooler is classification_head.0
            else:
                out["bert." + rest] = v
        elif k.startswith(POOLER):
            out["bert.pooler.dense." + k[len(POOLER) :]] = v
        elif k.startswith(HEAD):
            out["itm_head." + k[len(HEAD) :]] = v
        elif k == EMBEDDINGS_ALIAS or k.startswith(IGNORED):
            ignored.append(k)
        else:
            unknown.append(k)
    if unknown:
        raise CheckpointError(
            f"the checkpoint has key(s) that fit no part of the EDJE authors' model: {sorted(unknown)[:10]} "
            f"(expected {TEXT}{{embeddings,encoder}}.*, {POOLER}*, {HEAD}*, {EMBEDDINGS_ALIAS}, "
            f"or the ignored {', '.join(p + '*' for p in IGNORED)})"
        )
    alias, word = state.get(EMBEDDINGS_ALIAS), out.get("bert.embeddings.word_embeddings.weight")
    if alias is not None and word is None:
        out["bert.embeddings.word_embeddings.weight"] = alias
    elif alias is not None and not torch.equal(alias, word):
        raise CheckpointError(f"{EMBEDDINGS_ALIAS} differs from {TEXT}embeddings.word_embeddings.weight")
    return out, sorted(ignored)


def _num_queries(state: Mapping) -> int | None:
    q = state.get("vision_projection.query")
    return int(q.shape[1]) if q is not None and q.dim() == 3 else None


def authors_tokenizer(tokenizer, vocab_rows: int, source: str = "the tokenizer"):
    """``tokenizer`` (a BERT tokenizer or its folder) with ``<image>`` added, checked against the vocabulary rows."""
    tok = load_tokenizer(tokenizer) if isinstance(tokenizer, (str, os.PathLike)) else tokenizer
    if IMAGE_TOKEN not in tok.get_vocab():
        tok.add_tokens([IMAGE_TOKEN], special_tokens=True)  # as the authors do; its row is never read here
    if len(tok) != vocab_rows:
        raise CheckpointError(
            f"the checkpoint's vocabulary has {vocab_rows} rows, {source} has {len(tok)} tokens with {IMAGE_TOKEN}: "
            f"it is not the joint encoder's tokenizer (MiniLM-L12-H384-uncased's vocab.txt, 30,522 tokens + "
            f"{IMAGE_TOKEN})"
        )
    return tok


def _default_tokenizer(path: str) -> str:
    folder = os.path.dirname(path) or "."
    if os.path.isfile(path) and any(os.path.isfile(os.path.join(folder, f)) for f in TOKENIZER_FILES):
        return folder
    raise FileNotFoundError(
        f"no tokenizer for {path}: pass --tokenizer DIR (the joint encoder's BERT tokenizer files, vocab.txt or "
        f"tokenizer.json: MiniLM-L12-H384-uncased's), or put them next to the checkpoint"
    )


def load_authors_checkpoint(path: str, tokenizer=None, num_attention_heads: int = 12):
    """(model, tokenizer) from an authors'-format file (local path or URL, read by transforms/weights.py).

    ``tokenizer``: a BERT tokenizer or its folder (default: the checkpoint's
    folder, if it holds tokenizer files). The model is in eval mode on the CPU;
    ``model.load_report`` lists what was ignored.
    """
    from edje_indexer.transforms.weights import read_checkpoint

    try:
        state = read_checkpoint(path)
    except ValueError as e:
        raise CheckpointError(str(e)) from e
    if not is_authors_state_dict(state):
        raise CheckpointError(
            f"{path} is not an EDJE authors' checkpoint (no {TEXT}embeddings.word_embeddings.weight); "
            f"for the project's own reranker folders use --model"
        )
    converted, ignored = convert_authors_state_dict(state)
    m = _num_queries(state)
    del state
    config = _infer_config(converted, num_attention_heads)
    model = EdjeJointEncoder(
        config,
        token_dim=config.hidden_size,  # the adapter projects to the language model's width
        max_text_tokens=AUTHORS_CAPTION_PIECES,
        caption_cleaning=AUTHORS_CLEANING,
        num_image_tokens=m,
    )
    report = model.load_checkpoint(converted)
    report.ignored = sorted(set(report.ignored) | set(ignored))
    model.load_report = report
    tok = authors_tokenizer(
        tokenizer if tokenizer is not None else _default_tokenizer(path), config.vocab_size, "the tokenizer"
    )
    return model.eval(), tok
