"""The pipeline's own Ray processes do not outlive it when it is stopped with SIGTERM (`kill`)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_sigterm_stops_the_runs_ray_cluster(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.Popen([sys.executable, str(ROOT / "jobs" / "pipeline.py"), "--preset", "tiny", "--stages", "md0",
                             "--out", str(tmp_path / "run")], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    driver = psutil.Process(proc.pid)
    deadline = time.time() + 300
    ray_procs: list[psutil.Process] = []
    try:
        while time.time() < deadline and proc.poll() is None:  # wait until the local cluster (raylet) is up
            ray_procs = [p for p in driver.children(recursive=True) if "raylet" in " ".join(p.cmdline())]
            if ray_procs:
                time.sleep(3)  # let it start its agents too
                ray_procs = driver.children(recursive=True)
                break
            time.sleep(0.5)
        assert ray_procs, "the pipeline never started a local Ray cluster"
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    # Ray's driver turns SIGTERM into sys.exit(15) once it is up, ours into an interrupt before: either way the
    # driver unwinds and shuts down the cluster it started.
    assert proc.returncode not in (0, -signal.SIGTERM), (proc.returncode, err[-2000:])
    assert "Traceback" not in err, err[-2000:]
    gone, alive = psutil.wait_procs(ray_procs, timeout=60)
    left = [f"{p.pid} {' '.join(p.cmdline())[:80]}" for p in alive if p.is_running()]
    for p in alive:  # stop only what this test started
        p.kill()
    assert not left, f"Ray processes outlived the pipeline: {left}"
