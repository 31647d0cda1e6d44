"""Placing a built faiss index on this process's GPUs, within what faiss-GPU can do. Ray-free.

The decisions are pure functions (`plan_gpu`, `gpu_nprobe`, `gpu_k_factor`), so they are tested without a GPU;
`to_gpu` carries a plan out. What faiss-GPU imposes, and the answer to each:

- A refine index (IVF-PQ whose candidates are re-scored with kept vectors: `,RFlat` / `,Refine(SQ8)`) does not
  clone to one GPU, and on several GPUs the generic cloner moves the re-rank store too, where IndexRefine cannot
  read it. Only the IVF-PQ base goes to the GPU(s); the store stays on CPU, re-wrapped as IndexRefine(GPU base,
  CPU store) (`split_refine`, `rewrap`). The PQ scan is the costly part; the re-rank reads k * k_factor rows.
- faiss-GPU selects at most GPU_MAX_K per query, both k (for a refine: k * k_factor from the base) and nprobe.
- `useFloat16` means fp16 lookup tables for IVF-PQ but fp16 *storage* for a flat index, whose "exact" search
  would then differ from CPU: fp16 only for IVF-PQ.
- Each StandardGpuResources reserves its own scratch memory: one per device per process, shared by every index.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from dataclasses import dataclass
from typing import Any

import numpy as np

from rocketqa_ray.config import IndexConfig
from rocketqa_ray.errors import ConfigError
from rocketqa_ray.index.factory import gpu_count, load_faiss

log = logging.getLogger(__name__)

# faiss/gpu/utils/DeviceDefs.cuh GPU_MAX_SELECTION_K (CUDA > 9 and ROCm): the largest k or nprobe a GPU index
# selects; above it faiss aborts the search.
GPU_MAX_K = 2048

_resources: dict[int, Any] = {}
_resources_lock = threading.Lock()
_logged: set[tuple] = set()  # the caps already reported, so a capped search logs once, not once per batch


def _log_once(level: int, key: tuple, msg: str, *args: object) -> None:
    if key not in _logged:
        _logged.add(key)
        log.log(level, msg, *args)


def has_gpu_support() -> bool:
    """Whether the installed faiss was built with GPU support (faiss-gpu), whatever devices are visible."""
    return hasattr(load_faiss(), "StandardGpuResources")


def for_actor_gpus(cfg: IndexConfig, gpus: float, knob: str) -> IndexConfig:
    """`cfg` for a Ray actor that reserved `gpus` GPUs (the setting `knob`): on GPU only when it reserved some.

    Ray leaves every GPU of the node visible to an actor that reserved none, so index.use_gpu=auto there would
    put its shards on GPUs that Ray gives to other work (and on all of them at once).
    """
    if gpus > 0:
        return cfg
    if cfg.use_gpu == "true":
        raise ConfigError(f"index.use_gpu=true needs GPUs reserved for the processes that search: set {knob} (e.g. 1, "
                          "or 0.5 to share a GPU between two), or index.use_gpu=auto to search on CPU")
    return dataclasses.replace(cfg, use_gpu="false")


# ----------------------------------------------------------------------------------------------------
# Decisions (pure)


@dataclass(frozen=True)
class GpuPlan:
    """Where an index is searched. `place`: "cpu" (all of it stays), "whole" (all of it goes to the GPUs) or "base"
    (a refine index's IVF-PQ base goes, its re-rank store stays on CPU). `fp16`: the cloner's useFloat16 (IVF-PQ
    lookup tables only). `shard`: on several GPUs, split the vectors over them (each holds 1/n) rather than copy
    them to each. `nprobe`: within GPU_MAX_K. `reason`: why it stays on CPU."""

    place: str
    n_gpus: int = 0
    fp16: bool = False
    shard: bool = False
    nprobe: int | None = None
    reason: str = ""

    @property
    def on_gpu(self) -> bool:
        return self.place != "cpu"


def gpu_nprobe(nprobe: int) -> int:
    """`index.nprobe` within faiss-GPU's limit (logged once when lowered)."""
    nprobe = int(nprobe)
    if nprobe > GPU_MAX_K:
        _log_once(logging.WARNING, ("nprobe", nprobe),
                  "index.nprobe=%d is above faiss-GPU's limit; searching %d lists on GPU", nprobe, GPU_MAX_K)
        return GPU_MAX_K
    return nprobe


def plan_gpu(kind: str, refined: bool, n_gpus: int, nprobe: int) -> GpuPlan:
    """How an index of `kind` (with a re-rank store when `refined`) is placed on `n_gpus` GPUs."""
    if n_gpus < 1:
        return GpuPlan("cpu", reason="no GPU visible to faiss")
    if kind == "hnsw":
        return GpuPlan("cpu", reason="faiss has no GPU HNSW")
    shard = n_gpus > 1  # memory is what limits a GPU index; several GPUs hold more by splitting it
    if kind == "flat":
        # fp32: the GPU flat index stays exact, equal to the CPU one
        return GpuPlan("whole", n_gpus, fp16=False, shard=shard)
    if kind == "ivfpq":
        # fp16 lookup tables: faiss-GPU needs them for longer PQ codes (shared memory); approximate scores are
        # what IVF-PQ gives anyway, and a refine re-scores its candidates exactly on CPU
        return GpuPlan("base" if refined else "whole", n_gpus, fp16=True, shard=shard, nprobe=gpu_nprobe(nprobe))
    raise ConfigError(f"unknown index kind {kind!r}")


def check_gpu_k(k: int) -> None:
    """A ConfigError when faiss-GPU cannot return the top `k` for a query."""
    if int(k) > GPU_MAX_K:
        raise ConfigError(
            f"asked for the top {k} per query, but faiss-GPU returns at most {GPU_MAX_K}: lower the depth "
            "searched (eval.depth, mining.top_k, or a request's top_k; excluded ids add to it) or search on CPU "
            "with index.use_gpu=false"
        )


def gpu_k_factor(k: int, k_factor: float) -> float:
    """The refine factor for a search of the top `k` with a GPU base: `k_factor`, lowered so the base's
    k * k_factor candidates stay within GPU_MAX_K (logged once)."""
    check_gpu_k(k)
    # IndexRefine asks its base for idx_t(k * k_factor), computed in float32
    if int(np.float32(k) * np.float32(k_factor)) <= GPU_MAX_K:
        return float(k_factor)
    capped = float(max(1, GPU_MAX_K // int(k)))
    _log_once(logging.WARNING, ("k_factor", int(k), float(k_factor)),
              "index.refine_k_factor=%g with the top %d is %d GPU candidates, above faiss-GPU's %d: re-ranking "
              "%g * k instead (a smaller depth keeps the full factor)", k_factor, k, int(k * k_factor), GPU_MAX_K,
              capped)
    return capped


# ----------------------------------------------------------------------------------------------------
# Refine indexes: the base and the re-rank store apart, and together again


def is_refine(index: Any) -> bool:
    return isinstance(load_faiss().downcast_index(index), load_faiss().IndexRefine)


def split_refine(index: Any) -> tuple[Any, Any]:
    """(the base index, the re-rank store) of a refine index, each holding `index` alive.

    `index` owns both (faiss deletes them with it), and the objects returned are views of them: they keep a
    reference to `index` itself, the Python object that owns them (another view of it would not keep it alive).
    """
    faiss = load_faiss()
    refine = faiss.downcast_index(index)
    if not isinstance(refine, faiss.IndexRefine):
        raise TypeError(f"not a refine index: {type(refine).__name__}")
    base = faiss.downcast_index(refine.base_index)
    store = faiss.downcast_index(refine.refine_index)
    base.referenced_objects = [index]
    store.referenced_objects = [index]
    return base, store


def rewrap(base: Any, store: Any, k_factor: float) -> Any:
    """IndexRefine(base, store): search `base` for k * k_factor candidates, re-score them with `store`.

    A plain IndexRefine even for an IndexRefineFlat: that subclass keeps its store itself, so it cannot take one
    (the scores are the same). The wrapper owns neither part; faiss's Python constructor keeps both alive.
    """
    wrapped = load_faiss().IndexRefine(base, store)
    wrapped.k_factor = float(k_factor)
    return wrapped


# ----------------------------------------------------------------------------------------------------
# On the GPU


class PlacedIndex:
    """An index placed on GPU(s) by `to_gpu`, searched like a faiss index, within faiss-GPU's k limit.

    `index` is what a search runs on (the GPU index, or IndexRefine(GPU base, CPU store)); `gpu_part` is the part on
    the GPU(s), where nprobe is set. Holds the CPU index it came from when the store is part of it.
    """

    def __init__(self, index: Any, gpu_part: Any, plan: GpuPlan, kind: str):
        self.index, self.gpu_part, self.plan, self.kind = index, gpu_part, plan, kind
        self.refined = plan.place == "base"

    @property
    def ntotal(self) -> int:
        return int(self.index.ntotal)

    def set_search_params(self, cfg: IndexConfig) -> None:
        """`cfg`'s nprobe (capped) on the GPU part and refine factor on the wrapper."""
        faiss = load_faiss()
        if self.kind != "ivfpq":
            return
        try:
            # GpuParameterSpace reaches GpuIndexIVF, and through IndexShards/IndexReplicas every GPU's part
            faiss.GpuParameterSpace().set_index_parameter(self.gpu_part, "nprobe", gpu_nprobe(cfg.nprobe))
        except RuntimeError as e:
            log.warning("could not set nprobe on the GPU index (%s)", str(e).splitlines()[0])
        if self.refined:
            # as on CPU (factory.apply_search_params): the same ParameterSpace rounding of the factor
            faiss.ParameterSpace().set_index_parameter(self.index, "k_factor_rf", float(cfg.refine_k_factor))

    def search(self, x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        if self.refined:
            params = load_faiss().IndexRefineSearchParameters(k_factor=gpu_k_factor(k, self.index.k_factor))
            return self.index.search(x, k, params=params)
        check_gpu_k(k)
        return self.index.search(x, k)


def gpu_resources(device: int) -> Any:
    """This process's StandardGpuResources for `device`, made on first use and shared by every index after."""
    if not has_gpu_support():
        raise ConfigError("faiss has no GPU support (faiss-cpu is installed): install faiss-gpu, or set "
                          "index.use_gpu=false")
    with _resources_lock:
        res = _resources.get(device)
        if res is None:
            res = _resources[device] = load_faiss().StandardGpuResources()
        return res


def clone_to_gpus(index: Any, plan: GpuPlan) -> Any:
    """A GPU copy of `index` on devices 0..plan.n_gpus-1 (the devices this process sees), as `plan` says."""
    faiss = load_faiss()
    if plan.n_gpus == 1:
        co = faiss.GpuClonerOptions()
        co.useFloat16 = plan.fp16
        return faiss.index_cpu_to_gpu(gpu_resources(0), 0, index, co)
    co = faiss.GpuMultipleClonerOptions()
    co.useFloat16 = plan.fp16
    co.shard = plan.shard
    devices = list(range(plan.n_gpus))
    return faiss.index_cpu_to_gpu_multiple_py([gpu_resources(d) for d in devices], index, co, devices)


def to_gpu(index: Any, kind: str, cfg: IndexConfig | None = None) -> PlacedIndex | None:
    """`index` (a CPU faiss index, left as it is) placed on this process's GPUs with `cfg`'s search knobs, or None
    when it stays on CPU (HNSW, no GPU, or a shape faiss-GPU does not take under index.use_gpu=auto)."""
    cfg = cfg or IndexConfig()
    plan = plan_gpu(kind, is_refine(index), gpu_count(), cfg.nprobe)
    if not plan.on_gpu:
        _log_once(logging.INFO, ("cpu", kind, plan.reason), "%s index searched on CPU: %s", kind, plan.reason)
        return None
    if plan.place == "base":
        base, store = split_refine(index)
        k_factor = load_faiss().downcast_index(index).k_factor
    else:
        base, store, k_factor = index, None, 1.0
    try:
        gpu_part = clone_to_gpus(base, plan)
    except RuntimeError as e:  # e.g. PQ codes under 8 bits (a small training sample), which GPU IVF-PQ lacks
        why = str(e).strip().splitlines()[-1][:200]
        if cfg.use_gpu == "true":
            raise ConfigError(f"faiss cannot put this {kind} index on the GPU ({why}): set index.use_gpu=auto to "
                              "search it on CPU, or rebuild it with settings faiss-GPU supports") from None
        log.warning("could not move the %s index to GPU (%s); searching on CPU", kind, why)
        return None
    placed = PlacedIndex(rewrap(gpu_part, store, k_factor) if store is not None else gpu_part, gpu_part, plan, kind)
    placed.set_search_params(cfg)
    return placed
