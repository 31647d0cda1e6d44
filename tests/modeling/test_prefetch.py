"""The prefetcher on its own (no model): it runs ahead of its consumer, but not without bound, keeps the order,
hands over the thread's errors and stops when closed."""

from __future__ import annotations

import threading

import pytest

from rocketqa_ray.modeling.prefetch import Prefetcher


def test_the_prefetcher_prepares_the_next_item_while_the_consumer_works():
    """Depth 1: while the consumer holds item 0, item 1 is ready and item 2 being handed over; item 3 waits for the
    consumer (the thread runs ahead, but not without bound)."""
    prepared = {i: threading.Event() for i in range(6)}
    started: list[int] = []

    def prepare(i: int) -> int:
        started.append(i)
        prepared[i].set()
        return i * 10

    with Prefetcher(range(6), prepare, depth=1) as ahead:
        assert next(ahead) == 0
        # the consumer has not asked for item 1, yet it (and the one after) is prepared
        assert prepared[1].wait(timeout=30) and prepared[2].wait(timeout=30)
        assert 3 not in started  # the queue holds item 1 and the thread waits to hand over item 2
        assert next(ahead) == 10
        assert prepared[3].wait(timeout=30)
        assert list(ahead) == [20, 30, 40, 50]
    assert started == list(range(6))


def test_the_prefetcher_raises_the_threads_error_in_order_and_stops_when_closed():
    def prepare(i: int) -> int:
        if i == 2:
            raise KeyError("row 2")
        return i

    ahead = Prefetcher(range(5), prepare)
    assert [next(ahead), next(ahead)] == [0, 1]
    with pytest.raises(KeyError, match="row 2"):
        next(ahead)
    with pytest.raises(StopIteration):
        next(ahead)

    closed = threading.Event()
    pulled: list[int] = []

    def endless():
        try:
            i = 0
            while True:
                pulled.append(i)
                yield i
                i += 1
        finally:
            closed.set()

    ahead = Prefetcher(endless(), lambda i: i, depth=2)
    assert next(ahead) == 0
    ahead.close()  # the thread was waiting to hand over an item: it stops, and closes its source
    assert closed.is_set() and len(pulled) <= 5
    with pytest.raises(StopIteration):
        next(ahead)
