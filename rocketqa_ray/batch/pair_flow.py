"""Cross-encoder scores for (question, passage) pairs as one Ray Data flow over the files that hold them: the pairs
(a candidates folder's top `top` per question, and/or a Parquet file of extra pairs such as each question's gold
positive) are joined to the passage texts of the corpus store and to the question texts, scored by a pool of
`ScorerActor`s and written as Parquet (qid, pid, rank, score). No process holds the pairs' texts: the driver passes
paths and reads nothing but counts. Every stage scores through it (`pipeline.shared.ce_scores`); `batch.score`'s
`score_pairs`, for rows that already carry their texts, is what the scorer benchmark times (the same actor)."""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from rocketqa_ray.batch.bm25_stats import BM25Feature, PairBM25
from rocketqa_ray.batch.pair_dense import DenseFeature, PairDense
from rocketqa_ray.batch.score import ScorerActor
from rocketqa_ray.config import EncodeConfig, RayConfig
from rocketqa_ray.data import corpus_store
from rocketqa_ray.data.beir import passage_text
from rocketqa_ray.errors import DataError
from rocketqa_ray.io import (
    atomic_dir,
    atomic_path,
    describe_file,
    parquet_rows,
    read_json_if_valid,
    write_json,
)
from rocketqa_ray.retrieval.candidates import SUCCESS

if TYPE_CHECKING:
    from rocketqa_ray.retrieval.fusion import Fusion

log = logging.getLogger(__name__)

PAIRS_SCHEMA = pa.schema([("qid", pa.string()), ("pid", pa.string())])
ROWS_PER_PARTITION = 200_000  # joined pairs per hash partition of the joins (a partition's texts in one process)


def explode_top(batch: pa.Table, top: int) -> pa.Table:
    """Candidate rows {qid, pids[, scores]} -> one row per (qid, pid) of the first `top` pids, with its rank (and
    its score, when the rows have them)."""
    pids = pc.list_slice(batch.column("pids").combine_chunks(), 0, top)
    lengths = pc.list_value_length(pids).fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64)
    parents = np.repeat(np.arange(len(lengths)), lengths)
    ranks = np.arange(int(lengths.sum())) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    out = {"qid": pc.take(batch.column("qid"), pa.array(parents)), "pid": pc.list_flatten(pids),
           "rank": pa.array(ranks, pa.int64())}
    if "scores" in batch.column_names:
        out["scores"] = pc.list_flatten(pc.list_slice(batch.column("scores").combine_chunks(), 0, top))
    return pa.table(out)


def passages_of(batch: pa.Table) -> pa.Table:
    """Corpus store rows -> {id, passage}: the text as the encoders and the cross-encoder see it."""
    titles, texts = batch.column("title").to_pylist(), batch.column("text").to_pylist()
    return pa.table({"id": batch.column("id"), "passage": [passage_text(t, x) for t, x in zip(titles, texts)]})


def write_pairs(pairs: list[tuple[str, str]], path: str | Path) -> Path:
    """A Parquet file of (qid, pid) pairs for `score_pair_files`' `extra` (e.g. each question's gold positive)."""
    with atomic_path(path, suffix=".parquet") as tmp:
        pq.write_table(pa.table({"qid": [q for q, _ in pairs], "pid": [p for _, p in pairs]}, schema=PAIRS_SCHEMA),
                       tmp)
    return Path(path)


def write_questions(qids: list[str], texts: list[str], path: str | Path) -> Path:
    """A Parquet file of (qid, query) for `score_pair_files`' `questions`."""
    with atomic_path(path, suffix=".parquet") as tmp:
        pq.write_table(pa.table({"qid": pa.array(qids, pa.string()), "query": pa.array(texts, pa.string())}), tmp)
    return Path(path)


def score_pair_files(model_dir: str | Path, store_dir: str | Path, questions: str | Path, out_dir: str | Path,
                     cfg: EncodeConfig, candidates: str | Path | None = None, top: int = 0,
                     extra: str | Path | None = None, ray_cfg: RayConfig | None = None,
                     bm25: BM25Feature | None = None, dense: DenseFeature | None = None) -> Path:
    """Score the top `top` candidates of every question in `candidates` plus the pairs in `extra` (rank -1) with the
    cross-encoder in `model_dir`; `questions` is a Parquet file (qid, query). Output `out_dir`: Parquet parts
    (qid, pid, rank, score) in no particular order, then `_SUCCESS.json` with the number of pairs; a folder that
    has it is returned as is (rerun = the same job). With `bm25`, each pair's BM25 score too (column `bm25`, from
    the corpus statistics, while the pair has its texts: the fusion's lexical feature without a second join); with
    `dense`, each pair's q . p by that dual encoder (column `dense`, `batch.pair_dense`)."""
    import ray

    from rocketqa_ray.batch.encode import resolve_model_dir
    from rocketqa_ray.modeling.base import model_fingerprint
    from rocketqa_ray.ray_utils import ensure_ray, write_parquet

    out = Path(out_dir)
    model_dir = resolve_model_dir(model_dir)
    cand_record = read_json_if_valid(Path(candidates) / SUCCESS) if candidates else None
    job = {"task": "score_pairs", "model_fingerprint": model_fingerprint(model_dir), "top": int(top),
           "candidates": str(candidates) if candidates else None, "candidates_job": cand_record,
           "extra": describe_file(extra) if extra else None, "questions": describe_file(questions),
           "bm25": [bm25.stats_dir, bm25.k1, bm25.b] if bm25 else None,
           "dense": [model_fingerprint(resolve_model_dir(dense.model_dir)), dense.bf16] if dense else None}
    done = read_json_if_valid(out / SUCCESS)
    if isinstance(done, dict) and done.get("job") == job:
        return out
    rec = corpus_store.require_record(store_dir)
    ensure_ray(ray_cfg)
    t0 = time.perf_counter()
    parts = []
    if candidates is not None and top > 0:
        files = sorted(str(p) for p in Path(candidates).glob("part-*.parquet"))
        if not files:
            raise DataError(f"{candidates}: no candidate parts")
        parts.append(ray.data.read_parquet(files, columns=["qid", "pids"])
                     .map_batches(explode_top, fn_kwargs={"top": int(top)}, batch_format="pyarrow"))
    if extra is not None:
        parts.append(ray.data.read_parquet(str(extra), columns=["qid", "pid"]).map_batches(
            lambda b: b.append_column("rank", pa.array(np.full(b.num_rows, -1, np.int64))), batch_format="pyarrow"))
    if not parts:
        raise DataError("score_pair_files: no pairs (give candidates with top > 0, or extra pairs)")
    pairs = parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]
    n_pairs = pairs.count()
    if n_pairs == 0:
        raise DataError(f"score_pair_files: {candidates or extra} hold no pairs")
    files = corpus_store.part_files(store_dir)
    passages = ray.data.read_parquet(files, columns=["id", "title", "text"]).map_batches(passages_of,
                                                                                        batch_format="pyarrow")
    queries = ray.data.read_parquet(str(questions), columns=["qid", "query"])
    n_part = max(1, math.ceil(max(n_pairs, rec["n_rows"]) / ROWS_PER_PARTITION))
    joined = (pairs.join(passages, "inner", n_part, on=("pid",), right_on=("id",))
              .join(queries, "inner", n_part, on=("qid",)))
    actors = max(1, min(cfg.num_actors, math.ceil(n_pairs / cfg.batch_size)))
    # a join's output is one block per partition (one for all but huge inputs): split into a few blocks per actor so
    # every actor of the pool scores (one-thread actors: one block left a 2-core machine half idle), streaming
    joined = joined.repartition(target_num_rows_per_block=max(cfg.batch_size, math.ceil(n_pairs / (4 * actors))))
    if bm25 is not None:  # a light actor: the statistics (the vocabulary's document frequencies) load once each
        joined = joined.map_batches(PairBM25, fn_constructor_kwargs={"feature": bm25}, batch_format="pyarrow",
                                    compute=ray.data.ActorPoolStrategy(size=actors), num_cpus=0.25)
    if dense is not None:
        joined = joined.map_batches(PairDense, fn_constructor_kwargs={"feature": dense, "cpus": cfg.cpus_per_actor,
                                                                      "gpus": cfg.gpus_per_actor},
                                    batch_size=cfg.batch_size, batch_format="pyarrow",
                                    compute=ray.data.ActorPoolStrategy(size=actors), num_cpus=cfg.cpus_per_actor,
                                    num_gpus=cfg.gpus_per_actor or None)
    kwargs = {"model_dir": str(model_dir), "batch_size": cfg.batch_size, "bf16": cfg.bf16,
              "cpus": cfg.cpus_per_actor, "gpus": cfg.gpus_per_actor}
    scored = joined.rename_columns({"rank": "row"}).map_batches(
        ScorerActor, fn_constructor_kwargs=kwargs, batch_size=cfg.batch_size, batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=actors), num_cpus=cfg.cpus_per_actor,
        num_gpus=cfg.gpus_per_actor or None).rename_columns({"row": "rank"})
    with atomic_dir(out) as tmp:
        write_parquet(scored, tmp, (f"score {out.parent.name}/{out.name}", n_pairs, "pairs"))
        got = parquet_rows(tmp)
        if got != n_pairs:  # a pair whose passage or question has no text was dropped by the inner joins
            raise DataError(f"score_pair_files: {n_pairs} pairs but {got} scored: some pid is not in {store_dir} or "
                            f"some qid not in {questions}")
        write_json(tmp / SUCCESS, {"job": job, "pairs": n_pairs, "seconds": round(time.perf_counter() - t0, 3)})
    log.info("scored %d pairs in %.1f s -> %s", n_pairs, time.perf_counter() - t0, out)
    return out


def read_pair_scores(out_dir: str | Path) -> dict[tuple[str, str], float]:
    """{(qid, pid): probability} of a `score_pair_files` folder, or of one Parquet file with those columns (for
    callers that keep the scores in memory)."""
    out: dict[tuple[str, str], float] = {}
    for f in [out_dir] if Path(out_dir).is_file() else sorted(Path(out_dir).glob("*.parquet")):
        t = pq.read_table(f, columns=["qid", "pid", "score"])
        out.update(zip(zip(t.column("qid").to_pylist(), t.column("pid").to_pylist()),
                       t.column("score").to_numpy().astype(float).tolist()))
    return out


def fuse(batch: pa.Table, fusion: Fusion) -> pa.Table:
    """map_batches over scored pairs {..., score, dense[, bm25]} -> the same rows with `score` the fusion's score and
    the cross-encoder's probability kept as `ce`."""
    ce = batch.column("score").to_numpy().astype(np.float64)
    dense = batch.column("dense").to_numpy().astype(np.float64)
    bm25 = batch.column("bm25").to_numpy().astype(np.float64) if fusion.uses_bm25 else None
    i = batch.column_names.index("score")
    return batch.set_column(i, "score", pa.array(fusion(ce, dense, bm25), pa.float64())).append_column(
        "ce", pa.array(ce, pa.float64()))


def fuse_pair_files(scores: str | Path, fusion: Fusion, out_dir: str | Path, ray_cfg: RayConfig | None = None) -> Path:
    """A `score_pair_files` folder scored with `dense` (and `bm25` when the fusion weighs it) -> the same pairs with
    the fusion's score (`fuse`), by a Ray Data map: no process holds the pairs. A folder that was written for the
    same scores and fusion is returned as is."""
    import ray

    from rocketqa_ray.ray_utils import ensure_ray, write_parquet

    out = Path(out_dir)
    job = {"task": "fuse_pairs", "scores": read_json_if_valid(Path(scores) / SUCCESS), "fusion": fusion.to_dict()}
    done = read_json_if_valid(out / SUCCESS)
    if isinstance(done, dict) and done.get("job") == job:
        return out
    files = sorted(str(f) for f in Path(scores).glob("*.parquet"))
    if not files or job["scores"] is None:
        raise DataError(f"{scores}: no complete pair scores to fuse; rerun the stage")
    needed = ["dense", *(["bm25"] if fusion.uses_bm25 else [])]
    missing = [c for c in needed if c not in pq.read_schema(files[0]).names]
    if missing:
        raise DataError(f"{scores}: scored without {', '.join(missing)}, which the fusion weighs; rerun the stage")
    ensure_ray(ray_cfg)
    with atomic_dir(out) as tmp:
        write_parquet(ray.data.read_parquet(files).map_batches(fuse, fn_kwargs={"fusion": fusion},
                                                                batch_format="pyarrow"), tmp)
        write_json(tmp / SUCCESS, {"job": job, "pairs": job["scores"].get("pairs")})
    return out
