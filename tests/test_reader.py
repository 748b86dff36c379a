"""The online reader (edje_indexer.schemas.reader.TokenStore) on small synthetic stores built with the real writer."""

from __future__ import annotations

import concurrent.futures as cf
import uuid

import numpy as np
import pytest
import zarr

from edje_indexer.benchmarks.synthetic_store import (
    build_synthetic_store,
    encode_tokens,
    finalize_index,
    random_tokens,
    write_segment,
)
from edje_indexer.pipeline import cli
from edje_indexer.schemas import gather as schemas_gather
from edje_indexer.schemas import quantization
from edje_indexer.schemas.reader import TokenStore, UnknownIdError
from edje_indexer.schemas.storage import Location

N, PER_SEGMENT, M, D = 300, 70, 64, 384  # 5 segments, the last one short


@pytest.fixture(scope="module", params=quantization.QUANTIZATIONS)
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
    q = built.metadata.quantization
    if q == "fp16":
        np.testing.assert_array_equal(got, x.astype(np.float16).astype(np.float32))
        return
    _, scales = store.get_raw([built.ids[r] for r in rows])
    s = scales.astype(np.float64)[..., None]
    err = np.abs(got.astype(np.float64) - x)
    if q == "int8":
        # error <= scale / 2 (scales round up: nothing is clamped; see quantization.py), plus float32 rounding
        assert (err <= 0.5 * s * (1 + 2.0**-10) + 1e-6).all()
    elif q == "int4":
        assert (err <= 0.5 * s).all()  # exactly
    else:  # int4-rht: the bound holds on the rotated values; the rotation is orthogonal
        norm = np.linalg.norm(x, axis=-1, keepdims=True)
        assert (np.linalg.norm(got - x, axis=-1, keepdims=True) <= 0.5 * s * np.sqrt(D) + 1e-6 * norm).all()
    assert err.max() > 0  # it is lossy: the test is not vacuous
    # int4 is coarser than int8 (about 4 bits less): the relative error of the whole batch says which
    rel = float(np.linalg.norm(got - x) / np.linalg.norm(x))
    assert rel < {"int8": 0.01, "int4": 0.16, "int4-rht": 0.16}[q], rel


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
    no_torch._rows.torch = None
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
    q = built.metadata.quantization
    if q == "fp16":
        assert values.dtype == np.float16 and values.shape == (len(rows), M, D) and scales is None
        return
    # int8 [k, m, d]; int4 packed two values per byte, [k, m, d / 2]
    assert values.dtype == {"int8": np.int8, "int4": np.uint8, "int4-rht": np.uint8}[q]
    assert values.shape == (len(rows), M, D if q == "int8" else D // 2)
    assert scales.dtype == np.float16 and scales.shape == (len(rows), M)
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


def test_empty_batch(built, store):
    assert store.get([]).shape == (0, M, D)
    values, _ = store.get_raw([])
    assert values.shape == (0, *quantization.stored_row_shape(built.metadata.quantization, M, D))


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
    assert isinstance(store._rows._array(0, "tokens"), np.ndarray)  # the fast path is really used locally
    monkeypatch.setattr(schemas_gather, "_mmap_rows", lambda *a, **k: None)
    slow = TokenStore.open(built.url)
    assert isinstance(slow._rows._array(0, "tokens"), zarr.Array)
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


@pytest.mark.parametrize("quant", ["int8", "int4", "int4-rht"])
def test_fsspec_memory_url(quant):
    url = f"memory://edje-reader-test-{uuid.uuid4().hex}/store"
    built = build_synthetic_store(url, 50, 20, quantization=quant, m=M, d=D, seed=1, return_tokens=True)
    try:
        s = TokenStore.open(url)
        assert len(s) == 50
        assert not isinstance(s._rows._array(0, "tokens"), np.ndarray)  # zarr reads it
        rows = [49, 0, 21, 0]
        values, scales = s.get_raw([built.ids[r] for r in rows])
        want_values, want_scales = _encoded(built, rows)
        np.testing.assert_array_equal(values, want_values)
        np.testing.assert_array_equal(scales, want_scales)
        np.testing.assert_array_equal(
            s.get([built.ids[r] for r in rows]), quantization.dequantize(values, scales, quant)
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


def test_a_commit_is_visible_from_the_next_published_generation(tmp_path):
    """A segment committed after the published generation (a job running, or one that died before its
    finalize) is not visible until a finalize publishes it; then it is, exactly."""
    built = build_synthetic_store(str(tmp_path / "store"), 100, 40, quantization="int8", seed=4)
    loc = Location(built.url)
    ids, x, values, scales = _extra_segment(built, "late")
    write_segment(loc, built.metadata, "synthetic://late/late.tar", ids, values, scales, commit=True)
    before = TokenStore.open(built.url)
    assert len(before) == 100 and ids[3] not in before
    finalize_index(built.url)
    s = TokenStore.open(built.url)
    assert len(s) == 110 and ids[3] in s
    assert len(before) == 100 and before.get([built.ids[5]]).shape == (1, M, D)  # the old snapshot still reads
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


def _decode_by_the_attributes(group) -> np.ndarray:
    """A segment's float32 tokens from its Zarr arrays and the words of their "encoding" attribute alone
    (no project code), as a reader that knows only Zarr and numpy would write it."""
    enc = dict(group["tokens"].attrs["encoding"])
    tokens = group["tokens"][...]
    assert tokens.dtype == np.dtype(enc["tokens_dtype"])
    if enc["scales"] is None:  # fp16
        return tokens.astype(np.float32)
    scales = group[enc["scales"]][...].astype(np.float64)[..., None]
    if enc["tokens_dtype"] == "int8":  # "value = tokens * scales[..., None]"
        return (tokens * scales).astype(np.float32)
    # "value 2j of a token is the low nibble (bits 0-3) of byte j, value 2j+1 the high nibble (bits 4-7)"
    assert enc["nibble_order"].startswith("value 2j of a token is the low nibble (bits 0-3) of byte j")
    nibbles = np.empty(tokens.shape[:-1] + (2 * tokens.shape[-1],), np.int64)
    nibbles[..., 0::2], nibbles[..., 1::2] = tokens & 0x0F, tokens >> 4
    q = nibbles - enc["nibble_offset"]  # "q = nibble - 8"
    rot = enc["rotation"]
    if rot is None:  # "value = float32(q) * float32(scales[..., None])", exact
        return (q * scales).astype(np.float32)
    b, d = rot["block"], q.shape[-1]
    # "H[i, j] = (-1) ** popcount(i & j)", "block k acts on values k*B .. k*B+B-1"
    h = np.array([[(-1.0) ** bin(i & j).count("1") for j in range(b)] for i in range(b)])
    t = (q.reshape(-1, d // b, b).astype(np.float64) @ h).reshape(q.shape)
    # signs: bit i % 8 (least significant first) of byte i // 8 of signs_hex set -> -1
    bits = np.unpackbits(np.frombuffer(bytes.fromhex(rot["signs_hex"]), np.uint8), bitorder="little")[:d]
    c = float(np.array(int(rot["c_float32_hex"], 16), np.uint32).view(np.float32))
    # "value = float32(t * scales[..., None] * c * signs)": exact in float64, rounded once
    return (t * scales * c * (1.0 - 2.0 * bits)).astype(np.float32)


def test_a_reader_that_knows_only_zarr_decodes_the_same_bits(built, store):
    meta = zarr.open_group(built.url, mode="r").attrs["edje"]
    assert meta["quantization"] == built.metadata.quantization
    loc = Location(built.url)
    first = 0
    for seg in built.segments:
        record = loc.read_json("commits", f"{seg}.json")
        group = zarr.open_group(f"{built.url}/{record['data_path']}", mode="r")
        assert dict(group["tokens"].attrs["encoding"]) == meta["token_encoding"]
        got = _decode_by_the_attributes(group)
        ids = built.ids[first : first + record["rows"]]
        np.testing.assert_array_equal(got, store.get(ids))
        first += record["rows"]
    assert first == N


def test_a_result_is_recycled_only_when_nothing_references_it(built, store):
    """get() may hand back the memory of this thread's previous result, but only once the caller let it go."""
    torch = __import__("torch")
    ids = [built.ids[r] for r in _picks(built, seed=9, k=60)]  # > 1 MB of float32: recyclable
    first = store.get(ids)
    want = first.copy()
    second = store.get(ids[::-1])
    assert not np.shares_memory(first, second)  # first is held: a new array
    np.testing.assert_array_equal(first, want)
    view = second[3]
    del second
    third = store.get(ids)
    assert not np.shares_memory(view, third)  # a view keeps it alive
    wrapped = torch.from_numpy(third)
    del third, view
    fourth = store.get(ids[::-1])
    assert not np.shares_memory(wrapped.numpy(), fourth)  # so does a torch tensor on it
    np.testing.assert_array_equal(wrapped.numpy(), want)
    address = fourth.__array_interface__["data"][0]
    del fourth
    fifth = store.get(ids)
    assert fifth.__array_interface__["data"][0] == address  # let go: the same memory again
    np.testing.assert_array_equal(fifth, want)
