"""EDJE's online joint encoder and a reference reranker over a token store.

The model (docs: shared/docs/edje.md, "Online (the consumer of the store)")
---------------------------------------------------------------------------
A BERT encoder (MiniLM-L12-H384 in the paper: 12 layers, hidden 384, 12
heads) reads one sequence per (text, image) pair::

    [CLS] caption [SEP] <image token 1> ... <image token m> [SEP]

* text: WordPiece ids, the caption capped at ``max_text_tokens`` = 64 word
  pieces (before [CLS]/[SEP] are added); token type 0; positions 0 .. L-1,
  where L = caption pieces + 2.
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

Parameter names (``convert_state_dict``, ``EdjeJointEncoder.from_pretrained``)
-----------------------------------------------------------------------------
edje.md names the authors' parameters only for the vision adapter; for the
text side this loader accepts the standard Hugging Face BERT names under one
of these prefixes (found by where ``embeddings.word_embeddings.weight`` is):

============================================  =======================================
checkpoint name                                this module
============================================  =======================================
``bert.{embeddings,encoder,pooler}.*``         ``bert.*`` (as is)
``text_encoder.{embeddings,encoder,pooler}.*`` ``bert.*``
``text_encoder.bert.{...}.*``                  ``bert.*`` (BLIP-style BertForMaskedLM)
``{embeddings,encoder,pooler}.*`` (bare)       ``bert.*`` (a plain ``BertModel`` save)
``itm_head.weight`` [1, H], ``itm_head.bias``  ``itm_head.*``
``classifier.weight`` [1, H], ``.bias``        ``itm_head.*`` (BertForSequenceClassification, 1 label)
``image_proj.weight`` [H, d], ``.bias``        ``image_proj.*`` (only when H != d)
============================================  =======================================

e.g. ``bert.encoder.layer.3.attention.self.query.weight``,
``bert.pooler.dense.weight``. A leading ``module.`` (DistributedDataParallel)
is stripped, and a checkpoint that wraps its state dict in ``{"model": ...}``
or ``{"state_dict": ...}`` is unwrapped. ``*.embeddings.position_ids`` (a
buffer some old checkpoints saved) is ignored. Keys outside the text encoder
and the head -- the vision adapter (``vision_projection.*``), MLM heads
(``cls.*``), other projections -- are ignored and listed in the
:class:`LoadReport`. Every parameter of this module must be found with its
exact shape: a missing, misshapen or unexpected text-encoder parameter (e.g.
a 13th layer) raises :class:`CheckpointError` naming each one; so does a
2-way ITM head (BLIP's ``Linear(H, 2)``), which is not EDJE's one-logit head.

Reading tokens (``Reranker``)
-----------------------------
On the CPU the candidates' tokens come from ``TokenStore.get`` (float32,
decoded by the store). On any other device the stored values come from
``TokenStore.get_raw`` (fp16, or int8 + fp16 scales: half or a quarter of the
bytes to move) and are decoded on the device by
:func:`schemas.quantization.decode_torch`; both give bit-identical float32
tokens. The next batch is read on a helper thread while the current one is
scored. On CUDA the encoder runs under bf16 autocast.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Iterator, Mapping, Sequence

import numpy as np
import torch
from torch import nn

try:
    from transformers import BertConfig, BertModel
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError("the EDJE reranker needs transformers: pip install 'edje-indexer[rerank]'") from e

MAX_TEXT_TOKENS = 64  # caption word pieces, before [CLS] and [SEP] (paper)
TOKEN_DIM = 384  # width of the stored tokens
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "model.pt", "model.pth", "checkpoint.pth", "checkpoint.pt")

TEXT_PREFIXES = ("bert.", "text_encoder.bert.", "text_encoder.", "")
TEXT_PARTS = ("embeddings.", "encoder.", "pooler.")
HEAD_PREFIXES = ("itm_head.", "classifier.")
PROJ_PREFIX = "image_proj."
IGNORED_TEXT_BUFFERS = ("embeddings.position_ids", "embeddings.token_type_ids")


class CheckpointError(ValueError):
    """A checkpoint does not fit the joint encoder (missing, misshapen or unexpected parameters)."""


def minilm_l12_h384_config(**overrides) -> BertConfig:
    """MiniLM-L12-H384 (uncased): the paper's joint encoder, ~33M parameters."""
    kw = dict(vocab_size=30522, hidden_size=384, num_hidden_layers=12, num_attention_heads=12,
              intermediate_size=1536, hidden_act="gelu", hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1,
              max_position_embeddings=512, type_vocab_size=2, initializer_range=0.02, layer_norm_eps=1e-12,
              pad_token_id=0)
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

    def select(self, index) -> "TextBatch":
        """Rows ``index`` (an index array or slice), trimmed to their longest text."""
        lengths = self.lengths[index]
        t = int(lengths.max()) if len(lengths) else self.input_ids.shape[1]
        return TextBatch(self.input_ids[index, :t], lengths)


def tokenize(tokenizer, texts: Sequence[str], max_text_tokens: int = MAX_TEXT_TOKENS) -> TextBatch:
    """``[CLS] caption [SEP]`` for each text, the caption capped at ``max_text_tokens`` word pieces."""
    if isinstance(texts, str):
        raise TypeError("texts must be a list of strings; use [text]")
    cls_id, sep_id, pad_id = tokenizer.cls_token_id, tokenizer.sep_token_id, tokenizer.pad_token_id
    if cls_id is None or sep_id is None:
        raise ValueError("the tokenizer has no [CLS]/[SEP] token: the joint encoder needs a BERT WordPiece tokenizer")
    pad_id = 0 if pad_id is None else pad_id
    pieces = tokenizer(list(texts), add_special_tokens=False, truncation=True,
                       max_length=max_text_tokens)["input_ids"] if len(texts) else []
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

    def __init__(self, config: BertConfig, token_dim: int = TOKEN_DIM, max_text_tokens: int = MAX_TEXT_TOKENS):
        super().__init__()
        self.config = config
        self.token_dim = int(token_dim)
        self.max_text_tokens = int(max_text_tokens)
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

    def build_inputs(self, input_ids: torch.Tensor, lengths: torch.Tensor | None,
                     image_tokens: torch.Tensor) -> dict[str, torch.Tensor | None]:
        """``BertModel`` keyword arguments for a batch of pairs.

        ``input_ids`` [B, T]: ``[CLS] caption [SEP]`` right-padded; ``lengths``
        [B] each row's real length (None: every row is T long, no padding);
        ``image_tokens`` [B, m, token_dim]. Returns ``inputs_embeds`` [B, S, H],
        ``token_type_ids``, ``position_ids`` [B, S] and ``attention_mask`` [B, S]
        (None when nothing is padded), S = T + m + 1.
        """
        if input_ids.dim() != 2 or image_tokens.dim() != 3:
            raise ValueError(f"input_ids must be [B, T] and image_tokens [B, m, d]; got {tuple(input_ids.shape)} "
                             f"and {tuple(image_tokens.shape)}")
        b, t = input_ids.shape
        m, d = image_tokens.shape[1], image_tokens.shape[2]
        if image_tokens.shape[0] != b:
            raise ValueError(f"{b} texts but {image_tokens.shape[0]} images")
        if d != self.token_dim:
            raise ValueError(f"image tokens are {d} wide; this model reads {self.token_dim}-wide tokens")
        if t < 2:
            raise ValueError("input_ids must hold at least [CLS] and [SEP]")
        if t + m + 1 > self.config.max_position_embeddings:
            raise ValueError(f"{t} text + {m} image tokens + [SEP] exceed the model's "
                             f"{self.config.max_position_embeddings} positions")
        device = input_ids.device
        word = self.bert.embeddings.word_embeddings
        text = word(input_ids)  # [B, T, H]
        cols = torch.arange(t, device=device)
        if lengths is None:
            sep_ids = input_ids[:, t - 1:]
            start = torch.full((b, 1), t, dtype=torch.long, device=device)
        else:
            lengths = lengths.to(device=device, dtype=torch.long)
            sep_ids = input_ids.gather(1, (lengths - 1).unsqueeze(1))  # the id that closes each text: [SEP]
            start = lengths.unsqueeze(1)
        image = self.image_proj(image_tokens.to(text.dtype))
        sep = word(sep_ids)  # [B, 1, H]
        img_pos = start + torch.arange(m + 1, device=device)  # images then the closing [SEP]
        position_ids = torch.cat([cols.expand(b, t), img_pos], dim=1)
        token_type_ids = torch.cat([torch.zeros(b, t, dtype=torch.long, device=device),
                                    torch.ones(b, m + 1, dtype=torch.long, device=device)], dim=1)
        attention_mask = None
        if lengths is not None:
            attention_mask = torch.cat([(cols < start).long(),
                                        torch.ones(b, m + 1, dtype=torch.long, device=device)], dim=1)
        return {"inputs_embeds": torch.cat([text, image, sep], dim=1), "token_type_ids": token_type_ids,
                "position_ids": position_ids, "attention_mask": attention_mask}

    def forward(self, input_ids: torch.Tensor, lengths: torch.Tensor | None,
                image_tokens: torch.Tensor) -> torch.Tensor:
        """One float32 logit per pair: [B]."""
        out = self.bert(**self.build_inputs(input_ids, lengths, image_tokens))
        return self.itm_head(out.pooler_output).squeeze(-1).float()

    def score_texts(self, tokenizer, texts: Sequence[str], image_tokens) -> torch.Tensor:
        """Logits of pairs (texts[i], image_tokens[i]) on the model's device (no batching, no autocast)."""
        batch = tokenize(tokenizer, texts, self.max_text_tokens)
        dev = next(self.parameters()).device
        x = torch.as_tensor(np.asarray(image_tokens) if not torch.is_tensor(image_tokens) else image_tokens)
        lengths = batch.lengths.to(dev) if batch.padded else None
        return self(batch.input_ids.to(dev), lengths, x.to(dev))

    # -- loading -------------------------------------------------------------

    def load_checkpoint(self, state_dict: Mapping[str, torch.Tensor], allow_missing_head: bool = False) -> "LoadReport":
        """Load a state dict with the authors' (or Hugging Face) names; see the module docstring."""
        mapped, report = convert_state_dict(state_dict, self, allow_missing_head=allow_missing_head)
        missing, unexpected = self.load_state_dict(mapped, strict=False)
        missing = [k for k in missing if not (allow_missing_head and k.startswith("itm_head."))]
        if missing or unexpected:  # convert_state_dict checked the names; this is a guard
            raise CheckpointError(f"checkpoint does not fit: missing {missing[:8]}, unexpected {unexpected[:8]}")
        return report

    @classmethod
    def from_pretrained(cls, path: str, config: BertConfig | None = None, token_dim: int | None = None,
                        allow_missing_head: bool = False, num_attention_heads: int | None = None,
                        ) -> "EdjeJointEncoder":
        """A model from a folder (``config.json`` + weights) or a weights file, in eval mode, on the CPU.

        Weights: ``model.safetensors``, ``pytorch_model.bin``, ``model.pt(h)``,
        ``checkpoint.pt(h)`` or the only ``*.safetensors/*.pt/*.pth/*.bin`` in
        the folder. ``config.json``: a Hugging Face ``BertConfig`` (an optional
        ``"edje": {"token_dim": 384, "max_text_tokens": 64}`` entry is read
        too). Without one (and without ``config``), MiniLM-L12-H384 with the
        sizes read from the weights' shapes (heads: ``num_attention_heads``,
        default 12). ``allow_missing_head``: keep a random score head when the
        checkpoint has none (a bare text model).
        """
        weights_path, config_path = _resolve_files(path)
        state_dict = load_state_dict_file(weights_path)
        edje = {}
        if config is None and config_path is not None:
            with open(config_path) as f:
                raw = json.load(f)
            edje = raw.pop("edje", None) or {}
            config = BertConfig.from_dict(_portable_config(raw))
        if config is None:
            config = _infer_config(state_dict, num_attention_heads or 12)
        elif num_attention_heads is not None:
            config.num_attention_heads = num_attention_heads
        model = cls(config, token_dim=token_dim or edje.get("token_dim", TOKEN_DIM),
                    max_text_tokens=edje.get("max_text_tokens", MAX_TEXT_TOKENS))
        model.load_report = model.load_checkpoint(state_dict, allow_missing_head=allow_missing_head)
        return model.eval()


@dataclass
class LoadReport:
    """What :func:`convert_state_dict` found: the text prefix, the head's name, and the keys it ignored."""

    text_prefix: str
    head_prefix: str | None
    ignored: list[str] = field(default_factory=list)


def _strip_wrappers(state_dict: Mapping) -> dict:
    for key in ("model", "state_dict", "module"):
        if key in state_dict and isinstance(state_dict[key], Mapping) and not torch.is_tensor(state_dict[key]):
            return _strip_wrappers(state_dict[key])
    sd = dict(state_dict)
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return sd


def convert_state_dict(state_dict: Mapping[str, torch.Tensor], model: EdjeJointEncoder,
                       allow_missing_head: bool = False) -> tuple[dict[str, torch.Tensor], LoadReport]:
    """Rename a checkpoint's parameters to this module's names and check every name and shape.

    Returns (state dict for ``model.load_state_dict``, report). Raises
    :class:`CheckpointError` listing every missing, misshapen and unexpected
    parameter.
    """
    sd = _strip_wrappers(state_dict)
    non_tensors = [k for k, v in sd.items() if not torch.is_tensor(v)]
    sd = {k: v for k, v in sd.items() if torch.is_tensor(v)}
    found = [p for p in TEXT_PREFIXES if f"{p}embeddings.word_embeddings.weight" in sd]
    if not found:
        raise CheckpointError("no BERT text encoder in the checkpoint: looked for "
                              + ", ".join(f"'{p}embeddings.word_embeddings.weight'" for p in TEXT_PREFIXES)
                              + f"; its first keys: {sorted(sd)[:6]}")
    if len(found) > 1:
        raise CheckpointError(f"the checkpoint holds more than one BERT text encoder (prefixes {found}); "
                              "keep one")
    prefix = found[0]
    heads = [h for h in HEAD_PREFIXES if f"{h}weight" in sd or f"{h}bias" in sd]
    if len(heads) > 1:
        raise CheckpointError(f"the checkpoint has both {heads[0]}* and {heads[1]}*: which is the score head?")
    head = heads[0] if heads else None

    mapped, ignored = {}, list(non_tensors)
    text_keys = tuple(prefix + part for part in TEXT_PARTS)
    for k, v in sd.items():
        if k.startswith(text_keys):
            rest = k[len(prefix):]
            if rest in IGNORED_TEXT_BUFFERS:
                ignored.append(k)
            else:
                mapped["bert." + rest] = v
        elif head is not None and k.startswith(head):
            mapped["itm_head." + k[len(head):]] = v
        elif k.startswith(PROJ_PREFIX) and isinstance(model.image_proj, nn.Linear):
            mapped[k] = v
        else:
            ignored.append(k)

    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    problems = []
    origin = {}
    for k in mapped:
        if k.startswith("bert."):
            origin[k] = prefix + k[len("bert."):]
        elif k.startswith("itm_head."):
            origin[k] = head + k[len("itm_head."):]
        else:
            origin[k] = k
    for k, shape in expected.items():
        if k not in mapped:
            if allow_missing_head and k.startswith("itm_head."):
                continue
            where = {"bert.": prefix, "itm_head.": "itm_head./classifier."}
            hint = next((w + k.split(".", 1)[1] for p, w in where.items() if k.startswith(p)), k)
            problems.append(f"missing {hint} {list(shape)}")
        elif tuple(mapped[k].shape) != shape:
            extra = ""
            if k == "itm_head.weight" and mapped[k].dim() == 2 and mapped[k].shape[0] == 2:
                extra = " (a 2-way match/no-match head; EDJE's score head is Linear(hidden, 1))"
            problems.append(f"{origin[k]} has shape {list(mapped[k].shape)}, expected {list(shape)}{extra}")
    for k in mapped:
        if k not in expected:
            problems.append(f"unexpected {origin[k]} {list(mapped[k].shape)} (does the config match the checkpoint?)")
    if problems:
        raise CheckpointError(f"checkpoint does not fit the joint encoder ({len(problems)} problem(s)): "
                              + "; ".join(problems[:12]) + (" ..." if len(problems) > 12 else ""))
    return mapped, LoadReport(prefix, head, sorted(ignored))


def load_state_dict_file(path: str) -> dict:
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)  # never runs a checkpoint's pickled code
    except Exception as e:  # pickle.UnpicklingError and kin: objects other than tensors and containers
        raise CheckpointError(f"{path} is not a plain state dict (torch.load(weights_only=True) refused it: "
                              f"{str(e).splitlines()[0] if str(e) else type(e).__name__}); save just the "
                              "model's state_dict()") from e
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path} holds a {type(obj).__name__}, not a state dict")
    return dict(obj)


def _resolve_files(path: str) -> tuple[str, str | None]:
    """(weights file, config.json or None) for a folder or a weights file."""
    if os.path.isfile(path):
        cfg = os.path.join(os.path.dirname(path) or ".", CONFIG_NAME)
        return path, cfg if os.path.isfile(cfg) else None
    if not os.path.isdir(path):
        raise FileNotFoundError(f"no reranker model at {path} (a folder with config.json and weights, or a file)")
    cfg = os.path.join(path, CONFIG_NAME)
    cfg = cfg if os.path.isfile(cfg) else None
    for name in WEIGHT_FILES:
        if os.path.isfile(os.path.join(path, name)):
            return os.path.join(path, name), cfg
    cands = sorted(f for f in os.listdir(path) if f.endswith((".safetensors", ".pt", ".pth", ".bin")))
    if len(cands) == 1:
        return os.path.join(path, cands[0]), cfg
    raise FileNotFoundError(f"no weights in {path}: expected one of {', '.join(WEIGHT_FILES)}"
                            + (f" (or exactly one weights file; found {cands})" if cands else ""))


def _infer_config(state_dict: Mapping[str, torch.Tensor], heads: int) -> BertConfig:
    """MiniLM-L12-H384 defaults with the sizes the weights show."""
    sd = _strip_wrappers(state_dict)
    prefix = next((p for p in TEXT_PREFIXES if f"{p}embeddings.word_embeddings.weight" in sd), None)
    if prefix is None:
        raise CheckpointError("no BERT text encoder in the checkpoint (no '*embeddings.word_embeddings.weight')")
    vocab, hidden = sd[f"{prefix}embeddings.word_embeddings.weight"].shape
    layer_re = re.compile(re.escape(prefix) + r"encoder\.layer\.(\d+)\.")
    layers = 1 + max((int(m.group(1)) for k in sd if (m := layer_re.match(k))), default=-1)
    inter = sd.get(f"{prefix}encoder.layer.0.intermediate.dense.weight")
    pos = sd.get(f"{prefix}embeddings.position_embeddings.weight")
    types = sd.get(f"{prefix}embeddings.token_type_embeddings.weight")
    return minilm_l12_h384_config(
        vocab_size=int(vocab), hidden_size=int(hidden), num_hidden_layers=layers, num_attention_heads=heads,
        intermediate_size=int(inter.shape[0]) if inter is not None else 4 * int(hidden),
        max_position_embeddings=int(pos.shape[0]) if pos is not None else 512,
        type_vocab_size=int(types.shape[0]) if types is not None else 2)


def _portable_config(cfg: dict) -> dict:
    """A config dict without the attention-kernel choice a transformers version records (e.g. 4.46's
    ``_attn_implementation_autoset``, which would pin a loaded model to eager attention): each
    loading picks its own default, as for a freshly built model."""
    return {k: v for k, v in cfg.items() if not k.startswith("_attn_implementation")}


def save_pretrained(model: EdjeJointEncoder, path: str, tokenizer=None) -> str:
    """Write ``config.json`` (+ ``"edje"``), ``model.safetensors`` (``bert.*``, ``itm_head.*`` names)
    and the tokenizer files: a folder that :func:`load_reranker` reads."""
    from safetensors.torch import save_file

    os.makedirs(path, exist_ok=True)
    cfg = _portable_config(model.config.to_dict())
    cfg["edje"] = {"token_dim": model.token_dim, "max_text_tokens": model.max_text_tokens}
    with open(os.path.join(path, CONFIG_NAME), "w") as f:
        json.dump(cfg, f, indent=1, sort_keys=True)
    sd = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()
          if not k.endswith(IGNORED_TEXT_BUFFERS)}
    save_file(sd, os.path.join(path, WEIGHTS_NAME))
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
    return path


def load_reranker(path: str, allow_missing_head: bool = False):
    """(model, tokenizer) from a folder holding config.json, weights and the tokenizer files."""
    model = EdjeJointEncoder.from_pretrained(path, allow_missing_head=allow_missing_head)
    folder = path if os.path.isdir(path) else (os.path.dirname(path) or ".")
    return model, load_tokenizer(folder)


# -- the reranker ----------------------------------------------------------------


class Reranker:
    """Scores (query, image id) pairs with the joint encoder, reading the images' tokens from a store.

    ``device``: "cpu", "cuda", "cuda:1", ... (the model is moved there, eval
    mode). ``batch_size``: pairs per forward pass. ``precision``: "bf16"
    (autocast; the default on CUDA) or "fp32" (the default elsewhere).
    ``decode_on_device``: read stored values with ``get_raw`` and decode on
    the device (default: on any device but the CPU). ``prefetch``: read the
    next batch on a helper thread while the current one is scored.
    """

    def __init__(self, model: EdjeJointEncoder, tokenizer, store, device: str | torch.device = "cpu",
                 batch_size: int = 256, precision: str | None = None, decode_on_device: bool | None = None,
                 prefetch: bool = True):
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        self.device = torch.device(device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise RuntimeError(f"device {device} asked for, but torch sees no CUDA GPU")
        self.model = model.to(self.device).eval()
        self.tokenizer = tokenizer
        self.store = store
        self.batch_size = int(batch_size)
        self.precision = precision or ("bf16" if self.device.type == "cuda" else "fp32")
        if self.precision not in ("bf16", "fp32"):
            raise ValueError(f"precision must be bf16 or fp32, not {self.precision!r}")
        self.decode_on_device = self.device.type != "cpu" if decode_on_device is None else bool(decode_on_device)
        self.prefetch = prefetch
        m, d = int(store.tokens_per_image), int(store.token_dim)
        if d != model.token_dim:
            raise ValueError(f"the store's tokens are {d} wide; the model reads {model.token_dim}-wide tokens")
        if m > model.max_image_tokens:
            raise ValueError(f"the store has {m} tokens per image; the model's {model.config.max_position_embeddings} "
                             f"positions leave room for {model.max_image_tokens} after a full caption")
        self.tokens_per_image, self.token_dim = m, d

    # reading

    def _read(self, ids: Sequence[str], out: np.ndarray | None = None) -> torch.Tensor:
        """float32 [k, m, d] tokens of ``ids`` on the device."""
        if not self.decode_on_device:
            x = torch.from_numpy(self.store.get(ids, out=out))
            return x.to(self.device) if self.device.type != "cpu" else x
        from edje_indexer.schemas.quantization import decode_torch

        values, scales = self.store.get_raw(ids)
        nb = self.device.type == "cuda"
        v = torch.from_numpy(values).to(self.device, non_blocking=nb)
        s = None if scales is None else torch.from_numpy(scales).to(self.device, non_blocking=nb)
        return decode_torch(v, s, self.store.quantization, dtype=torch.float32)

    def _token_batches(self, ids: Sequence[str]) -> Iterator[tuple[int, int, torch.Tensor]]:
        """(start, stop, tokens) per batch; the next batch is read while the caller scores this one."""
        k, bs = len(ids), self.batch_size
        spans = [(a, min(a + bs, k)) for a in range(0, k, bs)]
        # CPU: decode into two reused buffers, alternately (batch i+2 is read only after batch i is scored)
        bufs = [None, None]
        if not self.decode_on_device:
            shape = (min(bs, k), self.tokens_per_image, self.token_dim)
            bufs = [np.empty(shape, np.float32), np.empty(shape, np.float32) if len(spans) > 1 else None]

        def read(i):
            a, b = spans[i]
            buf = bufs[i % 2]
            return self._read(ids[a:b], None if buf is None else buf[: b - a])

        if len(spans) <= 1 or not self.prefetch:
            for i, (a, b) in enumerate(spans):
                yield a, b, read(i)
            return
        with ThreadPoolExecutor(1, thread_name_prefix="rerank-read") as pool:
            pending = pool.submit(read, 0)
            for i, (a, b) in enumerate(spans):
                tokens = pending.result()
                if i + 1 < len(spans):
                    pending = pool.submit(read, i + 1)
                yield a, b, tokens
            # a batch's buffer is reused two batches later: by then the caller has scored it

    def _autocast(self):
        if self.precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _check_ids(self, ids) -> list:
        if isinstance(ids, (str, bytes)):
            raise TypeError("ids must be a list of image ids, not a single string; use [image_id]")
        return list(ids)

    # scoring

    @torch.inference_mode()
    def score(self, query: str, ids: Sequence[str]) -> np.ndarray:
        """float32 logits [k] of (query, ids[i]), in the order of ``ids`` (repeats allowed).

        Unknown ids raise ``schemas.store.UnknownIdError`` (a KeyError) naming the first one.
        """
        if not isinstance(query, str):
            raise TypeError(f"query must be a string, not {type(query).__name__}")
        ids = self._check_ids(ids)
        out = np.empty(len(ids), np.float32)
        if not ids:
            return out
        text = tokenize(self.tokenizer, [query], self.model.max_text_tokens)
        input_ids = text.input_ids.to(self.device)
        logits = []  # left on the device until the end: no synchronisation per batch
        with self._autocast():
            for a, b, tokens in self._token_batches(ids):
                logits.append(self.model(input_ids.expand(b - a, -1), None, tokens))
        out[:] = torch.cat(logits).cpu().numpy()
        return out

    @torch.inference_mode()
    def score_pairs(self, queries: Sequence[str], ids: Sequence[str]) -> np.ndarray:
        """float32 logits [k] of the pairs (queries[i], ids[i]): different texts in one batch (padded)."""
        ids = self._check_ids(ids)
        if isinstance(queries, str) or len(queries) != len(ids):
            raise ValueError("score_pairs needs one query per id (two lists of the same length)")
        out = np.empty(len(ids), np.float32)
        if not ids:
            return out
        text = tokenize(self.tokenizer, queries, self.model.max_text_tokens)
        logits = []
        with self._autocast():
            for a, b, tokens in self._token_batches(ids):
                part = text.select(slice(a, b))
                lengths = part.lengths.to(self.device) if part.padded else None
                logits.append(self.model(part.input_ids.to(self.device), lengths, tokens))
        out[:] = torch.cat(logits).cpu().numpy()
        return out

    def rerank(self, query: str, ids: Sequence[str]) -> list[tuple[str, float]]:
        """(id, score) for every id, best first (ties keep the order given)."""
        ids = self._check_ids(ids)
        scores = self.score(query, ids)
        order = np.argsort(-scores, kind="stable")
        return [(ids[i], float(scores[i])) for i in order]
