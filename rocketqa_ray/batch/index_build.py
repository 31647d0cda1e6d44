"""Building a FAISS index with Ray: the driver plans (kind, shard ranges, training on a bounded sample), Ray tasks
fill and write one shard each, reading the embedding parts themselves. No process holds more than one shard's
vectors plus the training sample; `index.plan` is the Ray-free core.
"""

from __future__ import annotations

import logging
import resource
import time
from pathlib import Path

from rocketqa_ray.config import IndexConfig, RayConfig
from rocketqa_ray.console import Progress
from rocketqa_ray.index.plan import IndexPlan, fill_shard, plan_index
from rocketqa_ray.index.store import read_meta, write_meta, write_shard
from rocketqa_ray.io import atomic_dir

log = logging.getLogger(__name__)


def fill_and_write(emb_dir: str, plan: IndexPlan, j: int, folder: str) -> dict:
    """One Ray task: shard j from the embedding parts into `folder`; returns its size and the task's peak RSS."""
    t0 = time.perf_counter()
    index, ids = fill_shard(emb_dir, plan, j)
    n = write_shard(folder, j, index, ids)
    return {"shard": j, "ntotal": n, "seconds": time.perf_counter() - t0,
            "max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def build_index(emb_dir: str | Path, cfg: IndexConfig, out_dir: str | Path, ray_cfg: RayConfig | None = None,
                seed: int = 0) -> dict:
    """Index an encoding job's output into `out_dir` (replaced atomically); returns the index's meta.json.

    The plan's template travels once through the object store; each shard is a retried Ray task.
    """
    import ray

    from rocketqa_ray.ray_utils import as_completed, ensure_ray, spread_over_nodes

    ensure_ray(ray_cfg)
    t0 = time.perf_counter()
    plan = plan_index(emb_dir, cfg, seed=seed)
    # dealt over the nodes: the shards, their reads and their memory go to every node, not the first that has room
    fill = ray.remote(fill_and_write)
    out = Path(out_dir)
    sizes = [0] * len(plan.ranges)
    peak = 0.0
    with atomic_dir(out) as tmp:
        plan_ref = ray.put(plan)
        where = spread_over_nodes(len(plan.ranges), cfg.build_cpus)
        pending = [fill.options(num_cpus=cfg.build_cpus, max_retries=3, scheduling_strategy=where[j])
                   .remote(str(emb_dir), plan_ref, j, str(tmp)) for j in range(len(plan.ranges))]
        with Progress(f"index {out.parent.name}/{out.name}", plan.n_total, "vectors") as progress:
            for rec in as_completed(pending):
                sizes[rec["shard"]] = rec["ntotal"]
                peak = max(peak, rec["max_rss_mb"])
                progress.advance(rec["ntotal"])
        meta = {**plan.meta(), "build": {"seconds": round(time.perf_counter() - t0, 3), "tasks": len(sizes),
                                         "task_peak_rss_mb": round(peak, 1)}}
        write_meta(tmp, meta, sizes)
    log.info("index: %s over %d vectors in %d shard(s) -> %s", plan.kind, plan.n_total, len(sizes), out)
    return read_meta(out)
