"""An index built shard by shard, by processes that never see the whole corpus.

The driver makes an `IndexPlan` once: the index kind ("auto" decided here, from the corpus size), the shard
ranges, and an empty faiss index trained on a bounded random sample (`index.train_sample` vectors; flat and
HNSW need none). Each shard is then filled by `fill_shard` from the encoding job's Parquet parts that cover its
rows, and written on its own (`index.store.write_shard`). Ray-free: `batch.index_build` runs `fill_shard` in Ray
tasks; tests run it in-process and compare with `DenseIndex.build`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from rocketqa_ray.config import IndexConfig
from rocketqa_ray.errors import ConfigError, DataError
from rocketqa_ray.index.dense import FORMAT_VERSION, check_batch
from rocketqa_ray.index.factory import check_train_sample, load_faiss, new_index, resolve_kind


@dataclass
class IndexPlan:
    """What every shard builder shares. `template` is the trained, empty faiss index, serialised (bytes)."""

    kind: str
    dim: int
    metric: str
    n_total: int
    factory: str
    model_fingerprint: str | None
    ranges: list[tuple[int, int]]  # shard j holds corpus rows [start, stop)
    rows_per_part: int  # the encoding job's rows per Parquet part (part i holds rows [i*R, (i+1)*R))
    template: np.ndarray = field(repr=False)
    cfg: IndexConfig = field(default_factory=IndexConfig)

    def meta(self) -> dict:
        """The index's meta.json without the shard list (`index.store.write_meta` adds it)."""
        c = self.cfg
        return {"format_version": FORMAT_VERSION, "kind": self.kind, "dim": self.dim, "metric": self.metric,
                "factory": self.factory, "model_fingerprint": self.model_fingerprint,
                "params": {"nprobe": c.nprobe, "ef_search": c.ef_search, "ef_construction": c.ef_construction,
                           "refine": c.refine, "refine_k_factor": c.refine_k_factor, "shard_size": c.shard_size},
                "faiss_version": getattr(load_faiss(), "__version__", "unknown")}


def shard_ranges(n: int, shard_size: int | None) -> list[tuple[int, int]]:
    """Consecutive row ranges of at most `shard_size` rows (one range when None)."""
    if shard_size is not None and shard_size < 1:
        raise ConfigError(f"index.shard_size must be at least 1 (or null for one shard), got {shard_size}")
    size = n if shard_size is None else int(shard_size)
    return [(s, min(s + size, n)) for s in range(0, n, max(size, 1))]


def plan_index(emb_dir: str | Path, cfg: IndexConfig, metric: str = "ip", seed: int = 0) -> IndexPlan:
    """Decide the index for an encoding job's output and train its empty template (on at most
    `cfg.train_sample` vectors, a uniform random sample read in one pass over the parts)."""
    from rocketqa_ray.batch.encode import embeddings_info
    from rocketqa_ray.batch.shards import JOB_FILE
    from rocketqa_ray.index.build import EMPTY, sample_rows
    from rocketqa_ray.io import read_json

    info = embeddings_info(emb_dir)
    n, dim = int(info["n_rows"]), int(info["dim"])
    if n == 0:
        raise DataError(EMPTY)
    kind = resolve_kind(cfg, n)
    train = None
    if kind == "ivfpq":
        check_train_sample(cfg)
        train = sample_rows(emb_dir, n, min(n, cfg.train_sample), seed)
    template, factory = new_index(kind, dim, cfg, n, train, metric)
    rows_per_part = int(read_json(Path(emb_dir) / JOB_FILE)["rows_per_shard"])
    return IndexPlan(kind, dim, metric, n, factory, info.get("model_fingerprint"), shard_ranges(n, cfg.shard_size),
                     rows_per_part, load_faiss().serialize_index(template), cfg)


def fill_shard(emb_dir: str | Path, plan: IndexPlan, j: int) -> tuple[Any, list[str]]:
    """(shard j's faiss index, its ids): a copy of the plan's template filled with the rows of the shard's range,
    read only from the encoding parts that hold them."""
    from rocketqa_ray.batch.shards import matrix, part_name

    faiss = load_faiss()
    start, stop = plan.ranges[j]
    index = faiss.deserialize_index(plan.template)
    ids: list[str] = []
    r = plan.rows_per_part
    for part in range(start // r, math.ceil(stop / r)):
        path = Path(emb_dir) / part_name(part)
        try:
            table = pq.read_table(path, columns=["row", "id", "emb"])
        except (OSError, ValueError) as e:
            raise DataError(f"{path} is missing or unreadable ({str(e).splitlines()[0][:120]}); rerun the encoding, "
                            "which recomputes it") from None
        rows = table.column("row").to_numpy()
        keep = np.flatnonzero((rows >= start) & (rows < stop))
        if not len(keep):
            continue
        emb, part_ids = check_batch(matrix(table, "emb")[keep], table.column("id").take(keep).to_pylist(), plan.dim)
        index.add(emb)
        ids.extend(part_ids)
    if len(ids) != stop - start:
        raise DataError(f"{emb_dir}: shard {j} should hold rows {start}..{stop - 1} but the parts gave {len(ids)}; "
                        "rerun the encoding")
    return index, ids
