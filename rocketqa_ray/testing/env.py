"""The environment for running the project's commands in a subprocess from a test, as a user would."""

from __future__ import annotations

import os


def subprocess_env() -> dict[str, str]:
    """This process's environment, offline, quiet, unbuffered, and with its own private Ray cluster (no
    RAY_ADDRESS): what the end-to-end tests run `jobs/*.py` with."""
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", RAY_USAGE_STATS_ENABLED="0", TOKENIZERS_PARALLELISM="false",
               RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S="120", PYTHONUNBUFFERED="1")
    env.pop("RAY_ADDRESS", None)
    return env
