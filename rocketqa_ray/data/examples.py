"""Training examples for the dual encoder and the cross-encoder, as Parquet files (Ray-free).

Dual encoder rows: `qid`, `query`, `positive` (passage text as the encoders see it, `data.passage_text`),
`positive_id`, `negatives` (hard negative texts, possibly empty), `negative_ids` and, optionally,
`teacher_scores`: the cross-encoder's probabilities for [positive, *negatives] (null where unscored; empty when
the stage scored nothing), the soft targets of distillation (`distill.kind`).
Cross-encoder rows: one per question group: `qid`, `query`, `passages` (texts) and `labels` (1.0 / 0.0,
one per passage): a positive with the negatives sampled for it, so a listwise loss sees them together
and shuffling keeps them together.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from rocketqa_ray.data.beir import BeirData
from rocketqa_ray.data.passages import Passages, as_passages
from rocketqa_ray.errors import DataError
from rocketqa_ray.io import atomic_path

DUAL_SCHEMA = pa.schema([
    ("qid", pa.string()), ("query", pa.string()), ("positive", pa.string()), ("positive_id", pa.string()),
    ("negatives", pa.list_(pa.string())), ("negative_ids", pa.list_(pa.string())),
    ("teacher_scores", pa.list_(pa.float32())),
])
CROSS_SCHEMA = pa.schema([
    ("qid", pa.string()), ("query", pa.string()), ("passages", pa.list_(pa.string())), ("labels", pa.list_(pa.float32())),
])
SCHEMAS = {"dual": DUAL_SCHEMA, "cross": CROSS_SCHEMA}
OPTIONAL = {"teacher_scores"}  # a user's own examples file may leave these out


def build_dual_examples(
    data: BeirData,
    corpus: Mapping[str, dict] | Passages,
    qids: list[str],
    hard_negatives: dict[str, list[str]] | None,
    num_negatives: int,
    seed: int,
    *,
    split: str = "train",
    positives: dict[str, list[str]] | None = None,
    queries: dict[str, str] | None = None,
    scores: Mapping[tuple[str, str], float] | None = None,
) -> list[dict]:
    """One row per (question, positive passage) pair, shuffled with `seed`.

    Positives come from the qrels of `split`, or from `positives` (e.g. pseudo-labels) when given;
    question texts from `data.queries`, or `queries`. With `hard_negatives` ({qid: ranked pids}) each row
    gets `num_negatives` of them sampled at random, never one of the question's positives; a question
    with too few is topped up with random corpus passages. Without it rows have no negatives (in-batch
    training, step 1). Questions without any positive are skipped. `corpus` is a dict or a `data.passages`
    source: the ids are chosen first, then the texts of just those passages are read. With `scores`
    ({(qid, pid): probability}) each row carries them as `teacher_scores` (None where a passage is unscored).
    """
    rng = random.Random(seed)
    source = as_passages(corpus)
    qrels = positives if positives is not None else data.split(split)
    all_pids = source.ids()  # a stored corpus reads its ids only if a top-up draws from them
    rows = []
    for qid in qids:
        pos = sorted(qrels.get(qid, {}))  # qrels, pseudo-labels and mined pools name corpus passages only
        if not pos:
            continue
        if queries is not None and qid in queries:
            qtext = queries[qid]
        elif qid in data.queries:
            qtext = data.queries[qid]["text"]
        else:
            raise DataError(f"question {qid!r} has no text (not in queries.jsonl nor in the given queries)")
        pos_set = set(pos)
        for pid in pos:
            neg_ids: list[str] = []
            if hard_negatives is not None and num_negatives > 0:
                pool = list(dict.fromkeys(p for p in hard_negatives.get(qid, []) if p not in pos_set))
                neg_ids = rng.sample(pool, min(num_negatives, len(pool)))
                taken = set(neg_ids)
                while len(neg_ids) < num_negatives and len(taken) + len(pos_set) < len(all_pids):
                    p = rng.choice(all_pids)
                    if p not in pos_set and p not in taken:
                        neg_ids.append(p)
                        taken.add(p)
            rows.append({"qid": qid, "query": qtext, "positive_id": pid, "negative_ids": neg_ids})
    texts = source.texts({p for r in rows for p in [r["positive_id"], *r["negative_ids"]]})
    rows = [{"qid": r["qid"], "query": r["query"], "positive": texts[r["positive_id"]],
             "positive_id": r["positive_id"], "negatives": [texts[n] for n in r["negative_ids"]],
             "negative_ids": r["negative_ids"],
             "teacher_scores": [scores.get((r["qid"], p)) for p in [r["positive_id"], *r["negative_ids"]]]
             if scores is not None else []} for r in rows]
    rng.shuffle(rows)
    return rows


def build_cross_examples(
    queries: dict[str, str],
    positives: dict[str, str],
    negatives: dict[str, list[str]],
    text_of: Callable[[str], str],
) -> list[dict]:
    """One group per question: its positive first, then its negatives (`text_of(pid)` gives the text).

    Questions without a positive are skipped; the order is the order of `positives` (training shuffles groups).
    """
    rows = []
    for qid, pos in positives.items():
        negs = [p for p in negatives.get(qid, []) if p != pos]
        rows.append({"qid": qid, "query": queries[qid], "passages": [text_of(p) for p in [pos, *negs]],
                     "labels": [1.0] + [0.0] * len(negs)})
    return rows


def write_examples(rows: list[dict], path: str | Path, kind: str | None = None) -> Path:
    """Write dual (`kind="dual"`) or cross-encoder (`"cross"`) rows to one Parquet file, atomically.

    The kind is inferred from the columns when not given.
    """
    if not rows:
        raise DataError(f"no training examples to write to {path}")
    kind = kind or ("dual" if "positive" in rows[0] else "cross")
    if kind == "cross":
        bad = next((r for r in rows if len(r["passages"]) != len(r["labels"]) or 1.0 not in r["labels"]), None)
        if bad is not None:
            raise DataError(f"cross-encoder group for question {bad.get('qid')!r} needs one label per passage and at "
                            "least one positive (label 1.0)")
    schema = SCHEMAS[kind]
    missing = set(schema.names) - OPTIONAL - set(rows[0])
    if missing:
        raise DataError(f"{kind} training examples lack column(s) {sorted(missing)}; need {schema.names}")
    table = pa.Table.from_pylist([{k: r.get(k) for k in schema.names} for r in rows], schema=schema)
    with atomic_path(path, suffix=".parquet") as tmp:
        pq.write_table(table, tmp)
    return Path(path)


def parquet_files(path: str | Path) -> list[Path]:
    """The Parquet file itself, or the `*.parquet` files of a directory (sorted)."""
    path = Path(path)
    if path.is_dir():
        files = sorted(path.glob("*.parquet"))
        if not files:
            raise DataError(f"{path}: no .parquet files in this directory")
        return files
    if not path.exists():
        raise DataError(f"training examples {path} not found")
    return [path]


def check_examples(path: str | Path, kind: str) -> dict:
    """Validate an examples file's columns; returns {"rows", "max_negatives"} (most negatives in a row: dual
    hard negatives, or a cross-encoder group's passages minus one)."""
    schema = SCHEMAS[kind]
    rows, max_neg = 0, 0
    for f in parquet_files(path):
        try:
            pf = pq.ParquetFile(f)
        except (pa.ArrowInvalid, OSError) as e:
            raise DataError(f"{f}: not a readable Parquet file ({e})") from None
        missing = set(schema.names) - OPTIONAL - set(pf.schema_arrow.names)
        if missing:
            raise DataError(f"{f}: {kind} training examples lack column(s) {sorted(missing)}; need {schema.names}")
        rows += pf.metadata.num_rows
        col_name = "negative_ids" if kind == "dual" else "passages"
        col = pq.read_table(f, columns=[col_name]).column(col_name)
        if len(col):
            import pyarrow.compute as pc

            longest = int(pc.max(pc.list_value_length(col)).as_py() or 0)
            max_neg = max(max_neg, longest if kind == "dual" else longest - 1)
    if rows == 0:
        raise DataError(f"{path}: no training examples")
    return {"rows": rows, "max_negatives": max_neg}
