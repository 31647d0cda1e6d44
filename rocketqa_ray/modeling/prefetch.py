"""Batches made ready ahead of the device's work (Ray-free): a background thread, pinned memory, async copies.

The host's share of a training step or an inference batch (tokenising texts into tensors) would otherwise
leave the GPU idle; here a thread prepares the next batch while the current one runs, and on CUDA pins its
tensors so that `to_device` can copy them without waiting. The order of the batches is the order of the items.
"""

from __future__ import annotations

import dataclasses
import queue
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Generic, TypeVar

import torch

S = TypeVar("S")
T = TypeVar("T")


def map_tensors(obj: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """`obj` with `fn` applied to every tensor inside it (dicts, lists, tuples, dataclasses); the rest as is."""
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, dict):
        return {k: map_tensors(v, fn) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(map_tensors(v, fn) for v in obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.replace(obj, **{f.name: map_tensors(getattr(obj, f.name), fn)
                                           for f in dataclasses.fields(obj) if f.init})
    return obj


def pin(batch: T) -> T:
    """`batch` with its tensors in page-locked memory: a copy from there to the GPU need not block the host."""
    return map_tensors(batch, lambda t: t.pin_memory())


def to_device(batch: T, device: torch.device | str) -> T:
    """`batch` with its tensors on `device`; on CUDA copied without blocking (asynchronous from pinned memory,
    ordered before the step's kernels on the same stream). On the CPU the batch itself."""
    device = torch.device(device)
    if device.type == "cpu":
        return batch
    return map_tensors(batch, lambda t: t.to(device, non_blocking=True))


_END = object()


class Prefetcher(Generic[T]):
    """Iterates `prepare(item)` for the items of `items`, in order, each prepared by a background thread while
    the consumer works on the one before (at most `depth` ready and one in the making).

    `pin_device`: a CUDA device to pin the prepared tensors for (None: leave them in pageable memory; 'cuda'
    without an index: the caller's current device).
    An exception in the thread is raised by `next()` at its place in the order. Close it (or use it as a
    context manager) when leaving early: the thread then stops and closes `items`.
    """

    def __init__(self, items: Iterable[S], prepare: Callable[[S], T], depth: int = 1,
                 pin_device: torch.device | None = None) -> None:
        if depth < 1:
            raise ValueError(f"prefetch depth must be at least 1, got {depth}")
        if pin_device is not None and pin_device.index is None:  # resolved here: the thread's own would be GPU 0
            pin_device = torch.device("cuda", torch.cuda.current_device())
        self._items = items
        self._prepare = prepare
        self._pin_device = pin_device
        self._ready: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._done = False
        self._thread = threading.Thread(target=self._produce, name="prefetch", daemon=True)
        self._thread.start()

    def _produce(self) -> None:
        it = iter(self._items)
        try:
            if self._pin_device is not None:
                # else this thread pins through a context on GPU 0, which another worker of the node may own
                torch.cuda.set_device(self._pin_device)
            while not self._stop.is_set():
                try:
                    item = next(it)
                except StopIteration:
                    break
                out = self._prepare(item)
                self._ready.put((pin(out) if self._pin_device is not None else out, None))
            self._ready.put((_END, None))
        except BaseException as e:  # handed to the consumer, in order
            self._ready.put((None, e))
        finally:
            close = getattr(it, "close", None)
            if close is not None:
                close()

    def __iter__(self) -> Iterator[T]:
        return self

    def __next__(self) -> T:
        if self._done:
            raise StopIteration
        out, error = self._ready.get()
        if error is not None or out is _END:
            self._done = True
            self._thread.join()
            if error is not None:
                raise error
            raise StopIteration
        return out

    def close(self) -> None:
        """Stop the thread (after the item it is preparing) and wait for it."""
        self._stop.set()
        self._done = True
        while self._thread.is_alive():
            try:  # a thread waiting to hand over a batch needs room
                self._ready.get_nowait()
            except queue.Empty:
                pass
            self._thread.join(timeout=0.01)

    def __enter__(self) -> Prefetcher[T]:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
