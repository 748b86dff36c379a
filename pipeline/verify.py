"""``edje-index verify``: check a store against its own commit records."""

from __future__ import annotations

import io

import numpy as np
import pyarrow.parquet as pq
import zarr

from edje_indexer.pipeline.maintenance import find_uncommitted, missing_sources
from edje_indexer.schemas import id_runs, job_log, layout, quantization
from edje_indexer.schemas.index import (
    IndexDamaged,
    legacy_run,
    load_index,
    open_runs,
    read_commits,
    read_duplicates,
    read_pointer,
    retired_paths,
    runs_cover,
    segment_ids,
)
from edje_indexer.schemas.remote_rows import SHARD_INDEX_CRC, SHARD_INDEX_ENTRY
from edje_indexer.schemas.segment import ids_checksum, token_checksum
from edje_indexer.schemas.storage import Location
from edje_indexer.schemas.store import open_metadata


def chunk_problems(loc: Location, data_path: str, n: int, m: int, d: int, tok_dtype: np.dtype, quant: str) -> list[str]:
    """Each array's chunk file must exist with the size the layout implies (a missing chunk reads as zeros
    through zarr, silently). Token and scale files are one plain shard each; the ids chunk must exist."""
    if n == 0:
        return []
    out = []
    row_values = int(np.prod(quantization.stored_row_shape(quant, m, d)))  # int4: d / 2 bytes per token
    sizes = {layout.TOKENS: ((0, 0, 0), n * row_values * tok_dtype.itemsize)}
    if quantization.has_scales(quant):
        sizes[layout.SCALES] = ((0, 0), n * m * 2)
    for name, (key, data_bytes) in sizes.items():
        expected = data_bytes + n * SHARD_INDEX_ENTRY + SHARD_INDEX_CRC
        path = loc.path(data_path, name, "c", *map(str, key))
        try:
            size = loc.fs.size(path)
        except FileNotFoundError:
            out.append(f"{name} chunk file c/{'/'.join(map(str, key))} is missing")
            continue
        if size != expected:
            out.append(f"{name} chunk file has {size} bytes, the layout implies {expected}")
    if not loc.exists(data_path, layout.IDS, "c", "0"):
        out.append("ids chunk file c/0 is missing")
    return out


def check_index_files(loc: Location, ptr) -> None:
    """IndexDamaged unless every file of the published generation has the sha256 it was written with (reads
    them all, a block at a time: readers check only small run files at open, see schemas/index.py)."""
    for name in ptr.files():
        want = ptr.checksums.get(name)
        if want is None:
            continue
        if loc.sha256(layout.INDEX, name) != want:
            raise IndexDamaged(f"id index file {loc.url_of(layout.INDEX, name)} does not match its checksum (damaged)")


def log_problems(loc: Location, commits: dict) -> tuple[list[str], list[str], set[str]]:
    """What the job log says against the commit records (the truth), and the segments committed by a job
    that did not finish, which the log (and so the index) does not hold yet."""
    if not job_log.has_log(loc):
        return [], ["no job log yet (a store from before it, or before its first job finished)"], set()
    try:
        state = job_log.read_state(loc)
    except (ValueError, OSError) as e:
        return [f"the job log is unusable: {e}"], [], set()
    problems, warnings, unlogged = [], [], set()
    pending = set().union(*state.unfinished.values()) if state.unfinished else set()
    for seg, c in commits.items():
        logged = state.get(seg)
        if logged is not None and logged.data_path == c.data_path:
            continue
        if seg in pending:
            unlogged.add(seg)
            warnings.append(
                f"segment {seg} is committed but not logged yet (a job that did not finish): the next job logs it"
            )
        else:
            said = logged.data_path if logged else "nothing"
            problems.append(f"segment {seg}: the job log says {said}, the commit record {c.data_path}")
    for seg in state:
        if seg not in commits:
            problems.append(f"segment {seg} is in the job log but has no commit record")
    ptr = read_pointer(loc)
    if ptr is not None and ptr.format >= 2 and ptr.log_seq > state.seq:
        problems.append(f"the id index reflects log entry {ptr.log_seq}, past the log's end ({state.seq})")
    return problems, warnings, unlogged


def index_problems(loc: Location, covered: dict, deep: bool) -> tuple[list[str], list[str]]:
    """The id index against the segments it must cover. Memory stays bounded by one segment's ids and a
    batch of index entries, whatever the store's size: a format-2 index is looked up in its memory-mapped runs
    (schemas/id_runs.py), never merged into one table (a format-1 index, from small stores before runs, is
    loaded whole). Plain: the ids it serves plus the duplicates it lists must be the stored rows. Deep: every
    stored row's id is looked up, and must be served from that very row or from an earlier occurrence of the
    same id (a duplicate); the rows served from where they are must be as many as the ids the index serves,
    so no entry points at a row that holds another id."""
    problems: list[str] = []
    warnings: list[str] = []
    if not loc.exists(layout.INDEX, layout.INDEX_POINTER):
        return ["no id index (index/CURRENT.json): run the same index command again to finalize"], []
    try:
        ptr = read_pointer(loc)
        check_index_files(loc, ptr)
        if ptr.format >= 2:
            runs, duplicates = open_runs(loc, ptr), read_duplicates(loc, ptr).num_rows
            published = runs_cover(ptr, runs, covered)
        else:
            index = load_index(loc, covered)
            runs, duplicates, published = [legacy_run(index, covered)], index.duplicates.num_rows, index.published
        served = id_runs.served_count(runs)
    except (ValueError, OSError) as e:  # a damaged index file or pointer
        return [f"the id index is unusable: {e}"], []
    if not published:
        problems.append("the id index does not cover every committed segment: run the index command again")
    stored_rows = sum(c.rows for c in covered.values())
    if served + duplicates != stored_rows:
        problems.append(f"the id index holds {served + duplicates} rows, the segments {stored_rows}")
    elif deep:
        row_problems, at_home, duplicate_rows = rows_against_index(loc, runs, covered)
        problems += row_problems
        if not row_problems and at_home != served:
            problems.append(
                f"the id index serves {served} ids, {at_home} of them from a row that holds that id: "
                f"{served - at_home} entries point at rows that hold another id"
            )
        if not row_problems and duplicate_rows != duplicates:
            problems.append(
                f"the segments hold {duplicate_rows} duplicate occurrence(s), the id index lists {duplicates}"
            )
    if duplicates:
        warnings.append(
            f"{duplicates} duplicate id(s); the first occurrence of each is served "
            f"(listed in index/{', index/'.join(n for n in ptr.files() if 'duplicates' in n)})"
        )
    return problems, warnings


def rows_against_index(loc: Location, runs: list, covered: dict) -> tuple[list[str], int, int]:
    """(problems, rows served from where they are, rows that are later occurrences of an id served from
    earlier), looking every stored row's id up in ``runs``, one segment at a time."""
    lookup = id_runs.Lookup(runs)
    names = [r.segments["segment"].to_pylist() for r in runs]  # per run: its segment table, by row
    code_in = [{name: code for code, name in enumerate(n)} for n in names]
    problems: list[str] = []
    at_home = duplicate_rows = 0
    for seg in sorted(covered):
        try:
            stored = segment_ids(loc, covered[seg].data_path)
        except (KeyError, FileNotFoundError, ValueError, OSError) as e:
            problems.append(f"the ids of segment {seg} are unreadable: {type(e).__name__}: {e}")
            continue
        which, pos, _ = lookup.find(stored.tolist())
        home = np.zeros(len(stored), bool)
        for r in np.unique(which[which >= 0]).tolist():
            pick = np.flatnonzero(which == r)
            run = runs[r]
            home[pick] = (run.segment[pos[pick]] == code_in[r].get(seg, -1)) & (run.row[pos[pick]] == pick)
        at_home += int(home.sum())
        missing = np.flatnonzero(which < 0)
        if len(missing):
            problems.append(
                f"segment {seg}: {len(missing)} stored id(s) are not in the id index (first: {stored[missing[0]]!r})"
            )
        wrong = []
        for row in np.flatnonzero(~home & (which >= 0)).tolist():
            run, p = runs[int(which[row])], int(pos[row])
            where = (names[int(which[row])][int(run.segment[p])], int(run.row[p]))
            if where < (seg, row) and where[0] in covered and where[1] < covered[where[0]].rows:
                duplicate_rows += 1  # a later occurrence; the first one is served (checked when its row is read)
            else:
                wrong.append((stored[row], where))
        if wrong:
            (id_, (other, other_row)), more = wrong[0], len(wrong) - 1
            problems.append(
                f"segment {seg}: the id index serves id {id_!r} from segment {other} row {other_row}, which is "
                f"neither this row nor an earlier occurrence" + (f" ({more} more such id(s))" if more else "")
            )
    return problems, at_home, duplicate_rows


def verify(url: str, deep: bool = False) -> dict:
    """Problems (the store is damaged) and warnings (it is fine but worth knowing)."""
    loc = Location(url)
    problems: list[str] = []
    warnings: list[str] = []
    meta = open_metadata(loc)
    m, d = meta.tokens_per_image, meta.token_dim
    quant = meta.quantization
    tok_dtype = np.dtype(meta.token_encoding["tokens_dtype"])
    unusable: list[tuple[str, str]] = []
    commits = read_commits(loc, unreadable=unusable)
    for name, why in unusable:
        problems.append(f"{name}: unusable commit record, refused everywhere else: {why}")
    for seg, c in sorted(commits.items()):
        where = f"segment {seg} ({c.shard})"
        if c.identity_sha256 != meta.identity_sha256():
            problems.append(f"{where}: written by another model or settings than the store's")
        n = c.rows
        if c.accounting_error():
            problems.append(f"{where}: {c.accounting_error()}")
        try:
            group = zarr.open_group(loc.url_of(c.data_path), mode="r")
            stored_shape = (n, *quantization.stored_row_shape(quant, m, d))  # int4: [n, m, d / 2], packed
            arrays = {layout.TOKENS: (stored_shape, tok_dtype), layout.IDS: ((n,), None)}
            if quantization.has_scales(quant):
                arrays[layout.SCALES] = ((n, m), np.dtype("float16"))
            for name, (shape, dtype) in arrays.items():
                arr = group[name]
                if arr.shape != shape or (dtype is not None and arr.dtype != dtype):
                    problems.append(f"{where}: {name} is {arr.shape} {arr.dtype}, the commit says {shape} {dtype}")
            problems += [f"{where}: {p}" for p in chunk_problems(loc, c.data_path, n, m, d, tok_dtype, quant)]
            if deep:
                for name in arrays:
                    data = group[name][...]
                    got = (
                        ids_checksum(data.tolist(), c.checksum_version) if name == layout.IDS else token_checksum(data)
                    )
                    if got != c.checksums.get(name):
                        problems.append(f"{where}: {name} data does not match the checksum recorded at commit")
        except (KeyError, FileNotFoundError, ValueError, OSError) as e:
            problems.append(f"{where}: data unreadable: {type(e).__name__}: {e}")
        if c.rejected:
            if not loc.exists(*layout.rejected_path(c.data_path)):
                problems.append(f"{where}: dead-letter table missing ({c.rejected} rejected samples)")
            else:
                rows = pq.read_metadata(io.BytesIO(loc.read_bytes(*layout.rejected_path(c.data_path)))).num_rows
                if rows != c.rejected:
                    problems.append(f"{where}: dead-letter table has {rows} rows, the commit says {c.rejected}")
        if not c.complete:
            warnings.append(f"{where}: shard was incomplete when read ({c.incomplete_reason})")

    problems_log, warnings_log, unlogged = log_problems(loc, commits)
    problems += problems_log
    warnings += warnings_log
    covered = {s: c for s, c in commits.items() if s not in unlogged}  # what the index must cover
    problems_index, warnings_index = index_problems(loc, covered, deep)
    problems += problems_index
    warnings += warnings_index
    leftovers = find_uncommitted(loc, commits, keep=retired_paths(loc))
    if leftovers:
        problems.append(f"{len(leftovers)} uncommitted leftover(s) (run 'verify --repair'): {', '.join(leftovers[:5])}")
    gone = missing_sources(commits)
    if gone:
        warnings.append(
            f"{len(gone)} committed shard(s) no longer exist in the corpus (remove them with "
            f"'edje-index remove STORE --missing'): {', '.join(gone[:5])}"
        )
    if loc.exists(layout.LOCK):
        warnings.append("a job holds (or held) the store lock; results may change while it runs")
    return {
        "store": url,
        "segments": len(commits),
        "deep": deep,
        "ok": not problems,
        "problems": problems,
        "warnings": warnings,
    }
