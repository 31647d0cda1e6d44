"""Step 3's training rows as a Ray Data flow: every question's candidates, cross-encoder scores, positives and known
positives, read from the files that hold them, grouped by question and decided group by group
(`rocketqa.question_negatives.decide`: denoise, draw the negatives). The driver passes paths and sums counts; no
process holds every question's candidates, scores or rows.

The rows (ids, `batch.examples_flow` gives them their texts) carry `row` = `data.examples.order_key`, so sorted by
it they are in the order the driver path writes; each question's counts ride on its first row as JSON and add up
to the stage's stats (`stats_of`), equal to deciding all questions in one process (tested)."""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from rocketqa_ray.batch.pair_flow import ROWS_PER_PARTITION, explode_top
from rocketqa_ray.config import RayConfig
from rocketqa_ray.data.examples import ID_SCHEMAS, ROW, order_key, parquet_files
from rocketqa_ray.errors import DataError
from rocketqa_ray.io import atomic_dir, atomic_path, write_json
from rocketqa_ray.retrieval.candidates import SUCCESS, parts
from rocketqa_ray.rocketqa.question_negatives import MiningPlan, Question, add_counts, decide, stats_of

log = logging.getLogger(__name__)

# what a row of the grouped union is: a positive of the question (rank = its place in the qrels), a candidate of
# source `src` (rank = its place in that source's ranking), a scored pair, a known positive
POSITIVE, CANDIDATE, SCORE, KNOWN = 0, 1, 2, 3
UNION = pa.schema([("qid", pa.string()), ("pid", pa.string()), ("tag", pa.int8()), ("src", pa.int8()),
                   ("rank", pa.int64()), ("score", pa.float64()), ("query", pa.string())])
COUNTS = "counts"
# on each question's first row: its counts (JSON) and what denoising kept and dropped, in rank order
OUT = pa.schema([*ID_SCHEMAS["dual"], (COUNTS, pa.string()), ("kept", pa.list_(pa.string())),
                 ("dropped", pa.list_(pa.string()))])


def write_question_positives(questions: Sequence[tuple[str, str, Sequence[str]]], path: str | Path) -> Path:
    """(qid, query, positives in qrels order) of the questions to decide, as one Parquet file (the flow's input)."""
    table = pa.table({"qid": pa.array([q for q, _, _ in questions], pa.string()),
                      "query": pa.array([t for _, t, _ in questions], pa.string()),
                      "positives": pa.array([list(p) for _, _, p in questions], pa.list_(pa.string()))})
    with atomic_path(path, suffix=".parquet") as tmp:
        pq.write_table(table, tmp)
    return Path(path)


def write_ranked(ranked: dict[str, Sequence[str]], path: str | Path) -> Path:
    """{qid: pids} (another source of candidates, or known positives) as a Parquet file of (qid, pids)."""
    table = pa.table({"qid": pa.array(list(ranked), pa.string()),
                      "pids": pa.array([list(v) for v in ranked.values()], pa.list_(pa.string()))})
    with atomic_path(path, suffix=".parquet") as tmp:
        pq.write_table(table, tmp)
    return Path(path)


def tagged(batch: pa.Table, tag: int, src: int = 0, top: int | None = None) -> pa.Table:
    """Rows of one input -> rows of `UNION`: questions (qid, query, positives), ranked lists (qid, pids: the first
    `top`) or scored pairs (qid, pid, score)."""
    n_top = 1 << 30 if top is None else top
    if "positives" in batch.column_names:
        ex = explode_top(batch.rename_columns(["qid", "query", "pids"]).select(["qid", "pids"]), n_top)
        queries = dict(zip(batch.column("qid").to_pylist(), batch.column("query").to_pylist()))
        query = pa.array([queries[q] for q in ex.column("qid").to_pylist()], pa.string())
    elif "pids" in batch.column_names:
        ex, query = explode_top(batch.select(["qid", "pids"]), n_top), None
    else:
        ex = pa.table({"qid": batch.column("qid"), "pid": batch.column("pid"),
                       "rank": pa.array(np.full(batch.num_rows, -1, np.int64))})
        query = None
    n = ex.num_rows
    score = batch.column("score").cast(pa.float64()) if tag == SCORE else pa.nulls(n, pa.float64())
    return pa.table({"qid": ex.column("qid").cast(pa.string()), "pid": ex.column("pid").cast(pa.string()),
                     "tag": pa.array(np.full(n, tag, np.int8)), "src": pa.array(np.full(n, src, np.int8)),
                     "rank": ex.column("rank").cast(pa.int64()), "score": score,
                     "query": query if query is not None else pa.nulls(n, pa.string())}, schema=UNION)


def question_of(group: pa.Table, plan: MiningPlan, with_known: bool) -> Question | None:
    """One question's rows of `UNION` -> its `Question`; None for a group without positives (not one to decide)."""
    order = pc.sort_indices(group, [("tag", "ascending"), ("src", "ascending"), ("rank", "ascending")])
    g = group.take(order).to_pydict()
    positives = [p for p, t in zip(g["pid"], g["tag"]) if t == POSITIVE]
    if not positives:
        return None
    query = next(q for q, t in zip(g["query"], g["tag"]) if t == POSITIVE)
    sources: dict[str, list[str]] = {}
    scores: dict[str, float] = {}
    known: set[str] = set()
    for pid, tag, src, score in zip(g["pid"], g["tag"], g["src"], g["score"]):
        if tag == CANDIDATE:
            sources.setdefault(plan.sources[src], []).append(pid)
        elif tag == SCORE:
            scores[pid] = score
        elif tag == KNOWN:
            known.add(pid)
    return Question(g["qid"][0], query, positives, sources, scores if plan.rule is not None else None,
                    known if with_known else None)


def decide_group(group: pa.Table, plan: MiningPlan, top_up: Sequence[str], with_known: bool) -> pa.Table:
    """map_groups: a question's rows -> its dual id rows (`OUT`), its counts and pools on the first."""
    x = question_of(group, plan, with_known)
    if x is None:
        return OUT.empty_table()
    d = decide(x, plan, lambda: top_up)
    first = {COUNTS: json.dumps(d.counts), "kept": d.kept, "dropped": d.dropped}
    rows = [{ROW: order_key(plan.seed, r["qid"], r["positive_id"]), **r, **(first if i == 0 else {})}
            for i, r in enumerate(d.rows)]
    return pa.Table.from_pylist(rows, schema=OUT)


def negatives_flow(questions: str | Path, candidates: str | Path, top: int, plan: MiningPlan, out_dir: str | Path,
                   top_up: Sequence[str], scores: Sequence[str | Path] = (), extra: Sequence[str | Path] = (),
                   known: str | Path | None = None, ray_cfg: RayConfig | None = None) -> tuple[Path, dict]:
    """Decide every question of `questions` (`write_question_positives`): its candidates are the first `top` of each
    row of the `candidates` folder (source 0) and the pids of each `extra` file (sources 1, ...; `write_ranked`), its
    scores the (qid, pid, score) rows of the `scores` folders/files, its known positives the (qid, pids) of `known`.
    Writes the id rows to `out_dir` (Parquet parts, `_SUCCESS.json` last) and returns it with the stats."""
    import ray

    from rocketqa_ray.ray_utils import ensure_ray, write_parquet

    ensure_ray(ray_cfg)
    t0 = time.perf_counter()
    files = [str(p) for p in parts(candidates)]
    if not files:
        raise DataError(f"{candidates}: no candidate parts; rerun the stage that mined them")
    inputs = [ray.data.read_parquet(str(questions)).map_batches(tagged, fn_kwargs={"tag": POSITIVE},
                                                                batch_format="pyarrow"),
             ray.data.read_parquet(files).select_columns(["qid", "pids"]).map_batches(
                 tagged, fn_kwargs={"tag": CANDIDATE, "src": 0, "top": int(top)}, batch_format="pyarrow")]
    for i, f in enumerate(extra, start=1):
        inputs.append(ray.data.read_parquet(str(f)).map_batches(tagged, fn_kwargs={"tag": CANDIDATE, "src": i},
                                                                batch_format="pyarrow"))
    for f in scores:
        score_files = [str(p) for p in parquet_files(f)]
        inputs.append(ray.data.read_parquet(score_files).select_columns(["qid", "pid", "score"]).map_batches(
            tagged, fn_kwargs={"tag": SCORE}, batch_format="pyarrow"))
    if known is not None:
        inputs.append(ray.data.read_parquet(str(known)).map_batches(tagged, fn_kwargs={"tag": KNOWN},
                                                                    batch_format="pyarrow"))
    union = inputs[0].union(*inputs[1:])
    n_questions = pq.ParquetFile(questions).metadata.num_rows
    decided = union.groupby("qid", num_partitions=max(1, math.ceil(n_questions * 64 / ROWS_PER_PARTITION))) \
        .map_groups(decide_group, fn_kwargs={"plan": plan, "top_up": list(top_up), "with_known": known is not None},
                    batch_format="pyarrow")
    with atomic_dir(out_dir) as tmp:
        write_parquet(decided, tmp)
        total: dict[str, float] = {}
        n_rows = 0
        for f in sorted(Path(tmp).glob("*.parquet")):
            col = pq.read_table(f, columns=[COUNTS]).column(COUNTS)
            n_rows += len(col)
            for c in col.drop_null().to_pylist():
                add_counts(total, json.loads(c))
        stats = {**stats_of(total, plan), "train_questions": n_rows}
        write_json(tmp / SUCCESS, {"rows": n_rows, "stats": stats, "seconds": round(time.perf_counter() - t0, 3)})
    log.info("step 3 rows: %d decided in %.1f s -> %s", n_rows, time.perf_counter() - t0, out_dir)
    return Path(out_dir), stats


def read_pools(folder: str | Path) -> dict[str, list[str]]:
    """{qid: the candidates denoising kept} of a `negatives_flow` folder, for a bounded set (tests, inspection)."""
    out: dict[str, list[str]] = {}
    for f in parquet_files(folder):
        t = pq.read_table(f, columns=["qid", COUNTS, "kept"])
        for q, c, kept in zip(*(t.column(n).to_pylist() for n in ("qid", COUNTS, "kept"))):
            if c is not None:
                out[q] = kept
    return out
