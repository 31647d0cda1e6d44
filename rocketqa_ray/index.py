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

No Ray in here: the Ray Data encoding job feeds `build_from_shards` with its Parquet shards.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from rocketqa_ray.config import IndexConfig
from rocketqa_ray.errors import ConfigError, DataError, RocketQAError
from rocketqa_ray.io import atomic_dir, read_json, write_json

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
KINDS = ("flat", "ivfpq", "hnsw", "auto")
REFINES = ("none", "flat", "sq8")
METRICS = ("ip", "l2")
# "auto" picks an exact index below this many vectors: flat search on 200k x 384 is ~10 ms per query on
# one core, and exact results are worth more than speed at that size.
AUTO_FLAT_MAX = 200_000
# faiss k-means wants at least this many training points per centroid (fewer gives poor centroids).
MIN_POINTS_PER_CENTROID = 39


def _faiss():
    try:
        import faiss
    except ImportError as e:  # pragma: no cover - faiss is a hard dependency
        raise RocketQAError(
            "faiss is not installed: pip install faiss-cpu (or faiss-gpu on CUDA machines)"
        ) from e
    return faiss


# ----------------------------------------------------------------------------------------------------
# input validation


def _as_matrix(x: Any, what: str, dim: int | None = None) -> np.ndarray:
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


def _check_batch(emb: Any, ids: Sequence[str], dim: int | None) -> tuple[np.ndarray, list[str]]:
    emb = _as_matrix(emb, "embeddings", dim)
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


# ----------------------------------------------------------------------------------------------------
# parameter choices


def resolve_kind(cfg: IndexConfig, n: int) -> str:
    """The concrete index kind for `n` vectors ("auto": flat below AUTO_FLAT_MAX, IVF-PQ above)."""
    if cfg.kind not in KINDS:
        raise ConfigError(f"index.kind={cfg.kind!r} is not one of: {', '.join(KINDS)}")
    if cfg.kind == "auto":
        return "flat" if n < AUTO_FLAT_MAX else "ivfpq"
    return cfg.kind


def _check_train_sample(cfg: IndexConfig) -> None:
    if cfg.train_sample < 1:
        raise ConfigError(f"index.train_sample must be at least 1, got {cfg.train_sample}")


def choose_nlist(cfg: IndexConfig, n_total: int, n_train: int) -> int:
    """IVF list count: `cfg.nlist`, else ~2*sqrt(N) (a few hundred vectors per list), within what the
    training sample can support (MIN_POINTS_PER_CENTROID points per centroid)."""
    if cfg.nlist is not None:
        if cfg.nlist < 1:
            raise ConfigError(f"index.nlist must be at least 1, got {cfg.nlist}")
        if cfg.nlist > n_train:
            raise ConfigError(
                f"index.nlist={cfg.nlist} needs at least that many training vectors, got {n_train}: "
                "lower index.nlist or raise index.train_sample"
            )
        return cfg.nlist
    nlist = int(round(2 * math.sqrt(max(n_total, 1))))
    return int(max(1, min(nlist, 65536, n_train // MIN_POINTS_PER_CENTROID)))


def choose_pq_m(cfg: IndexConfig, dim: int) -> int:
    """PQ sub-quantizers: `cfg.pq_m`, else the largest divisor of dim that is <= dim // 8
    (8-dim sub-vectors: 384 -> 48 bytes per vector)."""
    if cfg.pq_m is not None:
        if cfg.pq_m < 1 or dim % cfg.pq_m:
            divisors = [m for m in range(1, dim + 1) if dim % m == 0]
            raise ConfigError(
                f"index.pq_m={cfg.pq_m} must divide the dimension {dim}; choose one of {divisors}"
            )
        return cfg.pq_m
    target = max(1, dim // 8)
    return max(m for m in range(1, target + 1) if dim % m == 0)


def choose_pq_bits(n_train: int) -> int:
    """8-bit codes unless the training sample is too small to fit 256 centroids per sub-quantizer."""
    return int(min(8, max(1, math.floor(math.log2(max(n_train, 2) / MIN_POINTS_PER_CENTROID)))))


def factory_string(kind: str, cfg: IndexConfig, dim: int, n_total: int, n_train: int) -> str:
    """The faiss index_factory description of the index we build (also recorded in meta.json)."""
    if kind == "flat":
        return "Flat"
    if kind == "hnsw":
        if cfg.hnsw_m < 2:
            raise ConfigError(f"index.hnsw_m must be at least 2, got {cfg.hnsw_m}")
        return f"HNSW{cfg.hnsw_m},Flat"
    if kind == "ivfpq":
        if cfg.refine not in REFINES:
            raise ConfigError(f"index.refine={cfg.refine!r} is not one of: {', '.join(REFINES)}")
        nlist = choose_nlist(cfg, n_total, n_train)
        m = choose_pq_m(cfg, dim)
        bits = choose_pq_bits(n_train)
        # "np": no polysemous training (a slow annealing step for Hamming filtering, which we never use)
        s = f"IVF{nlist},PQ{m}x{bits}np"
        return s + {"none": "", "flat": ",RFlat", "sq8": ",Refine(SQ8)"}[cfg.refine]
    raise ConfigError(f"unknown index kind {kind!r}")


# ----------------------------------------------------------------------------------------------------
# GPU (guarded: only used when faiss has GPU support and a device is visible)


def gpu_count() -> int:
    faiss = _faiss()
    if not hasattr(faiss, "get_num_gpus"):
        return 0
    try:
        return int(faiss.get_num_gpus())
    except Exception:  # noqa: BLE001 - a broken CUDA install should mean "no GPU", not a crash
        return 0


def _want_gpu(cfg: IndexConfig) -> bool:
    if cfg.use_gpu not in ("auto", "true", "false"):
        raise ConfigError(f"index.use_gpu={cfg.use_gpu!r} is not one of: auto, true, false")
    if cfg.use_gpu == "false":
        return False
    n = gpu_count()
    if cfg.use_gpu == "true" and n == 0:
        raise ConfigError(
            "index.use_gpu=true but faiss sees no GPU (faiss-cpu installed, or no CUDA device): "
            "install faiss-gpu on a GPU machine or set index.use_gpu=auto"
        )
    return n > 0


def _to_gpu(index: Any, kind: str) -> Any:
    """A copy of `index` spread over all GPUs, or None when faiss cannot put this kind there."""
    faiss = _faiss()
    if kind == "hnsw":
        log.info("faiss has no GPU HNSW; searching HNSW on CPU")
        return None
    try:
        co = faiss.GpuMultipleClonerOptions()
        co.useFloat16 = True  # IVF-PQ lookup tables in fp16: needed for pq_m > 48 on GPU, harmless otherwise
        co.shard = True  # split the vectors across GPUs rather than replicate them
        return faiss.index_cpu_to_all_gpus(index, co=co)
    except Exception as e:  # noqa: BLE001
        log.warning("could not move the %s index to GPU (%s); searching on CPU", kind, e)
        return None


# ----------------------------------------------------------------------------------------------------


class DenseIndex:
    """Row-addressed dense index over passage embeddings.

    Attributes: `kind` ("flat" | "ivfpq" | "hnsw"), `dim`, `ids` (row -> passage id), `metric`
    ("ip": higher scores are better; "l2": squared distances, lower is better), `meta` (JSON-able
    description incl. "model_fingerprint", "dim", "kind", "ntotal", "shards").
    """

    def __init__(
        self,
        kind: str,
        dim: int,
        cfg: IndexConfig,
        template: Any,
        factory: str,
        model_fingerprint: str | None = None,
        metric: str = "ip",
    ) -> None:
        # Use build / build_from_shards / load; this only wires the pieces together.
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
        self._gpu: list[Any] | None = None  # lazily made GPU copies, dropped on add
        self._id_set: set[str] | None = None

    # ------------------------------------------------------------------ construction

    @classmethod
    def _empty(
        cls,
        kind: str,
        dim: int,
        cfg: IndexConfig,
        n_total: int,
        train: np.ndarray | None,
        model_fingerprint: str | None,
        metric: str,
    ) -> DenseIndex:
        faiss = _faiss()
        if metric not in METRICS:
            raise ConfigError(f"metric={metric!r} is not one of: {', '.join(METRICS)}")
        n_train = 0 if train is None else len(train)
        factory = factory_string(kind, cfg, dim, n_total, n_train)
        fmetric = faiss.METRIC_INNER_PRODUCT if metric == "ip" else faiss.METRIC_L2
        template = faiss.index_factory(dim, factory, fmetric)
        if kind == "hnsw":
            template.hnsw.efConstruction = int(cfg.ef_construction)
        if not template.is_trained:
            if train is None or len(train) == 0:
                raise DataError(f"a {kind} index needs training vectors")
            log.info("training %s on %d vectors", factory, len(train))
            template.train(train)
        idx = cls(kind, dim, cfg, template, factory, model_fingerprint, metric)
        idx._apply_search_params(template)
        return idx

    @classmethod
    def build(
        cls,
        emb: np.ndarray,
        ids: list[str],
        cfg: IndexConfig,
        model_fingerprint: str | None = None,
        metric: str = "ip",
    ) -> DenseIndex:
        """Index `emb` [N, D] (float32, normalised for "ip") whose row i is passage `ids[i]`.

        IVF-PQ is trained on a random sample of `cfg.train_sample` rows; with `cfg.shard_size` the rows
        are split into consecutive shards that share that training.
        """
        emb, ids = _check_batch(emb, ids, None)
        if emb.shape[0] == 0:
            raise DataError("cannot build an index from 0 embeddings (is the corpus empty?)")
        n, dim = emb.shape
        kind = resolve_kind(cfg, n)
        train = None
        if kind == "ivfpq":
            _check_train_sample(cfg)
            if n > cfg.train_sample:
                rng = np.random.default_rng(0)
                train = emb[np.sort(rng.choice(n, size=cfg.train_sample, replace=False))]
            else:
                train = emb
        idx = cls._empty(kind, dim, cfg, n, train, model_fingerprint, metric)
        idx.add(ids, emb)
        idx.finalize()
        return idx

    @classmethod
    def build_from_shards(
        cls,
        batches: Iterable[tuple[Sequence[str], np.ndarray]],
        cfg: IndexConfig,
        model_fingerprint: str | None = None,
        metric: str = "ip",
        total: int | None = None,
        train_emb: np.ndarray | None = None,
    ) -> DenseIndex:
        """Index a stream of `(ids, emb [B, D])` batches without holding the corpus in memory.

        IVF-PQ (and "auto", which must know whether the corpus passes AUTO_FLAT_MAX) buffers the first
        `cfg.train_sample` vectors to train on, unless `train_emb` is given. The buffer is the start of
        the stream, so pass `train_emb` (a random sample) when the corpus order is strongly topical.
        `total` (the corpus size, if known) sets the automatic nlist; otherwise the buffer size is used.
        """
        it = iter(batches)
        kind = cfg.kind
        if kind not in KINDS:
            raise ConfigError(f"index.kind={cfg.kind!r} is not one of: {', '.join(KINDS)}")
        if kind == "auto" and total is not None:
            kind = resolve_kind(cfg, total)

        if kind in ("ivfpq", "auto"):
            _check_train_sample(cfg)
        buffered: list[tuple[list[str], np.ndarray]] = []
        dim: int | None = None
        if kind in ("ivfpq", "auto") and train_emb is None:
            want = cfg.train_sample if kind == "ivfpq" else max(cfg.train_sample, AUTO_FLAT_MAX)
            have = 0
            for b_ids, b_emb in it:
                b_emb, b_ids = _check_batch(b_emb, b_ids, dim)
                dim = b_emb.shape[1]
                buffered.append((b_ids, b_emb))
                have += len(b_ids)
                if have >= want:
                    break
            if have == 0:
                raise DataError("cannot build an index from 0 embeddings (is the corpus empty?)")
            if kind == "auto":
                kind = "ivfpq" if have >= AUTO_FLAT_MAX else "flat"
            if kind == "ivfpq":
                train_emb = np.concatenate([e for _, e in buffered])[: cfg.train_sample]
        if train_emb is not None and kind == "ivfpq":
            train_emb = _as_matrix(train_emb, "training embeddings", dim)
            dim = train_emb.shape[1]
        if kind == "auto":  # train_emb given, size unknown: assume the big case
            kind = "ivfpq"

        idx: DenseIndex | None = None

        def add(b_ids: list[str], b_emb: np.ndarray) -> None:
            nonlocal idx
            if idx is None:
                n_est = total or max(len(b_ids), 0 if train_emb is None else len(train_emb))
                train = train_emb if kind == "ivfpq" else None
                idx = cls._empty(kind, b_emb.shape[1], cfg, n_est, train, model_fingerprint, metric)
            idx.add(b_ids, b_emb)

        for b_ids, b_emb in buffered:
            add(b_ids, b_emb)
        buffered.clear()
        for b_ids, b_emb in it:
            b_emb, b_ids = _check_batch(b_emb, b_ids, dim)
            dim = b_emb.shape[1]
            if len(b_ids):
                add(b_ids, b_emb)
        if idx is None or len(idx) == 0:
            raise DataError("cannot build an index from 0 embeddings (is the corpus empty?)")
        idx.finalize()
        return idx

    def add(self, ids: Sequence[str], emb: np.ndarray) -> None:
        """Append rows: `emb` [B, D] for passages `ids` (new ids only). Fills the last shard up to
        `cfg.shard_size`, then starts a new one."""
        faiss = _faiss()
        emb, ids = _check_batch(emb, ids, self.dim)
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
        if _want_gpu(self.cfg) and self._gpu is None:
            copies = [_to_gpu(s, self.kind) for s in self._shards]
            if all(c is not None for c in copies):
                self._gpu = copies
                for c in copies:
                    self._apply_search_params(c, gpu=True)

    # ------------------------------------------------------------------ search

    def _apply_search_params(self, index: Any, gpu: bool = False) -> None:
        faiss = _faiss()
        ps = (
            faiss.GpuParameterSpace()
            if gpu and hasattr(faiss, "GpuParameterSpace")
            else faiss.ParameterSpace()
        )
        try:
            if self.kind == "ivfpq":
                ps.set_index_parameter(index, "nprobe", int(self.cfg.nprobe))
                if self.cfg.refine != "none":
                    ps.set_index_parameter(index, "k_factor_rf", float(self.cfg.refine_k_factor))
            elif self.kind == "hnsw":
                ps.set_index_parameter(index, "efSearch", int(self.cfg.ef_search))
        except RuntimeError as e:
            if not gpu:
                raise
            log.warning("could not set search parameters on the GPU index (%s)", str(e).splitlines()[0])

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
        for s in self._gpu or []:
            self._apply_search_params(s, gpu=True)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-k rows for each query.

        queries: [Q, D] float32. Returns (scores [Q, k] float32, rows [Q, k] int64), best first; where
        the index has fewer than k vectors the tail is row -1 with score -inf ("ip") / +inf ("l2").
        """
        q = _as_matrix(queries, "queries", self.dim)
        if not isinstance(k, (int, np.integer)) or isinstance(k, bool) or k < 1:
            raise DataError(f"k must be a positive integer, got {k!r}")
        k = int(k)
        shards = self._gpu or self._shards
        worst = np.float32(-np.inf if self.metric == "ip" else np.inf)
        if len(q) == 0 or not shards:
            return np.full((len(q), k), worst, np.float32), np.full((len(q), k), -1, np.int64)
        all_s, all_r = [], []
        for off, shard in zip(self._offsets, shards):
            if shard.ntotal == 0:
                continue
            kk = min(k, shard.ntotal)  # faiss pads with -1; asking for fewer keeps HNSW/IVF from over-working
            s, r = shard.search(q, kk)
            s = s.astype(np.float32, copy=False)
            r = r.astype(np.int64, copy=False)
            missing = r < 0
            r = np.where(missing, -1, r + off)
            s = np.where(missing, worst, s)
            all_s.append(s)
            all_r.append(r)
        scores = np.concatenate(all_s, axis=1)
        rows = np.concatenate(all_r, axis=1)
        if len(all_s) > 1 or scores.shape[1] != k:
            # stable sort keeps the shard order for equal scores, like a single index would
            key = -scores if self.metric == "ip" else scores
            order = np.argsort(key, axis=1, kind="stable")[:, :k]
            scores = np.take_along_axis(scores, order, axis=1)
            rows = np.take_along_axis(rows, order, axis=1)
            if scores.shape[1] < k:
                pad = k - scores.shape[1]
                scores = np.pad(scores, ((0, 0), (0, pad)), constant_values=worst)
                rows = np.pad(rows, ((0, 0), (0, pad)), constant_values=-1)
        return np.ascontiguousarray(scores, np.float32), np.ascontiguousarray(rows, np.int64)

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
            "faiss_version": getattr(_faiss(), "__version__", "unknown"),
        }

    # ------------------------------------------------------------------ persistence

    def save(self, path: str | Path) -> Path:
        """Write `path/` = meta.json + ids.json + shard_XXXXX.faiss (CPU indexes), replacing it atomically."""
        faiss = _faiss()
        path = Path(path)
        meta = self.meta
        meta["files"] = [f"shard_{i:05d}.faiss" for i in range(len(self._shards))]
        with atomic_dir(path) as tmp:
            # the CPU copies are the source of truth (GPU copies are made from them), so no gpu_to_cpu here
            for name, shard in zip(meta["files"], self._shards):
                faiss.write_index(shard, str(tmp / name))
            write_json(tmp / "ids.json", self.ids)
            write_json(tmp / "meta.json", meta)  # last: a directory with meta.json is complete
        return path

    @classmethod
    def load(
        cls,
        path: str | Path,
        expect_dim: int | None = None,
        expect_fingerprint: str | None = None,
        cfg: IndexConfig | None = None,
    ) -> DenseIndex:
        """Read an index written by `save`.

        `expect_dim` / `expect_fingerprint` are the query encoder's dimension and `models.fingerprint`;
        a mismatch is a ConfigError. `cfg` overrides the saved search parameters (nprobe, ef_search,
        refine_k_factor, use_gpu); shard_size and the index structure come from the saved index.
        """
        faiss = _faiss()
        path = Path(path)
        hint = "rebuild it with jobs/index.py"
        if not path.is_dir():
            raise DataError(f"no index at {path} (expected a directory with meta.json): {hint}")
        if not (path / "meta.json").exists():
            raise DataError(f"{path} is not a complete index (meta.json missing): {hint}")
        try:
            meta = read_json(path / "meta.json")
            kind, dim, files = meta["kind"], int(meta["dim"]), list(meta["files"])
            metric = meta.get("metric", "ip")
            params = meta.get("params", {})
        except (ValueError, KeyError, TypeError) as e:
            raise DataError(f"{path}/meta.json is corrupt ({e}): {hint}") from None
        if meta.get("format_version", 0) > FORMAT_VERSION:
            raise DataError(f"{path} was written by a newer rocketqa_ray (format {meta['format_version']})")
        if expect_dim is not None and int(expect_dim) != dim:
            raise ConfigError(
                f"index at {path} has dimension {dim} but the query encoder produces {expect_dim}-d vectors: "
                f"the index was built with another model; {hint}"
            )
        fp = meta.get("model_fingerprint")
        if expect_fingerprint is not None and fp is not None and fp != expect_fingerprint:
            raise ConfigError(
                f"index at {path} was built with another model (fingerprint {fp}), the query encoder is "
                f"{expect_fingerprint}: rebuild the index with jobs/index.py"
            )
        if expect_fingerprint is not None and fp is None:
            log.warning("index at %s records no model fingerprint; cannot check it matches the encoder", path)

        base = IndexConfig()
        for key in ("nprobe", "ef_search", "ef_construction", "refine", "refine_k_factor", "shard_size"):
            if key in params:
                setattr(base, key, params[key])
        base.kind = kind
        if cfg is not None:
            base.nprobe, base.ef_search = cfg.nprobe, cfg.ef_search
            base.refine_k_factor, base.use_gpu = cfg.refine_k_factor, cfg.use_gpu
        try:
            ids = read_json(path / "ids.json")
        except (OSError, ValueError) as e:
            raise DataError(f"{path}/ids.json is missing or corrupt ({e}): {hint}") from None
        if not isinstance(ids, list):
            raise DataError(f"{path}/ids.json is corrupt (not a list): {hint}")

        shards = []
        for name in files:
            f = path / name
            if not f.exists():
                raise DataError(f"{f} is missing: the index is incomplete; {hint}")
            try:
                shards.append(faiss.read_index(str(f)))
            except RuntimeError as e:
                raise DataError(
                    f"{f} is not a readable faiss index ({str(e).splitlines()[0][:200]}): {hint}"
                ) from None
        if not shards:
            raise DataError(f"{path} has no index files: {hint}")
        if any(s.d != dim for s in shards):
            raise DataError(f"{path}: shard dimension does not match meta.json ({dim}): {hint}")
        if sum(s.ntotal for s in shards) != len(ids):
            raise DataError(
                f"{path}: {sum(s.ntotal for s in shards)} vectors but {len(ids)} ids; the index is corrupt: {hint}"
            )
        template = faiss.clone_index(shards[0])
        template.reset()  # keeps the IVF/PQ training, drops the vectors
        idx = cls(kind, dim, base, template, meta.get("factory", ""), fp, metric)
        idx.ids = ids
        offsets, off = [], 0
        for s in shards:
            offsets.append(off)
            off += s.ntotal
            idx._apply_search_params(s)
        idx._shards, idx._offsets = shards, offsets
        idx.finalize()
        return idx
