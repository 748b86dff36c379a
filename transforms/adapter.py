"""The EDJE token-compression adapter (``edje.md``, "the token-compression adapter").

m learned queries attend once over the backbone's patch tokens (no
self-attention among the queries); an MLP block with a residual and a final
projection to the stored width follow. The MLP's activation is the language
model's ``hidden_act`` in the authors' code: ``"gelu"``, the exact (erf) GELU,
for MiniLM-L12-H384-uncased (:attr:`AdapterConfig.activation`). Parameter
names match the authors' release, so their ``vision_projection.*`` weights
load by stripping that prefix (:func:`load_adapter_state`); the number of
queries m is read from their ``query`` parameter ([1, m, d_v]) by
:func:`num_queries_of`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

AUTHORS_PREFIX = "vision_projection."
# name -> torch.nn.GELU's `approximate`. "gelu" (exact, erf) is the authors' (MiniLM's hidden_act); "gelu_tanh"
# (SigLIP's gelu_pytorch_tanh) is what this project used before, wrongly: stores of that version recorded no
# "activation" in their identity, which is what AdapterConfig.to_dict() still writes for it (see there).
ACTIVATIONS = {"gelu": "none", "gelu_tanh": "tanh"}
DEFAULT_ACTIVATION = "gelu"
LEGACY_ACTIVATION = "gelu_tanh"  # the activation of an identity without an "activation" entry


@dataclass(frozen=True)
class AdapterConfig:
    """Shape of an adapter; ``embed_dim``/``num_heads``/``ln_eps`` come from the backbone."""

    embed_dim: int
    num_heads: int
    num_queries: int = 64
    out_dim: int = 384
    mlp_hidden: int = 8192
    ln_eps: float = 1e-6
    activation: str = DEFAULT_ACTIVATION

    def __post_init__(self):
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"unknown adapter activation {self.activation!r}; use one of {', '.join(ACTIVATIONS)}")

    def to_dict(self) -> dict:
        """What the store's model identity records.

        ``activation`` is omitted for :data:`LEGACY_ACTIVATION`: stores written
        before the activation was configurable (always tanh GELU) have no such
        entry, so an explicitly tanh adapter keeps their identity, while the
        default exact GELU differs from it (``model.adapter.activation``).
        """
        d = asdict(self)
        if self.activation == LEGACY_ACTIVATION:
            del d["activation"]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> AdapterConfig:
        """The inverse of :meth:`to_dict` (an identity without ``activation`` is tanh GELU)."""
        return cls(**{**d, "activation": d.get("activation", LEGACY_ACTIVATION)})


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, activation: str = DEFAULT_ACTIVATION):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU(approximate=ACTIVATIONS[activation])
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
        self.mlp = Mlp(c.embed_dim, c.mlp_hidden, c.activation)
        self.projection = nn.Linear(c.embed_dim, c.out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q = self.query.expand(x.shape[0], -1, -1)
        h, _ = self.attention(q, self.key(x), self.value(x), need_weights=False)
        h = h + self.mlp(self.layernorm(h))
        return self.projection(h)


def _strip_authors_prefix(state: dict) -> dict:
    if any(k.startswith(AUTHORS_PREFIX) for k in state):
        return {k[len(AUTHORS_PREFIX) :]: v for k, v in state.items() if k.startswith(AUTHORS_PREFIX)}
    return state


def num_queries_of(state: dict, source: str) -> int | None:
    """m of an adapter state dict (authors' or project names), from ``query`` [1, m, d_v]; None without one."""
    q = _strip_authors_prefix(state).get("query")
    if q is None:
        return None
    if q.dim() != 3 or q.shape[0] != 1:
        raise ValueError(f"adapter weights {source}: query has shape {tuple(q.shape)}, expected [1, m, d_v]")
    return int(q.shape[1])


def load_adapter_state(adapter: EDJEAdapter, state: dict[str, torch.Tensor], source: str) -> None:
    """Load the authors' names (with or without ``vision_projection.``) or ours.

    The two naming schemes coincide once the authors' prefix is stripped, so a
    full-model state dict from their release can be passed as it is. Missing or
    misshapen parameters are an error naming the file.
    """
    state = _strip_authors_prefix(state)
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
