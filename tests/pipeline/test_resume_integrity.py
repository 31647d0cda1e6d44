"""A resumed run trusts nothing it has not checked: damaged outputs, edited dataset files and damaged completion
markers are caught; the same data under another path spelling is not a changed config. Real runs of the bm25
stage (no Ray: seconds), as a user runs the pipeline."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture()
def data(tmp_path) -> Path:
    return Path(shutil.copytree(ROOT / "data" / "squad-mini", tmp_path / "data"))


def pipeline(cwd: Path, data: str, out: str = "run") -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "RAY_USAGE_STATS_ENABLED": "0"}
    return subprocess.run([sys.executable, str(ROOT / "jobs" / "pipeline.py"), "--preset", "tiny", "--stages", "bm25",
                           "--data", data, "--out", out], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def error_line(r: subprocess.CompletedProcess) -> str:
    assert r.returncode == 2, r.stdout[-2000:] + r.stderr[-2000:]
    errors = [line for line in r.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in r.stderr, r.stderr
    return errors[0]


def test_other_path_spelling_resumes_and_edited_qrels_are_caught(tmp_path, data):
    first = pipeline(tmp_path, "data")
    assert first.returncode == 0, first.stderr
    again = pipeline(tmp_path, "./data/../data")  # same data, another spelling: skipped, not refused
    assert again.returncode == 0, again.stderr
    assert "stage bm25: already complete" in again.stderr
    qrels = data / "qrels" / "test.tsv"
    lines = qrels.read_text().splitlines()
    lines[1] = lines[1].rsplit("\t", 1)[0] + "\t2"  # edited in place
    qrels.write_text("\n".join(lines) + "\n")
    msg = error_line(pipeline(tmp_path, "data"))
    assert "qrels/test.tsv changed since" in msg and "Delete" in msg and str(Path("run") / "bm25") in msg
    shutil.rmtree(tmp_path / "run" / "bm25")  # what the message says to do: the stage is redone on the new data
    assert pipeline(tmp_path, "data").returncode == 0


def test_damaged_output_is_named_and_nothing_is_deleted(tmp_path, data):
    assert pipeline(tmp_path, "data").returncode == 0
    trec = tmp_path / "run" / "bm25" / "test.trec"
    whole = trec.read_bytes()
    trec.write_bytes(whole[: len(whole) // 2])  # cut in half
    msg = error_line(pipeline(tmp_path, "data"))
    assert f"{Path('run') / 'bm25' / 'test.trec'} is damaged" in msg and "delete" in msg
    assert trec.stat().st_size == len(whole) // 2  # left for the user to inspect


def test_empty_or_truncated_marker_means_not_complete(tmp_path, data):
    assert pipeline(tmp_path, "data").returncode == 0
    marker = tmp_path / "run" / "bm25" / "_COMPLETE.json"
    for content in ("", '{"stage": "bm25", "dig'):  # empty, then cut short (one run's output, redone each time)
        marker.write_text(content)
        r = pipeline(tmp_path, "data")
        assert r.returncode == 0, r.stderr
        assert "empty or damaged; running the stage again" in r.stderr and "stage bm25: done in" in r.stderr, content
        assert json.loads(marker.read_text())["stage"] == "bm25"
