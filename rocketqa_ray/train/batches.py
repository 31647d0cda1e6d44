"""Which rows each training step of a worker trains on (Ray-free): the data order of `train.loop`.

Every worker reads every global batch of the epoch's seeded order and takes its own slice (rank r: rows
r*b .. r*b+b-1), so N workers with batch b see the global batches of one process with batch N*b. A resumed
run starts at its step: the batches of the epoch before it are read and skipped, not trained on.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import pyarrow as pa


@dataclass(frozen=True)
class StepRows:
    """This worker's rows of one step: `index` is the global batch's place in its epoch."""

    epoch: int
    index: int
    rows: list[dict]


def worker_batches(epoch_tables: Callable[[int], Iterable[pa.Table]], start_step: int, steps_per_epoch: int,
                   total: int, rank: int, batch_size: int) -> Iterator[StepRows]:
    """This worker's rows for steps `start_step` .. `total - 1`.

    epoch_tables(epoch): the global batches of that epoch in their (seeded) order, `batch_size * workers`
    rows each; at most `steps_per_epoch` of them are used. No table is read past the last step.
    """
    step = start_step
    epoch, skip = divmod(start_step, steps_per_epoch)
    while step < total:
        for i, table in enumerate(epoch_tables(epoch)):
            if i >= skip:
                yield StepRows(epoch, i, table.slice(rank * batch_size, batch_size).to_pylist())
                step += 1
            if i + 1 >= steps_per_epoch or step >= total:
                break
        epoch, skip = epoch + 1, 0
