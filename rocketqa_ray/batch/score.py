"""Cross-encoder scoring of (question, candidate) pairs as a resumable Ray Data job.

Any number of rows (qid, pid, query, passage) -> Parquet parts (row, qid, pid, score) where score is the
cross-encoder's probability sigmoid(logit). Same shard/resume machinery as corpus encoding
(`rocketqa_ray.batch.shards`): a rerun after a crash scores only the shards without a part file, and never
loses or duplicates a pair. `CrossEncoder.score` (in-process) is the reference.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

from rocketqa_ray.batch.shards import iter_parts, run_job, source_stat
from rocketqa_ray.config import EncodeConfig, RayConfig
from rocketqa_ray.errors import DataError

log = logging.getLogger(__name__)

PAIR_COLUMNS = ["qid", "pid", "query", "passage"]
# what the pair flow may add to a pair before scoring (`batch.bm25_stats.PairBM25`, `batch.pair_dense.PairDense`)
PAIR_FEATURES = ("bm25", "dense")


class ScorerActor:
    """Row batches {row, qid, pid, query, passage[, bm25][, dense]} -> {row, qid, pid, score[, bm25][, dense]};
    one cross-encoder per actor."""

    def __init__(self, model_dir: str, batch_size: int, bf16: str, cpus: float, gpus: float):
        from rocketqa_ray.modeling.cross_encoder import CrossEncoder
        from rocketqa_ray.ray_utils import model_in_actor

        self.model, self.device = model_in_actor(CrossEncoder, model_dir, cpus, gpus, bf16)
        self.batch_size, self.bf16 = batch_size, bf16

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        qs = [str(t) for t in batch["query"]]
        ps = [str(t) for t in batch["passage"]]
        scores = self.model.score(qs, ps, self.batch_size, self.bf16, self.device)
        out = {"row": np.asarray(batch["row"], dtype=np.int64), "qid": batch["qid"], "pid": batch["pid"],
               "score": scores.astype(np.float32)}
        for feature in PAIR_FEATURES:  # computed upstream in the same flow, for a fusion
            if feature in batch:
                out[feature] = np.asarray(batch[feature], dtype=np.float32)
        return out


def iter_pairs(source: str | Path | Iterable[dict]) -> Iterator[dict]:
    """Validated pair rows from a Parquet/JSONL file or an iterable of dicts with qid, pid, query, passage."""
    if isinstance(source, (str, Path)):
        path = Path(source)
        if not path.exists():
            raise DataError(f"pairs file {path} does not exist")
        if path.suffix == ".parquet":
            import pyarrow.parquet as pq

            pf = pq.ParquetFile(path)
            missing = set(PAIR_COLUMNS) - set(pf.schema_arrow.names)
            if missing:
                raise DataError(f"{path}: pairs need columns {PAIR_COLUMNS}; missing {sorted(missing)}")
            rows: Iterable[dict] = (r for b in pf.iter_batches(batch_size=8192, columns=PAIR_COLUMNS)
                                    for r in b.to_pylist())
        else:
            from rocketqa_ray.data.beir import iter_jsonl

            rows = (obj for _, obj in iter_jsonl(path))
        where = str(path)
    else:
        rows, where = source, "pairs"
    for i, r in enumerate(rows):
        if not isinstance(r, dict):
            raise DataError(f"{where}: pair #{i + 1} is not a mapping with {PAIR_COLUMNS}")
        qid, pid = r.get("qid"), r.get("pid")
        if qid is None or pid is None or str(qid) == "" or str(pid) == "":
            raise DataError(f"{where}: pair #{i + 1} lacks 'qid' or 'pid'")
        for c in ("query", "passage"):
            v = r.get(c)
            if not isinstance(v, str) or not v.strip():
                raise DataError(f"{where}: pair #{i + 1} (qid {qid!r}, pid {pid!r}) has no '{c}' text")
        yield {"qid": str(qid), "pid": str(pid), "query": r["query"], "passage": r["passage"]}


def score_pairs(pairs: str | Path | Iterable[dict], model_dir: str | Path, out_dir: str | Path, cfg: EncodeConfig,
                overwrite: bool = False, ray_cfg: RayConfig | None = None) -> Path:
    """Score every (qid, pid, query, passage) row with the cross-encoder in `model_dir`; returns `out_dir`.

    `pairs` is a Parquet or JSONL file, or a list/iterable of dicts (a list may be iterated twice, an
    iterator only once). Output: `part-XXXXX.parquet` (row, qid, pid, score float32 in [0, 1]) in input
    order, then `_SUCCESS.json`.
    """
    from rocketqa_ray.batch.encode import resolve_model_dir
    from rocketqa_ray.modeling.base import model_fingerprint

    model_dir = resolve_model_dir(model_dir)
    fp = model_fingerprint(model_dir)
    job = {"task": "score", "model_fingerprint": fp, "rows_per_shard": cfg.rows_per_shard}
    is_file = isinstance(pairs, (str, Path))
    kwargs = {"model_dir": str(model_dir), "batch_size": cfg.batch_size, "bf16": cfg.bf16,
              "cpus": cfg.cpus_per_actor, "gpus": cfg.gpus_per_actor}
    return run_job(lambda: iter_pairs(pairs), out_dir, job, PAIR_COLUMNS, ScorerActor, kwargs, cfg,
                   source=source_stat(pairs) if is_file else None,
                   extra=lambda plan: {"model_fingerprint": fp, "model_dir": str(model_dir)},
                   overwrite=overwrite, ray_cfg=ray_cfg)


def load_score_table(out_dir: str | Path):
    """The scores as one Arrow table (row, qid, pid, score) in input order."""
    import pyarrow as pa

    return pa.concat_tables(list(iter_parts(out_dir, ["qid", "pid", "score"])))


def load_scores(out_dir: str | Path) -> dict[tuple[str, str], float]:
    """{(qid, pid): probability}; with a pair listed twice, its scores are the same model's on the same text."""
    t = load_score_table(out_dir)
    return {(q, p): float(s) for q, p, s in zip(t.column("qid").to_pylist(), t.column("pid").to_pylist(),
                                                  t.column("score").to_numpy())}

