"""Shared fixtures: one private local Ray cluster for the whole session, a tiny random BERT."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "120")

DATA_MINI = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data", "squad-mini")


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
