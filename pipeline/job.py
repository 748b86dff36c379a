"""The indexing job: plan, launch the Beam graph, finalize the index, report.

Everything that touches store-level state (metadata, index, lock) happens
here, in the launcher, before or after the distributed part; workers only
write the segments they own (transforms/index_shards.py).
"""

from __future__ import annotations

import collections
import contextlib
import logging
import threading
import time
from dataclasses import dataclass, field

import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions

from edje_indexer.pipeline.finalize import finalize
from edje_indexer.pipeline.lock import StoreLock
from edje_indexer.pipeline.maintenance import remove_leftovers
from edje_indexer.pipeline.options import pipeline_options
from edje_indexer.pipeline.plan import Plan, expand_pattern, plan
from edje_indexer.pipeline.progress import JobProgress, TerminalBar, progress_line, stderr_is_terminal
from edje_indexer.schemas import job_log, quantization
from edje_indexer.schemas.records import CommitRecord, FailureRecord, ShardTask
from edje_indexer.schemas.segment import read_failure
from edje_indexer.schemas.storage import Location
from edje_indexer.schemas.store import StoreMismatch, create_or_check, new_metadata
from edje_indexer.transforms.index_shards import IndexShards
from edje_indexer.transforms.indexer import IndexSettings
from edje_indexer.transforms.model import ModelSpec, shared_model
from edje_indexer.transforms.shards import check_id_policy

log = logging.getLogger(__name__)

__all__ = ["JobConfig", "JobResult", "NoShards", "StoreMismatch", "run_job"]


class NoShards(ValueError):
    pass


@dataclass(frozen=True)
class JobConfig:
    """One ``edje-index index`` run (pipeline/options.py builds it from the command line)."""

    input: str
    store: str
    spec: ModelSpec
    quantization: str = "fp16"
    id_policy: str = "key"
    settings: IndexSettings = field(default_factory=IndexSettings)
    force: bool = False
    lock_wait_s: float = 0.0
    progress_every_s: float = 10.0
    beam_options: PipelineOptions | None = None  # default: FnApiRunner, in-process
    dask_local_workers: int = 0  # DaskRunner without an address: start a local cluster of this many processes


@dataclass
class JobResult:
    shards_matched: int
    plan: Plan
    committed: list[CommitRecord]
    failed: list[FailureRecord]
    not_finished: list[str]
    seconds: float
    index_images: int
    duplicates: int

    @property
    def indexed(self) -> int:
        return sum(r.indexed for r in self.committed)

    @property
    def rejected_by_reason(self) -> dict:
        c = collections.Counter()
        for r in self.committed:
            c.update(r.rejected_by_reason)
        return dict(sorted(c.items()))

    def to_dict(self) -> dict:
        return {
            "shards_matched": self.shards_matched,
            "shards_processed": len(self.plan.todo),
            "shards_skipped": len(self.plan.skipped),
            "shards_changed": len(self.plan.changed),
            "shards_committed": len(self.committed),
            "shards_failed": [{"shard": f.shard, "error": f.error} for f in self.failed],
            "shards_not_finished": self.not_finished,
            "shards_incomplete": [r.shard for r in self.committed if not r.complete],
            "images_indexed": self.indexed,
            "images_rejected": sum(self.rejected_by_reason.values()),
            "rejected_by_reason": self.rejected_by_reason,
            "seconds": round(self.seconds, 3),
            "images_per_s": round(self.indexed / self.seconds, 2) if self.seconds > 0 else None,
            "store_images": self.index_images,
            "store_duplicate_ids": self.duplicates,
        }


def _progress(
    loc: Location, todo: dict[str, ShardTask], stop: threading.Event, every_s: float, t0: float, bar: bool | None = None
):
    """This job's committed (and failed) shards, from the store's records, so the same on every runner: a live
    bar while stderr is a terminal (``bar``: None decides so), else a log line every ``every_s``."""
    try:
        progress = JobProgress(loc, todo, t0)
    except (OSError, ValueError) as e:
        log.warning("no progress reports: %s", e)
        return
    if not (stderr_is_terminal() if bar is None else bar):
        while not stop.wait(every_s):
            try:
                log.info("%s", progress_line(progress.poll()))
            except (OSError, ValueError):  # a record being replaced, a flaky listing: next time
                continue
        return
    poll_every = min(every_s, 1.0 if loc.is_local else 5.0)  # object stores: a listing costs a request
    last_poll = -float("inf")
    with TerminalBar() as terminal:
        while True:
            stopped = stop.wait(0.5)
            snap = progress.snapshot()
            if stopped or time.perf_counter() - last_poll >= poll_every:
                last_poll = time.perf_counter()
                try:
                    snap = progress.poll()
                except (OSError, ValueError):
                    pass
            terminal.show(snap)
            if stopped:
                return


@contextlib.contextmanager
def runner_context(opts: PipelineOptions, n_tasks: int, dask_local_workers: int = 0):
    """What a runner needs around the pipeline run. Beam's DaskRunner: one partition per shard unless the
    user chose (without ``--dask_npartitions`` its ``Create`` puts every shard in one partition, so one
    worker runs them all), and a local cluster when asked for (``--dask-local-workers N``)."""
    runner = opts.view_as(StandardOptions).runner
    if not str(runner).lower().endswith(("daskrunner", "dask")):
        if dask_local_workers:
            raise ValueError("--dask-local-workers needs --runner DaskRunner")
        yield
        return
    import distributed.client
    from apache_beam.runners.dask.dask_runner import DaskOptions

    dask_opts = opts.view_as(DaskOptions)
    if not dask_opts.npartitions and not dask_opts.partition_size:
        dask_opts.npartitions = max(1, n_tasks)
    before = set(distributed.client._global_clients)
    with contextlib.ExitStack() as stack:
        if dask_local_workers and not dask_opts.address:
            log.info("starting a local dask cluster of %d worker process(es) on 127.0.0.1", dask_local_workers)
            cluster = stack.enter_context(
                distributed.LocalCluster(
                    n_workers=dask_local_workers,
                    threads_per_worker=1,
                    processes=True,
                    host="127.0.0.1",
                    dashboard_address=None,
                )
            )
            dask_opts.address = cluster.scheduler_address
            stack.callback(setattr, dask_opts, "address", None)
        try:
            yield
        finally:
            # Beam's DaskRunner opens a Client per run and never closes it (it would keep reconnecting).
            for key in set(distributed.client._global_clients) - before:
                client = distributed.client._global_clients.get(key)
                if client is not None:
                    client.close()


def run_job(cfg: JobConfig) -> JobResult:
    quantization.check_quantization(cfg.quantization)
    check_id_policy(cfg.id_policy)
    urls = expand_pattern(cfg.input)
    if not urls:
        raise NoShards(f"--input {cfg.input!r} matched no shards (quote the pattern so the shell does not expand it)")
    log.info("input pattern matched %d shard(s)", len(urls))
    beam_opts = cfg.beam_options or pipeline_options([])

    # Launcher-side, on the CPU: the identity the store records (shared with in-process workers).
    metadata = new_metadata(shared_model(cfg.spec).identity, cfg.quantization, cfg.id_policy)
    loc = Location(cfg.store)
    with StoreLock(loc).acquire(wait_s=cfg.lock_wait_s) as lock:
        metadata = create_or_check(loc, metadata)
        state = job_log.read_state(loc)  # O(1 + log entries since the last checkpoint) reads
        dead_jobs_segments = sorted(set().union(*state.unfinished.values())) if state.unfinished else []
        if state.unfinished:  # a job died after its "begin": log what it committed before planning on it
            log.info("recovering %d unfinished job(s) from the job log", len(state.unfinished))
            state = finalize(loc, lock.token, [], state=state).state
        the_plan = plan(urls, state, force=cfg.force, job_id=lock.token)
        log.info(
            "plan: %d to index (%d changed), %d already committed",
            len(the_plan.todo),
            len(the_plan.changed),
            len(the_plan.skipped),
        )
        t0 = time.perf_counter()
        planned = [t.segment for t in the_plan.todo]
        if the_plan.todo:
            job_log.begin(loc, state, lock.token, planned)  # what a crash from here on may leave committed
            todo = {t.segment: t for t in the_plan.todo}
            stop = threading.Event()
            reporter = threading.Thread(
                target=_progress, args=(loc, todo, stop, cfg.progress_every_s, t0), daemon=True, name="progress"
            )
            reporter.start()
            try:
                with runner_context(beam_opts, len(the_plan.todo), cfg.dask_local_workers):
                    with beam.Pipeline(options=beam_opts) as p:
                        _ = p | "IndexShards" >> IndexShards(the_plan.todo, cfg.store, metadata, cfg.spec, cfg.settings)
            finally:
                stop.set()
                reporter.join(timeout=10)  # the bar's last state is drawn before the summary is printed
        seconds = time.perf_counter() - t0
        lock.check()  # the store-level writes below need the lock still ours
        # No attempt of this job may commit from here on, so what is committed now is final and an
        # uncommitted folder of this job is garbage (a late attempt's lease check fails).
        lock.close_commits()
        done = finalize(loc, lock.token, planned, state=state)
        commits = done.state
        removed = remove_leftovers(loc, sorted(set(planned) | set(dead_jobs_segments)), commits, keep=done.retired)
        if removed:
            log.info("removed %d uncommitted leftover(s) of earlier attempts: %s", len(removed), ", ".join(removed[:5]))
    committed, failed, not_finished = [], [], []
    for t in the_plan.todo:
        rec = commits.get(t.segment)
        if t.done_by(rec):
            committed.append(rec)
        elif (failure := read_failure(loc, t.segment)) is not None:
            failed.append(failure)
        else:
            not_finished.append(t.url)
    return JobResult(
        len(urls),
        the_plan,
        committed,
        failed,
        not_finished,
        seconds,
        done.pointer.images,
        done.pointer.duplicates_count,
    )
