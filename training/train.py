"""Training the EDJE adapter and joint encoder on a small corpus, on a CPU (a reference for small models).

``edje-index train --data quality/data --run quality/run --weights quality/models/dinov2-....safetensors``
(or ``python -m edje_indexer.training.train``); what ``make quality`` runs when it has no run yet.

What it does, in order (each step's wall time goes into ``run.json``):

1. **Backbone tokens, once.** The preset's frozen backbone runs over every training image, exactly as the
   indexer would (training/features.py); the raw patch tokens are cached in ``RUN/cache/train``.
2. **Sentence embeddings** of the training captions with all-MiniLM-L6-v2 (training/sentence.py).
3. **First stage.** A ridge map from the backbone's global feature (class token + mean patch token) to the
   caption's sentence embedding (training/first_stage.py), lambda by 5-fold cross-validation; saved as
   ``RUN/first_stage.safetensors``. The out-of-fold maps give each caption the top-``candidates`` images
   a first stage would return for it without having seen it, and each image its top captions.
4. **Adapter + joint encoder.** Two warm-ups of the adapter alone (:func:`align_adapter`: the mean of its
   tokens mapped to the caption embedding; :func:`align_through_text_model`: the frozen text model reading
   its tokens pulled towards the caption embedding), then both trained together on image-text matching
   with the first stage's hard negatives, as in ``edje.md``: a group is one caption with its image and
   ``negatives`` images (``random_negatives`` of them at random, the rest from its first-stage candidates),
   or one image with its caption and candidate captions (a fraction ``i2t_fraction`` of the groups); the
   loss is the cross-entropy of the group's logits with the true pair as the answer (a listwise ITM: the
   reranker's job is to put the right one of the first stage's candidates first). The adapter starts from
   the preset's seeded random init (transforms/adapter.py), the joint encoder (rerank/joint_encoder.py)
   from all-MiniLM-L6-v2 with a new score head; AdamW (weight decay 0.05), linear warm-up, cosine decay;
   ``time_limit_s`` stops the steps early (recorded). Not done (the paper's other objectives, with ~14M
   pairs and GPUs): masked language modelling, recovering the text embedding from [CLS], distillation.
5. **Saved** in the project's formats: ``RUN/adapter.safetensors`` (``edje-index index --adapter``),
   ``RUN/reranker/`` (``edje-index rerank --model``, rerank/checkpoint.py ``save_pretrained``) and
   ``RUN/run.json`` (the configuration, timings, losses, and the validation recall: a fixed
   ``val_fraction`` of the training images, kept out of steps 3-4, first stage against reranked).

The held-out test images (training/data.py: a fixed 30% of the pooled images) are read by none of these steps.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import numpy as np
import torch

from edje_indexer.training.config import TrainConfig, add_arguments, config_from_args

RUN_NAME, ADAPTER_NAME, RERANKER_DIR, FIRST_STAGE_NAME = (
    "run.json",
    "adapter.safetensors",
    "reranker",
    "first_stage.safetensors",
)


def resolve_precision(name: str) -> str:
    from edje_indexer.training.features import auto_precision

    if name == "auto":
        return auto_precision()
    if name not in ("fp32", "bf16"):
        raise ValueError(f"precision must be auto, fp32 or bf16, not {name!r}")
    return name


def load_spec(cfg: TrainConfig):
    """The preset's model spec with the run's backbone weights and a seeded random adapter (the init)."""
    from edje_indexer.pipeline.presets import resolve_spec

    if not cfg.weights and not cfg.random_weights:
        raise ValueError("no backbone weights: pass --weights FILE (make quality-data writes the DINOv2 file)")
    return resolve_spec(cfg.preset, weights=cfg.weights, random_weights=cfg.random_weights, random_adapter=True)


def split_rows(ids: list[str], val_fraction: float) -> np.ndarray:
    """True for the validation rows: a fixed hash of the id, the same on every run."""
    import hashlib

    cut = int(val_fraction * 10_000)
    return np.array([int(hashlib.sha256(("val:" + i).encode()).hexdigest()[:8], 16) % 10_000 < cut for i in ids])


def _candidate_lists(image_emb: np.ndarray, text: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    from edje_indexer.training.metrics import top_k

    scores = text @ image_emb.T  # [rows as captions, rows as images]
    return top_k(scores, k + 1), top_k(scores.T, k + 1)


def _cosine_lr(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


class GroupSampler:
    """Draws the groups of one step: (query texts, candidate image rows) with the true pair first."""

    def __init__(self, captions: list[str], t2i: np.ndarray, i2t: np.ndarray, cfg: TrainConfig):
        self.captions = captions
        self.t2i, self.i2t, self.cfg = t2i, i2t, cfg
        self.rng = np.random.default_rng(cfg.seed)
        self.n = len(captions)

    def _negatives(self, pool, ok) -> list[int]:
        picks = [int(c) for c in pool if ok(int(c))]
        self.rng.shuffle(picks)
        # mostly the first stage's hard candidates, plus `random_negatives` from anywhere: the easy contrasts
        # are what the joint encoder can learn from first
        picks = picks[: max(0, self.cfg.negatives - self.cfg.random_negatives)]
        while len(picks) < self.cfg.negatives:  # too few candidates differ from the query: random ones
            c = int(self.rng.integers(self.n))
            if ok(c) and c not in picks:
                picks.append(c)
        return picks

    def step(self) -> tuple[list[str], list[int]]:
        """(texts, image rows) of B x (1 + negatives) pairs, group by group, the true pair first in each."""
        texts, images = [], []
        n_i2t = int(round(self.cfg.batch_groups * self.cfg.i2t_fraction))
        rows = self.rng.choice(self.n, self.cfg.batch_groups, replace=False)
        for g, r in enumerate(int(x) for x in rows):
            cap = self.captions[r]
            if g < self.cfg.batch_groups - n_i2t:  # text -> image: one caption, several images
                negs = self._negatives(self.t2i[r], lambda c, cap=cap: self.captions[c] != cap)
                texts += [cap] * (1 + len(negs))
                images += [r, *negs]
            else:  # image -> text: one image, several captions (rows stand for their captions)
                negs = self._negatives(self.i2t[r], lambda c, cap=cap: self.captions[c] != cap)
                texts += [cap] + [self.captions[c] for c in negs]
                images += [r] * (1 + len(negs))
        return texts, images


def align_adapter(adapter, tokens, targets: np.ndarray, cfg: TrainConfig, precision: str, progress: bool) -> list:
    """Warm-up of the adapter alone: the mean of its output tokens, through a throw-away linear map, is pulled
    towards the image's caption embedding against the other captions of the batch (InfoNCE, temperature
    0.05). Why: from a random adapter, matching alone did not start learning here (the loss stayed at
    ln(1 + negatives) for 100+ steps: the joint encoder has no reason to read tokens that say nothing yet),
    while this costs no BERT pass. Only the adapter is kept. Returns the losses."""
    from tqdm import tqdm

    if cfg.align_steps <= 0:
        return []
    rng = np.random.default_rng(cfg.seed + 1)
    head = torch.nn.Linear(adapter.config.out_dim, targets.shape[1])
    opt = torch.optim.AdamW(list(adapter.parameters()) + list(head.parameters()), lr=cfg.lr_align, weight_decay=0.05)
    n, losses = len(targets), []
    batch = min(cfg.align_batch, n)
    bar = tqdm(range(cfg.align_steps), desc="adapter warm-up", unit="step", file=sys.stderr, disable=not progress)
    for step in bar:
        for g in opt.param_groups:
            g["lr"] = cfg.lr_align * _cosine_lr(step, cfg.align_steps, max(1, cfg.align_steps // 20))
        rows = rng.choice(n, batch, replace=False)
        x = torch.from_numpy(np.asarray(tokens[rows], dtype=np.float32))
        t = torch.from_numpy(targets[rows])
        with _autocast(precision):
            z = head(adapter(x).mean(1)).float()
        losses.append(_contrastive_step(opt, z, t))
        if (step + 1) % 10 == 0:
            bar.set_postfix(loss=f"{np.mean(losses[-20:]):.3f}")
    bar.close()
    return losses


def _contrastive_step(opt, z: torch.Tensor, t: torch.Tensor) -> float:
    """One optimizer step on the symmetric InfoNCE loss (temperature 0.05) pulling ``z[i]`` to ``t[i]`` against
    the rest of the batch (both adapter warm-ups); returns the loss."""
    sim = torch.nn.functional.normalize(z, dim=-1) @ torch.nn.functional.normalize(t, dim=-1).T / 0.05
    labels = torch.arange(len(z))
    loss = (torch.nn.functional.cross_entropy(sim, labels) + torch.nn.functional.cross_entropy(sim.T, labels)) / 2
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return float(loss.detach())


def align_through_text_model(
    adapter, joint, tokenizer, tokens, targets: np.ndarray, cfg: TrainConfig, precision: str, progress: bool
) -> list:
    """Second warm-up of the adapter: the frozen joint encoder reads an image's tokens after an empty caption
    (``[CLS] [SEP] <image tokens> [SEP]``, the joint input's own layout), and the mean of its outputs over the
    image tokens is pulled towards the caption's sentence embedding (InfoNCE against the batch). all-MiniLM-L6-v2
    produces those sentence embeddings by the same mean pooling, so the adapter learns to write tokens the
    text model reads like the caption: image-text matching then starts from something it can compare."""
    from tqdm import tqdm

    if cfg.align_text_steps <= 0:
        return []
    frozen = [p for p in joint.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    rng = np.random.default_rng(cfg.seed + 2)
    opt = torch.optim.AdamW(adapter.parameters(), lr=cfg.lr_adapter, weight_decay=cfg.weight_decay)
    n, losses = len(targets), []
    batch = min(cfg.align_text_batch, n)
    empty = joint.tokenize(tokenizer, [""])
    m = adapter.config.num_queries
    bar = tqdm(
        range(cfg.align_text_steps), desc="adapter warm-up 2", unit="step", file=sys.stderr, disable=not progress
    )
    joint.eval()  # no dropout while it is a fixed reader
    for step in bar:
        for g in opt.param_groups:
            g["lr"] = cfg.lr_adapter * _cosine_lr(step, cfg.align_text_steps, max(1, cfg.align_text_steps // 20))
        rows = rng.choice(n, batch, replace=False)
        x = torch.from_numpy(np.asarray(tokens[rows], dtype=np.float32))
        t = torch.from_numpy(targets[rows])
        with _autocast(precision):
            img = adapter(x)
            hidden = joint.bert(**joint.build_inputs(empty.input_ids.expand(batch, -1), None, img)).last_hidden_state
        t_len = empty.input_ids.shape[1]
        z = hidden[:, t_len : t_len + m].float().mean(1)
        losses.append(_contrastive_step(opt, z, t))
        if (step + 1) % 5 == 0:
            bar.set_postfix(loss=f"{np.mean(losses[-10:]):.3f}")
    bar.close()
    for p in frozen:
        p.requires_grad_(True)
    joint.train()
    return losses


def _autocast(precision: str):
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16")


def score_pairs(joint, tokenizer, adapter, tokens: np.ndarray, texts: list[str], rows: list[int], precision: str):
    """Logits [P] of (texts[i], image rows[i]) straight from cached backbone tokens (adapter, then joint)."""
    uniq, inverse = np.unique(np.asarray(rows), return_inverse=True)
    x = torch.from_numpy(np.asarray(tokens[uniq], dtype=np.float32))
    batch = joint.tokenize(tokenizer, texts)
    with _autocast(precision):
        img = adapter(x)[torch.from_numpy(inverse)]
        lengths = batch.lengths if batch.padded else None
        return joint(batch.input_ids, lengths, img).float()


@torch.no_grad()
def rerank_rows(joint, tokenizer, adapter, tokens, queries, candidates, precision, chunk: int = 64):
    """Reranked candidate lists: for each query text, its candidate rows sorted by the joint encoder."""
    joint.eval()
    adapter.eval()
    out = []
    for q, cands in zip(queries, candidates):
        cands = list(cands)
        s = torch.cat(
            [
                score_pairs(
                    joint, tokenizer, adapter, tokens, [q] * len(cands[a : a + chunk]), cands[a : a + chunk], precision
                )
                for a in range(0, len(cands), chunk)
            ]
        ).numpy()
        out.append([cands[i] for i in np.argsort(-s, kind="stable")])
    return out


def train(cfg: TrainConfig, progress: bool = True) -> dict:
    """Run steps 1-5 of the module docstring; returns what ``run.json`` records."""
    from safetensors.torch import save_file
    from tqdm import tqdm

    from edje_indexer.pipeline.plan import expand_pattern
    from edje_indexer.rerank.checkpoint import load_reranker, save_pretrained
    from edje_indexer.training.data import read_captions, read_manifest
    from edje_indexer.training.features import cached_features
    from edje_indexer.training.first_stage import caption_relevance, cross_fitted_embeddings, fit_ridge
    from edje_indexer.training.metrics import recall, top_k
    from edje_indexer.training.sentence import SentenceEncoder, minilm_folder
    from edje_indexer.transforms.model import load_model

    t_start = time.perf_counter()
    timings: dict[str, float] = {}
    precision = resolve_precision(cfg.precision)
    torch.manual_seed(cfg.seed)
    os.makedirs(cfg.run, exist_ok=True)
    manifest = read_manifest(cfg.data)
    split = manifest["splits"]["train"]
    shards = expand_pattern(split["pattern"])
    caption_of = {r["id"]: r["caption"] for r in read_captions(cfg.data, "train")}
    model = load_model(load_spec(cfg))

    # 1. backbone tokens (cache)
    t0 = time.perf_counter()
    if cfg.max_images is not None:  # tests: the first images only, in a cache of their own
        shards = shards[: max(1, math.ceil(cfg.max_images / max(1, manifest["shard_size"])))]
    feats, computed_s = cached_features(
        os.path.join(cfg.run, "cache", "train"),
        shards,
        model,
        precision,
        cfg.batch_size,
        split["images"] if cfg.max_images is None else None,
    )
    timings["backbone_tokens_s"] = round(time.perf_counter() - t0, 2)
    timings["backbone_tokens_reused"] = computed_s == 0.0
    n_all = len(feats.ids) if cfg.max_images is None else min(cfg.max_images, len(feats.ids))
    ids = feats.ids[:n_all]
    captions_all = [caption_of[i] for i in ids]
    is_val = split_rows(ids, cfg.val_fraction)
    fit = np.flatnonzero(~is_val)
    val = np.flatnonzero(is_val)
    global_all = feats.global_features(cfg.feature)[:n_all]

    # 2. sentence embeddings
    t0 = time.perf_counter()
    text_folder = cfg.text_model or minilm_folder()
    distinct = sorted(set(captions_all))
    emb = SentenceEncoder(text_folder).encode(distinct, progress=progress)
    text_emb = dict(zip(distinct, emb))
    targets = np.stack([text_emb[c] for c in captions_all])
    timings["sentence_embeddings_s"] = round(time.perf_counter() - t0, 2)

    # 3. first stage: lambda by cross-validation, out-of-fold candidates, the final map on every fit row
    t0 = time.perf_counter()
    fit_ids = [ids[i] for i in fit]
    fit_caps = [captions_all[i] for i in fit]
    lam, cv_r1, oof = cross_fitted_embeddings(
        global_all[fit], targets[fit], fit_ids, fit_caps, text_emb, k=cfg.folds, feature=cfg.feature
    )
    ridge = fit_ridge(global_all[fit], targets[fit], lam, cfg.feature)
    ridge.save(os.path.join(cfg.run, FIRST_STAGE_NAME))
    t2i_cand, i2t_cand = _candidate_lists(oof, targets[fit], cfg.candidates)
    timings["first_stage_s"] = round(time.perf_counter() - t0, 2)

    # 4a. adapter warm-up: its tokens made to carry the caption's meaning before the joint encoder sees them
    t0 = time.perf_counter()
    adapter = model.adapter.train()
    for p in adapter.parameters():
        p.requires_grad_(True)
    align_losses = align_adapter(adapter, _RowView(feats.tokens, fit), targets[fit], cfg, precision, progress)
    timings["adapter_warmup_s"] = round(time.perf_counter() - t0, 2)

    # 4b. adapter + joint encoder on image-text matching
    t0 = time.perf_counter()
    joint, tokenizer = load_reranker(text_folder, allow_missing_head=True)
    joint.caption_cleaning = "open_clip"  # queries and captions read as the authors' model reads them
    joint.num_image_tokens = adapter.config.num_queries
    t1 = time.perf_counter()
    align_text_losses = align_through_text_model(
        adapter, joint, tokenizer, _RowView(feats.tokens, fit), targets[fit], cfg, precision, progress
    )
    timings["adapter_warmup_2_s"] = round(time.perf_counter() - t1, 2)
    joint.train()
    groups = [
        {"params": list(adapter.parameters()), "lr": cfg.lr_adapter},
        {"params": list(joint.bert.parameters()), "lr": cfg.lr_text},
        {"params": list(joint.itm_head.parameters()) + list(joint.image_proj.parameters()), "lr": cfg.lr_head},
    ]
    opt = torch.optim.AdamW(groups, weight_decay=cfg.weight_decay)
    base_lrs = [g["lr"] for g in groups]
    warmup = max(1, int(cfg.warmup_fraction * cfg.steps))
    fit_tokens = _RowView(feats.tokens, fit)
    sampler = GroupSampler(fit_caps, t2i_cand, i2t_cand, cfg)
    group_size = 1 + cfg.negatives
    losses, accs, done, stopped_early = [], [], 0, False
    bar = tqdm(range(cfg.steps), desc="training", unit="step", file=sys.stderr, disable=not progress, mininterval=2.0)
    for step in bar:
        if time.perf_counter() - t_start > cfg.time_limit_s:
            stopped_early = True
            break
        scale = _cosine_lr(step, cfg.steps, warmup)
        for g, lr in zip(opt.param_groups, base_lrs):
            g["lr"] = lr * scale
        texts, rows = sampler.step()
        logits = score_pairs(joint, tokenizer, adapter, fit_tokens, texts, rows, precision).view(-1, group_size)
        loss = torch.nn.functional.cross_entropy(logits, torch.zeros(len(logits), dtype=torch.long))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for g in groups for p in g["params"]], 1.0)
        opt.step()
        losses.append(float(loss.detach()))
        accs.append(float((logits.argmax(1) == 0).float().mean()))
        done = step + 1
        if done % 10 == 0:
            bar.set_postfix(loss=f"{np.mean(losses[-50:]):.3f}", acc=f"{np.mean(accs[-50:]):.2f}")
    bar.close()
    timings["train_s"] = round(time.perf_counter() - t0, 2)

    # 5. save, then the validation check (first stage fit without these rows, candidates among them)
    adapter.eval()
    joint.eval()
    save_file(
        {k: v.detach().contiguous() for k, v in adapter.state_dict().items()}, os.path.join(cfg.run, ADAPTER_NAME)
    )
    save_pretrained(joint, os.path.join(cfg.run, RERANKER_DIR), tokenizer)
    t0 = time.perf_counter()
    validation = None
    if len(val) >= 2:
        val_caps = [captions_all[i] for i in val]
        queries = sorted(set(val_caps))
        scores = np.stack([text_emb[q] for q in queries]) @ ridge.embed(global_all[val]).T
        first = top_k(scores, cfg.candidates)
        relevant = caption_relevance(queries, val_caps)
        reranked = rerank_rows(joint, tokenizer, adapter, _RowView(feats.tokens, val), queries, first, precision)
        validation = {
            "images": len(val),
            "queries": len(queries),
            "first_stage_t2i": recall(first, relevant),
            "reranked_t2i": recall(reranked, relevant),
        }
    timings["validation_s"] = round(time.perf_counter() - t0, 2)
    timings["total_s"] = round(time.perf_counter() - t_start, 2)
    record = {
        "config": cfg.key(),
        "precision": precision,
        "images": {"train": len(fit), "validation": len(val)},
        "first_stage": {"lambda": lam, "cv_t2i_r1": {str(k): v for k, v in cv_r1.items()}, "feature": cfg.feature},
        "steps_done": done,
        "stopped_early": stopped_early,
        "loss": _first_and_last(losses),
        "adapter_warmup_loss": _first_and_last(align_losses),
        "adapter_warmup_2_loss": _first_and_last(align_text_losses),
        "group_accuracy": _first_and_last(accs),
        "validation": validation,
        "timings": timings,
        "files": {"adapter": ADAPTER_NAME, "reranker": RERANKER_DIR, "first_stage": FIRST_STAGE_NAME},
    }
    with open(os.path.join(cfg.run, RUN_NAME), "w") as f:
        json.dump(record, f, indent=1)
    return record


def _first_and_last(values: list[float]) -> dict:
    """Means over the first and the last tenth of the steps (at least one step each)."""
    if not values:
        return {"first_tenth": None, "last_tenth": None}
    w = max(1, len(values) // 10)
    return {"first_tenth": round(float(np.mean(values[:w])), 4), "last_tenth": round(float(np.mean(values[-w:])), 4)}


class _RowView:
    """Rows ``index`` of a cached token array, indexed like the array itself (training rows -> cache rows)."""

    def __init__(self, tokens: np.ndarray, index: np.ndarray):
        self.tokens, self.index = tokens, np.asarray(index)

    def __getitem__(self, rows) -> np.ndarray:
        cache_rows = self.index[np.asarray(rows)]
        order = np.argsort(cache_rows)  # memory-mapped reads in file order
        out = np.empty((len(cache_rows),) + self.tokens.shape[1:], self.tokens.dtype)
        out[order] = self.tokens[cache_rows[order]]
        return out


def load_run(run: str, cfg: TrainConfig | None = None) -> dict | None:
    """A finished run's record, or None if there is none (or it was trained with another configuration)."""
    try:
        with open(os.path.join(run, RUN_NAME)) as f:
            record = json.load(f)
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    if cfg is not None and record.get("config") != json.loads(json.dumps(cfg.key())):
        return None
    files = record.get("files", {})
    if not all(os.path.exists(os.path.join(run, p)) for p in files.values()):
        return None
    return record


def run(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    record = None if args.force else load_run(cfg.run, cfg)
    if record is None:
        record = train(cfg)
    else:
        print(f"reusing the run in {cfg.run} (same configuration; --force to train again)", file=sys.stderr)
    print(json.dumps(record, indent=1))
    return 0


def main(argv: list[str] | None = None) -> int:
    p = add_arguments(
        argparse.ArgumentParser(prog="python -m edje_indexer.training.train", description=__doc__.split("\n")[0])
    )
    return run(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
