"""The ``index`` job's flags: one Beam ``PipelineOptions`` subclass, the Beam idiom.

``edje-index index`` hands its whole command line to ``PipelineOptions``, so
the project's flags and Beam's (``--runner``, worker options) are one set of
pipeline options that travel with the job. :func:`job_config` turns them into
the typed :class:`pipeline.job.JobConfig`; each setting is defined once, here.
"""

from __future__ import annotations

import argparse

from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions

# FnApiRunner is Beam's in-process runner; naming it avoids DirectRunner's
# attempt to download the Prism binary first.
DEFAULT_RUNNER = "FnApiRunner"
DASK_RUNNER = "apache_beam.runners.dask.dask_runner.DaskRunner"

EPILOG = """Any other --flags are Beam pipeline options and pass through, e.g.
  --runner DataflowRunner --project P --region R --temp_location gs://B/tmp --setup_file ./setup.py
  --direct_num_workers 2 --direct_running_mode multi_processing   (local, several processes)
The local default runner is FnApiRunner (no Prism download)."""


class IndexOptions(PipelineOptions):
    """Flags of ``edje-index index`` (none is ``required=``: Beam parses them on workers too)."""

    @classmethod
    def _add_argparse_args(cls, parser: argparse.ArgumentParser) -> None:
        p = parser
        p.add_argument("--input", help="shards: brace pattern, glob, comma list, paths or fsspec URLs (required)")
        p.add_argument("--store", help="store folder or fsspec URL (required)")
        p.add_argument("--preset", help="named model configuration (tiny, edje-siglip2-l16-384)")
        p.add_argument("--backbone", help="any timm ViT name (without --preset: its own timm preprocessing)")
        p.add_argument("--weights", help="backbone weights file or URL (safetensors/.pth); default: local HF cache")
        p.add_argument("--adapter", help="adapter weights file or URL (authors' checkpoint or project safetensors)")
        p.add_argument("--random-weights", action="store_true", help="seeded random backbone (recorded in the store)")
        p.add_argument("--random-adapter", action="store_true", help="seeded random adapter (recorded in the store)")
        p.add_argument("--quantize", default="fp16", choices=["fp16", "int8"])
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


def add_index_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The ``index`` subcommand's parser (for ``--help`` and early errors): IndexOptions' flags."""
    IndexOptions._add_argparse_args(parser)  # the hook Beam itself calls on every options class
    return parser


def _wants_dask(argv: list[str]) -> bool:
    for i, a in enumerate(argv):
        value = (
            a.split("=", 1)[1]
            if a.startswith("--runner=")
            else argv[i + 1]
            if a == "--runner" and i + 1 < len(argv)
            else None
        )
        if value is not None and value.lower().rsplit(".", 1)[-1] in ("dask", "daskrunner"):
            return True
    return False


def pipeline_options(argv: list[str]) -> PipelineOptions:
    """All of ``argv`` as pipeline options; unknown flags are an error (Beam itself only warns)."""
    if _wants_dask(argv):
        # DaskRunner's options (--dask_client_address, --dask_npartitions, ...) exist once its module is imported.
        from apache_beam.runners.dask.dask_runner import DaskOptions  # noqa: F401

    opts = PipelineOptions(argv)
    known = set(opts.get_all_options(retain_unknown_options=False))
    unknown = sorted(set(opts.get_all_options(retain_unknown_options=True)) - known)
    if unknown:
        flags = " ".join(f"--{u}" for u in unknown)
        raise ValueError(
            f"unknown option(s) {flags}: neither an edje-index flag nor a Beam pipeline "
            f"option (see 'edje-index index --help')"
        )
    standard = opts.view_as(StandardOptions)
    if not standard.runner:
        standard.runner = DEFAULT_RUNNER
    elif standard.runner.lower() in ("dask", "daskrunner"):  # Beam knows it only by its full name
        standard.runner = DASK_RUNNER
    return opts


def job_config(opts: PipelineOptions):
    """The typed job configuration of ``opts`` (model spec, worker settings, store choices)."""
    from edje_indexer.pipeline.job import JobConfig
    from edje_indexer.pipeline.presets import resolve_spec
    from edje_indexer.transforms.indexer import IndexSettings

    o = opts.view_as(IndexOptions)
    missing = [f"--{name}" for name in ("input", "store") if not getattr(o, name)]
    if missing:
        raise ValueError(f"edje-index index needs {' and '.join(missing)}")
    spec = resolve_spec(
        o.preset, o.backbone, o.weights, o.adapter, o.random_weights, o.random_adapter, o.jpeg_draft, o.decoder
    )
    settings = IndexSettings(
        batch_size=o.batch_size,
        decode_threads=o.decode_threads,
        decode_timeout_s=o.decode_timeout,
        device=o.device,
        precision=o.precision,
        compile=o.compile,
    )
    return JobConfig(
        input=o.input,
        store=o.store,
        spec=spec,
        quantization=o.quantize,
        id_policy=o.id_policy,
        settings=settings,
        force=o.force,
        lock_wait_s=o.lock_wait,
        beam_options=opts,
    )
