"""The indexing job: plan, launch the Beam graph, finalize the index, report.

Everything that touches store-level state (metadata, index, lock) happens
here, in the launcher, before or after the distributed part; workers only
write the segments they own.
"""

from __future__ import annotations

import collections
import datetime as dt
import logging
import threading
import time
from dataclasses import dataclass, field

import apache_beam as beam
import zarr
from apache_beam.metrics import Metrics
from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions

from edje_indexer.pipeline.lock import StoreLock
from edje_indexer.pipeline.plan import Plan, expand_pattern, plan
from edje_indexer.schemas import layout, quantization
from edje_indexer.schemas.index import load_index, read_commits, write_index
from edje_indexer.pipeline.maintenance import remove_uncommitted, retire
from edje_indexer.schemas.storage import Location
from edje_indexer.schemas.store import open_metadata
from edje_indexer.transforms.encode import ModelSpec, TokenEncoder, load_model_cached
from edje_indexer.transforms.indexer import SOFTWARE_VERSION, IndexSettings, ShardTask, index_shard
from edje_indexer.transforms.shards import check_id_policy

log = logging.getLogger(__name__)

# FnApiRunner is Beam's in-process runner; naming it avoids DirectRunner's
# attempt to download the Prism binary first.
DEFAULT_RUNNER = "FnApiRunner"


class StoreMismatch(ValueError):
    pass


class NoShards(ValueError):
    pass


def store_metadata(model_identity: dict, quant: str, id_policy: str) -> dict:
    return {
        "schema_version": layout.SCHEMA_VERSION,
        "model": model_identity,
        "quantization": quant,
        "id_policy": id_policy,
        "token_encoding": quantization.ENCODINGS[quant],
        "software_version": SOFTWARE_VERSION,
        "created_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }


def prepare_store(loc: Location, metadata: dict) -> dict:
    """Create the store (metadata first, by the launcher alone) or check it matches the job."""
    if loc.exists("zarr.json"):
        stored = open_metadata(loc)
        diff = layout.identity_diff(layout.identity_of(stored), layout.identity_of(metadata))
        if diff:
            raise StoreMismatch(
                f"store {loc.url} was built with another model or settings; refusing to write into it:\n  "
                + "\n  ".join(diff) + "\nUse a new --store, or the store's own settings.")
        return stored
    root = zarr.open_group(loc.url, mode="a", zarr_format=3, attributes={layout.METADATA_KEY: metadata})
    root.create_group(layout.SEGMENTS)
    return metadata


_ENCODERS: dict[tuple, TokenEncoder] = {}
_ENCODERS_LOCK = threading.Lock()


def encoder_cached(spec: ModelSpec, quant: str, device: str, precision: str | None, compile: bool,
                   batch_size: int) -> TokenEncoder:
    key = (spec, quant, device, precision, compile, batch_size)
    with _ENCODERS_LOCK:
        if key not in _ENCODERS:
            _ENCODERS[key] = TokenEncoder(load_model_cached(spec), quant, device, precision, compile, batch_size)
        return _ENCODERS[key]


class IndexShardFn(beam.DoFn):
    """One shard in, its commit (or failure) record out. The model loads once per process."""

    def __init__(self, spec: ModelSpec, settings: IndexSettings, device: str, precision: str | None, compile: bool):
        self.spec, self.settings = spec, settings
        self.device, self.precision, self.compile = device, precision, compile
        self.images = Metrics.counter("edje", "images_indexed")
        self.rejected = Metrics.counter("edje", "images_rejected")
        self.shards = Metrics.counter("edje", "shards_committed")
        self.failed = Metrics.counter("edje", "shards_failed")
        self.shard_seconds = Metrics.distribution("edje", "shard_ms")

    def setup(self):
        self.encoder = encoder_cached(self.spec, self.settings.quantization, self.device, self.precision, self.compile,
                                      self.settings.batch_size)
        meta = store_metadata(self.encoder.model.identity, self.settings.quantization, self.settings.id_policy)
        if layout.identity_hash(meta) != self.settings.identity_sha256:
            raise RuntimeError(
                "this worker built a different model than the launcher (weights or library versions differ); "
                "install the same versions of torch/timm on workers, or ship weights files rather than random init")

    def process(self, task: ShardTask):
        t = time.perf_counter()
        rec = index_shard(task, self.encoder, self.settings)
        if rec.get("failed"):
            self.failed.inc()
        else:
            self.shards.inc()
            self.images.inc(rec["indexed"])
            self.rejected.inc(rec["rejected"])
        self.shard_seconds.update(int(1000 * (time.perf_counter() - t)))
        yield {k: rec.get(k) for k in ("segment", "indexed", "rejected", "failed")}


@dataclass
class JobConfig:
    input: str
    store: str
    spec: ModelSpec
    quantization: str = "fp16"
    id_policy: str = "key"
    batch_size: int = 32
    decode_threads: int = 0  # 0: one per worker core, at most 16
    decode_timeout_s: float = 60.0
    device: str = "cpu"
    precision: str | None = None
    compile: bool = False
    force: bool = False
    lock_wait_s: float = 0.0
    progress_every_s: float = 10.0
    beam_args: list[str] = field(default_factory=list)


@dataclass
class JobResult:
    shards_matched: int
    plan: Plan
    committed: list[dict]
    failed: list[dict]
    not_finished: list[str]
    seconds: float
    index_images: int
    duplicates: int

    @property
    def indexed(self) -> int:
        return sum(r["indexed"] for r in self.committed)

    @property
    def rejected_by_reason(self) -> dict:
        c = collections.Counter()
        for r in self.committed:
            c.update(r["rejected_by_reason"])
        return dict(sorted(c.items()))

    def to_dict(self) -> dict:
        return {
            "shards_matched": self.shards_matched,
            "shards_processed": len(self.plan.todo),
            "shards_skipped": len(self.plan.skipped),
            "shards_changed": len(self.plan.changed),
            "shards_committed": len(self.committed),
            "shards_failed": [{"shard": f["shard"], "error": f"{f['error_type']}: {f['message']}"} for f in self.failed],
            "shards_not_finished": self.not_finished,
            "shards_incomplete": [r["shard"] for r in self.committed if not r["complete"]],
            "images_indexed": self.indexed,
            "images_rejected": sum(self.rejected_by_reason.values()),
            "rejected_by_reason": self.rejected_by_reason,
            "seconds": round(self.seconds, 3),
            "images_per_s": round(self.indexed / self.seconds, 2) if self.seconds > 0 else None,
            "store_images": self.index_images,
            "store_duplicate_ids": self.duplicates,
        }


def _progress(loc: Location, todo: dict[str, ShardTask], stop: threading.Event, every_s: float, t0: float):
    seen: dict[str, int] = {}
    while not stop.wait(every_s):
        try:
            for name in loc.list(layout.COMMITS):
                seg = name[:-5]
                if seg in todo and seg not in seen:
                    rec = loc.read_json(layout.COMMITS, name)
                    if rec.get("data_path") == todo[seg].data_path:
                        seen[seg] = rec["indexed"]
        except (OSError, ValueError):
            continue
        n = sum(seen.values())
        el = time.perf_counter() - t0
        log.info("progress: %d/%d shards committed, %d images, %.1f images/s", len(seen), len(todo), n, n / el)


def _unknown_beam_args(beam_args: list[str]) -> list[str]:
    """The arguments no Beam options class defines (Beam itself only warns about them)."""
    import argparse

    def subclasses(cls):
        for sub in cls.__subclasses__():
            yield sub
            yield from subclasses(sub)

    parser = argparse.ArgumentParser(allow_abbrev=False, conflict_handler="resolve")
    for cls in set(subclasses(PipelineOptions)):
        cls._add_argparse_args(parser)
    return [a for a in parser.parse_known_args(beam_args)[1] if a.startswith("-")]


def beam_options(beam_args: list[str]) -> PipelineOptions:
    unknown = _unknown_beam_args(beam_args)
    if unknown:
        raise ValueError(f"unknown option(s) {' '.join(unknown)}: neither an edje-index flag nor a Beam pipeline "
                         f"option (see 'edje-index index --help')")
    opts = PipelineOptions(beam_args)
    if not opts.view_as(StandardOptions).runner:
        opts.view_as(StandardOptions).runner = DEFAULT_RUNNER
    return opts


def run_job(cfg: JobConfig) -> JobResult:
    quantization.check_quantization(cfg.quantization)
    check_id_policy(cfg.id_policy)
    if cfg.batch_size < 1 or cfg.decode_threads < 0:
        raise ValueError("--batch-size must be at least 1 and --decode-threads at least 0 (0: one per core)")
    urls = expand_pattern(cfg.input)
    if not urls:
        raise NoShards(f"--input {cfg.input!r} matched no shards (quote the pattern so the shell does not expand it)")
    log.info("input pattern matched %d shard(s)", len(urls))
    beam_opts = beam_options(cfg.beam_args)  # validate Beam flags before any work

    model = load_model_cached(cfg.spec)  # launcher-side, on the CPU: the identity the store records
    metadata = store_metadata(model.identity, cfg.quantization, cfg.id_policy)
    settings = IndexSettings(store=cfg.store, quantization=cfg.quantization, identity_sha256=layout.identity_hash(metadata),
                             id_policy=cfg.id_policy, batch_size=cfg.batch_size, decode_threads=cfg.decode_threads,
                             decode_timeout_s=cfg.decode_timeout_s)
    loc = Location(cfg.store)
    with StoreLock(loc).acquire(wait_s=cfg.lock_wait_s) as lock:
        prepare_store(loc, metadata)
        the_plan = plan(urls, read_commits(loc), force=cfg.force)
        log.info("plan: %d to index (%d changed), %d already committed", len(the_plan.todo), len(the_plan.changed),
                 len(the_plan.skipped))
        t0 = time.perf_counter()
        if the_plan.todo:
            todo = {t.segment: t for t in the_plan.todo}
            stop = threading.Event()
            threading.Thread(target=_progress, args=(loc, todo, stop, cfg.progress_every_s, t0), daemon=True).start()
            try:
                with beam.Pipeline(options=beam_opts) as p:
                    _ = (p
                         | "ListShards" >> beam.Create(the_plan.todo)
                         | "SpreadShards" >> beam.Reshuffle()
                         | "IndexShard" >> beam.ParDo(IndexShardFn(cfg.spec, settings, cfg.device, cfg.precision,
                                                                   cfg.compile)))
            finally:
                stop.set()
        seconds = time.perf_counter() - t0
        lock.check()  # the store-level writes below need the lock still ours
        commits = read_commits(loc)
        index = load_index(loc, commits)
        retired = retire([t.replaces for t in the_plan.todo
                          if t.replaces and commits.get(t.segment, {}).get("data_path") == t.data_path])
        if not index.published or retired:
            index = write_index(loc, index, retired)
        removed = remove_uncommitted(loc, commits, keep=retired)
        if removed:
            log.info("removed %d uncommitted leftover(s) of earlier attempts: %s", len(removed), ", ".join(removed[:5]))
    committed, failed, not_finished = [], [], []
    for t in the_plan.todo:
        rec = commits.get(t.segment)
        if rec is not None and rec["data_path"] == t.data_path:
            committed.append(rec)
        elif loc.exists(*layout.failed_path(t.segment)):
            failed.append(loc.read_json(*layout.failed_path(t.segment)))
        else:
            not_finished.append(t.url)
    return JobResult(len(urls), the_plan, committed, failed, not_finished, seconds, index.table.num_rows,
                     index.duplicates.num_rows)
