"""Building a DenseIndex: from one array, from a stream of embedding shards, or from an encoding job's output.

IVF-PQ trains once, on a bounded sample (`index.train_sample` vectors), and every shard of the index shares
that training. Ray-free: the Ray Data encoding job (`batch.encode`) writes the shards this reads.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np

from rocketqa_ray.config import IndexConfig
from rocketqa_ray.errors import DataError
from rocketqa_ray.index.dense import DenseIndex, as_matrix, check_batch
from rocketqa_ray.index.factory import AUTO_FLAT_MAX, check_train_sample, resolve_kind

log = logging.getLogger(__name__)

EMPTY = "cannot build an index from 0 embeddings (is the corpus empty?)"


def build(emb: np.ndarray, ids: list[str], cfg: IndexConfig, model_fingerprint: str | None = None,
          metric: str = "ip") -> DenseIndex:
    """Index `emb` [N, D] (float32, normalised for "ip") whose row i is passage `ids[i]`.

    IVF-PQ is trained on a random sample of `cfg.train_sample` rows; with `cfg.shard_size` the rows
    are split into consecutive shards that share that training.
    """
    emb, ids = check_batch(emb, ids, None)
    if emb.shape[0] == 0:
        raise DataError(EMPTY)
    n, dim = emb.shape
    kind = resolve_kind(cfg, n)
    train = None
    if kind == "ivfpq":
        check_train_sample(cfg)
        if n > cfg.train_sample:
            rng = np.random.default_rng(0)
            train = emb[np.sort(rng.choice(n, size=cfg.train_sample, replace=False))]
        else:
            train = emb
    idx = DenseIndex.empty(kind, dim, cfg, n, train, model_fingerprint, metric)
    idx.add(ids, emb)
    idx.finalize()
    return idx


def _take(it: Iterator[tuple[Sequence[str], np.ndarray]], want: int) -> list[tuple[list[str], np.ndarray]]:
    """Validated batches from the start of the stream until they hold `want` vectors (or the stream ends)."""
    out: list[tuple[list[str], np.ndarray]] = []
    have, dim = 0, None
    for b_ids, b_emb in it:
        b_emb, b_ids = check_batch(b_emb, b_ids, dim)
        dim = b_emb.shape[1]
        out.append((b_ids, b_emb))
        have += len(b_ids)
        if have >= want:
            break
    return out


def build_from_shards(batches: Iterable[tuple[Sequence[str], np.ndarray]], cfg: IndexConfig,
                      model_fingerprint: str | None = None, metric: str = "ip", total: int | None = None,
                      train_emb: np.ndarray | None = None) -> DenseIndex:
    """Index a stream of `(ids, emb [B, D])` batches without holding the corpus in memory.

    IVF-PQ (and "auto" with `total` unknown, which must count up to AUTO_FLAT_MAX) buffers the first
    `cfg.train_sample` vectors to train on, unless `train_emb` is given. The buffer is the start of
    the stream, so pass `train_emb` (a random sample) when the corpus order is strongly topical.
    `total` (the corpus size, if known) sets the automatic nlist; otherwise the buffer size is used.
    """
    it = iter(batches)
    kind = resolve_kind(cfg, total, have_sample=train_emb is not None)
    if kind in ("ivfpq", "auto"):
        check_train_sample(cfg)
    buffered: list[tuple[list[str], np.ndarray]] = []
    if kind in ("ivfpq", "auto") and train_emb is None:
        buffered = _take(it, cfg.train_sample if kind == "ivfpq" else max(cfg.train_sample, AUTO_FLAT_MAX))
        have = sum(len(b) for b, _ in buffered)
        if have == 0:
            raise DataError(EMPTY)
        if kind == "auto":  # counted up to AUTO_FLAT_MAX: enough to decide
            kind = resolve_kind(cfg, have)
        if kind == "ivfpq":
            train_emb = np.concatenate([e for _, e in buffered])[: cfg.train_sample]
    dim = buffered[0][1].shape[1] if buffered else None
    if train_emb is not None and kind == "ivfpq":
        train_emb = as_matrix(train_emb, "training embeddings", dim)
        dim = train_emb.shape[1]

    idx: DenseIndex | None = None

    def add(b_ids: list[str], b_emb: np.ndarray) -> None:
        nonlocal idx
        if idx is None:
            n_est = total or max(len(b_ids), 0 if train_emb is None else len(train_emb))
            train = train_emb if kind == "ivfpq" else None
            idx = DenseIndex.empty(kind, b_emb.shape[1], cfg, n_est, train, model_fingerprint, metric)
        idx.add(b_ids, b_emb)

    for b_ids, b_emb in buffered:
        add(b_ids, b_emb)
    buffered.clear()
    for b_ids, b_emb in it:
        b_emb, b_ids = check_batch(b_emb, b_ids, dim)
        dim = b_emb.shape[1]
        if len(b_ids):
            add(b_ids, b_emb)
    if idx is None or len(idx) == 0:
        raise DataError(EMPTY)
    idx.finalize()
    return idx


def build_index_from_embeddings(emb_dir: str | Path, cfg: IndexConfig, out_dir: str | Path, seed: int = 0) -> Path:
    """Build an index from an encoding job's Parquet parts in this process, shard after shard, and save it.

    The same plan and shard filling as the Ray build (`batch.index_build.build_index`), which runs the shards in
    parallel tasks: IVF-PQ trains on a uniform random sample of the corpus, not on its first rows (often one
    topic), and the index records the encoding model's fingerprint.
    """
    from rocketqa_ray.index.plan import fill_shard, plan_index
    from rocketqa_ray.index.store import write_meta, write_shard
    from rocketqa_ray.io import atomic_dir

    plan = plan_index(emb_dir, cfg, seed=seed)
    out = Path(out_dir)
    with atomic_dir(out) as tmp:
        sizes = [write_shard(tmp, j, *fill_shard(emb_dir, plan, j)) for j in range(len(plan.ranges))]
        write_meta(tmp, plan.meta(), sizes)
    log.info("index: %s over %d passages (dim %d) -> %s", plan.kind, plan.n_total, plan.dim, out)
    return out


def sample_rows(emb_dir: str | Path, n: int, size: int, seed: int) -> np.ndarray:
    """A uniform random sample of `size` of the `n` embeddings in an encoding job's output, in row order."""
    from rocketqa_ray.batch.encode import iter_embeddings

    pick = np.sort(np.random.default_rng(seed).choice(n, size=size, replace=False))
    parts, start = [], 0
    for ids, emb in iter_embeddings(emb_dir):
        lo, hi = np.searchsorted(pick, [start, start + len(ids)])
        parts.append(emb[pick[lo:hi] - start])
        start += len(ids)
    return np.concatenate(parts)
