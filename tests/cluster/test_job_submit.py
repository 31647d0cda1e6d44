"""The pipeline as a Ray job: `ray job submit --working-dir <repo> -- python jobs/pipeline.py ...` against a
head node this test starts with `ray start --head` (and stops, by its own process id)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
import urllib.request

import pytest
import yaml
from local_cluster import REPO, VENV_BIN, LocalCluster, free_ports

# The whole pipeline runs end to end in test_pipeline_e2e, and Ray Train through `ray job submit` in
# tests/cluster/test_cluster.py (md0 across two nodes); here the first stages (Ray Data ingest and encoding, FAISS)
# prove the job path from an uploaded working_dir, and serving a RUN_DIR without a cross-encoder is covered on the
# way, while CI stays short.
ALL_STAGES = "bm25,zero_shot"
METRICS = ("mrr@10", "recall@5", "recall@20", "recall@100", "ndcg@10", "answer_acc@20")


@pytest.mark.slow
def test_pipeline_through_ray_job_submit(tmp_path):
    out = tmp_path / "run"  # absolute: the job's working directory is Ray's unpacked copy of the repo
    # PYTHONPATH as cluster.yaml sets it on its nodes: Serve imports `serve.app` in the cluster's workers.
    cluster = LocalCluster(num_cpus=4, env={"PYTHONPATH": str(REPO)})
    try:
        cluster.start()
        res = cluster.submit(["python", "jobs/pipeline.py", "--preset", "tiny", "--out", str(out),
                              "--stages", ALL_STAGES], working_dir=REPO, timeout=1200)
        assert res.returncode == 0 and res.status == "SUCCEEDED", res.logs[-6000:]

        # The job ran from the uploaded copy of the checkout, not from /work/main, and without the venv.
        pkgs = [p for p in (cluster.temp_dir / "head" / "session_latest" / "runtime_resources" / "working_dir_files").iterdir()
                if p.is_dir()]
        assert len(pkgs) == 1, pkgs
        shipped = set(os.listdir(pkgs[0]))
        assert {"jobs", "rocketqa_ray", "configs", "data"} <= shipped
        assert not {".venv", ".git", "runs"} & shipped, shipped
        size = sum(f.stat().st_size for f in pkgs[0].rglob("*") if f.is_file())
        assert size < 50 * 2**20, f"working dir upload is {size / 2**20:.0f} MiB"

        # Progress is visible in the job's logs (what `ray job logs` shows), stage by stage.
        logs = cluster.job_logs(res.job_id)
        for stage in ALL_STAGES.split(","):
            assert re.search(rf"stage {stage}: starting", logs), f"no start line for {stage}"
            assert re.search(rf"stage {stage}: done in", logs), f"no done line for {stage}"
        # Ray's and the workers' chatter (per-shard lines) goes to RUN_DIR/logs, not the job's console.
        assert not re.search(r"encode: shard \d+ done", logs)
        assert re.search(r"encode: shard \d+ done", (out / "logs" / "debug.log").read_text()), "no encoding progress lines"

        # The README's next step: `serve deploy` the run on the same cluster, then query it.
        _serve_deploy_and_search(cluster, out, tmp_path)
    finally:
        cluster.stop()
    assert not cluster.head.alive()

    report = json.loads((out / "report.json").read_text())
    for stage in ALL_STAGES.split(","):
        assert set(METRICS) <= set(report["stages"][stage]), (stage, report["stages"][stage])
        assert all(0.0 <= report["stages"][stage][m] <= 1.0 for m in METRICS)
    assert (out / "report.md").exists() and (out / "zero_shot" / "model" / "config.json").exists()


def _serve_deploy_and_search(cluster: LocalCluster, run_dir, tmp_path) -> None:
    cfg = yaml.safe_load((REPO / "serve" / "config.yaml").read_text())
    (port,) = free_ports(1)
    cfg["http_options"]["port"] = port
    cfg["applications"][0]["args"]["run_dir"] = str(run_dir)
    cfg_path = tmp_path / "serve.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    p = subprocess.run([str(VENV_BIN / "serve"), "deploy", str(cfg_path), "--address", cluster.dashboard_url],
                       env=cluster.env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stdout + p.stderr
    body = json.dumps({"query": "Which company owns Columbia Records?", "top_k": 3}).encode()
    deadline, last = time.time() + 300, None
    while time.time() < deadline:
        try:
            req = urllib.request.Request(f"http://127.0.0.1:{port}/search", data=body,
                                         headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(req, timeout=30) as r:
                results = json.loads(r.read())["results"]
            assert len(results) == 3 and all({"id", "title", "text", "score"} <= set(x) for x in results)
            return
        except OSError as e:  # not up yet
            last = e
            time.sleep(3)
    raise AssertionError(f"the deployed service never answered /search: {last}")
