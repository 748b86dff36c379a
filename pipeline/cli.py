"""``edje-index``: one entry point, subcommands. ``main(argv)`` is callable from tests."""

from __future__ import annotations

import argparse
import json
import logging
import sys

import numpy as np


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="edje-index", description="Index WebDataset image shards into EDJE token stores.")
    p.add_argument("-v", "--verbose", action="store_true")
    sub = p.add_subparsers(dest="command", required=True)

    from edje_indexer.pipeline.flags import EPILOG, add_index_flags  # no Beam: store commands never import it

    add_index_flags(
        sub.add_parser(
            "index",
            help="index a corpus into a store (incremental)",
            epilog=EPILOG,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
    )

    ins = sub.add_parser("inspect", help="summarize a store; --html writes a report to open in a browser")
    ins.add_argument("store")
    ins.add_argument("--json", action="store_true")
    ins.add_argument(
        "--html",
        metavar="FILE",
        help="write a self-contained HTML report: segments, rejects with thumbnails, token statistics, integrity",
    )
    ins.add_argument("--deep", action="store_true", help="with --html: verify --deep (reads every token once)")
    ins.add_argument("--sample-rows", type=int, default=512, help="with --html: token rows sampled for statistics")

    rj = sub.add_parser("rejected", help="list the dead-letter rows (rejected samples) across segments")
    rj.add_argument("store")
    rj.add_argument("--reason", help="only this reason (e.g. decode_error; 'inspect' lists them)")
    rj.add_argument("--shard", help="only this shard (its URL or path)")
    fmt = rj.add_mutually_exclusive_group()
    fmt.add_argument("--json", action="store_true", help="a JSON list of rows")
    fmt.add_argument("--parquet", metavar="OUT", help="write the rows to a Parquet file")

    g = sub.add_parser("get", help="decoded tokens of one image (float32 [m, d])")
    g.add_argument("store")
    g.add_argument("id")
    g.add_argument("--out", help="write a .npy file instead of printing")

    v = sub.add_parser("verify", help="check a store's integrity; exit 1 on any problem")
    v.add_argument("store")
    v.add_argument("--deep", action="store_true", help="recompute the checksums of all token data")
    v.add_argument("--repair", action="store_true", help="remove uncommitted leftovers (takes the store lock)")
    v.add_argument("--json", action="store_true")

    rm = sub.add_parser("remove", help="remove committed shards from a store (explicitly)")
    rm.add_argument("store")
    rm.add_argument("--missing", action="store_true", help="every shard whose source no longer exists")
    rm.add_argument("--shard", action="append", default=[], help="a shard URL as recorded in its commit")

    up = sub.add_parser(
        "upgrade",
        help="write the job log and id index runs of a store from before them (the next index job also does)",
    )
    up.add_argument("store")

    from edje_indexer.rerank.cli import add_arguments as rerank_arguments  # light: no torch/transformers import

    rerank_arguments(
        sub.add_parser(
            "rerank",
            help="re-sort candidate images for a text query with the EDJE joint encoder (needs the [rerank] extra)",
        )
    )

    from edje_indexer.training.config import add_arguments as train_arguments  # light: no torch import

    train_arguments(
        sub.add_parser("train", help="train the EDJE adapter and joint encoder on a corpus (README: Quality)")
    )

    d = sub.add_parser("demo-corpus", help="write the built-in demo corpus (packaged sample photos)")
    d.add_argument("out")
    d.add_argument("--shards", type=int, default=3)
    return p


def _cmd_index(index_argv: list[str]) -> int:
    from edje_indexer.pipeline.job import run_job
    from edje_indexer.pipeline.options import IndexOptions, job_config, pipeline_options
    from edje_indexer.pipeline.summary import data_bytes_per_image
    from edje_indexer.schemas import Location

    opts = pipeline_options(index_argv)  # every flag, ours and Beam's: unknown ones are an error here
    args = opts.view_as(IndexOptions)
    cfg = job_config(opts)
    result = run_job(cfg)
    out = result.to_dict()
    # this job's segments only: a summary of the whole store would read every commit record
    out["bytes_per_image"] = data_bytes_per_image(Location(args.store), result.committed)
    if args.json:
        print(json.dumps(out, indent=1))
    else:
        print(
            f"shards: {out['shards_matched']} matched, {out['shards_processed']} processed "
            f"({out['shards_changed']} changed), {out['shards_skipped']} already committed, "
            f"{len(out['shards_failed'])} failed"
        )
        print(
            f"images: {out['images_indexed']} indexed, {out['images_rejected']} rejected"
            + (
                ": " + ", ".join(f"{k}={v}" for k, v in out["rejected_by_reason"].items())
                if out["rejected_by_reason"]
                else ""
            )
        )
        print(f"speed:  {out['images_per_s']} images/s over {out['seconds']} s")
        print(
            f"store:  {out['store_images']} images, {out['bytes_per_image']} bytes/image, "
            f"{out['store_duplicate_ids']} duplicate ids"
        )
        for f in out["shards_failed"]:
            print(f"FAILED shard {f['shard']}: {f['error']}", file=sys.stderr)
        for s in out["shards_incomplete"]:
            print(f"incomplete shard (truncated?) {s}", file=sys.stderr)
    if result.plan.todo and not result.committed and (result.failed or result.not_finished):
        print("error: no shard could be indexed", file=sys.stderr)
        return 2
    if result.not_finished:
        print(f"error: {len(result.not_finished)} shard(s) did not finish; run the same command again", file=sys.stderr)
        return 1
    return 0


def _cmd_verify(args) -> int:
    from edje_indexer.pipeline.lock import StoreLock
    from edje_indexer.pipeline.maintenance import remove_uncommitted
    from edje_indexer.pipeline.verify import verify
    from edje_indexer.schemas import Location, read_commits
    from edje_indexer.schemas.index import retired_paths

    removed = []
    if args.repair:
        loc = Location(args.store)
        with StoreLock(loc).acquire():
            removed = remove_uncommitted(loc, read_commits(loc), keep=retired_paths(loc))
    report = verify(args.store, deep=args.deep)
    report["repaired"] = removed
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        for rel in removed:
            print(f"removed {rel}")
        for p in report["problems"]:
            print(f"PROBLEM {p}")
        for w in report["warnings"]:
            print(f"warning {w}")
        print(
            f"{'ok' if report['ok'] else 'DAMAGED'}: {report['segments']} segment(s) checked"
            f"{' (deep)' if args.deep else ''}"
        )
    return 0 if report["ok"] else 1


def _cmd_upgrade(args) -> int:
    from edje_indexer.pipeline.finalize import finalize
    from edje_indexer.pipeline.lock import StoreLock
    from edje_indexer.schemas import Location, job_log, read_pointer
    from edje_indexer.schemas.store import open_metadata

    loc = Location(args.store)
    open_metadata(loc)  # a store, and one this version can read
    with StoreLock(loc).acquire() as lock:
        before = read_pointer(loc)
        logged = job_log.has_log(loc)
        done = finalize(loc, lock.token, None)  # every commit record, listed: what the log and index must hold
    ptr = done.pointer
    if logged and before is not None and before.format >= 2 and not done.added and not done.removed:
        print(f"{args.store}: already current (job log entry {done.state.seq}, {len(ptr.runs)} id index run(s))")
    else:
        print(
            f"{args.store}: job log at entry {done.state.seq}, id index generation {ptr.generation} "
            f"({ptr.images} images in {len(ptr.runs)} run(s), {ptr.duplicates_count} duplicate ids)"
        )
    return 0


def _cmd_remove(args) -> int:
    from edje_indexer.pipeline.lock import StoreLock
    from edje_indexer.pipeline.maintenance import missing_sources, remove_segments
    from edje_indexer.schemas import Location, read_commits

    loc = Location(args.store)
    with StoreLock(loc).acquire():
        commits = read_commits(loc)
        by_shard = {c.shard: s for s, c in commits.items()}
        shards = list(args.shard) + (missing_sources(commits) if args.missing else [])
        unknown = [s for s in shards if s not in by_shard]
        if unknown:
            raise ValueError(f"not committed in this store: {', '.join(unknown)}")
        if not shards:
            if not args.missing:
                raise ValueError("nothing to remove: pass --missing or --shard URL")
            print("no committed shard is missing from the corpus: nothing to remove")
            return 0
        remove_segments(loc, [by_shard[s] for s in shards])
    for s in shards:
        print(f"removed {s}")
    return 0


class _BeamImportNoise(logging.Filter):
    """Beam logs this through the root logger on import when Google's client libraries are absent (they are
    only for GCP I/O); it says nothing about this job."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.name == "root" and str(record.msg).startswith("apitools not found"))


def _cmd_inspect(args) -> int:
    from edje_indexer.pipeline.summary import format_summary, summarize

    if args.html:
        import time

        from edje_indexer.pipeline.report import write_report

        t0 = time.perf_counter()
        report = write_report(args.store, args.html, deep=args.deep, sample_rows=args.sample_rows)
        print(f"wrote {args.html} in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
        s = report["summary"]
    else:
        s = summarize(args.store)
    print(json.dumps(s, indent=1) if args.json else format_summary(s))
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    root = logging.getLogger()
    if not any(isinstance(f, _BeamImportNoise) for f in root.filters):
        root.addFilter(_BeamImportNoise())
    args, rest = _parser().parse_known_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    logging.getLogger("edje_indexer").setLevel(logging.INFO)  # progress lines; Beam's own chatter stays at WARNING
    if not args.verbose:  # dask.distributed logs every worker start and stop at INFO
        logging.getLogger("distributed").setLevel(logging.WARNING)
    if args.command != "index" and rest:
        _parser().error(f"unrecognized arguments: {' '.join(rest)}")
    try:
        if args.command == "index":
            return _cmd_index(argv[argv.index("index") + 1 :])
        if args.command == "inspect":
            return _cmd_inspect(args)
        if args.command == "rejected":
            from edje_indexer.pipeline.rejected import run as rejected_run

            return rejected_run(args)
        if args.command == "get":
            from edje_indexer.schemas.reader import TokenStore

            tokens = TokenStore.open(args.store).get([args.id])[0]
            if args.out:
                np.save(args.out, tokens)
                print(f"wrote {args.out}: float32 {list(tokens.shape)}")
            else:
                with np.printoptions(precision=4, threshold=20, edgeitems=3):
                    print(f"{args.id}: float32 {list(tokens.shape)}\n{tokens}")
            return 0
        if args.command == "verify":
            return _cmd_verify(args)
        if args.command == "remove":
            return _cmd_remove(args)
        if args.command == "upgrade":
            return _cmd_upgrade(args)
        if args.command == "rerank":
            from edje_indexer.rerank.cli import run as rerank_run

            return rerank_run(args)
        if args.command == "train":
            from edje_indexer.training.train import run as train_run

            return train_run(args)
        if args.command == "demo-corpus":
            from edje_indexer.pipeline.demo import build_demo_corpus

            for path in build_demo_corpus(args.out, args.shards):
                print(path)
            return 0
    except (ValueError, KeyError, FileNotFoundError, RuntimeError) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
        print(f"edje-index {args.command}: error: {msg}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
