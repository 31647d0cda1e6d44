"""Step 4's pseudo-labels as a Ray Data flow: every unlabelled question's candidates (M_D1's top-k with their dense
scores), their cross-encoder probabilities and BM25 scores (the pair flow's output), and, for the reports, its hidden
labels and known positives, read from the files that hold them, grouped by question and labelled group by group:
the fusion of step 2, then `rocketqa.pseudo_label.label_question`, then the question's dual id rows
(`data.examples.question_rows`, negatives drawn with a per-question seed). The driver passes paths and sums
counts; no process holds every question's candidates, scores or rows.

Each question's counts ride on its first output row as JSON; a question with no confident positive leaves one row
with its counts and no positive, which `pseudo_flow` keeps out of the id rows it hands to `batch.examples_flow`.
Labels, rows and stats equal `pseudo_label` + `pipeline.shared.dual_examples` over all questions in one process
(tested)."""

from __future__ import annotations

import json
import logging
import math
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from rocketqa_ray.batch.pair_flow import ROWS_PER_PARTITION, explode_top
from rocketqa_ray.config import RayConfig
from rocketqa_ray.data.examples import ID_SCHEMAS, ROW, order_key, parquet_files, question_rows
from rocketqa_ray.errors import DataError
from rocketqa_ray.io import atomic_dir, atomic_path, write_json
from rocketqa_ray.retrieval.candidates import SUCCESS, parts
from rocketqa_ray.retrieval.fusion import Fusion, fuse_scores
from rocketqa_ray.rocketqa.diagnostics import pseudo_counts, pseudo_report_of
from rocketqa_ray.rocketqa.pseudo_label import label_question, pseudo_stats

log = logging.getLogger(__name__)

# what a row of the grouped union is: the question (its text), a candidate (rank and dense score), a scored pair
# (cross-encoder probability, BM25), one of its hidden labels, one of its known positives
QUESTION, CANDIDATE, SCORE, HIDDEN, KNOWN = 0, 1, 2, 3, 4
UNION = pa.schema([("qid", pa.string()), ("pid", pa.string()), ("tag", pa.int8()), ("rank", pa.int64()),
                   ("dense", pa.float64()), ("score", pa.float64()), ("bm25", pa.float64()), ("query", pa.string())])
COUNTS = "counts"
OUT = pa.schema([*ID_SCHEMAS["dual"], (COUNTS, pa.string())])
IDS = "ids"  # the id rows of the labelled questions, for the examples flow
KNOWN_REPORT = "known_positives"  # the counts' prefix of the diagnostic report
WITH_HIDDEN = b"with_hidden"  # the questions file's metadata: whether any question has hidden labels


@dataclass(frozen=True)
class PseudoPlan:
    """What labels a question: step 2's fusion (None: the cross-encoder's probability alone), the thresholds, and
    how its rows draw negatives (`dual.num_hard_negatives`, `mining.seed`)."""

    pos_threshold: float
    neg_threshold: float
    num_negatives: int
    seed: int
    fusion: Fusion | None = None


def write_pseudo_questions(questions: Sequence[tuple[str, str, Sequence[str] | None]], path: str | Path) -> Path:
    """(qid, query, hidden labels or None) of the questions to label, as one Parquet file (the flow's input, and
    the pair flow's questions file: it reads qid and query)."""
    with_hidden = any(h is not None for _, _, h in questions)
    table = pa.table({"qid": pa.array([q for q, _, _ in questions], pa.string()),
                      "query": pa.array([t for _, t, _ in questions], pa.string()),
                      "hidden": pa.array([list(h) if h is not None else None for _, _, h in questions],
                                         pa.list_(pa.string()))}).replace_schema_metadata(
        {WITH_HIDDEN: str(int(with_hidden)).encode()})
    with atomic_path(path, suffix=".parquet") as tmp:
        pq.write_table(table, tmp)
    return Path(path)


def _union(qid: pa.Array, pid: pa.Array, tag: int, n: int, rank=None, dense=None, score=None, bm25=None,
           query=None) -> pa.Table:
    def col(a, t):
        return a.cast(t) if a is not None else pa.nulls(n, t)

    return pa.table({"qid": qid.cast(pa.string()), "pid": col(pid, pa.string()),
                     "tag": pa.array(np.full(n, tag, np.int8)), "rank": col(rank, pa.int64()),
                     "dense": col(dense, pa.float64()), "score": col(score, pa.float64()),
                     "bm25": col(bm25, pa.float64()), "query": col(query, pa.string())}, schema=UNION)


def tag_questions(batch: pa.Table) -> pa.Table:
    """Questions (qid, query, hidden) -> one QUESTION row each and one HIDDEN row per hidden label."""
    n = batch.num_rows
    first = _union(batch.column("qid"), None, QUESTION, n, query=batch.column("query"))
    hidden = explode_top(batch.select(["qid", "hidden"]).rename_columns(["qid", "pids"]), 1 << 30)
    return pa.concat_tables([first, _union(hidden.column("qid"), hidden.column("pid"), HIDDEN, hidden.num_rows)])


def tag_candidates(batch: pa.Table, top: int) -> pa.Table:
    """Candidate rows (qid, pids, scores) -> CANDIDATE rows of the first `top`, with rank and dense score."""
    ex = explode_top(batch, top)
    return _union(ex.column("qid"), ex.column("pid"), CANDIDATE, ex.num_rows, rank=ex.column("rank"),
                  dense=ex.column("scores"))


def tag_scores(batch: pa.Table) -> pa.Table:
    """The pair flow's rows (qid, pid, score[, bm25]) -> SCORE rows."""
    bm25 = batch.column("bm25") if "bm25" in batch.column_names else None
    return _union(batch.column("qid"), batch.column("pid"), SCORE, batch.num_rows, score=batch.column("score"),
                  bm25=bm25)


def tag_known(batch: pa.Table) -> pa.Table:
    """Known positives (qid, pids) -> KNOWN rows."""
    ex = explode_top(batch.select(["qid", "pids"]), 1 << 30)
    return _union(ex.column("qid"), ex.column("pid"), KNOWN, ex.num_rows)


def label_group(group: pa.Table, plan: PseudoPlan, top_up: Sequence[str], with_hidden: bool,
                with_known: bool) -> pa.Table:
    """map_groups: one question's rows -> its dual id rows (`OUT`; none without a confident positive) and its counts
    on the first row (a row without a positive when it has no rows)."""
    order = pc.sort_indices(group, [("tag", "ascending"), ("rank", "ascending")])
    g = group.take(order).to_pydict()
    qid = g["qid"][0]
    query = next((t for t, tag in zip(g["query"], g["tag"]) if tag == QUESTION), None)
    if query is None:
        raise DataError(f"pseudo-labels: question {qid!r} has candidates or scores but no text in the questions file")
    ranked, ce, lexical, hidden, known = [], {}, {}, [], set()
    for pid, tag, dense, score, bm25 in zip(g["pid"], g["tag"], g["dense"], g["score"], g["bm25"]):
        if tag == CANDIDATE:
            ranked.append((pid, dense))
        elif tag == SCORE:
            ce[(qid, pid)], lexical[(qid, pid)] = score, bm25
        elif tag == HIDDEN:
            hidden.append(pid)
        elif tag == KNOWN:
            known.add(pid)
    missing = [p for p, _ in ranked if (qid, p) not in ce]
    if missing:
        raise DataError(f"pseudo-labels: question {qid!r}: candidate {missing[0]!r} has no cross-encoder score; "
                        "rerun md2 (its scores folder is incomplete)")
    scores = ce
    if plan.fusion is not None:
        if plan.fusion.uses_bm25 and any(v is None for v in lexical.values()):
            raise DataError(f"pseudo-labels: question {qid!r}: the fusion weighs BM25 but its pairs were scored "
                            "without it; rerun md2")
        scores = fuse_scores({qid: ranked}, ce, plan.fusion, lexical if plan.fusion.uses_bm25 else None)
    res = label_question([p for p, _ in ranked], {p: scores[(qid, p)] for p, _ in ranked}, plan.pos_threshold,
                         plan.neg_threshold, (hidden or None) if with_hidden else None)
    counts = dict(res.counts)
    if res.positive is None:
        return pa.Table.from_pylist([{"qid": qid, COUNTS: json.dumps(counts)}], schema=OUT)
    if with_known:
        counts.update({f"{KNOWN_REPORT}.{k}": v for k, v in pseudo_counts(res.positive, set(hidden), known).items()})
    rows = question_rows(qid, query, [res.positive], res.negatives, plan.num_negatives, plan.seed,
                         lambda: top_up, scores)
    out = [{ROW: order_key(plan.seed, r["qid"], r["positive_id"]), **r, **({COUNTS: json.dumps(counts)} if i == 0
                                                                             else {})}
           for i, r in enumerate(rows)]
    return pa.Table.from_pylist(out, schema=OUT)


def pseudo_flow(questions: str | Path, candidates: str | Path, top: int, scores: str | Path, plan: PseudoPlan,
                out_dir: str | Path, top_up: Sequence[str], known: str | Path | None = None,
                ray_cfg: RayConfig | None = None) -> tuple[Path | None, dict]:
    """Label every question of `questions` (`write_pseudo_questions`) from the first `top` of its row in the
    `candidates` folder, the pair flow's `scores` folder (with `bm25` when the fusion weighs it) and, for the
    report, the (qid, pids) of `known`. Writes every question's output to `out_dir` and the labelled questions' id
    rows to `out_dir`/ids (Parquet parts, `_SUCCESS.json` last); returns the ids folder (None when no question was
    labelled) and the stats (`pseudo_stats`, with `known_positives` when `known` is given)."""
    import ray

    from rocketqa_ray.ray_utils import ensure_ray, write_parquet

    ensure_ray(ray_cfg)
    t0 = time.perf_counter()
    files = [str(p) for p in parts(candidates)]
    if not files:
        raise DataError(f"{candidates}: no candidate parts; rerun the stage that mined them")
    meta = pq.ParquetFile(questions)
    with_hidden = (meta.schema_arrow.metadata or {}).get(WITH_HIDDEN) == b"1"
    inputs = [ray.data.read_parquet(str(questions)).map_batches(tag_questions, batch_format="pyarrow"),
              ray.data.read_parquet(files).select_columns(["qid", "pids", "scores"]).map_batches(
                  tag_candidates, fn_kwargs={"top": int(top)}, batch_format="pyarrow"),
              ray.data.read_parquet([str(p) for p in parquet_files(scores)]).map_batches(tag_scores,
                                                                                       batch_format="pyarrow")]
    if known is not None:
        inputs.append(ray.data.read_parquet(str(known)).map_batches(tag_known, batch_format="pyarrow"))
    union = inputs[0].union(*inputs[1:])
    n_part = max(1, math.ceil(meta.metadata.num_rows * 2 * (top + 1) / ROWS_PER_PARTITION))
    labelled = union.groupby("qid", num_partitions=n_part).map_groups(
        label_group, fn_kwargs={"plan": plan, "top_up": list(top_up), "with_hidden": bool(with_hidden),
                                "with_known": known is not None}, batch_format="pyarrow")
    out = Path(out_dir)
    with atomic_dir(out) as tmp:
        write_parquet(labelled, tmp / "all")
        total: Counter = Counter()
        n_rows = 0
        (tmp / IDS).mkdir()
        for f in sorted((tmp / "all").glob("*.parquet")):  # one part at a time: bounded by the flow's block size
            t = pq.read_table(f)
            for c in t.column(COUNTS).drop_null().to_pylist():
                total.update(json.loads(c))
            t = t.filter(pc.is_valid(t.column("positive_id"))).select(ID_SCHEMAS["dual"].names)
            if t.num_rows:
                pq.write_table(t, tmp / IDS / f.name)
                n_rows += t.num_rows
        stats = pseudo_stats(total, plan.pos_threshold, plan.neg_threshold, bool(with_hidden))
        if known is not None:
            prefix = f"{KNOWN_REPORT}."
            stats[KNOWN_REPORT] = pseudo_report_of({k[len(prefix):]: v for k, v in total.items()
                                                    if k.startswith(prefix)})
        write_json(tmp / SUCCESS, {"rows": n_rows, "stats": stats, "seconds": round(time.perf_counter() - t0, 3)})
    log.info("step 4 pseudo-labels: %d rows from %d questions in %.1f s -> %s", n_rows, stats["questions"],
             time.perf_counter() - t0, out)
    return (out / IDS if n_rows else None), stats
