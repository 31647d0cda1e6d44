"""Read, compute, write: three stages over a list of work items, overlapped (Ray-free).

An encoding or scoring actor that reads a shard, computes it and writes it, one after another, leaves its
accelerator idle while Parquet is read and written. Here the next items are read ahead (`modeling.prefetch`'s
Prefetcher) and the previous one is written by a writer thread while the current one is computed, so the compute
stage waits only when I/O is slower than it. Results come back in item order; the first error of any stage is
raised in the caller, after the items computed before it are written.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from rocketqa_ray.modeling.prefetch import Prefetcher

Item = TypeVar("Item")

_DONE = object()


def overlapped(items: Sequence[Item], read: Callable[[Item], Any], compute: Callable[[Any], Any],
               write: Callable[[Item, Any], Any]) -> list[Any]:
    """`[write(item, compute(read(item))) for item in items]`, with the next items' reads and item i-1's write
    running while item i is computed. `compute` runs in the calling thread (the one that owns the model)."""
    if len(items) <= 1:
        return [write(item, compute(read(item))) for item in items]
    writes: queue.Queue = queue.Queue(maxsize=1)
    results: list[Any] = [None] * len(items)
    write_errors: list[BaseException] = []

    def writer() -> None:
        while (job := writes.get()) is not _DONE:
            if write_errors:  # after a failed write, only drain: the caller stops at its next item
                continue
            i, value = job
            try:
                results[i] = write(items[i], value)
            except BaseException as e:  # noqa: BLE001 - handed to the caller's thread
                write_errors.append(e)

    thread = threading.Thread(target=writer, daemon=True, name="overlap-write")
    thread.start()
    try:
        with Prefetcher(items, read) as ready:  # a failed read is raised here, at its place in the order
            for i, value in enumerate(ready):
                if write_errors:
                    break
                writes.put((i, compute(value)))
    finally:
        writes.put(_DONE)
        thread.join()  # every item computed before an error, or all of them, is written
    if write_errors:
        raise write_errors[0]
    return results
