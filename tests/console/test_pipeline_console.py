"""The console of a pipeline run (tiny preset, its first stages: Ray Data, Ray Train, FAISS and the pair flow, for
real, in a subprocess as a user runs it; the session's `first_stages` run, which test_pipeline_e2e continues):
stage lines on the terminal, Ray's and the libraries' output in RUN_DIR/logs/, a bad input still one `error:`
line."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest

from rocketqa_ray.testing.env import subprocess_env, tiny_pipeline_cmd

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def _pipeline(out: Path, *extra: str, timeout: int = 900) -> subprocess.CompletedProcess:
    return subprocess.run(tiny_pipeline_cmd(out, *extra), cwd=ROOT, env=subprocess_env(), capture_output=True,
                          text=True, timeout=timeout)


def test_console_shows_stage_lines_and_little_else(first_stages):
    res, out, stages = first_stages.res, first_stages.out, first_stages.stages
    assert res.returncode == 0, res.stderr[-3000:]
    console = res.stderr.splitlines()
    for stage in stages:
        assert any(re.fullmatch(rf"\d\d:\d\d:\d\d stage {stage}: starting", ln) for ln in console), stage
        done = [ln for ln in console if f"stage {stage}: done in " in ln]
        assert len(done) == 1 and json.loads(done[0].split(" s ", 1)[1]) == json.loads(
            (out / stage / "_COMPLETE.json").read_text())["metrics"]
    # stage lines, the logs line, and at most a few progress lines (a part longer than 30 s on a busy machine)
    assert len(console) <= 2 * len(stages) + 1 + 10, res.stderr
    assert all(re.match(r"\d\d:\d\d:\d\d ", ln) for ln in console), res.stderr
    assert len(console) + len(res.stdout.splitlines()) < 100
    for noise in ("RayTrainWorker", "TrainController", "core_worker.cc", "TrainingReport", "PlacementGroupCleaner",
                  "faiss", "streaming_executor", "bm25s", "Token authentication", "Warning"):
        assert noise not in res.stderr + res.stdout, noise


def test_logs_hold_rays_and_the_libraries_output(first_stages):
    console_log, debug_log = first_stages.console_log, first_stages.debug_log
    # what the workers streamed to the driver, Ray's own lines, the libraries' lines
    for line in ("(RayTrainWorker pid=", "Reporting training result", "md0 step 4/4", "Started a local Ray instance",
                 "faiss.loader", f"stage {first_stages.stages[-1]}: done in"):
        assert line in console_log, line
    assert "\x1b[36m(" not in console_log  # no colour codes around worker prefixes in a file
    assert "encode: shard 0 done" in debug_log and "DEBUG" in debug_log
    assert "Starting execution of Dataset" in debug_log  # Ray Data's logger, which does not propagate
    # Ray Train's PlacementGroupCleaner reached the State API (it did not when the dashboard was off)
    for log_text in (console_log, debug_log):
        assert "Failed to query Ray Train Controller" not in log_text
        assert "Found multiple active Ray instances" not in log_text
    # rank 0's progress file reached the driver's side with the last step
    progress = first_stages.progress
    assert progress["done"] == progress["total"] == 4 and "loss" in progress["postfix"]


def test_a_bad_input_is_one_error_line(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    res = _pipeline(tmp_path / "run", "--data", str(empty), timeout=300)
    assert res.returncode == 2
    errors = [ln for ln in res.stderr.splitlines() if ln.startswith("error:")]
    assert errors == [res.stderr.splitlines()[-1]] and "no corpus found" in errors[0]
    assert "Traceback" not in res.stderr
    assert "Traceback" in (tmp_path / "run" / "logs" / "debug.log").read_text()
