"""The first stage: a ridge regression from the frozen backbone's global image feature to the sentence
embedding of its caption, solved in closed form.

The paper's first stage is a contrastive embedding model of the same family (SigLIP2); none can be had
here, so the miniature learns the cheapest map that puts images into MiniLM's sentence space::

    x = (feature - mean) / std                    feature: DINOv2 [CLS] and mean patch token, concatenated
    W = (X^T X + lambda N I)^-1 X^T (T - t_mean)  T: unit sentence embeddings of the training captions
    image embedding = normalize(x W + t_mean),    score(text, image) = cosine with the text's embedding

``lambda`` is chosen by k-fold cross-validation on the training images (text -> image R@1 within
each held-out fold); the same folds give every training caption a candidate list from a map that
did not see it (:func:`cross_fitted_embeddings`), which is where training mines its hard negatives:
they look like what the first stage hands the reranker on new data, not like a memorised fit.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np

from edje_indexer.training.metrics import recall, top_k

LAMBDAS = (0.003, 0.01, 0.03, 0.1, 0.3, 1.0)


@dataclass
class RidgeMap:
    feature: str  # which global feature (training/features.py Features.global_features)
    lam: float
    mean: np.ndarray  # [D]
    std: np.ndarray  # [D]
    weight: np.ndarray  # [D, T]
    target_mean: np.ndarray  # [T]

    def embed(self, features: np.ndarray) -> np.ndarray:
        """Unit image embeddings [N, T] in the text space."""
        y = ((features - self.mean) / self.std) @ self.weight + self.target_mean
        return (y / np.maximum(np.linalg.norm(y, axis=1, keepdims=True), 1e-12)).astype(np.float32)

    def save(self, path: str) -> None:
        from safetensors.numpy import save_file

        tensors = {"mean": self.mean, "std": self.std, "weight": self.weight, "target_mean": self.target_mean}
        save_file(
            {k: np.ascontiguousarray(v, np.float32) for k, v in tensors.items()},
            path,
            metadata={"kind": "edje-first-stage-ridge", "feature": self.feature, "lambda": json.dumps(self.lam)},
        )

    @classmethod
    def load(cls, path: str) -> RidgeMap:
        from safetensors import safe_open

        with safe_open(path, "np") as f:
            meta = f.metadata() or {}
            if meta.get("kind") != "edje-first-stage-ridge":
                raise ValueError(f"{path} is not a first-stage ridge map (metadata kind {meta.get('kind')!r})")
            t = {k: f.get_tensor(k) for k in f.keys()}
        return cls(
            meta["feature"], float(json.loads(meta["lambda"])), t["mean"], t["std"], t["weight"], t["target_mean"]
        )


def fit_ridge(features: np.ndarray, targets: np.ndarray, lam: float, feature: str = "cls+mean") -> RidgeMap:
    """The closed-form ridge map (``lam`` is relative to the number of rows)."""
    x = features.astype(np.float64)
    mean, std = x.mean(0), x.std(0) + 1e-6
    xs = (x - mean) / std
    t_mean = targets.mean(0)
    gram = xs.T @ xs + lam * len(xs) * np.eye(xs.shape[1])
    weight = np.linalg.solve(gram, xs.T @ (targets - t_mean))
    f32 = np.float32
    return RidgeMap(feature, float(lam), mean.astype(f32), std.astype(f32), weight.astype(f32), t_mean.astype(f32))


def folds_of(ids: list[str], k: int) -> np.ndarray:
    """A fixed fold number per id (a hash of the id: the same on every run and machine)."""
    import hashlib

    return np.array([int(hashlib.sha256(i.encode()).hexdigest()[:8], 16) % k for i in ids])


def caption_relevance(query_captions: list[str], gallery_captions: list[str]) -> list[set[int]]:
    """For each query caption, the gallery indices with exactly that caption."""
    where: dict[str, set[int]] = {}
    for g, c in enumerate(gallery_captions):
        where.setdefault(c, set()).add(g)
    return [where.get(c, set()) for c in query_captions]


def t2i_recall(ridge: RidgeMap, features: np.ndarray, captions: list[str], text_emb: dict[str, np.ndarray]) -> dict:
    """Text -> image recall of the map on one gallery (the distinct captions as queries)."""
    queries = sorted(set(captions))
    scores = np.stack([text_emb[q] for q in queries]) @ ridge.embed(features).T
    return recall(top_k(scores, 10), caption_relevance(queries, captions))


def cross_fitted_embeddings(
    features: np.ndarray,
    targets: np.ndarray,
    ids: list[str],
    captions: list[str],
    text_emb: dict[str, np.ndarray],
    k: int = 5,
    lambdas=LAMBDAS,
    feature: str = "cls+mean",
) -> tuple[float, dict, np.ndarray]:
    """(chosen lambda, mean fold R@1 per lambda, out-of-fold image embeddings [N, T] at that lambda)."""
    folds = folds_of(ids, k)
    scores, oof = {}, {}
    for lam in lambdas:
        emb = np.zeros_like(targets, dtype=np.float32)
        r1 = []
        for f in range(k):
            test = folds == f
            if not test.any() or test.all():
                continue
            ridge = fit_ridge(features[~test], targets[~test], lam, feature)
            emb[test] = ridge.embed(features[test])
            fold_caps = [c for c, t in zip(captions, test) if t]
            r1.append(t2i_recall(ridge, features[test], fold_caps, text_emb)["r1"])
        scores[lam], oof[lam] = float(np.mean(r1)) if r1 else 0.0, emb
    best = max(lambdas, key=lambda lam: (scores[lam], -lam))
    return best, scores, oof[best]
