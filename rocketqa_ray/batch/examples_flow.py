"""Training examples with their texts, as a Ray Data flow: the driver hands over example rows as ids
(`data.examples.dual_id_rows` / `cross_id_groups`, written to Parquet), the flow joins every passage id to its text
in the corpus store, groups the texts back by row and writes the examples folder in training order. No process
holds the examples' texts (a dual row carries ~5 passages: ~3 KB a row, gigabytes at a million questions).

Order is the rows' order (`row`): the folder's files, read in name order, give the rows as the driver listed
them, so training sees exactly what `data.examples.write_examples` would have written (tested)."""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from rocketqa_ray.batch.pair_flow import ROWS_PER_PARTITION, passages_of
from rocketqa_ray.config import RayConfig
from rocketqa_ray.data import corpus_store
from rocketqa_ray.data.examples import (
    ID_SCHEMAS,
    ROW,
    as_schema,
    assemble_example,
    cross_id_row,
    example_kind,
    id_slots,
    id_table,
    parquet_files,
)
from rocketqa_ray.errors import DataError
from rocketqa_ray.io import atomic_dir, atomic_path, parquet_rows, write_json
from rocketqa_ray.retrieval.candidates import SUCCESS

log = logging.getLogger(__name__)


SLOTS_KEY = b"slots"  # the ids file's metadata: passages over all its rows (sizes the join without a pass)


def write_id_rows(rows: list[dict], path: str | Path) -> Path:
    """The id rows, numbered in list order, as one Parquet file (the flow's input)."""
    if not rows:
        raise DataError(f"no training examples to write to {path}")
    kind = example_kind(rows[0])
    slots = sum(len(r["pids"]) if kind == "cross" else 1 + len(r["negative_ids"]) for r in rows)
    with atomic_path(path, suffix=".parquet") as tmp:
        pq.write_table(id_table(rows, kind).replace_schema_metadata({SLOTS_KEY: str(slots).encode()}), tmp)
    return Path(path)


def cross_id_parts(dual_ids: str | Path, out_dir: str | Path) -> Path:
    """A folder of dual id rows (e.g. `batch.negatives_flow`'s) as cross-encoder groups (`data.examples.cross_id_row`),
    part by part (one part in memory at a time), atomically; the rows keep their `row`, so their order."""
    with atomic_dir(out_dir) as tmp:
        for f in parquet_files(dual_ids):
            rows = [cross_id_row(r) for r in pq.read_table(f, columns=ID_SCHEMAS["dual"].names).to_pylist()]
            if rows:
                pq.write_table(pa.Table.from_pylist(rows, schema=ID_SCHEMAS["cross"]), Path(tmp) / f.name)
    return Path(out_dir)


def id_counts(files: list[Path]) -> tuple[int, int, str]:
    """(rows, passages over all rows, kind) of id-row files: the passages from `write_id_rows`' metadata, else
    from the id columns, read a column at a time."""
    names = pq.read_schema(files[0]).names
    kind = "cross" if "pids" in names else "dual"
    rows = slots = 0
    for f in files:
        pf = pq.ParquetFile(f)
        rows += pf.metadata.num_rows
        meta = pf.schema_arrow.metadata or {}
        if SLOTS_KEY in meta:
            slots += int(meta[SLOTS_KEY])
            continue
        col = "pids" if kind == "cross" else "negative_ids"
        for batch in pf.iter_batches(columns=[col]):
            slots += int(pc.sum(pc.list_value_length(batch.column(0))).as_py() or 0) + (kind == "dual") * batch.num_rows
    return rows, slots, kind


def examples_flow(ids_file: str | Path, store_dir: str | Path, out_dir: str | Path,
                  ray_cfg: RayConfig | None = None) -> Path:
    """Id rows in `ids_file` (written by `write_id_rows`, or a folder of such parts, e.g. `batch.negatives_flow`'s)
    -> the examples folder `out_dir` (Parquet parts with the columns of `data.examples.SCHEMAS`, the rows in the
    order of their `row` across the files in name order; `_SUCCESS.json` last, with the row count). Raises
    DataError when a passage id is not in the store."""
    import ray

    from rocketqa_ray.ray_utils import ensure_ray, write_parquet

    ensure_ray(ray_cfg)
    t0 = time.perf_counter()
    files = parquet_files(ids_file)
    n_rows, n_slots, kind = id_counts(files)
    ctx = ray.data.DataContext.get_current()
    before = ctx.execution_options.preserve_order
    ctx.execution_options.preserve_order = True  # write tasks numbered in the sorted blocks' order
    try:
        # one row per passage, carrying its row's columns; joined to the texts; grouped back into rows; sorted
        slots = ray.data.read_parquet([str(f) for f in files], columns=ID_SCHEMAS[kind].names).map_batches(
            id_slots, batch_format="pyarrow")
        rec = corpus_store.require_record(store_dir)
        n_part = max(1, math.ceil(max(n_slots, rec["n_rows"]) / ROWS_PER_PARTITION))
        passages = ray.data.read_parquet(corpus_store.part_files(store_dir)).select_columns(["id", "title", "text"]) \
            .map_batches(passages_of, batch_format="pyarrow")
        examples = (slots.join(passages, "inner", n_part, on=("pid",), right_on=("id",))
                    .groupby(ROW).map_groups(assemble_example, fn_kwargs={"kind": kind}, batch_format="pyarrow")
                    .sort(ROW)
                    .map_batches(as_schema, fn_kwargs={"kind": kind}, batch_format="pyarrow"))  # order kept, `row` not
        with atomic_dir(out_dir) as tmp:
            write_parquet(examples, tmp)
            got = parquet_rows(tmp)
            if got != n_rows:  # a row none of whose passages is in the store left no group
                raise DataError(f"training examples: {n_rows} rows in {ids_file} but {got} have their passages in "
                                f"{store_dir}: some passage id is not in the corpus")
            write_json(tmp / SUCCESS, {"rows": n_rows, "kind": kind, "seconds": round(time.perf_counter() - t0, 3)})
    finally:
        ctx.execution_options.preserve_order = before
    log.info("%s examples: %d rows with their texts in %.1f s -> %s", kind, n_rows, time.perf_counter() - t0, out_dir)
    return Path(out_dir)
