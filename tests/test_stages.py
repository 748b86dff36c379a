"""The per-shard stages (edje_indexer.transforms.stages), driven directly: no Beam, no tar files."""

from __future__ import annotations

import random
import threading
import time

import numpy as np
import pytest
from helpers import image_bytes
from hypothesis import given, settings
from hypothesis import strategies as st

from edje_indexer.pipeline.presets import PRESETS
from edje_indexer.schemas.records import ModelIdentity
from edje_indexer.schemas.store import new_metadata
from edje_indexer.transforms.decoders import DecodeRejected, PillowDecoder
from edje_indexer.transforms.encoder import TokenEncoder
from edje_indexer.transforms.model import load_model
from edje_indexer.transforms.shards import Rejection, Sample
from edje_indexer.transforms.stages import (
    Batch,
    Decoded,
    EncodedBatch,
    OrderedDecodeMap,
    Stopwatch,
    collect,
    encode_batches,
    fixed_batches,
    rejection_row,
)

SHARD = "/data/shard-000001.tar"
GATE_WAIT_S = 20.0  # a blocked fake decode gives up after this long, so a failing test can never hang


class FakeDecoder:
    """``prepare`` interprets the bytes: ``ok:DELAY:VALUE``, ``reject:REASON``, ``boom``, ``silent``, ``block``."""

    def __init__(self):
        self.gate = threading.Event()
        self.blocked = 0

    def prepare(self, data: bytes):
        kind, _, rest = data.decode().partition(":")
        if kind == "ok":
            delay, _, value = rest.partition(":")
            time.sleep(float(delay))
            return f"px:{value}"
        if kind == "reject":
            raise DecodeRejected(rest, f"refused: {rest}")
        if kind == "boom":
            raise RuntimeError("libfoo exploded")
        if kind == "silent":
            raise KeyError()
        if kind == "block":
            self.blocked += 1
            self.gate.wait(GATE_WAIT_S)
            return "px:late"
        raise AssertionError(data)

    def assemble(self, items):
        raise AssertionError("not used here")


@pytest.fixture
def fake():
    dec = FakeDecoder()
    yield dec
    dec.gate.set()  # release every stuck decode thread


def sample(i: int, data: bytes) -> Sample:
    return Sample(f"id-{i}", f"id-{i}", f"id-{i}.jpg", data)


def read_rejection(i: int) -> Rejection:
    return Rejection(f"r-{i}", f"r-{i}.jpg", "read", "duplicate_id", "DuplicateId", "seen before")


def ok(i: int, delay: float = 0.0) -> Sample:
    return sample(i, f"ok:{delay}:{i}".encode())


def check_in_order(items, out):
    assert len(out) == len(items)
    for item, got in zip(items, out):
        if isinstance(item, Rejection):
            assert got is item
        else:
            assert isinstance(got, Decoded) and got.sample is item
            assert got.pixels == f"px:{item.id.split('-')[1]}"


# -- OrderedDecodeMap -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("threads,prefetch", [(1, 1), (4, 3), (8, 32)])
def test_decode_keeps_input_order_and_passes_rejections_in_place(fake, threads, prefetch):
    rng = random.Random(threads)
    items = []
    for i in range(24):
        # later items often finish first
        items.append(read_rejection(i) if i % 7 == 3 else ok(i, rng.choice([0.0, 0.001, 0.01, 0.02])))
    with OrderedDecodeMap(fake, threads, timeout_s=10.0, prefetch=prefetch) as decode:
        out = list(decode(iter(items)))
    check_in_order(items, out)


def test_decode_of_nothing_and_of_rejections_only(fake):
    with OrderedDecodeMap(fake, 2, 10.0, 4) as decode:
        assert list(decode([])) == []
        rej = [read_rejection(i) for i in range(3)]
        assert list(decode(rej)) == rej


def test_decoder_failures_become_rejections(fake):
    items = [ok(0), sample(1, b"reject:too_many_pixels"), sample(2, b"boom"), sample(3, b"silent"), ok(4)]
    with OrderedDecodeMap(fake, 2, 10.0, 8) as decode:
        out = list(decode(items))
    assert isinstance(out[0], Decoded) and isinstance(out[4], Decoded)
    refused, boom, silent = out[1], out[2], out[3]
    assert (refused.id, refused.member, refused.stage, refused.reason, refused.error_type) == (
        "id-1",
        "id-1.jpg",
        "decode",
        "too_many_pixels",
        "DecodeRejected",
    )
    assert refused.message == "refused: too_many_pixels"
    assert (boom.id, boom.stage, boom.reason, boom.error_type, boom.message) == (
        "id-2",
        "decode",
        "decode_error",
        "RuntimeError",
        "libfoo exploded",
    )
    assert (silent.reason, silent.error_type) == ("decode_error", "KeyError")
    assert silent.message  # an exception without a message still says something (its repr)


def test_a_stuck_decode_times_out_and_queued_images_move_to_a_new_pool(fake):
    """One thread: everything after the stuck image was queued behind it; none of them may time out."""
    items = [ok(0), sample(1, b"block"), ok(2, 0.05), ok(3, 0.05), read_rejection(4), ok(5, 0.05)]
    t0 = time.monotonic()
    with OrderedDecodeMap(fake, 1, timeout_s=0.3, prefetch=10) as decode:
        out = list(decode(items))
    elapsed = time.monotonic() - t0
    assert elapsed < GATE_WAIT_S / 2  # did not wait for the stuck decode
    assert fake.blocked == 1 and not fake.gate.is_set()
    stuck = out[1]
    assert isinstance(stuck, Rejection)
    assert (stuck.id, stuck.stage, stuck.reason, stuck.error_type) == ("id-1", "decode", "timeout", "TimeoutError")
    assert "0.3" in stuck.message
    check_in_order([items[0]] + items[2:], [out[0]] + out[2:])


def test_several_stuck_decodes_on_several_threads(fake):
    items = [ok(0), sample(1, b"block"), ok(2, 0.01), sample(3, b"block"), ok(4), ok(5, 0.01), ok(6)]
    with OrderedDecodeMap(fake, 3, timeout_s=0.3, prefetch=4) as decode:
        out = list(decode(items))
    assert [getattr(o, "reason", None) for o in out] == [None, "timeout", None, "timeout", None, None, None]
    good = [i for i in range(len(items)) if i not in (1, 3)]
    check_in_order([items[i] for i in good], [out[i] for i in good])


def test_slow_decodes_each_within_the_timeout_are_not_rejected(fake):
    """Four decodes of 0.15 s on one thread take 0.6 s in all, twice the timeout: each is within it."""
    items = [ok(i, 0.15) for i in range(4)]
    with OrderedDecodeMap(fake, 1, timeout_s=0.3, prefetch=4) as decode:
        out = list(decode(items))
    check_in_order(items, out)


def test_close_does_not_wait_for_a_stuck_decode(fake):
    decode = OrderedDecodeMap(fake, 2, timeout_s=60.0, prefetch=1)
    gen = decode(iter([ok(0), sample(1, b"block"), ok(2)]))
    first = next(gen)  # the stuck decode is now running
    assert isinstance(first, Decoded) and first.sample.id == "id-0"
    deadline = time.monotonic() + 5
    while not fake.blocked and time.monotonic() < deadline:
        time.sleep(0.01)
    assert fake.blocked == 1
    t0 = time.monotonic()
    decode.close()
    gen.close()
    assert time.monotonic() - t0 < 1.0
    assert not fake.gate.is_set()


def test_context_manager_exit_does_not_wait_for_a_stuck_decode(fake):
    t0 = time.monotonic()
    with OrderedDecodeMap(fake, 1, timeout_s=60.0, prefetch=1) as decode:
        gen = decode(iter([ok(0), sample(1, b"block")]))
        assert next(gen).sample.id == "id-0"
        while not fake.blocked and time.monotonic() - t0 < 5:
            time.sleep(0.01)
        assert fake.blocked == 1
        t1 = time.monotonic()
    gen.close()
    assert time.monotonic() - t1 < 1.0
    assert not fake.gate.is_set()


# -- fixed_batches --------------------------------------------------------------------------------------------


def decoded_items(kinds: list[bool]) -> list:
    """True: a decoded sample, False: a rejection."""
    return [Decoded(sample(i, b""), f"px:{i}") if k else read_rejection(i) for i, k in enumerate(kinds)]


@settings(max_examples=200, deadline=None)
@given(kinds=st.lists(st.booleans(), max_size=40), size=st.integers(1, 7))
def test_fixed_batches_property(kinds, size):
    items = decoded_items(kinds)
    out = list(fixed_batches(iter(items), size))
    batches = [o for o in out if isinstance(o, Batch)]
    decoded = [i for i in items if isinstance(i, Decoded)]
    # every sample once, in order, with its own pixels
    assert [s for b in batches for s in b.samples] == [d.sample for d in decoded]
    assert [p for b in batches for p in b.pixels] == [d.pixels for d in decoded]
    # full batches, the remainder last, never an empty batch
    sizes = [len(b.samples) for b in batches]
    assert sizes == [size] * (len(decoded) // size) + ([len(decoded) % size] if len(decoded) % size else [])
    # rejections: all of them, in order, each as soon as it arrives (brute force: count samples before it)
    rejections = [o for o in out if isinstance(o, Rejection)]
    assert rejections == [i for i in items if isinstance(i, Rejection)]
    for pos, o in enumerate(out):
        if isinstance(o, Rejection):
            samples_before_in_input = sum(isinstance(i, Decoded) for i in items[: items.index(o)])
            samples_before_in_output = sum(len(b.samples) for b in out[:pos] if isinstance(b, Batch))
            assert samples_before_in_output == samples_before_in_input // size * size


def test_fixed_batches_example():
    items = decoded_items([True, True, False, True, True, True, False, True])
    out = list(fixed_batches(items, 2))
    shape = [[s.id for s in o.samples] if isinstance(o, Batch) else o.id for o in out]
    assert shape == [["id-0", "id-1"], "r-2", ["id-3", "id-4"], "r-6", ["id-5", "id-7"]]


# -- encode_batches and collect -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny():
    model = load_model(PRESETS["tiny"])
    return model, TokenEncoder(model, "fp16")


@pytest.fixture(scope="module")
def tiny_pixels(tiny, photos):
    model, _ = tiny
    dec = PillowDecoder(model.preprocess)
    out = []
    for i, (_, im) in enumerate(photos[:7]):
        data = image_bytes(im, "JPEG" if i % 2 else "PNG")
        out.append((sample(i, data), dec.prepare(data)))
    return out


def test_encode_and_collect_equal_one_batch_of_everything(tiny, tiny_pixels):
    model, encoder = tiny
    meta = new_metadata(model.identity, "fp16", "key")
    items = [Decoded(s, px) for s, px in tiny_pixels]
    items.insert(4, read_rejection(99))
    clock = Stopwatch()
    decoder = PillowDecoder(model.preprocess)
    data = collect(encode_batches(fixed_batches(items, 3), decoder, encoder, clock), SHARD, meta)
    want, scales, finite = encoder(np.stack([px for _, px in tiny_pixels]))
    assert finite.all() and scales is None and data.scales is None
    assert data.ids == [s.id for s, _ in tiny_pixels]
    assert data.values.dtype == np.float16 and data.values.shape == (7, meta.tokens_per_image, meta.token_dim)
    np.testing.assert_allclose(data.values.astype(np.float32), want.astype(np.float32), atol=5e-3)
    assert data.rejected == [rejection_row(SHARD, items[4])]
    assert clock.seconds > 0


class FailingAssembly(PillowDecoder):
    """A decoder whose batch half cannot use the items whose pixels are ``None``."""

    def assemble(self, items):
        errors = [None if x is not None else ValueError("cannot assemble this one") for x in items]
        good = [x for x in items if x is not None]
        return (np.stack(good) if good else np.zeros((0, *self.pp.size, 3), np.uint8)), errors


def test_an_item_the_decoder_cannot_assemble_becomes_a_decode_error(tiny, tiny_pixels):
    model, encoder = tiny
    meta = new_metadata(model.identity, "fp16", "key")
    bad = {1, 5, 6}  # batches of 3: [0, 1x, 2], [3, 4, 5x], [6x]: the last batch has nothing left to encode
    items = [Decoded(s, None if i in bad else px) for i, (s, px) in enumerate(tiny_pixels)]
    data = collect(encode_batches(fixed_batches(items, 3), FailingAssembly(model.preprocess), encoder), SHARD, meta)
    kept = [i for i in range(len(tiny_pixels)) if i not in bad]
    assert data.ids == [f"id-{i}" for i in kept]
    assert [(r["id"], r["stage"], r["reason"], r["error_type"], r["message"]) for r in data.rejected] == [
        (f"id-{i}", "decode", "decode_error", "ValueError", "cannot assemble this one") for i in sorted(bad)
    ]
    assert all(r["shard"] == SHARD and r["member"] == f"{r['id']}.jpg" for r in data.rejected)
    want, _, _ = encoder(np.stack([tiny_pixels[i][1] for i in kept]))
    np.testing.assert_allclose(data.values.astype(np.float32), want.astype(np.float32), atol=5e-3)


def test_non_finite_tokens_of_the_real_encoder_are_rejected(tiny, tiny_pixels, monkeypatch):
    model, encoder = tiny
    meta = new_metadata(model.identity, "fp16", "key")
    real_finish = encoder.finish
    calls = []

    def finish(pending):
        values, scales, finite = real_finish(pending)
        calls.append(len(finite))
        if len(calls) == 1:
            finite = finite.copy()
            finite[1] = False  # the second image of the first batch
        return values, scales, finite

    monkeypatch.setattr(encoder, "finish", finish)
    items = [Decoded(s, px) for s, px in tiny_pixels]
    data = collect(encode_batches(fixed_batches(items, 4), PillowDecoder(model.preprocess), encoder), SHARD, meta)
    assert calls == [4, 3]
    assert data.ids == [f"id-{i}" for i in range(7) if i != 1]
    [row] = data.rejected
    assert (row["id"], row["stage"], row["reason"], row["error_type"]) == (
        "id-1",
        "encode",
        "non_finite_tokens",
        "NonFiniteTokens",
    )
    assert "fp16" in row["message"]
    monkeypatch.undo()
    want, _, _ = encoder(np.stack([px for i, (_, px) in enumerate(tiny_pixels) if i != 1]))
    np.testing.assert_allclose(data.values.astype(np.float32), want.astype(np.float32), atol=5e-3)


class FakeEncoder:
    """int8 'tokens' that are the image's number; an image whose number is in ``bad`` is not finite.

    Logs start/finish calls to check that batch k+1 starts before batch k is finished.
    """

    quantization = "int8"

    def __init__(self, bad=(), m=2, d=3):
        self.bad, self.m, self.d, self.log = set(bad), m, d, []

    def start(self, batch):
        nums = [int(x) for x in batch]
        self.log.append(("start", nums))
        return nums

    def finish(self, nums):
        self.log.append(("finish", nums))
        n = len(nums)
        values = np.broadcast_to(np.array(nums, np.int8)[:, None, None], (n, self.m, self.d)).copy()
        scales = np.broadcast_to(np.array(nums, np.float16)[:, None] / 4, (n, self.m)).copy()
        finite = np.array([x not in self.bad for x in nums])
        return values, scales, finite


class NumberDecoder:
    def prepare(self, data):
        raise AssertionError("not used")

    def assemble(self, items):
        return np.array(items), [None] * len(items)


def numbered(n: int, rejected_at=()) -> list:
    return [read_rejection(i) if i in rejected_at else Decoded(sample(i, b""), i) for i in range(n)]


def int8_meta():
    model = ModelIdentity(
        backbone="fake",
        backbone_kwargs={},
        backbone_sha256="0" * 64,
        random_weights=True,
        adapter={},
        adapter_sha256="0" * 64,
        random_adapter=True,
        tokens="fake",
        preprocessing={},
        tokens_per_image=2,
        token_dim=3,
    )
    return new_metadata(model, "int8", "key")


def test_non_finite_rows_are_dropped_with_their_scales():
    enc = FakeEncoder(bad={2, 6})
    items = numbered(9, rejected_at={4})
    out = list(encode_batches(fixed_batches(items, 3), NumberDecoder(), enc))
    data = collect(out, SHARD, int8_meta())
    kept = [0, 1, 3, 5, 7, 8]
    assert data.ids == [f"id-{i}" for i in kept]
    np.testing.assert_array_equal(data.values[:, 0, 0], kept)
    np.testing.assert_array_equal(data.scales[:, 0], np.array(kept, np.float16) / 4)
    assert data.values.shape == (6, 2, 3) and data.scales.shape == (6, 2)
    assert [(r["id"], r["reason"]) for r in data.rejected] == [
        ("r-4", "duplicate_id"),
        ("id-2", "non_finite_tokens"),
        ("id-6", "non_finite_tokens"),
    ]
    assert "int8" in data.rejected[1]["message"]


def test_a_batch_that_is_all_non_finite_yields_an_empty_batch():
    enc = FakeEncoder(bad={0, 1})
    out = list(encode_batches(fixed_batches(numbered(2), 2), NumberDecoder(), enc))
    assert [type(o) for o in out] == [Rejection, Rejection, EncodedBatch]
    assert out[2].ids == [] and out[2].values.shape == (0, 2, 3) and out[2].scales.shape == (0, 2)
    data = collect(out, SHARD, int8_meta())
    assert data.ids == [] and data.values.shape == (0, 2, 3) and data.scales.shape == (0, 2)


def test_batch_k_plus_1_starts_before_batch_k_is_finished():
    enc = FakeEncoder()
    list(encode_batches(fixed_batches(numbered(7), 3), NumberDecoder(), enc))
    assert enc.log == [
        ("start", [0, 1, 2]),
        ("start", [3, 4, 5]),
        ("finish", [0, 1, 2]),
        ("start", [6]),
        ("finish", [3, 4, 5]),
        ("finish", [6]),
    ]


def test_a_batch_with_nothing_to_encode_is_never_started():
    class AllBad(NumberDecoder):
        def assemble(self, items):
            return np.zeros(0), [ValueError("no") for _ in items]

    enc = FakeEncoder()
    out = list(encode_batches(fixed_batches(numbered(4), 2), AllBad(), enc))
    assert enc.log == []
    assert [(o.id, o.reason) for o in out] == [(f"id-{i}", "decode_error") for i in range(4)]


def test_collect_of_nothing_is_an_empty_segment_of_the_store_shape():
    meta = int8_meta()
    data = collect(iter([read_rejection(0)]), SHARD, meta)
    assert data.ids == [] and data.values.dtype == np.int8 and data.values.shape == (0, 2, 3)
    assert data.scales.shape == (0, 2)
    assert [r["id"] for r in data.rejected] == ["r-0"]


def test_rejection_row_truncates_long_messages():
    r = Rejection("x", "x.jpg", "decode", "decode_error", "OSError", "y" * 5000)
    row = rejection_row(SHARD, r)
    assert row == {
        "id": "x",
        "shard": SHARD,
        "member": "x.jpg",
        "stage": "decode",
        "reason": "decode_error",
        "error_type": "OSError",
        "message": "y" * 2000,
    }
