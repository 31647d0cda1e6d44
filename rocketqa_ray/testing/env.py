"""The environment for running the project's commands in a subprocess from a test, as a user would."""

from __future__ import annotations

import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def subprocess_env() -> dict[str, str]:
    """This process's environment, offline, quiet, unbuffered, and with its own private Ray cluster (no
    RAY_ADDRESS): what the end-to-end tests run `jobs/*.py` with."""
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", RAY_USAGE_STATS_ENABLED="0", TOKENIZERS_PARALLELISM="false",
               RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S="120", PYTHONUNBUFFERED="1")
    env.pop("RAY_ADDRESS", None)
    return env


def tiny_pipeline_cmd(out: str | Path, *extra: str) -> list[str]:
    """The command a user runs for the tiny pipeline into RUN_DIR `out` (this checkout's `jobs/pipeline.py`, this
    interpreter), with `extra` arguments."""
    return [sys.executable, str(REPO / "jobs" / "pipeline.py"), "--preset", "tiny", "--out", str(out), *extra]
