"""Read, compute, write: three stages over a list of work items, overlapped (Ray-free).

An encoding or scoring actor that reads a shard, computes it and writes it, one after another, leaves its
accelerator idle while Parquet is read and written. Here the next item is read while the current one is
computed and the previous one is written, each stage in its own thread with one item of slack, so the compute
stage waits only when I/O is slower than it. Results come back in item order; the first error of any stage
stops the others and is raised in the caller.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

Item = TypeVar("Item")

_DONE = object()


class _Failed:
    def __init__(self, error: BaseException):
        self.error = error


def overlapped(items: Sequence[Item], read: Callable[[Item], Any], compute: Callable[[Any], Any],
               write: Callable[[Item, Any], Any]) -> list[Any]:
    """`[write(item, compute(read(item))) for item in items]`, with item i+1's read and item i-1's write running
    while item i is computed. `compute` runs in the calling thread (the one that owns the model)."""
    if len(items) <= 1:
        return [write(item, compute(read(item))) for item in items]
    stop = threading.Event()
    reads: queue.Queue = queue.Queue(maxsize=1)
    writes: queue.Queue = queue.Queue(maxsize=1)
    results: list[Any] = [None] * len(items)
    write_error: list[BaseException] = []

    def put(q: queue.Queue, value: Any) -> bool:
        while not stop.is_set():
            try:
                q.put(value, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def get(q: queue.Queue) -> Any:
        while True:
            try:
                return q.get(timeout=0.1)
            except queue.Empty:
                if stop.is_set():
                    return _DONE

    def reader() -> None:
        for item in items:
            try:
                value = read(item)
            except BaseException as e:  # noqa: BLE001 - handed to the caller's thread
                put(reads, _Failed(e))
                return
            if not put(reads, value):
                return

    def writer() -> None:
        while True:
            job = get(writes)
            if job is _DONE:
                return
            i, value = job
            if isinstance(value, _Failed):  # a read failed: stop, and raise it in the caller
                write_error.append(value.error)
                stop.set()
                return
            try:
                results[i] = write(items[i], value)
            except BaseException as e:  # noqa: BLE001 - handed to the caller's thread
                write_error.append(e)
                stop.set()
                return

    threads = [threading.Thread(target=reader, daemon=True, name="overlap-read"),
               threading.Thread(target=writer, daemon=True, name="overlap-write")]
    for t in threads:
        t.start()
    try:
        for i in range(len(items)):
            value = get(reads)
            if value is _DONE:
                break  # the writer failed: its error is raised below
            # a failed read travels through the writer, so the items before it are still written
            if not put(writes, (i, value if isinstance(value, _Failed) else compute(value))):
                break
        put(writes, _DONE)
        threads[1].join()  # every computed item is written before the results are returned
    finally:
        stop.set()
        for t in threads:
            t.join()
    if write_error:
        raise write_error[0]
    return results
