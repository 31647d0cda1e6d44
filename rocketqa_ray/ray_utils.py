"""Connecting to Ray: the job's cluster when there is one, else a private local cluster."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from rocketqa_ray.config import RayConfig

log = logging.getLogger(__name__)

# Passed to every Ray worker so they load models offline and do not fight over the 2 cores.
WORKER_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "RAY_USAGE_STATS_ENABLED": "0",
}


def ensure_ray(cfg: RayConfig | None = None) -> None:
    """Initialise Ray once.

    Under `ray job submit` (RAY_ADDRESS set) or with `ray.address` configured this joins that cluster.
    Otherwise it starts a *new* local cluster (address="local"), never attaching by accident to another
    `ray start` head on the same machine.
    """
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    cfg = cfg or RayConfig()
    address = cfg.address or os.environ.get("RAY_ADDRESS")
    kwargs: dict = {"runtime_env": {"env_vars": dict(WORKER_ENV)}, "log_to_driver": True}
    if address:
        ray.init(address=address, **kwargs)
    else:
        # Workers must import this package even when it is not pip-installed and the job was started
        # from another directory (under `ray job submit` the working_dir takes care of that).
        root = str(Path(__file__).resolve().parent.parent)
        env = kwargs["runtime_env"]["env_vars"]
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH", "")) if p)
        # Logical CPUs above the physical count keep Ray Data actor pools and Train workers from waiting
        # on each other on small machines (they are mostly blocked in torch, which has its own threads).
        ray.init(address="local", num_cpus=cfg.local_num_cpus, include_dashboard=False, **kwargs)
    log.info("ray: %s", ray.cluster_resources())


def torch_threads_for(cpus: float) -> int:
    """Threads for torch inside an actor that was given `cpus` logical CPUs (at least 1)."""
    return max(1, int(round(cpus)))
