"""The ``index`` subcommand's own flags, defined once and without Beam.

``edje-index`` builds its parser from here, so the store commands (``inspect``,
``get``, ``rejected``, ``verify``, ...) never import Beam (about 0.5 s and an
import-time warning); :class:`pipeline.options.IndexOptions` adds the same
flags to Beam's pipeline options for the ``index`` job itself.
"""

from __future__ import annotations

import argparse

from edje_indexer.schemas.quantization import INT4_ROTATIONS

# FnApiRunner is Beam's in-process runner; naming it avoids DirectRunner's
# attempt to download the Prism binary first.
DEFAULT_RUNNER = "FnApiRunner"
DASK_RUNNER = "apache_beam.runners.dask.dask_runner.DaskRunner"

EPILOG = """Any other --flags are Beam pipeline options and pass through, e.g.
  --runner DataflowRunner --project P --region R --temp_location gs://B/tmp --setup_file ./setup.py
  --direct_num_workers 2 --direct_running_mode multi_processing   (local, several processes)
The local default runner is FnApiRunner (no Prism download)."""


def add_index_flags(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Flags of ``edje-index index`` (none is ``required=``: Beam parses them on workers too)."""
    p = parser
    p.add_argument("--input", help="shards: brace pattern, glob, comma list, paths or fsspec URLs (required)")
    p.add_argument("--store", help="store folder or fsspec URL (required)")
    p.add_argument("--preset", help="named model configuration (tiny, edje-siglip2-l16-384, edje-dinov2-s14-224)")
    p.add_argument("--backbone", help="any timm ViT name (without --preset: its own timm preprocessing)")
    p.add_argument(
        "--backbone-kwargs",
        help='JSON object of timm create_model arguments for --backbone, e.g. \'{"depth": 2, "img_size": 32}\'',
    )
    p.add_argument(
        "--weights",
        help="backbone weights file or URL: timm's names, or a Hugging Face SigLIP vision model's "
        "(vision_model.*) safetensors; default: local HF cache",
    )
    p.add_argument("--adapter", help="adapter weights file or URL (authors' checkpoint or project safetensors)")
    p.add_argument(
        "--checkpoint",
        help="the EDJE authors' checkpoint file or URL (torch.save of {'model': ...}, or a subset): the vision "
        "encoder (vision_encoder.vision_model.*) and the adapter (vision_projection.*); without --preset, "
        "the authors' preprocessing (squash-resize, bilinear, mean = std = 0.5)",
    )
    p.add_argument(
        "--adapter-activation",
        choices=["gelu", "gelu_tanh"],
        help="the adapter MLP's activation (default gelu, the exact erf GELU of the authors' model; "
        "gelu_tanh: the tanh approximation earlier versions used, to add to their stores)",
    )
    p.add_argument("--random-weights", action="store_true", help="seeded random backbone (recorded in the store)")
    p.add_argument("--random-adapter", action="store_true", help="seeded random adapter (recorded in the store)")
    p.add_argument(
        "--quantize",
        default="fp16",
        choices=["fp16", "int8", "int4"],
        help="how tokens are stored: fp16 (49,152 bytes per 64 x 384 image), int8 (24,704) or int4 (12,416); "
        "int8 and int4 with one float16 scale per token (schemas/quantization.py)",
    )
    p.add_argument(
        "--int4-rotation",
        choices=list(INT4_ROTATIONS),
        default="none",
        help="with --quantize int4: none (default) or hadamard, a fixed seeded randomized block Hadamard "
        "rotation of each token before quantizing, undone on decode (stored as quantization int4-rht)",
    )
    p.add_argument("--id-policy", default="key", help="key (default: WebDataset __key__), shard-key, json:FIELD")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument(
        "--decode-threads",
        type=int,
        default=0,
        help="image decoding threads per worker (default 0: one per core, at most 16)",
    )
    p.add_argument(
        "--decode-timeout",
        type=float,
        default=60.0,
        help="seconds one image may take to decode before it is rejected (reason 'timeout')",
    )
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda[:N]; cuda fails if no GPU is used")
    p.add_argument("--precision", choices=["fp32", "bf16", "fp16"], help="default: bf16 on cuda, fp32 on cpu")
    p.add_argument("--compile", action="store_true", help="torch.compile the model (worth it on GPUs)")
    p.add_argument(
        "--no-jpeg-draft",
        dest="jpeg_draft",
        action="store_false",
        help="decode JPEGs at full size (changes the model identity)",
    )
    p.add_argument(
        "--decoder",
        choices=["pillow", "torchvision"],
        default="pillow",
        help="torchvision: JPEGs decoded on the model's device (nvJPEG on GPUs); changes the identity",
    )
    p.add_argument("--force", action="store_true", help="re-index shards even if committed")
    p.add_argument("--lock-wait", type=float, default=0.0, help="seconds to wait for another job's store lock")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.add_argument(
        "--dask-local-workers",
        type=int,
        default=0,
        help="with --runner DaskRunner and no --dask_client_address: start a local dask.distributed "
        "cluster of N worker processes on 127.0.0.1 for this job",
    )
    return parser
