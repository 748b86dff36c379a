"""The EDJE token-compression adapter (``edje.md``, "the token-compression adapter").

m learned queries attend once over the backbone's patch tokens; an MLP block
with a residual and a final projection to the stored width follow. Parameter
names match the authors' release, so their ``vision_projection.*`` weights
load by stripping that prefix (:func:`load_adapter_state`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

AUTHORS_PREFIX = "vision_projection."


@dataclass(frozen=True)
class AdapterConfig:
    """Shape of an adapter; ``embed_dim``/``num_heads``/``ln_eps`` come from the backbone."""

    embed_dim: int
    num_heads: int
    num_queries: int = 64
    out_dim: int = 384
    mlp_hidden: int = 8192
    ln_eps: float = 1e-6

    def to_dict(self) -> dict:
        return asdict(self)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU(approximate="tanh")  # SigLIP's gelu_pytorch_tanh
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class EDJEAdapter(nn.Module):
    """[B, n, d_v] patch tokens -> [B, m, out_dim] compressed tokens."""

    def __init__(self, config: AdapterConfig):
        super().__init__()
        c = config
        self.config = c
        self.query = nn.Parameter(torch.randn(1, c.num_queries, c.embed_dim))
        self.key = nn.Linear(c.embed_dim, c.embed_dim)
        self.value = nn.Linear(c.embed_dim, c.embed_dim)
        self.attention = nn.MultiheadAttention(c.embed_dim, c.num_heads, batch_first=True)
        self.layernorm = nn.LayerNorm(c.embed_dim, eps=c.ln_eps)
        self.mlp = Mlp(c.embed_dim, c.mlp_hidden)
        self.projection = nn.Linear(c.embed_dim, c.out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q = self.query.expand(x.shape[0], -1, -1)
        h, _ = self.attention(q, self.key(x), self.value(x), need_weights=False)
        h = h + self.mlp(self.layernorm(h))
        return self.projection(h)


def load_adapter_state(adapter: EDJEAdapter, state: dict[str, torch.Tensor], source: str) -> None:
    """Load the authors' names (with or without ``vision_projection.``) or ours.

    The two naming schemes coincide once the authors' prefix is stripped, so a
    full-model state dict from their release can be passed as it is. Missing or
    misshapen parameters are an error naming the file.
    """
    if any(k.startswith(AUTHORS_PREFIX) for k in state):
        state = {k[len(AUTHORS_PREFIX) :]: v for k, v in state.items() if k.startswith(AUTHORS_PREFIX)}
    expected = adapter.state_dict()
    missing = sorted(set(expected) - set(state))
    if missing:
        raise ValueError(
            f"adapter weights {source} lack parameters {missing}; expected the names in transforms/adapter.py"
        )
    for k, v in expected.items():
        if tuple(state[k].shape) != tuple(v.shape):
            raise ValueError(
                f"adapter weights {source}: {k} has shape {tuple(state[k].shape)}, the adapter needs {tuple(v.shape)} "
                f"(config {adapter.config})"
            )
    adapter.load_state_dict({k: state[k] for k in expected}, strict=True)
