"""EDJE's online joint encoder: the BERT that scores one (text, image tokens) pair.

The model (docs: shared/docs/edje.md, "Online (the consumer of the store)")
---------------------------------------------------------------------------
A BERT encoder (MiniLM-L12-H384 in the paper: 12 layers, hidden 384, 12
heads) reads one sequence per (text, image) pair::

    [CLS] caption [SEP] <image token 1> ... <image token m> [SEP]

* text: WordPiece ids, the caption capped at ``max_text_tokens`` = 64 word
  pieces (before [CLS]/[SEP] are added); token type 0; positions 0 .. L-1,
  where L = caption pieces + 2. ``caption_cleaning`` (None, or
  ``"open_clip"``: rerank/text.py) is applied to each text first.
* image: the m stored tokens (m = 64, width d = 384) take the place of word
  embeddings; token type 1; positions L .. L+m-1, i.e. they continue right
  after *this* pair's own text, whatever the padding of the batch.
* the closing [SEP]: the word embedding of [SEP] (the id that closes the
  text), token type 1 (it closes segment B, as in BERT's sentence pairs),
  position L+m.
* score: BERT's pooler (dense + tanh on the [CLS] output) then
  ``itm_head`` = Linear(hidden, 1): one logit per pair (higher = better match).

Image tokens and the embedding LayerNorm. The image tokens are given to
``BertModel`` as ``inputs_embeds`` at their positions, so ``BertEmbeddings``
treats them exactly like word embeddings: token-type embedding (type 1) and
position embedding are *added*, then the embedding LayerNorm and dropout are
applied. This is what a standard BERT does to anything passed as
``inputs_embeds`` and how the authors' "placeholders replaced by the stored
tokens" reads; no separate LayerNorm for the image tokens exists.

Width. The stored tokens are 384 wide, MiniLM's hidden size: they go in as
they are (``image_proj`` = Identity, no parameters). For a text model of
another hidden size, ``image_proj`` = Linear(token_dim, hidden_size) (its
parameters ``image_proj.weight`` [hidden, token_dim] and ``image_proj.bias``
must then be in the checkpoint); the projected tokens then go through the same
embedding sums and LayerNorm.

Batching (padding scheme). A batch holds many pairs, texts of different
lengths. The tensor layout is ``[text right-padded to T | m image tokens |
[SEP]]``: the image tokens always occupy columns T .. T+m-1, so building the
input is one concatenation (no scatter), but their *position ids* are L_i ..
L_i+m-1 from each row's own text length L_i, and the text padding columns are
masked out of attention. Attention ignores column order (absolute position
embeddings, padding masked), so every row is scored exactly as its unpadded
sequence would be; tests/test_rerank.py checks that a pair's score does not
depend on the other pairs of its batch. When every row has the same text (one
query against k candidates, the reranking case) there is no padding and no
attention mask at all, which lets SDPA pick its fastest kernel.

The authors' model. Their code (``shahafwa/EDJE``, ``pretrain_model.py``)
calls the tokenizer on the pair (caption, ``"<image>" * m``) with
``truncation="only_first"`` and ``max_length = 64 + m`` and replaces the m
``<image>`` embeddings by the tokens: per pair exactly the sequence above
(``[CLS] caption [SEP] <image>*m [SEP]``, segment B of token type 1, positions
straight on), with the caption cut at 64 + m - m - 3 = 61 word pieces, on
captions cleaned like open_clip's ``canonicalize_text(basic_clean(...))``. So
their checkpoint runs in this module with ``max_text_tokens=61`` and
``caption_cleaning="open_clip"``; rerank/authors.py loads it that way and
tests/test_authors_checkpoint.py checks the scores against that reference
computation.

Loading checkpoints (``EdjeJointEncoder.load_checkpoint`` / ``from_pretrained``)
and the parameter names they accept: rerank/checkpoint.py (the authors' file:
rerank/authors.py). Scoring the images of a token store: rerank/reranker.py.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

try:
    from transformers import BertConfig, BertModel
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError("the EDJE reranker needs transformers: pip install 'edje-indexer[rerank]'") from e

from edje_indexer.rerank.text import CAPTION_CLEANINGS

if TYPE_CHECKING:
    from edje_indexer.rerank.checkpoint import LoadReport

MAX_TEXT_TOKENS = 64  # caption word pieces, before [CLS] and [SEP] (paper)
TOKEN_DIM = 384  # width of the stored tokens


def minilm_l12_h384_config(**overrides) -> BertConfig:
    """MiniLM-L12-H384 (uncased): the paper's joint encoder, ~33M parameters."""
    kw = dict(
        vocab_size=30522,
        hidden_size=384,
        num_hidden_layers=12,
        num_attention_heads=12,
        intermediate_size=1536,
        hidden_act="gelu",
        hidden_dropout_prob=0.1,
        attention_probs_dropout_prob=0.1,
        max_position_embeddings=512,
        type_vocab_size=2,
        initializer_range=0.02,
        layer_norm_eps=1e-12,
        pad_token_id=0,
    )
    kw.update(overrides)
    return BertConfig(**kw)


# -- text ----------------------------------------------------------------------


@dataclass
class TextBatch:
    """Texts as ``[CLS] caption [SEP]`` ids, right-padded: ``input_ids`` [B, T], ``lengths`` [B] (all <= T)."""

    input_ids: torch.Tensor
    lengths: torch.Tensor

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    @property
    def padded(self) -> bool:
        return bool((self.lengths != self.input_ids.shape[1]).any())

    def select(self, index) -> TextBatch:
        """Rows ``index`` (an index array or slice), trimmed to their longest text."""
        lengths = self.lengths[index]
        t = int(lengths.max()) if len(lengths) else self.input_ids.shape[1]
        return TextBatch(self.input_ids[index, :t], lengths)


def tokenize(
    tokenizer, texts: Sequence[str], max_text_tokens: int = MAX_TEXT_TOKENS, cleaning: str | None = None
) -> TextBatch:
    """``[CLS] caption [SEP]`` for each text, the caption capped at ``max_text_tokens`` word pieces.

    ``cleaning``: a name in ``rerank.text.CAPTION_CLEANINGS`` applied to each text first (None: as given)."""
    if isinstance(texts, str):
        raise TypeError("texts must be a list of strings; use [text]")
    if cleaning is not None:
        clean = CAPTION_CLEANINGS[cleaning]
        texts = [clean(t) for t in texts]
    cls_id, sep_id, pad_id = tokenizer.cls_token_id, tokenizer.sep_token_id, tokenizer.pad_token_id
    if cls_id is None or sep_id is None:
        raise ValueError("the tokenizer has no [CLS]/[SEP] token: the joint encoder needs a BERT WordPiece tokenizer")
    pad_id = 0 if pad_id is None else pad_id
    pieces = (
        tokenizer(list(texts), add_special_tokens=False, truncation=True, max_length=max_text_tokens)["input_ids"]
        if len(texts)
        else []
    )
    rows = [[cls_id, *p, sep_id] for p in pieces]
    t = max((len(r) for r in rows), default=2)
    ids = torch.full((len(rows), t), pad_id, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
    return TextBatch(ids, torch.tensor([len(r) for r in rows], dtype=torch.long))


def load_tokenizer(path: str):
    """The BERT WordPiece tokenizer in folder ``path`` (vocab.txt and/or tokenizer.json), offline."""
    from transformers import BertTokenizerFast

    try:
        return BertTokenizerFast.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, TypeError) as e:
        raise FileNotFoundError(f"no BERT tokenizer (vocab.txt or tokenizer.json) in {path}: {e}") from e


# -- the model -----------------------------------------------------------------


class EdjeJointEncoder(nn.Module):
    """BERT over ``[CLS] text [SEP] <image tokens> [SEP]`` -> one logit per pair (see the module docstring)."""

    def __init__(
        self,
        config: BertConfig,
        token_dim: int = TOKEN_DIM,
        max_text_tokens: int = MAX_TEXT_TOKENS,
        caption_cleaning: str | None = None,
        num_image_tokens: int | None = None,
    ):
        super().__init__()
        if caption_cleaning is not None and caption_cleaning not in CAPTION_CLEANINGS:
            raise ValueError(f"unknown caption cleaning {caption_cleaning!r}; use one of {sorted(CAPTION_CLEANINGS)}")
        self.config = config
        self.token_dim = int(token_dim)
        self.max_text_tokens = int(max_text_tokens)
        self.caption_cleaning = caption_cleaning
        # m the model was trained with, when known (the authors' adapter query): the store's must match
        self.num_image_tokens = None if num_image_tokens is None else int(num_image_tokens)
        self.bert = BertModel(config, add_pooling_layer=True)
        hidden = config.hidden_size
        self.image_proj = nn.Identity() if self.token_dim == hidden else nn.Linear(self.token_dim, hidden)
        self.itm_head = nn.Linear(hidden, 1)
        self.itm_head.weight.data.normal_(0.0, config.initializer_range)
        self.itm_head.bias.data.zero_()

    @property
    def max_image_tokens(self) -> int:
        """The most image tokens per pair that the position table leaves room for with a full-length caption."""
        return self.config.max_position_embeddings - (self.max_text_tokens + 2) - 1

    def build_inputs(
        self, input_ids: torch.Tensor, lengths: torch.Tensor | None, image_tokens: torch.Tensor
    ) -> dict[str, torch.Tensor | None]:
        """``BertModel`` keyword arguments for a batch of pairs.

        ``input_ids`` [B, T]: ``[CLS] caption [SEP]`` right-padded; ``lengths``
        [B] each row's real length (None: every row is T long, no padding);
        ``image_tokens`` [B, m, token_dim]. Returns ``inputs_embeds`` [B, S, H],
        ``token_type_ids``, ``position_ids`` [B, S] and ``attention_mask`` [B, S]
        (None when nothing is padded), S = T + m + 1.
        """
        if input_ids.dim() != 2 or image_tokens.dim() != 3:
            raise ValueError(
                f"input_ids must be [B, T] and image_tokens [B, m, d]; got {tuple(input_ids.shape)} "
                f"and {tuple(image_tokens.shape)}"
            )
        b, t = input_ids.shape
        m, d = image_tokens.shape[1], image_tokens.shape[2]
        if image_tokens.shape[0] != b:
            raise ValueError(f"{b} texts but {image_tokens.shape[0]} images")
        if d != self.token_dim:
            raise ValueError(f"image tokens are {d} wide; this model reads {self.token_dim}-wide tokens")
        if t < 2:
            raise ValueError("input_ids must hold at least [CLS] and [SEP]")
        if t + m + 1 > self.config.max_position_embeddings:
            raise ValueError(
                f"{t} text + {m} image tokens + [SEP] exceed the model's "
                f"{self.config.max_position_embeddings} positions"
            )
        device = input_ids.device
        word = self.bert.embeddings.word_embeddings
        text = word(input_ids)  # [B, T, H]
        cols = torch.arange(t, device=device)
        if lengths is None:
            sep_ids = input_ids[:, t - 1 :]
            start = torch.full((b, 1), t, dtype=torch.long, device=device)
        else:
            lengths = lengths.to(device=device, dtype=torch.long)
            sep_ids = input_ids.gather(1, (lengths - 1).unsqueeze(1))  # the id that closes each text: [SEP]
            start = lengths.unsqueeze(1)
        image = self.image_proj(image_tokens.to(text.dtype))
        sep = word(sep_ids)  # [B, 1, H]
        img_pos = start + torch.arange(m + 1, device=device)  # images then the closing [SEP]
        position_ids = torch.cat([cols.expand(b, t), img_pos], dim=1)
        token_type_ids = torch.cat(
            [torch.zeros(b, t, dtype=torch.long, device=device), torch.ones(b, m + 1, dtype=torch.long, device=device)],
            dim=1,
        )
        attention_mask = None
        if lengths is not None:
            attention_mask = torch.cat(
                [(cols < start).long(), torch.ones(b, m + 1, dtype=torch.long, device=device)], dim=1
            )
        return {
            "inputs_embeds": torch.cat([text, image, sep], dim=1),
            "token_type_ids": token_type_ids,
            "position_ids": position_ids,
            "attention_mask": attention_mask,
        }

    def forward(
        self, input_ids: torch.Tensor, lengths: torch.Tensor | None, image_tokens: torch.Tensor
    ) -> torch.Tensor:
        """One float32 logit per pair: [B]."""
        out = self.bert(**self.build_inputs(input_ids, lengths, image_tokens))
        return self.itm_head(out.pooler_output).squeeze(-1).float()

    def tokenize(self, tokenizer, texts: Sequence[str]) -> TextBatch:
        """The texts as this model reads them: cleaned (``caption_cleaning``), capped at ``max_text_tokens``."""
        return tokenize(tokenizer, texts, self.max_text_tokens, self.caption_cleaning)

    def score_texts(self, tokenizer, texts: Sequence[str], image_tokens) -> torch.Tensor:
        """Logits of pairs (texts[i], image_tokens[i]) on the model's device (no batching, no autocast)."""
        batch = self.tokenize(tokenizer, texts)
        dev = next(self.parameters()).device
        x = torch.as_tensor(np.asarray(image_tokens) if not torch.is_tensor(image_tokens) else image_tokens)
        lengths = batch.lengths.to(dev) if batch.padded else None
        return self(batch.input_ids.to(dev), lengths, x.to(dev))

    # -- loading (rerank/checkpoint.py) ----------------------------------------

    def load_checkpoint(self, state_dict: Mapping[str, torch.Tensor], allow_missing_head: bool = False) -> LoadReport:
        """Load a state dict with the authors' (or Hugging Face) names; see rerank/checkpoint.py."""
        from edje_indexer.rerank.checkpoint import load_checkpoint

        return load_checkpoint(self, state_dict, allow_missing_head=allow_missing_head)

    @classmethod
    def from_pretrained(
        cls,
        path: str,
        config: BertConfig | None = None,
        token_dim: int | None = None,
        allow_missing_head: bool = False,
        num_attention_heads: int | None = None,
    ) -> EdjeJointEncoder:
        """A model from a folder (``config.json`` + weights) or a weights file, in eval mode, on the CPU.

        Weights: ``model.safetensors``, ``pytorch_model.bin``, ``model.pt(h)``,
        ``checkpoint.pt(h)`` or the only ``*.safetensors/*.pt/*.pth/*.bin`` in
        the folder. ``config.json``: a Hugging Face ``BertConfig`` (an optional
        ``"edje": {"token_dim": 384, "max_text_tokens": 64}`` entry is read
        too, with optional ``caption_cleaning`` and ``num_image_tokens``).
        Without one (and without ``config``), MiniLM-L12-H384 with the
        sizes read from the weights' shapes (heads: ``num_attention_heads``,
        default 12). ``allow_missing_head``: keep a random score head when the
        checkpoint has none (a bare text model).
        """
        from edje_indexer.rerank.checkpoint import from_pretrained

        return from_pretrained(
            path,
            config=config,
            token_dim=token_dim,
            allow_missing_head=allow_missing_head,
            num_attention_heads=num_attention_heads,
            model_cls=cls,
        )
