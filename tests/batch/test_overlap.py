"""Read / compute / write overlapped over work items (batch.overlap): order, overlap, errors."""

from __future__ import annotations

import threading

import pytest

from rocketqa_ray.batch.overlap import overlapped

WAIT_S = 10.0  # generous: the events fire at once when the stages overlap, and never when they do not


def test_results_in_item_order_equal_the_sequential_loop():
    items = list(range(7))
    out = overlapped(items, lambda i: i * 10, lambda v: v + 1, lambda i, v: (i, v))
    assert out == [(i, i * 10 + 1) for i in items]
    assert overlapped([3], lambda i: i, lambda v: v * 2, lambda i, v: v) == [6]
    assert overlapped([], lambda i: i, lambda v: v, lambda i, v: v) == []


def test_the_next_read_and_the_last_write_run_while_an_item_is_computed():
    read_started = {i: threading.Event() for i in range(3)}
    write_started = {i: threading.Event() for i in range(3)}
    seen: dict[str, bool] = {}

    def read(i: int) -> int:
        read_started[i].set()
        return i

    def compute(i: int) -> int:
        if i == 0:  # item 1 is read while item 0 is computed
            seen["read 1 during compute 0"] = read_started[1].wait(WAIT_S)
        if i == 1:  # item 0 is written while item 1 is computed
            seen["write 0 during compute 1"] = write_started[0].wait(WAIT_S)
        return i

    def write(i: int, v: int) -> int:
        write_started[i].set()
        return v

    assert overlapped(list(range(3)), read, compute, write) == [0, 1, 2]
    assert seen == {"read 1 during compute 0": True, "write 0 during compute 1": True}


def test_compute_runs_in_the_calling_thread():
    threads = overlapped([1, 2, 3], lambda i: i, lambda v: threading.get_ident(), lambda i, v: v)
    assert set(threads) == {threading.get_ident()}


@pytest.mark.parametrize("stage", ["read", "compute", "write"])
def test_an_error_in_any_stage_is_raised_and_earlier_items_are_written(stage):
    written: list[int] = []

    def fail_at_2(name: str, i: int) -> None:
        if stage == name and i == 2:
            raise ValueError(f"{name} of item 2 failed")

    def read(i: int) -> int:
        fail_at_2("read", i)
        return i

    def compute(i: int) -> int:
        fail_at_2("compute", i)
        return i

    def write(i: int, v: int) -> int:
        fail_at_2("write", i)
        written.append(i)
        return v

    with pytest.raises(ValueError, match=f"{stage} of item 2 failed"):
        overlapped(list(range(6)), read, compute, write)
    assert written[:2] == [0, 1] and 2 not in written
