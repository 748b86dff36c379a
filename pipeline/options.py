"""The ``index`` job's flags: one Beam ``PipelineOptions`` subclass, the Beam idiom.

``edje-index index`` hands its whole command line to ``PipelineOptions``, so
the project's flags and Beam's (``--runner``, worker options) are one set of
pipeline options that travel with the job. :func:`job_config` turns them into
the typed :class:`pipeline.job.JobConfig`. Each flag is defined once, in the
Beam-free :mod:`pipeline.flags` (the command line's parser uses it without
importing Beam).
"""

from __future__ import annotations

import argparse

from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions

from edje_indexer.pipeline.flags import DASK_RUNNER, DEFAULT_RUNNER, EPILOG, add_index_flags

__all__ = ["DASK_RUNNER", "DEFAULT_RUNNER", "EPILOG", "IndexOptions", "add_index_arguments", "job_config"]


class IndexOptions(PipelineOptions):
    """Flags of ``edje-index index`` (none is ``required=``: Beam parses them on workers too)."""

    @classmethod
    def _add_argparse_args(cls, parser: argparse.ArgumentParser) -> None:
        add_index_flags(parser)


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
    from edje_indexer.schemas.quantization import with_int4_rotation
    from edje_indexer.transforms.indexer import IndexSettings

    o = opts.view_as(IndexOptions)
    missing = [f"--{name}" for name in ("input", "store") if not getattr(o, name)]
    if missing:
        raise ValueError(f"edje-index index needs {' and '.join(missing)}")
    spec = resolve_spec(
        o.preset,
        o.backbone,
        o.weights,
        o.adapter,
        o.random_weights,
        o.random_adapter,
        o.jpeg_draft,
        o.decoder,
        checkpoint=o.checkpoint,
        backbone_kwargs=o.backbone_kwargs,
        adapter_activation=o.adapter_activation,
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
        quantization=with_int4_rotation(o.quantize, o.int4_rotation),
        id_policy=o.id_policy,
        settings=settings,
        force=o.force,
        lock_wait_s=o.lock_wait,
        beam_options=opts,
    )
