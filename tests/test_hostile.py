"""Every image accounted for: the hostile corpus (tests/hostile.py) through the real job.

Three jobs in all, each run once per module: sample-level cases (two
shards), shard-level cases (one healthy shard beside broken ones), and a
corpus with no readable shard. Each case then checks its own outcome: the id
is in the store, or there is exactly one dead-letter row naming it, its
shard, member, stage, reason and error type; a shard is committed (complete
or flagged incomplete) or has a failure record.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import resource
import time
from pathlib import Path
from types import SimpleNamespace

import hostile as H
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from webdataset.tariterators import base_plus_ext

from edje_indexer.pipeline.cli import main
from edje_indexer.pipeline.presets import PRESETS
from edje_indexer.pipeline.summary import summarize
from edje_indexer.schemas import layout
from edje_indexer.schemas.reader import TokenStore
from edje_indexer.transforms.decoders import DecodeRejected, decode_image
from edje_indexer.transforms.shards import IMAGE_EXTENSIONS

PP = PRESETS["tiny"].preprocess

# Stored tokens are fp16; two images with identical pixels may still land in
# batches of different sizes, so "equal" allows a few fp16 ulps. Different
# images differ by far more (checked against MIN_DIFFERENT in each test).
SAME_ATOL = 5e-3
MIN_DIFFERENT = 0.1


def run_cli(argv: list[str]) -> SimpleNamespace:
    out, err = io.StringIO(), io.StringIO()
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(argv)
    return SimpleNamespace(rc=rc, stdout=out.getvalue(), stderr=err.getvalue(), seconds=time.perf_counter() - t0)


def index(pattern: str, store: Path, *extra: str) -> SimpleNamespace:
    res = run_cli(["index", "--input", pattern, "--store", str(store), "--preset", "tiny", "--json", *extra])
    res.summary = json.loads(res.stdout) if res.rc == 0 or res.stdout.strip().startswith("{") else None
    return res


def read_store_records(store: Path) -> SimpleNamespace:
    """Commit records, failure records and dead-letter rows, keyed by shard file name."""

    def by_shard(folder: str) -> dict[str, dict]:
        d = store / folder
        recs = [json.loads(p.read_text()) for p in sorted(d.glob("*.json"))] if d.exists() else []
        return {Path(r["shard"]).name: r for r in recs}

    rej_dir = store / layout.REJECTED
    tables = [pq.read_table(p) for p in sorted(rej_dir.glob("*.parquet"))] if rej_dir.exists() else []
    rows = pa.concat_tables(tables).to_pylist() if tables else []
    return SimpleNamespace(commits=by_shard(layout.COMMITS), failed=by_shard(layout.FAILED), rejected=rows)


def tokens(ts: TokenStore, *ids: str) -> list[np.ndarray]:
    return list(ts.get(list(ids)))


def max_diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.float64) - b.astype(np.float64)).max())


# ---------------------------------------------------------------- sample-level cases


@pytest.fixture(scope="module", params=["pillow", "torchvision"])
def samples(tmp_path_factory, request):
    """The sample corpus through each decoder (torchvision's nvJPEG path runs with the CPU as device)."""
    root = tmp_path_factory.mktemp(f"hostile_samples_{request.param}")
    shards = H.write_sample_corpus(root / "corpus")
    store = root / "store"
    res = index(str(root / "corpus" / "*.tar"), store, "--decoder", request.param)
    assert res.rc == 0, res.stderr
    recs = read_store_records(store)
    return SimpleNamespace(
        res=res, store=store, shards=shards, ts=TokenStore.open(str(store)), summary=summarize(str(store)), **vars(recs)
    )


SAMPLE_REJECTED = [c for c in H.SAMPLE_CASES if c.expect.outcome == "rejected"]
SAMPLE_INDEXED = [c for c in H.SAMPLE_CASES if c.expect.outcome == "indexed"]


def test_only_bad_samples_job_exits_0(samples):
    s = samples.res.summary
    assert samples.res.rc == 0
    assert s["shards_committed"] == 2 and s["shards_failed"] == [] and s["shards_incomplete"] == []
    assert samples.res.seconds < 120, "the job must not hang on hostile images"


@pytest.mark.parametrize("case", SAMPLE_INDEXED, ids=lambda c: c.name)
def test_sample_indexed(samples, case):
    assert case.id in samples.ts, f"{case.name}: {case.member} was not indexed ({case.note})"
    assert samples.ts.get([case.id]).shape == (1, samples.ts.tokens_per_image, samples.ts.token_dim)
    if case.name != "duplicate_in_shard_first":  # its later twin is the rejected one
        assert not [r for r in samples.rejected if r["id"] == case.id], f"{case.name} also has a dead-letter row"


@pytest.mark.parametrize("case", SAMPLE_REJECTED, ids=lambda c: c.name)
def test_sample_rejected(samples, case):
    rows = [r for r in samples.rejected if r["id"] == case.id and r["reason"] == case.expect.reason]
    assert len(rows) == 1, f"{case.name}: expected one dead-letter row, got {rows}"
    row = rows[0]
    assert Path(row["shard"]).name == case.shard
    assert row["shard"] == samples.commits[case.shard]["shard"]
    assert row["member"] == case.member
    assert row["stage"] == case.expect.stage
    assert row["error_type"] == case.expect.error_type
    assert row["message"] and not re.search(r" at 0x[0-9a-f]+", row["message"]), row["message"]  # stable text
    if case.expect.reason != "duplicate_id":
        assert case.id not in samples.ts


def test_every_sample_accounted_for(samples):
    """samples_read == indexed + rejected per shard, and the store holds exactly the expected ids."""
    expected_ids = {c.id for c in SAMPLE_INDEXED} | set(H.HELPER_IDS_A) | set(H.HELPER_IDS_B)
    assert set(samples.ts.ids()) == expected_ids
    a, b = samples.commits[H.SHARD_A], samples.commits[H.SHARD_B]
    for rec in (a, b):
        assert rec["complete"] is True and rec["incomplete_reason"] is None
        assert rec["samples_read"] == rec["indexed"] + rec["rejected"]
    assert a["rejected"] == len(SAMPLE_REJECTED) == len(samples.rejected)
    # one sample per case and per helper; the member without an extension belongs to no sample
    assert a["samples_read"] == len([c for c in H.SAMPLE_CASES if c.shard == H.SHARD_A]) + len(H.HELPER_IDS_A)
    assert b["samples_read"] == b["indexed"] == 3


def test_rejected_counts_by_reason(samples):
    want: dict[str, int] = {}
    for c in SAMPLE_REJECTED:
        want[c.expect.reason] = want.get(c.expect.reason, 0) + 1
    want = dict(sorted(want.items()))
    assert samples.commits[H.SHARD_A]["rejected_by_reason"] == want
    assert samples.summary["rejected"] == want
    assert samples.summary["rejected_total"] == len(SAMPLE_REJECTED)
    assert samples.res.summary["rejected_by_reason"] == want
    assert samples.summary["samples_read"] == samples.summary["images"] + samples.summary["duplicate_ids"] + len(
        SAMPLE_REJECTED
    )


def test_rejection_never_stops_the_shard(samples):
    """The shard opens with bad samples; every good sample after them is indexed, up to the last member."""
    bad = {c.name for c in SAMPLE_REJECTED}
    order = H.SHARD_A_MEMBERS
    assert order[0][0] in bad
    last_bad = max(i for i, (case, _, _) in enumerate(order) if case in bad)
    after = [base_plus_ext(name)[0] for case, name, _ in order[last_bad + 1 :] if "." in name]
    assert "good_last" in after and len(after) >= 5
    missing = [key for key in after if key not in samples.ts]
    assert not missing, f"good samples after a rejected one were not indexed: {missing}"


def test_bombs_rejected_from_the_header_fast():
    """Refused from the header: no time spent and no memory taken (30000^2 RGB would be 2.7 GB)."""
    for data in (H.png_bomb(), H.jpeg_bomb(), H.png_bomb(H.OVER_LIMIT_SIDE, H.OVER_LIMIT_SIDE)):
        assert len(data) < 2000
        rss_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        t0 = time.perf_counter()
        with pytest.raises(DecodeRejected) as e:
            decode_image(data, PP)
        assert e.value.reason == "too_many_pixels"
        assert time.perf_counter() - t0 < 0.5, "the declared size must be refused before any pixel is allocated"
        assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_kb < 200_000


def test_exif_rotated_jpeg_indexed_upright(samples):
    exif = decode_image(H.sample_member_bytes("exif_rotated.jpg"), PP)
    upright = decode_image(H.sample_member_bytes("upright.jpg"), PP)
    ignored = decode_image(H.sample_member_bytes("exif_stripped.jpg"), PP)
    np.testing.assert_array_equal(exif, upright)
    assert np.abs(exif.astype(int) - ignored.astype(int)).mean() > 20  # the rotation matters
    t_exif, t_upright, t_ignored = tokens(samples.ts, "exif_rotated", "upright", "exif_stripped")
    assert max_diff(t_exif, t_upright) <= SAME_ATOL
    assert max_diff(t_exif, t_ignored) > MIN_DIFFERENT


def test_gif_first_frame(samples):
    np.testing.assert_array_equal(decode_image(H.animated_gif(), PP), decode_image(H.gif_first_frame_png(), PP))
    t_gif, t_first, t_second = tokens(samples.ts, "anim", "gif_frame1", "gif_frame2")
    assert max_diff(t_gif, t_first) <= SAME_ATOL
    assert max_diff(t_gif, t_second) > MIN_DIFFERENT


def test_several_image_members_use_first_of_image_extensions(samples):
    # tar order is png, webp, jpg; IMAGE_EXTENSIONS puts jpg first, so the jpg is the image.
    assert IMAGE_EXTENSIONS.index("jpg") < IMAGE_EXTENSIONS.index("png") < IMAGE_EXTENSIONS.index("webp")
    t_multi, t_jpg, t_png, t_webp = tokens(samples.ts, "multi", "ref_multi_jpg", "ref_green", "ref_blue_webp")
    assert max_diff(t_multi, t_jpg) <= SAME_ATOL
    assert max_diff(t_multi, t_png) > MIN_DIFFERENT and max_diff(t_multi, t_webp) > MIN_DIFFERENT
    assert samples.commits[H.SHARD_A]["extra_image_members"] == 2  # multi.png and multi.webp, ignored


def test_duplicate_in_shard_keeps_first(samples):
    t_dup, t_first, t_second = tokens(samples.ts, "dup", "ref_yellow", "ref_orange")
    assert max_diff(t_dup, t_first) <= SAME_ATOL
    assert max_diff(t_dup, t_second) > MIN_DIFFERENT


def test_duplicate_across_shards(samples):
    """Both shards store 'cross'; the index reports it as a duplicate and resolves it to the first shard."""
    seg_a, seg_b = samples.commits[H.SHARD_A]["segment"], samples.commits[H.SHARD_B]["segment"]
    assert seg_a < seg_b
    assert samples.commits[H.SHARD_A]["rows"] == samples.commits[H.SHARD_A]["indexed"]
    dups = samples.ts.duplicates.to_pylist()
    assert len(dups) == 1
    assert dups[0]["id"] == "cross" and dups[0]["segment"] == seg_b and dups[0]["kept_segment"] == seg_a
    assert samples.summary["duplicate_ids"] == 1 and samples.res.summary["store_duplicate_ids"] == 1
    assert len(samples.ts) == sum(r["indexed"] for r in samples.commits.values()) - 1
    t_cross, t_a, t_b = tokens(samples.ts, "cross", "ref_green", "ref_blue")
    assert max_diff(t_cross, t_a) <= SAME_ATOL
    assert max_diff(t_cross, t_b) > MIN_DIFFERENT


# ---------------------------------------------------------------- shard-level cases


def _can_test_permissions() -> bool:
    return os.geteuid() != 0


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile_shards")
    paths = H.write_shard_corpus(root / "corpus", permission_case=_can_test_permissions())
    store = root / "store"
    try:
        res = index(",".join(str(p) for p in paths.values()), store)
    finally:
        for p in paths.values():
            if p.exists():
                os.chmod(p, 0o644)
    return SimpleNamespace(
        res=res,
        store=store,
        paths=paths,
        ts=TokenStore.open(str(store)),
        summary=summarize(str(store)),
        **vars(read_store_records(store)),
    )


def test_broken_shards_beside_a_good_one_exit_0(shards):
    assert shards.res.rc == 0, shards.res.stderr
    s = shards.res.summary
    committed = [c for c, (_, _, e) in H.SHARD_CASES.items() if e.outcome == "committed"]
    failed = [c for c, (_, _, e) in H.SHARD_CASES.items() if e.outcome == "failed"]
    failed += [H.PERMISSION_CASE[0]] if _can_test_permissions() else []
    assert s["shards_committed"] == len(committed)
    assert {Path(f["shard"]).name for f in s["shards_failed"]} == {shards.paths[c].name for c in failed}
    incomplete = {shards.paths[c].name for c, (_, _, e) in H.SHARD_CASES.items() if e.complete is False}
    assert {Path(p).name for p in s["shards_incomplete"]} == incomplete
    assert {Path(p).name for p in shards.summary["incomplete_shards"]} == incomplete
    assert {Path(p).name for p in shards.summary["failed_shards"]} == {shards.paths[c].name for c in failed}


def _check_shard(shards, name: str, fname: str, want: H.ShardExpect):
    if want.outcome == "failed":
        assert fname not in shards.commits
        rec = shards.failed[fname]
        assert rec["failed"] is True and rec["error_type"] == want.error_type and rec["message"]
        assert rec["shard"] == str(shards.paths[name])
        return
    assert fname not in shards.failed
    rec = shards.commits[fname]
    assert rec["samples_read"] == rec["indexed"] + rec["rejected"]
    assert (rec["indexed"], rec["samples_read"], rec["complete"]) == (want.indexed, want.samples_read, want.complete)
    assert (rec["incomplete_reason"] is None) == want.complete, rec["incomplete_reason"]
    for image_id in want.ids:
        assert image_id in shards.ts


@pytest.mark.parametrize("name", list(H.SHARD_CASES))
def test_shard_case(shards, name):
    fname, _, want = H.SHARD_CASES[name]
    _check_shard(shards, name, fname, want)


def test_permission_denied_shard(shards):
    if not _can_test_permissions():
        pytest.skip("running as root: chmod 000 does not stop root from reading (the missing-file case still runs)")
    name, fname, want = H.PERMISSION_CASE
    _check_shard(shards, name, fname, want)


def test_store_holds_exactly_the_readable_samples(shards):
    want = {i for _, _, e in H.SHARD_CASES.values() for i in e.ids}
    assert set(shards.ts.ids()) == want
    assert shards.summary["rejected_total"] == 0


def test_no_readable_shard_exits_2(tmp_path):
    paths = H.write_unreadable_corpus(tmp_path / "corpus")
    store = tmp_path / "store"
    res = index(",".join(str(p) for p in paths), store)
    assert res.rc == 2
    assert "no shard could be indexed" in res.stderr
    recs = read_store_records(store)
    assert recs.commits == {}
    assert {n: r["error_type"] for n, r in recs.failed.items()} == {
        "nowhere.tar": "FileNotFoundError",
        "garbage.tar": "ReadError",
    }


def test_a_stuck_decoder_is_rejected_by_timeout_not_a_hang(tmp_path, monkeypatch):
    """A decoder that never returns costs one image (reason 'timeout'), not the job."""
    import threading

    from helpers import image_bytes, write_tar
    from PIL import Image

    from edje_indexer.transforms import decoders

    release = threading.Event()
    real = decoders.PillowDecoder.prepare

    def prepare(self, data):
        if data.startswith(b"\x89PNG"):
            release.wait(60)  # stands in for a pathological decode
        return real(self, data)

    monkeypatch.setattr(decoders.PillowDecoder, "prepare", prepare)
    im = Image.new("RGB", (40, 30), (200, 10, 10))
    shard = write_tar(
        tmp_path / "stuck.tar",
        [("a.jpg", image_bytes(im, "JPEG")), ("stuck.png", image_bytes(im, "PNG")), ("b.jpg", image_bytes(im, "JPEG"))],
    )
    try:
        res = index(shard, tmp_path / "store", "--decode-timeout", "1")
    finally:
        release.set()
    assert res.rc == 0 and res.seconds < 30, res.stderr
    assert res.summary["rejected_by_reason"] == {"timeout": 1} and res.summary["images_indexed"] == 2


def test_non_utf8_names_and_oversized_members_are_rejected_not_fatal(tmp_path, monkeypatch):
    """A Latin-1 member name and a too-large image member cost their sample only."""
    import tarfile

    from helpers import image_bytes
    from PIL import Image

    from edje_indexer.transforms import shards as transforms_shards

    monkeypatch.setattr(transforms_shards, "MAX_MEMBER_BYTES", 4096)
    small = image_bytes(Image.new("RGB", (8, 8), (0, 90, 200)), "JPEG")
    big = image_bytes(Image.effect_noise((300, 300), 80).convert("RGB"), "PNG")
    assert len(small) < 4096 < len(big)
    path = tmp_path / "mixed.tar"
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT, encoding="latin-1") as tf:
        for name, data in [
            ("ok1.jpg", small),
            ("caf\xe9.jpg", small),
            ("huge.png", big),
            ("video.mp4", b"\0" * 10_000),
            ("video.jpg", small),
            ("ok2.jpg", small),
        ]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    # read back as UTF-8, the way the indexer sees it: the Latin-1 byte becomes a surrogate escape
    res = index(str(path), tmp_path / "store")
    assert res.rc == 0, res.stderr
    assert res.summary["images_indexed"] == 3  # ok1, video (its .mp4 is skipped unread), ok2
    assert res.summary["rejected_by_reason"] == {"bad_id": 1, "member_too_large": 1}
    rows = read_store_records(tmp_path / "store").rejected
    bad = next(r for r in rows if r["reason"] == "bad_id")
    assert bad["id"] is None and "not valid UTF-8" in bad["message"] and bad["member"].startswith("caf")
    assert sorted(TokenStore.open(str(tmp_path / "store")).ids()) == ["ok1", "ok2", "video"]


def test_images_queued_behind_a_timed_out_decode_are_not_rejected(tmp_path, monkeypatch):
    """One decode thread, a 1 s timeout, a 3 s decode: only the slow image is a timeout."""
    from helpers import image_bytes, write_tar
    from PIL import Image

    from edje_indexer.transforms import decoders

    real = decoders.PillowDecoder.prepare

    def prepare(self, data):
        if data.startswith(b"\x89PNG"):
            time.sleep(3)
        return real(self, data)

    monkeypatch.setattr(decoders.PillowDecoder, "prepare", prepare)
    im = Image.new("RGB", (40, 30), (20, 100, 10))
    members = [("slow.png", image_bytes(im, "PNG"))] + [(f"fast{i}.jpg", image_bytes(im, "JPEG")) for i in range(3)]
    shard = write_tar(tmp_path / "queue.tar", members)
    res = index(shard, tmp_path / "store", "--decode-timeout", "1", "--decode-threads", "1")
    assert res.rc == 0, res.stderr
    assert res.summary["rejected_by_reason"] == {"timeout": 1} and res.summary["images_indexed"] == 3


def test_no_ghostscript_is_ever_started(tmp_path, monkeypatch):
    """EPS content in a .jpg member is refused from its header (unsupported_format), by both decoders:
    Pillow's EPS plugin never rasterises it, so no Ghostscript process is started."""
    import subprocess

    from helpers import image_bytes, write_tar
    from PIL import EpsImagePlugin, Image

    from edje_indexer.transforms.decoders import TorchvisionDecoder

    calls = []

    def ghostscript(*a, **kw):
        calls.append("EpsImagePlugin.Ghostscript")
        raise AssertionError("Ghostscript must not run")

    real_popen = subprocess.Popen

    def popen(args, *a, **kw):
        if "gs" in str(args).lower() or "ghostscript" in str(args).lower():
            calls.append(args)
        return real_popen(args, *a, **kw)

    monkeypatch.setattr(EpsImagePlugin, "Ghostscript", ghostscript)
    monkeypatch.setattr(subprocess, "Popen", popen)
    decoders = [lambda d: decode_image(d, PP), TorchvisionDecoder(PP).prepare]
    decoders.append(TorchvisionDecoder(PP, batched_jpeg=True).prepare)
    for decode in decoders:
        with pytest.raises(DecodeRejected) as e:
            decode(H.EPS)
        assert e.value.reason == "unsupported_format" and "EPS" in str(e.value) and "%!PS" in str(e.value)
    good = image_bytes(Image.new("RGB", (20, 20), (1, 2, 3)), "JPEG")
    shard = write_tar(tmp_path / "eps.tar", [("eps.jpg", H.EPS), ("good.jpg", good)])
    res = index(shard, tmp_path / "store")
    assert res.rc == 0, res.stderr
    assert res.summary["rejected_by_reason"] == {"unsupported_format": 1} and res.summary["images_indexed"] == 1
    assert calls == []


def test_ids_over_1_kib_are_rejected(tmp_path):
    """At most MAX_ID_BYTES (1024) bytes of UTF-8, for ids from member names and from json fields."""
    import json as json_

    from helpers import image_bytes, write_tar
    from PIL import Image

    from edje_indexer.transforms.shards import MAX_ID_BYTES

    assert MAX_ID_BYTES == 1024
    img = image_bytes(Image.new("RGB", (20, 20), (9, 80, 7)), "JPEG")
    fits = ["k" * 1024, "\u00e9" * 512, "short"]  # 1024, 1024 (2 bytes each) and 5 bytes
    too_long = ["L" * 1025, "\u00e8" * 513]  # 1025 and 1026 bytes
    by_name = write_tar(tmp_path / "names.tar", [(f"{k}.jpg", img) for k in too_long[:1] + fits + too_long[1:]])
    res = index(by_name, tmp_path / "store-names")
    assert res.rc == 0, res.stderr
    assert res.summary["rejected_by_reason"] == {"bad_id": 2}
    assert sorted(TokenStore.open(str(tmp_path / "store-names")).ids()) == sorted(fits)
    rows = read_store_records(tmp_path / "store-names").rejected
    assert sorted(r["member"] for r in rows) == sorted(f"{k}.jpg" for k in too_long)
    for r in rows:
        assert (r["id"], r["stage"], r["error_type"]) == (None, "read", "IdTooLong") and "1024" in r["message"]

    members = []
    for key, value in [("a", "x" * 1024), ("b", "y" * 1025), ("c", 10**1100), ("d", "ok")]:
        members += [(f"{key}.jpg", img), (f"{key}.json", json_.dumps({"id": value}).encode())]
    by_json = write_tar(tmp_path / "json.tar", members)
    res = index(by_json, tmp_path / "store-json", "--id-policy", "json:id")
    assert res.rc == 0, res.stderr
    assert res.summary["rejected_by_reason"] == {"bad_id": 2}
    assert sorted(TokenStore.open(str(tmp_path / "store-json")).ids()) == ["ok", "x" * 1024]


STUCK_CHILD = r"""
import sys, threading, time
from edje_indexer.transforms import decoders

real = decoders.PillowDecoder.prepare

def prepare(self, data):
    if data.startswith(b"\x89PNG"):
        threading.Event().wait()  # a decode that never returns
    return real(self, data)

decoders.PillowDecoder.prepare = prepare
from edje_indexer.pipeline.cli import main

rc = main(sys.argv[1:])
print("main returned", rc, time.time(), flush=True)
sys.exit(rc)
"""


def test_a_stuck_decoder_does_not_keep_the_process_alive(tmp_path):
    """The CLI process exits once the job is done, though one decode never returns: the decode
    threads are daemon threads, which the interpreter's exit does not wait for."""
    import subprocess
    import sys

    from helpers import image_bytes, write_tar
    from PIL import Image

    im = Image.new("RGB", (40, 30), (200, 10, 10))
    shard = write_tar(
        tmp_path / "stuck.tar", [("a.jpg", image_bytes(im, "JPEG")), ("stuck.png", image_bytes(im, "PNG"))]
    )
    argv = ["index", "--input", shard, "--store", str(tmp_path / "store"), "--preset", "tiny", "--json"]
    proc = subprocess.Popen(
        [sys.executable, "-c", STUCK_CHILD, *argv, "--decode-timeout", "2"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        out, err = proc.communicate(timeout=90)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        returned = "main returned" in out
        pytest.fail(f"the process did not exit ({'main() had returned' if returned else 'main() did not return'})")
    exited = time.time()
    line = next(x for x in out.splitlines() if x.startswith("main returned"))
    assert proc.returncode == 0 and line.split()[2] == "0", err[-3000:]
    assert exited - float(line.split()[3]) < 5, "the process lingered after main() returned"
    summary = json.loads(out[: out.index("main returned")])
    assert summary["rejected_by_reason"] == {"timeout": 1} and summary["images_indexed"] == 1
