"""Shared fixtures: one private local Ray cluster for the whole session, a tiny random BERT."""

from __future__ import annotations

import json
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "120")
# Serve's direct ingress holds every stopping ingress replica for 30 s so an external load balancer can deregister
# it; the tests' apps on 127.0.0.1 have none, and each app deleted or shut down waited those 30 s
os.environ.setdefault("RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S", "0")

ROOT = Path(__file__).resolve().parents[1]
FIRST_STAGES = ("bm25", "md0", "mc")
DATA_MINI = str(ROOT / "data" / "squad-mini")


@pytest.fixture(scope="session")
def ray_session():
    """A real local Ray cluster (4 logical CPUs on a 2-core box, so actor pools and Train workers fit)."""
    import ray

    from rocketqa_ray.config import RayConfig
    from rocketqa_ray.ray_utils import ensure_ray

    ensure_ray(RayConfig(local_num_cpus=4))
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_model_dir():
    """Path of the tiny random-weight BERT (built once, cached)."""
    from rocketqa_ray.modeling.base import resolve_base

    return resolve_base("tiny")


@pytest.fixture(scope="session")
def mini_data_dir():
    return DATA_MINI


@dataclass(frozen=True)
class FirstStages:
    """A finished `jobs/pipeline.py --stages bm25,md0,mc` run: its process, RUN_DIR, and what its logs held when it
    ended (read right away: later runs in the same RUN_DIR append to them)."""

    stages: tuple[str, ...]
    res: subprocess.CompletedProcess
    out: Path
    console_log: str
    debug_log: str
    progress: dict


@pytest.fixture(scope="session")
def first_stages(tmp_path_factory) -> FirstStages:
    """The tiny pipeline's first stages (BM25, M_D0 on Ray Train with Ray Data and FAISS, M_C with the pair flow),
    run as a user runs them, in a subprocess with its own Ray cluster. The console tests read its terminal and
    logs; test_pipeline_e2e goes on in the same RUN_DIR (the whole pipeline, interrupted in md1, then resumed),
    so the suite runs these stages once, not once per test."""
    from rocketqa_ray.testing.env import subprocess_env, tiny_pipeline_cmd

    out = tmp_path_factory.mktemp("pipeline") / "run"
    res = subprocess.run(tiny_pipeline_cmd(out, "--stages", ",".join(FIRST_STAGES)), cwd=ROOT, env=subprocess_env(),
                         capture_output=True, text=True, timeout=900)

    def text(path: Path) -> str:  # what a failed run left (the tests then show its stderr)
        return path.read_text() if path.exists() else ""

    progress = text(out / "md0" / "train_progress.json")
    return FirstStages(FIRST_STAGES, res, out, text(out / "logs" / "console.log"), text(out / "logs" / "debug.log"),
                       json.loads(progress) if progress else {})
