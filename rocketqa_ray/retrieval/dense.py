"""Batch retrieval: queries -> (Ray Data) query embeddings -> index top-k -> Parquet / TREC runs.

Used for test evaluation, hard-negative mining (gold positives excluded) and pseudo-labelling.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from rocketqa_ray.config import EncodeConfig, RayConfig
from rocketqa_ray.errors import ConfigError, DataError
from rocketqa_ray.io import atomic_path
from rocketqa_ray.types import RankedHits, Run

if TYPE_CHECKING:
    from rocketqa_ray.index import DenseIndex

log = logging.getLogger(__name__)

SEARCH_CHUNK = 4096  # queries per index.search call: bounds the [Q, k] temporaries


def check_index_model(index: DenseIndex, model_dir: str | Path) -> str:
    """The model's fingerprint; a `ConfigError` if the index was built from another model's embeddings."""
    from rocketqa_ray.batch.encode import resolve_model_dir
    from rocketqa_ray.modeling.base import model_fingerprint

    fp = model_fingerprint(resolve_model_dir(model_dir))
    built_with = getattr(index, "model_fingerprint", None)
    if built_with is not None and built_with != fp:
        raise ConfigError(
            f"the index was built with another model (fingerprint {built_with}) than the query encoder {model_dir} "
            f"({fp}); rebuild the index from this model's embeddings (jobs/encode.py, then jobs/index.py)")
    return fp


def encode_queries(model_dir: str | Path, qids: list[str], texts: list[str], cfg: EncodeConfig,
                   use_ray: bool = True, ray_cfg: RayConfig | None = None) -> np.ndarray:
    """float32 [Q, H] query embeddings, via the Ray Data actor pool or (use_ray=False) in-process."""
    from rocketqa_ray.batch.encode import encode_texts, resolve_model_dir

    if use_ray:
        return encode_texts(texts, qids, model_dir, cfg, kind="query", ray_cfg=ray_cfg)
    from rocketqa_ray.modeling.dual_encoder import DualEncoder

    model = DualEncoder.load(resolve_model_dir(model_dir))
    return model.encode(texts, "query", cfg.batch_size, cfg.bf16, sort_by_length=cfg.sort_by_length)


def check_questions(qids: list[str], texts: list[str], k: int | None = None) -> None:
    """The rules every retrieval entry point applies to its questions (and k), as one-line DataErrors."""
    if len(qids) != len(texts):
        raise DataError(f"{len(qids)} query ids but {len(texts)} query texts")
    if len(set(qids)) != len(qids):
        raise DataError("query ids must be unique")
    if k is not None and (not isinstance(k, (int, np.integer)) or isinstance(k, bool) or k < 1):
        raise DataError(f"k must be a positive integer, got {k!r}")


def search_embeddings(index: DenseIndex, qids: list[str], q_emb: np.ndarray, k: int,
                      exclude: dict[str, set[str]] | None = None) -> RankedHits:
    """Top-k (pid, score) per query from precomputed query embeddings, minus `exclude[qid]`.

    To still return k passages after dropping the excluded ones, each query asks the index for
    k + (the largest exclude set in its chunk) candidates.
    """
    if len(qids) != len(q_emb):
        raise DataError(f"{len(qids)} query ids but {len(q_emb)} query embeddings")
    if not isinstance(k, (int, np.integer)) or k < 1:
        raise DataError(f"k must be a positive integer, got {k!r}")
    exclude = exclude or {}
    ids = index.ids
    out: RankedHits = {}
    for start in range(0, len(qids), SEARCH_CHUNK):
        chunk = qids[start : start + SEARCH_CHUNK]
        extra = max((len(exclude.get(q, ())) for q in chunk), default=0)
        depth = min(int(k) + extra, len(ids))
        scores, rows = index.search(q_emb[start : start + len(chunk)], depth)
        for q, srow, rrow in zip(chunk, scores.tolist(), rows.tolist()):
            drop = exclude.get(q, ())
            hits = [(ids[r], float(s)) for s, r in zip(srow, rrow) if r >= 0 and ids[r] not in drop]
            out[q] = hits[:k]
    return out


def retrieve(model_dir: str | Path, index: DenseIndex, qids: list[str], query_texts: list[str], k: int,
             exclude: dict[str, set[str]] | None = None, cfg: EncodeConfig | None = None,
             use_ray: bool | None = None, ray_cfg: RayConfig | None = None) -> RankedHits:
    """Encode the queries with `model_dir` and return {qid: [(pid, score), ...]} (k per query, best first).

    `exclude[qid]` (e.g. the gold positives, for hard-negative mining) never appears in that query's list.
    The index must have been built from the same model's passage embeddings. `use_ray` None: the Ray Data
    actor pool encodes more than `cfg.driver_max_queries` queries, fewer are encoded in this process.
    """
    cfg = cfg or EncodeConfig()
    check_questions(qids, query_texts)
    if not qids:
        return {}
    check_index_model(index, model_dir)
    if use_ray is None:
        use_ray = len(qids) > cfg.driver_max_queries
    q_emb = encode_queries(model_dir, qids, query_texts, cfg, use_ray=use_ray, ray_cfg=ray_cfg)
    return search_embeddings(index, qids, q_emb, k, exclude)


# -------------------------------------------------------------------------------------------- run files
def to_run(results: RankedHits) -> Run:
    """{qid: [(pid, score)]} -> {qid: {pid: score}} (the form evaluation.* takes)."""
    return {q: dict(items) for q, items in results.items()}


def write_run_parquet(results: RankedHits, path: str | Path) -> Path:
    """Atomically write columns qid, pid, rank (from 1), score, in the lists' order."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    qs, ps, ranks, scores = [], [], [], []
    for q, items in results.items():
        for rank, (p, s) in enumerate(items, 1):
            qs.append(q)
            ps.append(p)
            ranks.append(rank)
            scores.append(s)
    table = pa.table({"qid": pa.array(qs, pa.string()), "pid": pa.array(ps, pa.string()),
                      "rank": pa.array(ranks, pa.int32()), "score": pa.array(scores, pa.float32())})
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)
    return Path(path)


def read_run_parquet(path: str | Path) -> RankedHits:
    import pyarrow.parquet as pq

    t = pq.read_table(path)
    out: RankedHits = {}
    for q, p, s in zip(t.column("qid").to_pylist(), t.column("pid").to_pylist(), t.column("score").to_pylist()):
        out.setdefault(q, []).append((p, s))
    return out


def write_trec(results: RankedHits, path: str | Path, tag: str = "rocketqa_ray") -> Path:
    from rocketqa_ray.evaluation import write_trec_run

    return write_trec_run(to_run(results), path, tag=tag)
