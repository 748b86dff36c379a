"""The online reader (edje_indexer.schemas.reader.TokenStore) on small synthetic stores built with the real writer."""

from __future__ import annotations

import concurrent.futures as cf
import uuid

import numpy as np
import pytest
import zarr

from edje_indexer.benchmarks.synthetic_store import build_synthetic_store, encode_tokens, random_tokens, write_segment
from edje_indexer.pipeline import cli
from edje_indexer.schemas import quantization
from edje_indexer.schemas import reader as schemas_store
from edje_indexer.schemas.reader import TokenStore, UnknownIdError
from edje_indexer.schemas.storage import Location

N, PER_SEGMENT, M, D = 300, 70, 64, 384  # 5 segments, the last one short


@pytest.fixture(scope="module", params=["fp16", "int8"])
def built(request, tmp_path_factory):
    url = str(tmp_path_factory.mktemp(f"store-{request.param}") / "store")
    return build_synthetic_store(url, N, PER_SEGMENT, quantization=request.param, m=M, d=D, seed=7, return_tokens=True)


@pytest.fixture(scope="module")
def store(built):
    return TokenStore.open(built.url)


def _encoded(built, rows):
    return encode_tokens(built.tokens[rows], built.metadata.quantization)


def _picks(built, seed=0, k=40):
    """Row numbers (storage order) of a batch: several segments, repeats, not sorted."""
    rows = np.random.default_rng(seed).integers(0, N, size=k)
    rows[5] = rows[0]
    rows[-1] = rows[0]
    rows[1] = N - 1  # last row of the short last segment
    return rows


def test_results_come_in_the_order_asked(built, store):
    rows = _picks(built)
    assert len({built.segment_of[r] for r in rows}) > 1
    ids = [built.ids[r] for r in rows]
    values, scales = store.get_raw(ids)
    want_values, want_scales = _encoded(built, rows)
    np.testing.assert_array_equal(values, want_values)
    if want_scales is not None:
        np.testing.assert_array_equal(scales, want_scales)
    got = store.get(ids)
    assert got.shape == (len(ids), M, D) and got.dtype == np.float32
    np.testing.assert_array_equal(got[5], got[0])
    np.testing.assert_array_equal(got[-1], got[0])
    # one at a time gives the same rows
    for i in (0, 1, 7):
        np.testing.assert_array_equal(store.get([ids[i]])[0], got[i])


def test_single_segment_batch_in_reverse_order(built, store):
    rows = np.arange(PER_SEGMENT)[::-1]
    got = store.get([built.ids[r] for r in rows])
    np.testing.assert_array_equal(got, store.get([built.ids[r] for r in np.arange(PER_SEGMENT)])[::-1])


def test_get_matches_the_tokens_written(built, store):
    rows = np.arange(N)
    got = store.get([built.ids[r] for r in rows])
    x = built.tokens[rows]
    if built.metadata.quantization == "fp16":
        np.testing.assert_array_equal(got, x.astype(np.float16).astype(np.float32))
    else:
        _, scales = store.get_raw([built.ids[r] for r in rows])
        s = scales.astype(np.float32)[..., None]
        # error <= scale / 2 (scales round up: nothing is clamped; see quantization.py), plus float32 rounding
        bound = 0.5 * s * (1 + 2.0**-10) + 1e-6
        assert (np.abs(got - x) <= bound).all()
        assert np.abs(got - x).max() > 0  # it is lossy: the test is not vacuous


def test_get_is_quantization_decode_bit_for_bit(built, store):
    ids = [built.ids[r] for r in _picks(built, seed=1)]
    values, scales = store.get_raw(ids)
    q = built.metadata.quantization
    for dtype in (np.float32, np.float16, np.float64):
        got = store.get(ids, dtype=dtype)
        assert got.dtype == dtype
        np.testing.assert_array_equal(got, quantization.dequantize(values, scales, q, dtype=dtype))
    out = np.full((len(ids), M, D), np.nan, np.float32)
    assert store.get(ids, out=out) is out
    np.testing.assert_array_equal(out, store.get(ids))
    with pytest.raises(ValueError):
        store.get(ids, out=np.empty((len(ids), M, D), np.float16))


def test_every_decode_path_gives_the_same_bits(built, store):
    """torch with one thread (chunked, from cache), torch with several (one op), numpy only (no torch)."""
    import torch

    ids = [built.ids[r] for r in _picks(built, seed=6, k=250)]  # several 2 MB chunks
    values, scales = store.get_raw(ids)
    want = quantization.dequantize(values, scales, built.metadata.quantization)
    threads = torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            np.testing.assert_array_equal(store.get(ids), want)
    finally:
        torch.set_num_threads(threads)
    no_torch = TokenStore.open(built.url)
    no_torch._torch = None
    np.testing.assert_array_equal(no_torch.get(ids), want)
    np.testing.assert_array_equal(
        no_torch.get(ids, dtype=np.float16),
        quantization.dequantize(values, scales, built.metadata.quantization, np.float16),
    )


def test_get_raw_returns_stored_bytes_and_scales(built, store):
    rows = _picks(built, seed=2)
    values, scales = store.get_raw([built.ids[r] for r in rows])
    want_values, want_scales = _encoded(built, rows)
    assert values.dtype == want_values.dtype and values.tobytes() == want_values.tobytes()
    if built.metadata.quantization == "fp16":
        assert values.dtype == np.float16 and scales is None
    else:
        assert values.dtype == np.int8 and scales.dtype == np.float16 and scales.shape == (len(rows), M)
        assert scales.tobytes() == want_scales.tobytes()


def test_unknown_ids_raise_a_key_error_naming_the_id(built, store):
    with pytest.raises(UnknownIdError) as e:
        store.get([built.ids[0], "no-such-image", built.ids[1]])
    assert isinstance(e.value, KeyError)
    assert "'no-such-image'" in str(e.value)
    for bad in ("", "x" * 500, built.ids[0] + " ", built.ids[0][:-1], built.ids[0] + "\x00", "imagé-ünknown"):
        with pytest.raises(KeyError, match="unknown image id"):
            store.get_raw([bad])
        assert bad not in store
    with pytest.raises(TypeError):
        store.get(built.ids[0])  # one id string, not a list
    with pytest.raises(TypeError):
        store.get([1, 2])


def test_ids_as_tuple_array_or_iterator(built, store):
    ids = [built.ids[r] for r in _picks(built, seed=5)]
    want = store.get(ids)
    np.testing.assert_array_equal(store.get(tuple(ids)), want)
    np.testing.assert_array_equal(store.get(np.array(ids)), want)
    np.testing.assert_array_equal(store.get(iter(ids)), want)
    with pytest.raises(UnknownIdError, match="'nope'"):
        store.get(np.array(ids + ["nope"]))


def test_empty_batch(store):
    assert store.get([]).shape == (0, M, D)
    values, _ = store.get_raw([])
    assert values.shape == (0, M, D)


def test_len_ids_and_contains(built, store):
    assert len(store) == N
    ids = store.ids()
    assert ids == sorted(built.ids)
    assert all(i in store for i in built.ids[:20])
    assert "nope" not in store and 3 not in store


def test_concurrent_readers_get_correct_results(built, store):
    want = store.get(built.ids)  # storage order

    def worker(seed):
        rng = np.random.default_rng(seed)
        for _ in range(15):
            rows = rng.integers(0, N, size=rng.integers(1, 120))
            got = store.get([built.ids[r] for r in rows])
            if not np.array_equal(got, want[rows]):
                return False
        return True

    with cf.ThreadPoolExecutor(8) as pool:
        assert all(pool.map(worker, range(16)))


def test_zarr_fallback_matches_the_mmap_path(built, store, monkeypatch):
    rows = _picks(built, seed=3)
    ids = [built.ids[r] for r in rows]
    assert isinstance(store._array(0, "tokens"), np.ndarray)  # the fast path is really used locally
    monkeypatch.setattr(schemas_store, "_mmap_rows", lambda *a, **k: None)
    slow = TokenStore.open(built.url)
    assert isinstance(slow._array(0, "tokens"), zarr.Array)
    np.testing.assert_array_equal(slow.get(ids), store.get(ids))
    for a, b in zip(slow.get_raw(ids), store.get_raw(ids)):
        if a is None:
            assert b is None
        else:
            np.testing.assert_array_equal(a, b)
    one_segment = [built.ids[r] for r in (3, 3, 0, 69, 1)]
    np.testing.assert_array_equal(slow.get(one_segment), store.get(one_segment))


def test_fsspec_file_url(built, store):
    rows = _picks(built, seed=4)
    ids = [built.ids[r] for r in rows]
    remote = TokenStore.open("file://" + built.url)
    assert len(remote) == N
    np.testing.assert_array_equal(remote.get(ids), store.get(ids))


def test_fsspec_memory_url():
    url = f"memory://edje-reader-test-{uuid.uuid4().hex}/store"
    built = build_synthetic_store(url, 50, 20, quantization="int8", m=M, d=D, seed=1, return_tokens=True)
    try:
        s = TokenStore.open(url)
        assert len(s) == 50
        assert not isinstance(s._array(0, "tokens"), np.ndarray)  # zarr reads it
        rows = [49, 0, 21, 0]
        values, scales = s.get_raw([built.ids[r] for r in rows])
        want_values, want_scales = _encoded(built, rows)
        np.testing.assert_array_equal(values, want_values)
        np.testing.assert_array_equal(scales, want_scales)
        np.testing.assert_array_equal(
            s.get([built.ids[r] for r in rows]), quantization.dequantize(values, scales, "int8")
        )
    finally:
        Location(url).fs.rm(url.split("://", 1)[1].rsplit("/", 1)[0], recursive=True)


def _extra_segment(built, name, n=10, seed=99):
    ids = [f"{name}-{i}" for i in range(n)]
    x = random_tokens(__import__("torch").Generator().manual_seed(seed), n, M, D)
    values, scales = encode_tokens(x, built.metadata.quantization)
    return ids, x, values, scales


def test_uncommitted_data_is_invisible(tmp_path):
    built = build_synthetic_store(str(tmp_path / "store"), 100, 40, seed=3)
    loc = Location(built.url)
    ids, _, values, scales = _extra_segment(built, "uncommitted")
    write_segment(loc, built.metadata, "synthetic://late/uncommitted.tar", ids, values, scales, commit=False)
    s = TokenStore.open(built.url)
    assert len(s) == 100
    assert ids[0] not in s
    with pytest.raises(UnknownIdError, match="uncommitted-0"):
        s.get([built.ids[0], ids[0]])


def test_commit_after_the_index_generation_is_visible(tmp_path):
    """A job that committed a segment and died before finalize: load_index patches it in."""
    built = build_synthetic_store(str(tmp_path / "store"), 100, 40, quantization="int8", seed=4)
    loc = Location(built.url)
    ids, x, values, scales = _extra_segment(built, "late")
    write_segment(loc, built.metadata, "synthetic://late/late.tar", ids, values, scales, commit=True)
    s = TokenStore.open(built.url)
    assert len(s) == 110 and ids[3] in s
    got_values, got_scales = s.get_raw([ids[3], built.ids[5], ids[0]])
    np.testing.assert_array_equal(got_values[[0, 2]], values[[3, 0]])
    np.testing.assert_array_equal(got_scales[[0, 2]], scales[[3, 0]])
    np.testing.assert_array_equal(s.get([ids[7]])[0], quantization.dequantize(values[7], scales[7], "int8"))


@pytest.mark.parametrize("with_nul", [False, True])
def test_unusual_ids(tmp_path, with_nul):
    """Non-ASCII, long, prefix-of-another and (when present) NUL-containing ids are all exact."""
    url = str(tmp_path / "store")
    built = build_synthetic_store(url, 0, 1, m=M, d=D, index=False)
    ids = ["plain", "naïve-é", "日本語", "a", "ab", " lead", "x" * 300, "Z"]
    if with_nul:
        ids += ["a\x00", "a\x00b", "\x00"]
    _, _, values, scales = _extra_segment(built, "unused", n=len(ids))
    write_segment(Location(url), built.metadata, "synthetic://odd/ids.tar", ids, values, scales)
    s = TokenStore.open(url)
    assert len(s) == len(ids) and sorted(s.ids()) == sorted(ids)
    order = list(np.random.default_rng(0).permutation(len(ids))) * 2
    got, _ = s.get_raw([ids[i] for i in order])
    np.testing.assert_array_equal(got, values[order])
    for unknown in ("a\x00\x00", "plain\x00", "\x00\x00", "b", "x" * 301, "naïve"):
        assert unknown not in s
        with pytest.raises(UnknownIdError):
            s.get([unknown])
    assert ("a\x00" in s) == with_nul


def test_cli_get(built, tmp_path):
    out = tmp_path / "tokens.npy"
    assert cli.main(["get", built.url, built.ids[11], "--out", str(out)]) == 0
    tokens = np.load(out)
    assert tokens.dtype == np.float32 and tokens.shape == (M, D)
    np.testing.assert_array_equal(tokens, TokenStore.open(built.url).get([built.ids[11]])[0])
    assert cli.main(["get", built.url, "no-such-image", "--out", str(tmp_path / "x.npy")]) != 0
    assert not (tmp_path / "x.npy").exists()
