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

import functools
import hashlib
import random
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
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


def build_dual_examples(data: BeirData, corpus: Mapping[str, dict] | Passages, qids: list[str],
                        hard_negatives: dict[str, list[str]] | None, num_negatives: int, seed: int,
                        **options: Any) -> list[dict]:
    """One row per (question, positive passage) pair, in `seed`'s order: `dual_id_rows` (its keyword `options`:
    split, positives, queries, scores) with the passages' texts attached (`attach_texts`); `corpus` is a dict or a
    `data.passages` source, read for just those ids."""
    source = as_passages(corpus)
    rows = dual_id_rows(data, source.ids, qids, hard_negatives, num_negatives, seed, **options)
    return attach_texts(rows, source.texts)


def dual_id_rows(
    data: BeirData,
    corpus_ids: Callable[[], Sequence[str]],
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
    """Dual-encoder rows as ids (`qid`, `query`, `positive_id`, `negative_ids`, `teacher_scores`) in training order
    (`order_key`); the passages' texts are attached afterwards, in the driver or by the Ray Data flow.

    Positives come from the qrels of `split`, or from `positives` (e.g. pseudo-labels) when given;
    question texts from `data.queries`, or `queries`. With `hard_negatives` ({qid: ranked pids}) each row
    gets `num_negatives` of them sampled at random (`question_rows`), never one of the question's positives; a
    question with too few is topped up with random corpus passages (`corpus_ids()`, called only then). Without it
    rows have no negatives (in-batch training, step 1). Questions without any positive are skipped. With `scores`
    ({(qid, pid): probability}) each row carries them as `teacher_scores` (None where a passage is unscored).
    """
    qrels = positives if positives is not None else data.split(split)
    corpus = functools.cache(corpus_ids)  # read once, and only if a top-up draws from them
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
        pool = hard_negatives.get(qid, []) if hard_negatives is not None else None
        rows += question_rows(qid, qtext, pos, pool, num_negatives, seed, corpus, scores)
    rows.sort(key=lambda r: order_key(seed, r["qid"], r["positive_id"]))
    return rows


def question_rows(qid: str, query: str, positives: list[str], pool: Sequence[str] | None, num_negatives: int,
                  seed: int, corpus_ids: Callable[[], Sequence[str]],
                  scores: Mapping[tuple[str, str], float] | None = None) -> list[dict]:
    """One question's dual id rows, one per positive: `num_negatives` drawn from its ranked `pool` (minus its
    positives; topped up from `corpus_ids()` when short). The draws come from a generator seeded by (`seed`,
    `qid`), so a question's rows do not depend on which other questions are built with it, nor in what order: the
    driver and a per-question Ray Data step build the same rows."""
    rng = random.Random(f"{seed}\x1f{qid}")  # a str seed is hashed with SHA-512: the same in every process
    pos_set = set(positives)
    rows = []
    cands = list(dict.fromkeys(p for p in pool if p not in pos_set)) if pool is not None else []
    for pid in positives:
        neg_ids: list[str] = []
        if pool is not None and num_negatives > 0:
            neg_ids = rng.sample(cands, min(num_negatives, len(cands)))
            taken = set(neg_ids)
            all_pids = corpus_ids() if len(neg_ids) < num_negatives else ()
            while len(neg_ids) < num_negatives and len(taken) + len(pos_set) < len(all_pids):
                p = all_pids[rng.randrange(len(all_pids))]
                if p not in pos_set and p not in taken:
                    neg_ids.append(p)
                    taken.add(p)
        rows.append({"qid": qid, "query": query, "positive_id": pid, "negative_ids": neg_ids,
                     "teacher_scores": [scores.get((qid, p)) for p in [pid, *neg_ids]] if scores is not None else []})
    return rows


def order_key(seed: int, qid: str, positive_id: str) -> int:
    """A dual row's place in training order: a 63-bit hash of (`seed`, question, positive). A shuffle that needs no
    global generator, so rows built apart (per question, on several workers) sort into the same order."""
    digest = hashlib.blake2b(f"{seed}\x1f{qid}\x1f{positive_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> 1


def build_cross_examples(
    queries: dict[str, str],
    positives: dict[str, str],
    negatives: dict[str, list[str]],
    text_of: Callable[[str], str],
) -> list[dict]:
    """One group per question: its positive first, then its negatives (`text_of(pid)` gives the text).

    Questions without a positive are skipped; the order is the order of `positives` (training shuffles groups).
    """
    return attach_texts(cross_id_groups(queries, positives, negatives),
                        lambda ids: {p: text_of(p) for p in ids})


def cross_id_groups(queries: dict[str, str], positives: dict[str, str], negatives: dict[str, list[str]]) -> list[dict]:
    """`build_cross_examples`' groups as ids (`qid`, `query`, `pids`, `labels`)."""
    return [cross_id_row({"qid": qid, "query": queries[qid], "positive_id": pos,
                          "negative_ids": [p for p in negatives.get(qid, []) if p != pos]})
            for qid, pos in positives.items()]


def cross_id_row(dual: Mapping) -> dict:
    """A dual id row (a positive and its drawn negatives) as a cross-encoder group of ids: the positive first,
    labelled 1, the negatives 0 (its `row` kept)."""
    out = {"qid": dual["qid"], "query": dual["query"], "pids": [dual["positive_id"], *dual["negative_ids"]],
           "labels": [1.0] + [0.0] * len(dual["negative_ids"])}
    return {ROW: dual[ROW], **out} if ROW in dual else out


def example_kind(row: Mapping) -> str:
    """"dual" or "cross", from an example row's (or id row's) columns."""
    return "cross" if "labels" in row else "dual"


def attach_texts(rows: list[dict], texts_of: Callable[[set[str]], Mapping[str, str]]) -> list[dict]:
    """Id rows (`dual_id_rows`, `cross_id_groups`) -> example rows with their passages' texts, read at once."""
    if not rows:
        return []
    if example_kind(rows[0]) == "cross":
        texts = texts_of({p for r in rows for p in r["pids"]})
        return [{"qid": r["qid"], "query": r["query"], "passages": [texts[p] for p in r["pids"]],
                 "labels": r["labels"]} for r in rows]
    texts = texts_of({p for r in rows for p in [r["positive_id"], *r["negative_ids"]]})
    return [{"qid": r["qid"], "query": r["query"], "positive": texts[r["positive_id"]],
             "positive_id": r["positive_id"], "negatives": [texts[n] for n in r["negative_ids"]],
             "negative_ids": r["negative_ids"], "teacher_scores": r["teacher_scores"]} for r in rows]


# ------------------------------------------------------------------ id rows -> example rows, batch by batch
# (the pieces of the Ray Data flow `batch.examples_flow`; pyarrow only). `row` is an example's place in
# training order: the flow joins and groups by it and writes the examples sorted by it.
ROW = "row"
ID_SCHEMAS = {
    "dual": pa.schema([(ROW, pa.int64()), ("qid", pa.string()), ("query", pa.string()), ("positive_id", pa.string()),
                       ("negative_ids", pa.list_(pa.string())), ("teacher_scores", pa.list_(pa.float32()))]),
    "cross": pa.schema([(ROW, pa.int64()), ("qid", pa.string()), ("query", pa.string()), ("pids", pa.list_(pa.string())),
                        ("labels", pa.list_(pa.float32()))]),
}


def id_table(rows: list[dict], kind: str, first_row: int = 0) -> pa.Table:
    """Id rows as an Arrow table of `ID_SCHEMAS[kind]`, numbered from `first_row` in list order."""
    schema = ID_SCHEMAS[kind]
    cols = {name: [r.get(name) for r in rows] for name in schema.names if name != ROW}
    return pa.table({ROW: pa.array(range(first_row, first_row + len(rows)), pa.int64()), **cols}, schema=schema)


def id_slots(batch: pa.Table) -> pa.Table:
    """Id rows -> one row per passage of each: the row's columns repeated, plus `slot` (0 = the positive of a dual
    row, or a group's first passage) and `pid`."""
    if "pids" in batch.column_names:
        lists = batch.column("pids").combine_chunks()
    else:  # dual: [positive_id, *negative_ids]
        lists = pa.array([[p, *n] for p, n in zip(batch.column("positive_id").to_pylist(),
                                                  batch.column("negative_ids").to_pylist())], pa.list_(pa.string()))
    lengths = pc.list_value_length(lists).fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64)
    parents = pa.array(np.repeat(np.arange(len(lengths)), lengths))
    slots = np.arange(int(lengths.sum())) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    return batch.take(parents).append_column("slot", pa.array(slots, pa.int64())).append_column(
        "pid", pc.list_flatten(lists))


def assemble_example(group: pa.Table, kind: str) -> pa.Table:
    """One row's slots joined to their `passage` texts -> the example row of `SCHEMAS[kind]` plus `row`; a row whose
    passages did not all join (an id that is not in the corpus) is named."""
    group = group.take(pc.sort_indices(group, [("slot", "ascending")]))
    first = group.slice(0, 1)
    texts = group.column("passage").to_pylist()
    want = len(first.column("pids")[0]) if kind == "cross" else 1 + len(first.column("negative_ids")[0])
    if len(texts) != want:
        raise DataError(f"training example of question {first.column('qid')[0].as_py()!r}: {want} passage ids but "
                        f"{len(texts)} found in the corpus store")
    cols = {ROW: first.column(ROW), "qid": first.column("qid"), "query": first.column("query")}
    if kind == "cross":
        cols.update({"passages": pa.array([texts], pa.list_(pa.string())), "labels": first.column("labels")})
    else:
        cols.update({"positive": pa.array(texts[:1], pa.string()), "positive_id": first.column("positive_id"),
                     "negatives": pa.array([texts[1:]], pa.list_(pa.string())),
                     "negative_ids": first.column("negative_ids"), "teacher_scores": first.column("teacher_scores")})
    return pa.table(cols)


def as_schema(batch: pa.Table, kind: str) -> pa.Table:
    """A flow's example batch with exactly the columns and types of `SCHEMAS[kind]` (shuffles turn strings into
    large strings): a stage trains on a flow's folder and a driver's file as one data set."""
    schema = SCHEMAS[kind]
    return batch.select(schema.names).cast(schema)


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


def parquet_files(path: str | Path | Sequence[str | Path]) -> list[Path]:
    """The Parquet file itself, or the `*.parquet` files of a directory (sorted); for several paths, each one's
    files in the order given."""
    if not isinstance(path, (str, Path)):
        return [f for one in path for f in parquet_files(one)]
    path = Path(path)
    if path.is_dir():
        files = sorted(path.glob("*.parquet"))
        if not files:
            raise DataError(f"{path}: no .parquet files in this directory")
        return files
    if not path.exists():
        raise DataError(f"training examples {path} not found")
    return [path]


def teacher_counts(path: str | Path | Sequence[str | Path]) -> tuple[int, int]:
    """(rows, rows with the teacher's score of the positive and of at least one negative) of dual examples, read
    one column a batch at a time."""
    rows = taught = 0
    for f in parquet_files(path):
        pf = pq.ParquetFile(f)
        rows += pf.metadata.num_rows
        if "teacher_scores" not in pf.schema_arrow.names:
            continue
        for batch in pf.iter_batches(columns=["teacher_scores"]):
            for t in batch.column(0).to_pylist():
                taught += bool(t) and t[0] is not None and any(v is not None for v in t[1:])
    return rows, taught


def check_examples(path: str | Path | Sequence[str | Path], kind: str) -> dict:
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
            longest = int(pc.max(pc.list_value_length(col)).as_py() or 0)
            max_neg = max(max_neg, longest if kind == "dual" else longest - 1)
    if rows == 0:
        raise DataError(f"{path}: no training examples")
    return {"rows": rows, "max_negatives": max_neg}
