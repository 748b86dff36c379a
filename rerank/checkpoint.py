"""Joint-encoder checkpoints: parameter names, weights files, model folders.

Parameter names (``convert_state_dict``, ``EdjeJointEncoder.from_pretrained``)
-----------------------------------------------------------------------------
edje.md names the authors' parameters only for the vision adapter; for the
text side this loader accepts the standard Hugging Face BERT names under one
of these prefixes (found by where ``embeddings.word_embeddings.weight`` is):

============================================  =======================================
checkpoint name                                ``EdjeJointEncoder``
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

Files (``EdjeJointEncoder.from_pretrained``, :func:`load_reranker`)
-------------------------------------------------------------------
A model is a folder (``config.json``, the weights, the tokenizer files, as
:func:`save_pretrained` writes it) or a weights file. The weights are read by
:func:`edje_indexer.transforms.weights.read_state_dict`, the project's one
checkpoint reader: ``.safetensors``, or a ``.pt``/``.pth``/``.bin`` pickle
loaded with ``weights_only=True`` (a checkpoint cannot run code), unwrapped
from ``{"state_dict": ...}`` / ``{"model": ...}``, ``module.`` stripped.
:func:`convert_state_dict` unwraps again (also ``{"module": ...}``, nested),
since a state dict can be handed to it in memory too.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import nn
from transformers import BertConfig

# joint_encoder before transformers: without the [rerank] extra, its ImportError says what to install
from edje_indexer.rerank.joint_encoder import (
    MAX_TEXT_TOKENS,
    TOKEN_DIM,
    EdjeJointEncoder,
    load_tokenizer,
    minilm_l12_h384_config,
)

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


# -- parameter names -----------------------------------------------------------------


@dataclass
class LoadReport:
    """What :func:`convert_state_dict` found: the text prefix, the head's name, and the keys it ignored."""

    text_prefix: str
    head_prefix: str | None
    ignored: list[str] = field(default_factory=list)


def _strip_wrappers(state_dict: Mapping) -> dict:
    # read_weights has unwrapped a file's dict already; this is for state dicts given in memory (and {"module": ...})
    for key in ("model", "state_dict", "module"):
        if key in state_dict and isinstance(state_dict[key], Mapping) and not torch.is_tensor(state_dict[key]):
            return _strip_wrappers(state_dict[key])
    sd = dict(state_dict)
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k[len("module.") :]: v for k, v in sd.items()}
    return sd


def convert_state_dict(
    state_dict: Mapping[str, torch.Tensor], model: EdjeJointEncoder, allow_missing_head: bool = False
) -> tuple[dict[str, torch.Tensor], LoadReport]:
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
        hint = ""
        if any(k.startswith(("language_model.bert.", "classification_head.")) for k in sd):
            hint = " (this is the EDJE authors' checkpoint layout: load it with --checkpoint, rerank/authors.py)"
        raise CheckpointError(
            "no BERT text encoder in the checkpoint: looked for "
            + ", ".join(f"'{p}embeddings.word_embeddings.weight'" for p in TEXT_PREFIXES)
            + f"; its first keys: {sorted(sd)[:6]}{hint}"
        )
    if len(found) > 1:
        raise CheckpointError(f"the checkpoint holds more than one BERT text encoder (prefixes {found}); keep one")
    prefix = found[0]
    heads = [h for h in HEAD_PREFIXES if f"{h}weight" in sd or f"{h}bias" in sd]
    if len(heads) > 1:
        raise CheckpointError(f"the checkpoint has both {heads[0]}* and {heads[1]}*: which is the score head?")
    head = heads[0] if heads else None

    mapped, ignored = {}, list(non_tensors)
    text_keys = tuple(prefix + part for part in TEXT_PARTS)
    for k, v in sd.items():
        if k.startswith(text_keys):
            rest = k[len(prefix) :]
            if rest in IGNORED_TEXT_BUFFERS:
                ignored.append(k)
            else:
                mapped["bert." + rest] = v
        elif head is not None and k.startswith(head):
            mapped["itm_head." + k[len(head) :]] = v
        elif k.startswith(PROJ_PREFIX) and isinstance(model.image_proj, nn.Linear):
            mapped[k] = v
        else:
            ignored.append(k)

    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    problems = []
    origin = {}
    for k in mapped:
        if k.startswith("bert."):
            origin[k] = prefix + k[len("bert.") :]
        elif k.startswith("itm_head."):
            origin[k] = head + k[len("itm_head.") :]
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
        raise CheckpointError(
            f"checkpoint does not fit the joint encoder ({len(problems)} problem(s)): "
            + "; ".join(problems[:12])
            + (" ..." if len(problems) > 12 else "")
        )
    return mapped, LoadReport(prefix, head, sorted(ignored))


def load_checkpoint(
    model: EdjeJointEncoder, state_dict: Mapping[str, torch.Tensor], allow_missing_head: bool = False
) -> LoadReport:
    """Load ``state_dict`` (authors' or Hugging Face names) into ``model``: ``model.load_checkpoint``."""
    mapped, report = convert_state_dict(state_dict, model, allow_missing_head=allow_missing_head)
    missing, unexpected = model.load_state_dict(mapped, strict=False)
    missing = [k for k in missing if not (allow_missing_head and k.startswith("itm_head."))]
    if missing or unexpected:  # convert_state_dict checked the names; this is a guard
        raise CheckpointError(f"checkpoint does not fit: missing {missing[:8]}, unexpected {unexpected[:8]}")
    return report


# -- files -------------------------------------------------------------------------


def read_weights(path: str) -> dict:
    """The tensors of a weights file (see the module docstring); an unreadable one raises :class:`CheckpointError`."""
    # imported here: edje_indexer.transforms' __init__ imports the indexing stages
    from edje_indexer.transforms.weights import read_state_dict

    try:
        return read_state_dict(path)
    except FileNotFoundError:
        raise
    except ValueError as e:  # e.g. a pickle with objects other than tensors and containers, or no dict at all
        raise CheckpointError(
            f"{e}; a reranker checkpoint must be a plain state dict: save just the model's state_dict()"
        ) from e


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
    raise FileNotFoundError(
        f"no weights in {path}: expected one of {', '.join(WEIGHT_FILES)}"
        + (f" (or exactly one weights file; found {cands})" if cands else "")
    )


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
        vocab_size=int(vocab),
        hidden_size=int(hidden),
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=int(inter.shape[0]) if inter is not None else 4 * int(hidden),
        max_position_embeddings=int(pos.shape[0]) if pos is not None else 512,
        type_vocab_size=int(types.shape[0]) if types is not None else 2,
    )


def _portable_config(cfg: dict) -> dict:
    """A config dict without the attention-kernel choice a transformers version records (e.g. 4.46's
    ``_attn_implementation_autoset``, which would pin a loaded model to eager attention): each
    loading picks its own default, as for a freshly built model."""
    return {k: v for k, v in cfg.items() if not k.startswith("_attn_implementation")}


def from_pretrained(
    path: str,
    config: BertConfig | None = None,
    token_dim: int | None = None,
    allow_missing_head: bool = False,
    num_attention_heads: int | None = None,
    model_cls: type[EdjeJointEncoder] = EdjeJointEncoder,
) -> EdjeJointEncoder:
    """``EdjeJointEncoder.from_pretrained`` (see there): a ``model_cls`` from a folder or a weights file."""
    weights_path, config_path = _resolve_files(path)
    state_dict = read_weights(weights_path)
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
    model = model_cls(
        config,
        token_dim=token_dim or edje.get("token_dim", TOKEN_DIM),
        max_text_tokens=edje.get("max_text_tokens", MAX_TEXT_TOKENS),
        caption_cleaning=edje.get("caption_cleaning"),
        num_image_tokens=edje.get("num_image_tokens"),
    )
    model.load_report = model.load_checkpoint(state_dict, allow_missing_head=allow_missing_head)
    return model.eval()


def save_pretrained(model: EdjeJointEncoder, path: str, tokenizer=None) -> str:
    """Write ``config.json`` (+ ``"edje"``), ``model.safetensors`` (``bert.*``, ``itm_head.*`` names)
    and the tokenizer files: a folder that :func:`load_reranker` reads."""
    from safetensors.torch import save_file

    os.makedirs(path, exist_ok=True)
    cfg = _portable_config(model.config.to_dict())
    cfg["edje"] = {"token_dim": model.token_dim, "max_text_tokens": model.max_text_tokens}
    for key in ("caption_cleaning", "num_image_tokens"):  # only when set: folders stay as they were otherwise
        if getattr(model, key) is not None:
            cfg["edje"][key] = getattr(model, key)
    with open(os.path.join(path, CONFIG_NAME), "w") as f:
        json.dump(cfg, f, indent=1, sort_keys=True)
    sd = {
        k: v.detach().cpu().contiguous() for k, v in model.state_dict().items() if not k.endswith(IGNORED_TEXT_BUFFERS)
    }
    save_file(sd, os.path.join(path, WEIGHTS_NAME))
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
    return path


def load_reranker(path: str, allow_missing_head: bool = False):
    """(model, tokenizer) from a folder holding config.json, weights and the tokenizer files."""
    model = EdjeJointEncoder.from_pretrained(path, allow_missing_head=allow_missing_head)
    folder = path if os.path.isdir(path) else (os.path.dirname(path) or ".")
    return model, load_tokenizer(folder)
