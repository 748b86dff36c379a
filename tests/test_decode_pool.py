"""The decode window's limits and its daemon thread pool (edje_indexer.transforms.stages), driven directly."""

from __future__ import annotations

import concurrent.futures as cf
import threading
import time

import pytest

from edje_indexer.transforms.shards import Sample
from edje_indexer.transforms.stages import MAX_PENDING_BYTES, DaemonPool, Decoded, OrderedDecodeMap

WAIT_S = 20.0  # a blocked fake decode gives up after this long, so a failing test can never hang


class GatedDecoder:
    """Every decode waits for ``gate``; counts how many started and how many ran at once."""

    def __init__(self):
        self.gate = threading.Event()
        self.started = 0
        self.running = 0
        self.most = 0
        self.seen: list[int] = []
        self._lock = threading.Lock()

    def prepare(self, data: bytes):
        with self._lock:
            self.started += 1
            self.running += 1
            self.most = max(self.most, self.running)
            self.seen.append(len(data))
        try:
            self.gate.wait(WAIT_S)
            return f"px:{len(data)}"
        finally:
            with self._lock:
                self.running -= 1

    def assemble(self, items):
        raise AssertionError("not used here")


@pytest.fixture
def gated():
    dec = GatedDecoder()
    yield dec
    dec.gate.set()


def samples(sizes: list[int]) -> list[Sample]:
    return [Sample(f"id-{i}", f"id-{i}", f"id-{i}.jpg", b"x" * n) for i, n in enumerate(sizes)]


def wait_for(cond, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond() and time.monotonic() < deadline:
        time.sleep(0.01)


def test_the_window_is_bounded_by_bytes(gated):
    """8 threads and room for 100 samples by count, but 350 bytes: only 3 samples of 100 bytes are in flight."""
    items = samples([100] * 8)
    out = []
    with OrderedDecodeMap(gated, 8, timeout_s=WAIT_S, prefetch=100, max_pending_bytes=350) as decode:
        t = threading.Thread(target=lambda: out.extend(decode(items)), daemon=True)
        t.start()
        wait_for(lambda: gated.started >= 3)
        time.sleep(0.3)
        assert gated.started == 3
        gated.gate.set()
        t.join(WAIT_S)
    assert [o.sample for o in out] == items and all(isinstance(o, Decoded) for o in out)
    assert gated.most <= 3


def test_a_sample_larger_than_the_window_is_still_decoded(gated):
    gated.gate.set()
    items = samples([1000, 10, 1000])
    with OrderedDecodeMap(gated, 4, timeout_s=WAIT_S, prefetch=10, max_pending_bytes=100) as decode:
        out = list(decode(items))
    assert [o.pixels for o in out] == ["px:1000", "px:10", "px:1000"]
    assert gated.most == 1  # each one alone: it is over the limit with anything else


def test_the_default_window_is_256_mib():
    assert MAX_PENDING_BYTES == 256 * 1024 * 1024
    assert OrderedDecodeMap(GatedDecoder(), 1, 1.0, 1).max_pending_bytes == MAX_PENDING_BYTES


def test_a_decoded_sample_no_longer_holds_its_bytes(gated):
    gated.gate.set()
    items = samples([50, 60])
    with OrderedDecodeMap(gated, 2, timeout_s=WAIT_S, prefetch=4) as decode:
        out = list(decode(items))
    assert sorted(gated.seen) == [50, 60]  # the decoder got the bytes
    assert [o.sample.data for o in out] == [b"", b""]  # then the samples let go of them


def test_decode_threads_are_daemon_threads(gated):
    with OrderedDecodeMap(gated, 2, timeout_s=WAIT_S, prefetch=4) as decode:
        gen = decode(iter(samples([1, 1, 1])))
        t = threading.Thread(target=lambda: list(gen), daemon=True)
        t.start()
        wait_for(lambda: gated.started >= 2)
        threads = [th for th in threading.enumerate() if th.name.startswith("decode_")]
        assert threads and all(th.daemon for th in threads)
        gated.gate.set()
        t.join(WAIT_S)


def test_daemon_pool_results_errors_and_cancellation():
    pool = DaemonPool(1)
    gate = threading.Event()
    assert pool.submit(lambda x: x * 2, 21).result(5) == 42
    with pytest.raises(ZeroDivisionError):
        pool.submit(lambda: 1 / 0).result(5)
    blocked = pool.submit(gate.wait, WAIT_S)
    wait_for(blocked.running)
    queued = [pool.submit(lambda: "never") for _ in range(3)]
    assert queued[0].cancel() and queued[0].cancelled()
    assert not blocked.cancel()  # running: cannot be cancelled
    with pytest.raises(cf.TimeoutError):
        blocked.result(0.05)
    pool.shutdown(cancel_futures=True)
    assert all(f.cancelled() for f in queued)
    with pytest.raises(RuntimeError):
        pool.submit(lambda: None)
    gate.set()
    assert blocked.result(5) is True


def test_daemon_pool_starts_threads_only_as_needed():
    pool = DaemonPool(8)
    for _ in range(5):
        pool.submit(lambda: None).result(5)  # one at a time: the idle thread is reused
    assert len(pool._threads) == 1
    pool.shutdown()
    wait_for(lambda: not pool._threads[0].is_alive())
    assert not pool._threads[0].is_alive()
