"""End-to-end: the whole pipeline with the `tiny` preset, for real (Ray Train, Ray Data, FAISS, tiny BERT).

Runs in subprocesses, as a user would, each with its own private Ray cluster; an interruption is
simulated by killing the driver's whole process group in the middle of a stage. It goes on from the session's
`first_stages` run (bm25, md0, mc: the console tests read that run), so those stages run once per suite.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from rocketqa_ray.testing.env import subprocess_env, tiny_pipeline_cmd

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def _complete(out: Path) -> dict[str, float]:
    return {p.parent.name: p.stat().st_mtime for p in out.glob("*/_COMPLETE.json")}


# the first stages, the whole pipeline to md1, then resumed to the end, and a third command: minutes on a busy
# 2-core machine, which can pass the suite's 900 s per test
@pytest.mark.timeout(1800)
def test_full_pipeline_resumes_after_interruption(first_stages, tmp_path):
    assert first_stages.res.returncode == 0, first_stages.res.stderr[-3000:]
    out = first_stages.out
    log1 = open(tmp_path / "first.log", "w")
    # 1) the whole pipeline in the RUN_DIR of the first stages (they are skipped), killed (its whole process group)
    #    once md1 is underway
    proc = subprocess.Popen(tiny_pipeline_cmd(out), cwd=ROOT, env=subprocess_env(), stdout=log1, stderr=subprocess.STDOUT,
                            start_new_session=True)
    deadline = time.time() + 600
    try:
        while time.time() < deadline and proc.poll() is None:
            if (out / "mc" / "_COMPLETE.json").exists() and (out / "md1").exists():
                break
            time.sleep(0.2)
        assert proc.poll() is None, f"pipeline ended before it could be interrupted:\n{(tmp_path / 'first.log').read_text()[-3000:]}"
        time.sleep(1.0)  # somewhere inside md1 (denoise scoring or training)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert "stage md0: already complete" in (tmp_path / "first.log").read_text()
    done_before = _complete(out)
    assert {"bm25", "zero_shot", "md0", "mc"} <= set(done_before)
    assert "md2" not in done_before and "md2_rerank" not in done_before

    # 2) the same command resumes: completed stages are skipped, the rest runs to the end
    res = subprocess.run(tiny_pipeline_cmd(out), cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    done_after = _complete(out)
    for stage, mtime in done_before.items():
        assert done_after[stage] == mtime, f"stage {stage} was redone"
    assert "already complete" in res.stderr
    report = json.loads((out / "report.json").read_text())
    for stage in ("bm25", "zero_shot", "md0", "mc", "md1", "md2", "md2_rerank"):
        m = report["stages"][stage]
        for k in ("mrr@10", "recall@5", "recall@20", "recall@100", "ndcg@10", "answer_acc@20"):
            assert 0.0 <= m[k] <= 1.0
    assert report["stats"]["md1"]["kept"] + report["stats"]["md1"]["dropped"] > 0
    assert "pseudo_coverage" in report["stats"]["md2"]
    assert (out / "report.md").read_text().count("|") > 20
    assert (out / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the tiny preset validates the cross-encoder while it trains: the report says which step was kept, and plots it
    es = report["stats"]["mc"]["early_stopping"]
    assert f"- mc: {report['stats']['mc']['trained_steps']} steps" in (out / "report.md").read_text()
    assert f"the model kept is step {es['best_step']}'s" in (out / "report.md").read_text()
    assert (out / "training.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # exported models load with sentence-transformers
    from sentence_transformers import CrossEncoder, SentenceTransformer

    assert SentenceTransformer(str(out / "md2" / "model"), device="cpu").encode(["a question"]).shape[1] > 0
    assert CrossEncoder(str(out / "mc" / "model"), device="cpu").predict([("q", "p")]).shape == (1,)

    # 3) a changed config for a completed stage is reported, not silently mixed
    res = subprocess.run(tiny_pipeline_cmd(out, "--set", "dual.lr=0.5"), cwd=ROOT, env=subprocess_env(),
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 2
    assert "different config" in res.stderr and "dual.lr" in res.stderr and "Traceback" not in res.stderr


def test_pipeline_bad_config_is_one_line(tmp_path):
    res = subprocess.run(tiny_pipeline_cmd(tmp_path / "r", "--set", "dual.nope=1"), cwd=ROOT, env=subprocess_env(),
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 2
    assert "unknown config key 'dual.nope'" in res.stderr and "valid keys" in res.stderr
    assert "Traceback" not in res.stderr
