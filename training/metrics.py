"""Retrieval metrics: recall at k, and how much two rankings of the same candidates agree.

Relevance is by caption text: in both directions an image and a caption match when the image's caption
is exactly that text. Tux Paint has stamps with the same description ("A cow."), so a caption query
has every such stamp as a right answer and is asked once (queries are the distinct captions).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def top_k(scores: np.ndarray, k: int) -> np.ndarray:
    """[Q, G] scores -> [Q, k] gallery indices, best first (ties: the lower index first)."""
    k = min(k, scores.shape[1])
    part = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    rows = np.arange(scores.shape[0])[:, None]
    order = np.lexsort((part, -scores[rows, part]), axis=1)
    return part[rows, order]


def recall(ranked: Sequence[Sequence], relevant: Sequence[set], ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """``{"r1": .., "r5": .., "r10": ..}``: the fraction of queries with a relevant item in their first k."""
    if len(ranked) != len(relevant) or len(ranked) == 0:
        raise ValueError("recall needs one ranking and one relevant set per query (and at least one query)")
    out = {}
    for k in ks:
        hits = sum(any(x in rel for x in list(r)[:k]) for r, rel in zip(ranked, relevant))
        out[f"r{k}"] = hits / len(ranked)
    return out


def kendall_tau(a: Sequence[float], b: Sequence[float]) -> float:
    """Kendall's tau-b of two score vectors over the same items (1: same order, -1: reversed)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError("kendall_tau needs two score vectors of the same length")
    i, j = np.triu_indices(len(a), k=1)
    da, db = np.sign(a[i] - a[j]), np.sign(b[i] - b[j])
    n0 = len(i)
    ties_a, ties_b = int((da == 0).sum()), int((db == 0).sum())
    denom = np.sqrt(float(n0 - ties_a) * float(n0 - ties_b))
    return float((da * db).sum() / denom) if denom > 0 else 1.0


def agreement(orders: Sequence[Sequence], reference: Sequence[Sequence], scores, reference_scores) -> dict:
    """Top-1 agreement (fraction of queries whose best candidate is the reference's) and mean Kendall tau
    of the candidates' scores against the reference's, per query."""
    if not (len(orders) == len(reference) == len(scores) == len(reference_scores)) or len(orders) == 0:
        raise ValueError("agreement needs the same queries on both sides")
    top1 = float(np.mean([o[0] == r[0] for o, r in zip(orders, reference)]))
    taus = [kendall_tau(s, r) for s, r in zip(scores, reference_scores)]
    return {"top1": top1, "kendall_tau": float(np.mean(taus))}
