"""Candidates: each question's top-k passages from several index shards' answers, minus the passages it must not
get (its gold positives, when mining hard negatives), and the Parquet files they are kept in.

A candidates folder holds `part-XXXXXXXXXX.parquet` files (columns `qid`, `pids` list<string>, `scores`
list<float32>, best first; the number is the first question row in it) and, written last, `_SUCCESS.json`. Every
question is in exactly one part. Ray-free: `batch.search` writes them from its searcher actors' answers.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from rocketqa_ray.errors import DataError
from rocketqa_ray.index.search import merge_topk
from rocketqa_ray.io import atomic_path, read_json_if_valid
from rocketqa_ray.types import RankedHits

SUCCESS = "_SUCCESS.json"
SCHEMA = pa.schema([("qid", pa.string()), ("pids", pa.list_(pa.string())), ("scores", pa.list_(pa.float32()))])

Answer = tuple[np.ndarray, np.ndarray, list[list[str]]]  # one searcher's (scores, global rows, ids per query)


def depth_for(k: int, exclude: Iterable[Sequence[str]] | None) -> int:
    """How many hits to ask each shard for, so that k remain after the largest exclusion."""
    return int(k) + max((len(e) for e in exclude or ()), default=0)


def merge_answers(answers: list[Answer], k: int, metric: str, n_queries: int,
                  exclude: Sequence[Sequence[str]] | None = None) -> list[list[tuple[str, float]]]:
    """The best `k` (pid, score) per query over several searchers' answers (in shard order, so ties fall as one
    index over all rows breaks them), without the query's `exclude` ids."""
    depth = depth_for(k, exclude)
    scores, rows = merge_topk([(s, r) for s, r, _ in answers], depth, metric, n_queries=n_queries)
    names: list[dict[int, str]] = [{} for _ in range(n_queries)]
    for _, a_rows, a_ids in answers:
        for i in range(n_queries):
            valid = a_rows[i][a_rows[i] >= 0]
            names[i].update(zip(valid.tolist(), a_ids[i]))
    out = []
    for i in range(n_queries):
        drop = set(exclude[i]) if exclude is not None else ()
        hits = []
        for s, r in zip(scores[i].tolist(), rows[i].tolist()):
            if r < 0:
                break
            pid = names[i][r]
            if pid not in drop:
                hits.append((pid, float(s)))
                if len(hits) == k:
                    break
        out.append(hits)
    return out


def to_table(qids: Sequence[str], hits: Sequence[Sequence[tuple[str, float]]]) -> pa.Table:
    return pa.table({"qid": pa.array([str(q) for q in qids], pa.string()),
                     "pids": pa.array([[p for p, _ in h] for h in hits], pa.list_(pa.string())),
                     "scores": pa.array([[s for _, s in h] for h in hits], pa.list_(pa.float32()))}, schema=SCHEMA)


def part_path(folder: str | Path, first_row: int) -> Path:
    return Path(folder) / f"part-{int(first_row):010d}.parquet"


def write_part(folder: str | Path, first_row: int, table: pa.Table) -> Path:
    """One part, atomically: a retried batch rewrites the same file, so no question is written twice."""
    path = part_path(folder, first_row)
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)
    return path


def parts(folder: str | Path) -> list[Path]:
    return sorted(Path(folder).glob("part-*.parquet"))


def success(folder: str | Path) -> dict | None:
    return read_json_if_valid(Path(folder) / SUCCESS)


def iter_tables(folder: str | Path) -> Iterator[pa.Table]:
    """A complete candidates folder, part by part."""
    folder = Path(folder)
    if success(folder) is None:
        raise DataError(f"{folder}: no complete candidates here (no {SUCCESS}); rerun the stage that retrieves them")
    for path in parts(folder):
        try:
            yield pq.read_table(path)
        except (OSError, pa.ArrowInvalid) as e:
            raise DataError(f"{path} is not readable ({str(e).splitlines()[0][:120]}); delete {folder} and rerun "
                            "the stage") from None


def read_hits(folder: str | Path, qids: Collection[str] | None = None) -> RankedHits:
    """{qid: [(pid, score), ...]} for a bounded set of questions (test, dev): the whole folder in memory, or only
    the questions in `qids` (read part by part)."""
    import pyarrow.compute as pc

    keep = pa.array(sorted(set(qids)), pa.string()) if qids is not None else None
    out: RankedHits = {}
    for t in iter_tables(folder):
        if keep is not None:
            t = t.filter(pc.is_in(t.column("qid"), value_set=keep))
        for q, ps, ss in zip(t.column("qid").to_pylist(), t.column("pids").to_pylist(), t.column("scores").to_pylist()):
            out[q] = list(zip(ps, ss))
    return out


def count_rows(folder: str | Path) -> int:
    return sum(pq.ParquetFile(p).metadata.num_rows for p in parts(folder))
