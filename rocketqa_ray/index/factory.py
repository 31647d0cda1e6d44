"""Which FAISS index to build, decided once: kind ("auto" resolved here), IVF lists, PQ size, factory string,
search parameters, and whether to search on GPU. Ray-free; placing an index on GPU is `index.gpu`.
"""

from __future__ import annotations

import logging
import math
import typing
from typing import Any

import numpy as np

from rocketqa_ray.config import AutoBool, IndexConfig, IndexKind, IndexRefine
from rocketqa_ray.errors import ConfigError, DataError, RocketQAError

log = logging.getLogger(__name__)

# The config's Literal types are the one list of valid values; IndexConfig objects built in code (tests, benches)
# are not validated on construction, so the factory checks them again.
KINDS = typing.get_args(IndexKind)
REFINES = typing.get_args(IndexRefine)
USE_GPU = typing.get_args(AutoBool)
METRICS = ("ip", "l2")
# "auto" picks an exact index below this many vectors: flat search on 200k x 384 is ~10 ms per query on
# one core, and exact results are worth more than speed at that size.
AUTO_FLAT_MAX = 200_000
# faiss k-means wants at least this many training points per centroid (fewer gives poor centroids).
MIN_POINTS_PER_CENTROID = 39


def load_faiss() -> Any:
    """The faiss module (faiss-cpu or faiss-gpu, whichever is installed)."""
    try:
        import faiss
    except ImportError as e:  # pragma: no cover - faiss is a hard dependency
        raise RocketQAError(
            "faiss is not installed: pip install faiss-cpu (or faiss-gpu on CUDA machines)"
        ) from e
    return faiss


def resolve_kind(cfg: IndexConfig, n: int | None, have_sample: bool = False) -> str:
    """The concrete index kind for `n` vectors: "auto" is flat below AUTO_FLAT_MAX, IVF-PQ above.

    With `n` unknown (None), "auto" stays "auto" (the caller counts the stream, then asks again), unless a
    training sample is given, which only the big case needs: then IVF-PQ.
    """
    if cfg.kind not in KINDS:
        raise ConfigError(f"index.kind={cfg.kind!r} is not one of: {', '.join(KINDS)}")
    if cfg.kind != "auto":
        return cfg.kind
    if n is None:
        return "ivfpq" if have_sample else "auto"
    return "flat" if n < AUTO_FLAT_MAX else "ivfpq"


def check_train_sample(cfg: IndexConfig) -> None:
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


def new_index(kind: str, dim: int, cfg: IndexConfig, n_total: int, train: np.ndarray | None,
              metric: str) -> tuple[Any, str]:
    """(an empty, trained faiss index of `kind`, its factory string); IVF-PQ is trained on `train`."""
    faiss = load_faiss()
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
    return template, factory


def apply_search_params(index: Any, kind: str, cfg: IndexConfig) -> None:
    """Set `cfg`'s speed/recall knobs (IVF nprobe and refine factor, HNSW efSearch) on a CPU faiss index
    (`index.gpu.PlacedIndex.set_search_params` for one on GPU)."""
    ps = load_faiss().ParameterSpace()
    if kind == "ivfpq":
        ps.set_index_parameter(index, "nprobe", int(cfg.nprobe))
        if cfg.refine != "none":
            ps.set_index_parameter(index, "k_factor_rf", float(cfg.refine_k_factor))
    elif kind == "hnsw":
        ps.set_index_parameter(index, "efSearch", int(cfg.ef_search))


# ----------------------------------------------------------------------------------------------------
# GPU: whether to use one (placing an index there is `index.gpu`)


def gpu_count() -> int:
    """GPUs faiss can use in this process (0 with faiss-cpu or without a visible CUDA device)."""
    faiss = load_faiss()
    if not hasattr(faiss, "get_num_gpus"):
        return 0
    try:
        return int(faiss.get_num_gpus())
    except Exception:  # noqa: BLE001 - a broken CUDA install should mean "no GPU", not a crash
        return 0


def want_gpu(cfg: IndexConfig) -> bool:
    """Whether to search on GPU: `index.use_gpu` true (a GPU is then required), auto (when one is visible), false."""
    if cfg.use_gpu not in USE_GPU:
        raise ConfigError(f"index.use_gpu={cfg.use_gpu!r} is not one of: {', '.join(USE_GPU)}")
    if cfg.use_gpu == "false":
        return False
    n = gpu_count()
    if cfg.use_gpu == "true" and n == 0:
        raise ConfigError(
            "index.use_gpu=true but faiss sees no GPU (faiss-cpu installed, or no CUDA device): "
            "install faiss-gpu on a GPU machine or set index.use_gpu=auto"
        )
    return n > 0


def to_gpu(index: Any, kind: str, cfg: IndexConfig | None = None) -> Any:
    """`index.gpu.to_gpu` (a PlacedIndex, or None on CPU), under the name scripts already call."""
    from rocketqa_ray.index import gpu  # imported here: index.gpu builds on this module

    return gpu.to_gpu(index, kind, cfg)
