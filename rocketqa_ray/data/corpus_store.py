"""The corpus as Parquet parts (`id`, `title`, `text`, `line`), read once from the user's file by parallel readers
and validated in the same pass; later stages read passages from here, never from a dict of the whole corpus.

A JSONL file is cut into byte ranges that start at line starts (`line_chunks`); each range is parsed on its own
(`parse_chunk`), with its first line's number known from the newlines before it, so a malformed line is named by
file and line whoever reads it. A gzip file cannot seek: it is one range. A Parquet corpus is cut by row groups.

Folder layout: `part-XXXXX.parquet` (part i = range i, in corpus order) and, last, `_SUCCESS.json` (rows per part,
the source file's size and mtime). Ray-free; `batch.corpus` runs the ranges in Ray tasks and checks ids.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from rocketqa_ray.data.beir import check_passage, iter_jsonl
from rocketqa_ray.errors import DataError
from rocketqa_ray.io import atomic_path, read_json_if_valid

SUCCESS = "_SUCCESS.json"
STORE_DIR = "corpus"  # in a RUN_DIR: the store the pipeline writes and the service reads its texts from
SCHEMA = pa.schema([("id", pa.string()), ("title", pa.string()), ("text", pa.string()), ("line", pa.int64())])


def part_path(folder: str | Path, i: int) -> Path:
    return Path(folder) / f"part-{i:05d}.parquet"


def line_chunks(path: str | Path, chunk_bytes: int) -> list[tuple[int, int]]:
    """Byte ranges [start, end) of about `chunk_bytes` covering the file, each starting at a line start."""
    path = Path(path)
    size = path.stat().st_size
    if path.suffix == ".gz" or path.suffix == ".parquet":
        return [(0, size)]
    starts = [0]
    with open(path, "rb") as f:
        pos = chunk_bytes
        while pos < size:
            f.seek(pos)
            f.readline()  # to the end of the line `pos` falls in
            nxt = f.tell()
            if nxt >= size:
                break
            if nxt > starts[-1]:
                starts.append(nxt)
            pos = nxt + chunk_bytes
    return list(zip(starts, starts[1:] + [size]))


def count_newlines(path: str | Path, start: int, end: int, block: int = 1 << 24) -> int:
    """Newlines in bytes [start, end) of a plain file (gives the next range's first line number)."""
    n = 0
    with open(path, "rb") as f:
        f.seek(start)
        left = end - start
        while left > 0:
            buf = f.read(min(block, left))
            if not buf:
                break
            n += buf.count(b"\n")
            left -= len(buf)
    return n


def parse_chunk(path: str | Path, start: int, end: int, first_line: int) -> pa.Table:
    """The validated passages whose lines start in [start, end): a DataError names the file and line of the first
    problem (malformed JSON, no id, no text)."""
    path = Path(path)
    if path.suffix == ".parquet":
        return parse_parquet(path)
    ids, titles, texts, lines = [], [], [], []
    for lineno, obj in iter_jsonl(path, start, None if path.suffix == ".gz" else end, first_line):
        p = check_passage(obj, f"{path}:{lineno}")
        ids.append(p["_id"])
        titles.append(p["title"])
        texts.append(p["text"])
        lines.append(lineno)
    return pa.table({"id": ids, "title": titles, "text": texts, "line": pa.array(lines, pa.int64())}, schema=SCHEMA)


def parse_parquet(path: Path) -> pa.Table:
    """A Parquet corpus (`_id`, `text`, optional `title`), validated row by row; `line` is the row number."""
    from rocketqa_ray.data.beir import iter_corpus

    rows = list(iter_corpus(path))
    return pa.table({"id": [r["_id"] for r in rows], "title": [r["title"] for r in rows],
                     "text": [r["text"] for r in rows], "line": pa.array(range(len(rows)), pa.int64())},
                    schema=SCHEMA)


def write_part(folder: str | Path, i: int, table: pa.Table) -> Path:
    path = part_path(folder, i)
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)
    return path


def record(folder: str | Path) -> dict | None:
    """The `_SUCCESS.json` of a complete store, else None."""
    rec = read_json_if_valid(Path(folder) / SUCCESS)
    return rec if isinstance(rec, dict) and "part_rows" in rec else None


def require_record(folder: str | Path) -> dict:
    """The record of a complete store; a DataError naming the folder otherwise."""
    rec = record(folder)
    if rec is None:
        raise DataError(f"{folder}: not a complete corpus store (no {SUCCESS}); run the ingest again")
    return rec


def part_files(folder: str | Path) -> list[str]:
    """The paths of a complete store's parts, in corpus order (what Ray Data reads)."""
    return [str(part_path(folder, i)) for i in range(len(require_record(folder)["part_rows"]))]


def iter_parts(folder: str | Path, columns: list[str] | None = None) -> Iterator[pa.Table]:
    """The passages part by part, in corpus order."""
    rec = require_record(folder)
    for i, n in enumerate(rec["part_rows"]):
        table = pq.read_table(part_path(folder, i), columns=columns)
        if table.num_rows != n:
            raise DataError(f"{part_path(folder, i)}: {table.num_rows} passages, {n} recorded; run the ingest again")
        yield table


def lookup(folder: str | Path, ids: set[str]) -> dict[str, tuple[str, str]]:
    """{id: (title, text)} for the given ids only, streamed part by part (the id column first, then only the
    matching rows' texts): memory follows len(ids)."""
    import pyarrow.compute as pc

    want = pa.array(sorted(ids), pa.string())
    out: dict[str, tuple[str, str]] = {}
    rec = require_record(folder)
    for i in range(len(rec["part_rows"])):
        f = pq.ParquetFile(part_path(folder, i))
        rows = pc.indices_nonzero(pc.is_in(f.read(columns=["id"]).column("id"), value_set=want))
        if len(rows):
            hit = f.read(columns=["id", "title", "text"]).take(rows)
            out.update(zip(hit.column("id").to_pylist(), zip(hit.column("title").to_pylist(),
                                                              hit.column("text").to_pylist())))
    return out


def read_rows(folder: str | Path, start: int, stop: int, columns: list[str] | None = None) -> pa.Table:
    """Passages [start, stop) in corpus order, reading only the parts that hold them: an index shard's texts, since
    the index keeps the store's order (memory follows stop - start)."""
    rec = require_record(folder)
    pieces, first = [], 0
    for i, n in enumerate(rec["part_rows"]):
        lo, hi = max(start, first), min(stop, first + n)
        if lo < hi:
            pieces.append(pq.read_table(part_path(folder, i), columns=columns).slice(lo - first, hi - lo))
        first += n
    if first < stop or start < 0:
        raise DataError(f"{folder}: rows [{start}, {stop}) asked, the store holds {first}; run the ingest again")
    if not pieces:
        return SCHEMA.empty_table().select(columns) if columns else SCHEMA.empty_table()
    return pa.concat_tables(pieces).combine_chunks()
