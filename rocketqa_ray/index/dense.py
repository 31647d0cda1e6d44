"""Dense passage indexes on FAISS: exact (flat), IVF-PQ and HNSW, optionally sharded, on GPU when present.

A `DenseIndex` maps rows (0..N-1, in insertion order) to passage ids. It holds one or more FAISS
indexes ("shards") of up to `IndexConfig.shard_size` vectors each; a search asks every shard for its top k
and merges by score, so sharded and unsharded flat indexes return the same results. Sharding bounds the
size of each FAISS index (and of each file on disk); with IVF-PQ every shard shares one trained
quantizer, so only one training pass is needed.

Index kinds and their memory per vector (d = dimension, float32 = 4 bytes):

- flat:  exact inner product, 4*d bytes (384-d: 1.5 kB). Search cost grows linearly with N.
- ivfpq: inverted lists + product quantizer codes, pq_m bytes + 8 (row id). With `refine="flat"` the
  raw vectors are kept too (+4*d) and the top `refine_k_factor * k` PQ candidates are re-scored exactly:
  PQ codes decide *where* to look, exact scores decide the *order*, which is what lifts recall@100 from
  ~0.7 to > 0.95. `refine="sq8"` keeps 8-bit scalar-quantised vectors instead (+d bytes, 4x smaller
  than flat) at a small recall cost; `refine="none"` is the compact option (pq_m + 8 bytes).
- hnsw:  graph over raw vectors, 4*d + ~8*hnsw_m bytes. Fast and accurate, but slow to build and it
  cannot run on GPU in faiss.

Measured (bench/bench_faiss.py, 1M x 384 synthetic clustered vectors, shared 2-core CPU, k=100):
IVF2000,PQ48 alone is 59 MB and reaches recall@100 0.70; with the flat re-rank store (1.6 GB) and
refine_k_factor 4 it reaches 0.97-0.98 at nprobe 8-32, 11-20x flat's queries per CPU-second. On real
MiniLM embeddings (SQuAD, 21k passages, question queries) the IVF lists are the limit instead: recall@100
0.93 at nprobe 32 and 0.96 at nprobe 64 (of 290 lists); `nprobe` is the knob to raise first.

Every saved index records the fingerprint of the model that encoded the passages; loading it for a
different query encoder is an error, because its scores would be meaningless.

No Ray in here. `index.factory` decides what to build, `index.build` builds it (from an array or a stream of
embedding shards), `index.store` saves and loads it; this module holds and searches it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from rocketqa_ray.config import IndexConfig
from rocketqa_ray.errors import ConfigError, DataError
from rocketqa_ray.index.factory import apply_search_params, load_faiss, new_index, want_gpu
from rocketqa_ray.index.gpu import PlacedIndex, to_gpu
from rocketqa_ray.index.search import merge_topk, offset_rows

FORMAT_VERSION = 3  # 3: one ids file per shard (2: ids.parquet, 1: ids.json; both still read)


def as_matrix(x: Any, what: str, dim: int | None = None) -> np.ndarray:
    """A C-contiguous float32 [N, D] copy/view of `x`, or a clear error."""
    arr = np.asarray(x)
    if arr.ndim != 2:
        raise DataError(
            f"{what} must be a 2-D array [n, dim], got shape {tuple(arr.shape)}"
            + (" (for one vector use x[None, :])" if arr.ndim == 1 else "")
        )
    if not np.issubdtype(arr.dtype, np.floating):
        raise DataError(f"{what} must be floating point, got dtype {arr.dtype}")
    if dim is not None and arr.shape[1] != dim:
        raise ConfigError(
            f"{what} have dimension {arr.shape[1]} but the index has dimension {dim}: "
            "the encoder does not match the index; rebuild the index with jobs/index.py"
        )
    arr = np.ascontiguousarray(arr, dtype=np.float32)
    step = 1 << 16  # in blocks: a mask of the whole corpus would be another N x D bytes
    for start in range(0, arr.shape[0], step):
        finite = np.isfinite(arr[start : start + step])
        if not finite.all():
            bad = start + int(np.argwhere(~finite)[0][0])
            raise DataError(f"{what} contain NaN or inf (first at row {bad})")
    return arr


def check_batch(emb: Any, ids: Sequence[str], dim: int | None) -> tuple[np.ndarray, list[str]]:
    emb = as_matrix(emb, "embeddings", dim)
    ids = [i if isinstance(i, str) else str(i) for i in ids]
    if len(ids) != emb.shape[0]:
        raise DataError(f"got {len(ids)} ids for {emb.shape[0]} embeddings: they must be the same length")
    if emb.shape[1] == 0:
        raise DataError("embeddings have dimension 0")
    return emb, ids


def _first_duplicate(ids: Iterable[str], seen: set[str]) -> str | None:
    for i in ids:
        if i in seen:
            return i
        seen.add(i)
    return None


class DenseIndex:
    """Row-addressed dense index over passage embeddings.

    Attributes: `kind` ("flat" | "ivfpq" | "hnsw"), `dim`, `ids` (row -> passage id), `metric`
    ("ip": higher scores are better; "l2": squared distances, lower is better), `meta` (JSON-able
    description incl. "model_fingerprint", "dim", "kind", "ntotal", "shards").
    Build with `DenseIndex.build` / `build_from_shards` (`index.build`), read with `DenseIndex.load` (`index.store`).
    """

    def __init__(self, kind: str, dim: int, cfg: IndexConfig, template: Any, factory: str,
                 model_fingerprint: str | None = None, metric: str = "ip") -> None:
        self.kind = kind
        self.dim = int(dim)
        self.cfg = dataclasses.replace(cfg)  # a copy: set_search_params must not edit the caller's config
        self.metric = metric
        self.factory = factory
        self.model_fingerprint = model_fingerprint
        self.ids: list[str] = []
        self._template = template  # an empty, trained faiss index: each new shard is a clone of it
        self._shards: list[Any] = []  # CPU faiss indexes; shard j holds rows offsets[j] .. offsets[j]+ntotal
        self._offsets: list[int] = []
        self._gpu: list[PlacedIndex] | None = None  # lazily made GPU copies, dropped on add
        self._id_set: set[str] | None = None

    @classmethod
    def empty(cls, kind: str, dim: int, cfg: IndexConfig, n_total: int, train: np.ndarray | None,
              model_fingerprint: str | None, metric: str = "ip") -> DenseIndex:
        """An index with no vectors yet, trained on `train` where its kind needs training."""
        template, factory = new_index(kind, dim, cfg, n_total, train, metric)
        idx = cls(kind, dim, cfg, template, factory, model_fingerprint, metric)
        idx._apply_search_params(template)
        return idx

    @classmethod
    def from_shards(cls, kind: str, dim: int, cfg: IndexConfig, shards: list[Any], ids: list[str], factory: str,
                    model_fingerprint: str | None, metric: str = "ip") -> DenseIndex:
        """Wrap filled faiss indexes (shard j holds the rows after shard j-1's) whose rows are passages `ids`."""
        template = load_faiss().clone_index(shards[0])
        template.reset()  # keeps the IVF/PQ training, drops the vectors
        idx = cls(kind, dim, cfg, template, factory, model_fingerprint, metric)
        idx.ids = list(ids)
        off = 0
        for s in shards:
            idx._offsets.append(off)
            off += s.ntotal
            idx._apply_search_params(s)
        idx._shards = list(shards)
        return idx

    @classmethod
    def build(cls, emb: np.ndarray, ids: list[str], cfg: IndexConfig, model_fingerprint: str | None = None,
              metric: str = "ip") -> DenseIndex:
        """Index `emb` [N, D] whose row i is passage `ids[i]` (`index.build.build`)."""
        return _build().build(emb, ids, cfg, model_fingerprint, metric)

    @classmethod
    def build_from_shards(cls, batches: Iterable[tuple[Sequence[str], np.ndarray]], cfg: IndexConfig,
                          model_fingerprint: str | None = None, metric: str = "ip", total: int | None = None,
                          train_emb: np.ndarray | None = None) -> DenseIndex:
        """Index a stream of `(ids, emb [B, D])` batches without holding the corpus (`index.build.build_from_shards`)."""
        return _build().build_from_shards(batches, cfg, model_fingerprint, metric, total, train_emb)

    @classmethod
    def load(cls, path: str | Path, expect_dim: int | None = None, expect_fingerprint: str | None = None,
             cfg: IndexConfig | None = None) -> DenseIndex:
        """Read an index written by `save`, checking it fits the query encoder (`index.store.load_index`)."""
        return _store().load_index(path, expect_dim, expect_fingerprint, cfg)

    def save(self, path: str | Path) -> Path:
        """Write `path/` (meta.json, ids, one .faiss file per shard), replacing it atomically (`index.store`)."""
        return _store().save_index(self, path)

    @property
    def shards(self) -> list[Any]:
        """The CPU faiss indexes, in row order (the source of truth; GPU copies are made from them)."""
        return list(self._shards)

    def add(self, ids: Sequence[str], emb: np.ndarray) -> None:
        """Append rows: `emb` [B, D] for passages `ids` (new ids only). Fills the last shard up to
        `cfg.shard_size`, then starts a new one."""
        faiss = load_faiss()
        emb, ids = check_batch(emb, ids, self.dim)
        if self._id_set is None:
            self._id_set = set(self.ids)
            if len(self._id_set) != len(self.ids):  # pragma: no cover - guarded at every add
                raise DataError("index has duplicate passage ids")
        cap = self.cfg.shard_size
        if cap is not None and cap < 1:
            raise ConfigError(f"index.shard_size must be at least 1 (or null for one shard), got {cap}")
        dup = _first_duplicate(ids, self._id_set)
        if dup is not None:
            self._id_set = None  # it now holds part of the rejected batch: rebuild it on the next add
            raise DataError(f"duplicate passage id {dup!r}: every passage must have a unique id")
        start = 0
        while start < len(ids):
            if not self._shards or (cap is not None and self._shards[-1].ntotal >= cap):
                shard = faiss.clone_index(self._template)
                self._apply_search_params(shard)
                self._offsets.append(len(self.ids) + start)
                self._shards.append(shard)
            shard = self._shards[-1]
            room = len(ids) - start if cap is None else min(len(ids) - start, cap - shard.ntotal)
            shard.add(emb[start : start + room])
            start += room
        self.ids.extend(ids)
        self._gpu = None

    def finalize(self) -> None:
        """Move to GPU when configured; called by the builders and by `load`."""
        if want_gpu(self.cfg) and self._gpu is None:
            copies = [to_gpu(s, self.kind, self.cfg) for s in self._shards]
            if all(c is not None for c in copies):
                self._gpu = copies

    # ------------------------------------------------------------------ search

    def _apply_search_params(self, index: Any) -> None:
        apply_search_params(index, self.kind, self.cfg)

    def set_search_params(
        self, nprobe: int | None = None, ef_search: int | None = None, refine_k_factor: float | None = None
    ) -> None:
        """Change the speed/recall knobs of an existing index (IVF nprobe, HNSW efSearch, refine factor)."""
        if nprobe is not None:
            self.cfg.nprobe = int(nprobe)
        if ef_search is not None:
            self.cfg.ef_search = int(ef_search)
        if refine_k_factor is not None:
            self.cfg.refine_k_factor = float(refine_k_factor)
        for s in self._shards:
            self._apply_search_params(s)
        for g in self._gpu or []:
            g.set_search_params(self.cfg)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-k rows for each query.

        queries: [Q, D] float32. Returns (scores [Q, k] float32, rows [Q, k] int64), best first; where
        the index has fewer than k vectors the tail is row -1 with score -inf ("ip") / +inf ("l2").
        """
        q = as_matrix(queries, "queries", self.dim)
        if not isinstance(k, (int, np.integer)) or isinstance(k, bool) or k < 1:
            raise DataError(f"k must be a positive integer, got {k!r}")
        k = int(k)
        shards = self._gpu or self._shards
        if len(q) == 0 or not shards:
            return merge_topk([], k, self.metric, n_queries=len(q))
        parts = []
        for off, shard in zip(self._offsets, shards):
            if shard.ntotal:
                # faiss pads with -1; asking for no more than the shard holds keeps HNSW/IVF from over-working
                s, r = shard.search(q, min(k, shard.ntotal))
                parts.append(offset_rows(s, r, off, self.metric))
        return merge_topk(parts, k, self.metric)

    def search_ids(self, queries: np.ndarray, k: int) -> list[list[tuple[str, float]]]:
        """Like `search`, as [(passage id, score), ...] per query (without the -1 padding)."""
        scores, rows = self.search(queries, k)
        ids = self.ids
        return [
            [(ids[r], float(s)) for s, r in zip(srow, rrow) if r >= 0]
            for srow, rrow in zip(scores.tolist(), rows.tolist())
        ]

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def ntotal(self) -> int:
        return len(self.ids)

    @property
    def on_gpu(self) -> bool:
        return self._gpu is not None

    @property
    def meta(self) -> dict[str, Any]:
        return {
            "format_version": FORMAT_VERSION,
            "kind": self.kind,
            "dim": self.dim,
            "metric": self.metric,
            "ntotal": len(self.ids),
            "shards": len(self._shards),
            "shard_sizes": [int(s.ntotal) for s in self._shards],
            "factory": self.factory,
            "model_fingerprint": self.model_fingerprint,
            "params": {
                "nprobe": self.cfg.nprobe,
                "ef_search": self.cfg.ef_search,
                "ef_construction": self.cfg.ef_construction,
                "refine": self.cfg.refine,
                "refine_k_factor": self.cfg.refine_k_factor,
                "shard_size": self.cfg.shard_size,
            },
            "faiss_version": getattr(load_faiss(), "__version__", "unknown"),
        }

    # ------------------------------------------------------------------ persistence


def _build():
    from rocketqa_ray.index import build

    return build


def _store():
    from rocketqa_ray.index import store

    return store
