"""The cluster side: `cluster.yaml` checked by Ray's own validator, and a real two-node Ray cluster on this
machine (`ray start` head + worker, see tests/cluster/local_cluster.py) running the pipeline through
`ray job submit`, then losing its worker node in the middle of corpus encoding.
"""

from __future__ import annotations

import copy
import json
import random
import re
import time
from pathlib import Path

import pytest
import yaml
from local_cluster import REPO, LocalCluster

CLUSTER_YAML = REPO / "cluster.yaml"


# --------------------------------------------------------------------------------------- cluster.yaml
@pytest.fixture(scope="module")
def cluster_cfg() -> dict:
    with open(CLUSTER_YAML) as f:
        return yaml.safe_load(f)


def _prepared(cfg: dict) -> dict:
    """What `ray up` does to the file before launching anything (no cloud credentials needed)."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(cfg))
    validate_config(prepared)
    return prepared


def _all_setup(cfg: dict) -> list[str]:
    return [*cfg.get("initialization_commands", []), *cfg.get("setup_commands", []),
            *cfg.get("head_setup_commands", []), *cfg.get("worker_setup_commands", [])]


def test_cluster_yaml_passes_rays_validation(cluster_cfg):
    prepared = _prepared(cluster_cfg)
    types = prepared["available_node_types"]
    head = types[prepared["head_node_type"]]
    assert "GPU" not in head["resources"], "the head runs the driver, not GPU work"
    gpus = sorted(t["resources"].get("GPU", 0) for name, t in types.items() if name != prepared["head_node_type"])
    assert 1 in gpus and 8 in gpus, f"want a 1-GPU and an 8-GPU worker type, got GPU counts {gpus}"
    for name, t in types.items():
        if name != prepared["head_node_type"]:
            assert 0 <= t["min_workers"] <= t["max_workers"], name
    assert prepared["provider"]["type"] == "aws"


def test_cluster_yaml_validation_catches_mistakes(cluster_cfg):
    """The validator used above really looks at our node types (a typo fails, a bad head type fails)."""
    import jsonschema

    typo = copy.deepcopy(cluster_cfg)
    typo["available_node_types"]["gpu_1x"]["max_worker"] = 3
    with pytest.raises(jsonschema.ValidationError, match="max_worker"):
        _prepared(typo)
    bad_head = copy.deepcopy(cluster_cfg)
    bad_head["head_node_type"] = "no_such_type"
    with pytest.raises(ValueError, match="head_node_type"):
        _prepared(bad_head)


def test_cluster_setup_installs_the_gpu_extra_and_never_faiss_cpu(cluster_cfg):
    import ray

    cmds = _all_setup(cluster_cfg)
    text = "\n".join(cmds)
    assert "faiss-cpu" not in text and "[cpu" not in text and "[cpu," not in text
    installs = [i for i, c in enumerate(cmds) if re.search(r"pip install .*-e .*\[gpu\]", c)]
    assert installs, "setup_commands must `pip install -e <project>[gpu]`"
    torch_at = [i for i, c in enumerate(cmds) if re.search(r"pip install .*\btorch\b", c)]
    assert torch_at and torch_at[0] < installs[0], "torch must be installed before the project"
    pins = re.findall(r"ray\[[^\]]*\]==([\w.]+)", text)
    assert pins == [ray.__version__], f"cluster Ray must match the client's {ray.__version__}, got {pins}"

    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert any(d.startswith("faiss-gpu") for d in extras["gpu"])
    assert not any(d.startswith("faiss-cpu") for d in extras["gpu"]), "[gpu] must not pull faiss-cpu too"


def test_cluster_file_mounts_ship_this_checkout(cluster_cfg):
    mounts = cluster_cfg["file_mounts"]
    (remote, local), = [(r, loc) for r, loc in mounts.items() if (REPO / loc / "pyproject.toml").exists()]
    name = remote.rstrip("/").split("/")[-1]
    assert any(name in c and "[gpu]" in c for c in cluster_cfg["setup_commands"]), \
        f"the mounted code at {remote} is what setup_commands must install"
    assert any("--head" in c for c in cluster_cfg["head_start_ray_commands"])
    assert any("$RAY_HEAD_IP" in c for c in cluster_cfg["worker_start_ray_commands"])


def test_paper_preset_fits_the_node_types(cluster_cfg):
    """`--preset paper` asks for resources that some node type can actually provide."""
    from rocketqa_ray.config import load_config

    cfg = load_config("paper")
    nodes = [t["resources"] for t in cluster_cfg["available_node_types"].values()]
    train = {"CPU": cfg.ray.cpus_per_worker * cfg.ray.num_workers, "GPU": cfg.ray.num_workers if cfg.ray.use_gpu else 0}
    # All Train workers on one node: cross-batch negatives all-gather every step (NVLink, not the network).
    assert any(all(n.get(k, 0) >= v for k, v in train.items()) for n in nodes), f"no node type holds {train}"
    # ... and Ray Train is told to keep them there, not merely allowed to
    assert cfg.ray.placement_strategy == "STRICT_PACK"
    actor = {"CPU": cfg.encode.cpus_per_actor, "GPU": cfg.encode.gpus_per_actor}
    small = [n for n in nodes if n.get("GPU", 0) == 1]
    assert small and all(n.get(k, 0) >= v for k, v in actor.items() for n in small[:1]), \
        f"an encoding actor {actor} must fit a 1-GPU node"


# ----------------------------------------------------------------------------- a two-node cluster
# Logical CPUs (the machine has 2 cores; oversubscription is fine, the models are tiny): each node has 3,
# a Train worker takes 2, so the two Train workers cannot share a node. An encoding actor takes 1, so
# after the worker node dies the head still has room to restart its actor.
NODE_CPUS = 3
PLACEMENT = ["--set", "ray.num_workers=2", "--set", "ray.cpus_per_worker=2", "--set", "encode.num_actors=2",
             "--set", "encode.cpus_per_actor=1"]
TRAIN_WORKER = "RayTrainWorker"
SHARD_ENCODER = "MapBatches(ShardActor)"  # Ray Data actor-pool workers of corpus encoding / scoring
SEARCHER = "ShardSearcher"  # the actors holding index shards (batch.search)
SHARD_TASK = "fill_and_write"  # the tasks filling index shards (batch.index_build)


# Ray Data starts dispatching as soon as one pool actor is up; with tiny models the first actor can finish
# all shards before the second has imported torch. Waiting for the whole pool makes placement observable.
NODE_ENV = {"RAY_DATA_DEFAULT_WAIT_FOR_MIN_ACTORS_S": "600"}


@pytest.fixture(scope="module")
def two_nodes():
    cluster = LocalCluster(num_cpus=NODE_CPUS, env=NODE_ENV)
    try:
        cluster.start()
        cluster.add_worker("w1", num_cpus=NODE_CPUS)
        yield cluster
    finally:
        cluster.stop()


def _actors(cluster: LocalCluster, job_id: str) -> list[dict]:
    from ray.util.state import list_actors

    return [a.__dict__ if not isinstance(a, dict) else a for a in
            list_actors(address=cluster.dashboard_url, filters=[("job_id", "=", job_id)], detail=True,
                        limit=10000, raise_on_missing_output=False)]


def _tasks(cluster: LocalCluster, job_id: str, name: str) -> list[dict]:
    from ray.util.state import list_tasks

    return [t.__dict__ if not isinstance(t, dict) else t for t in
            list_tasks(address=cluster.dashboard_url, filters=[("job_id", "=", job_id), ("name", "=", name)],
                       detail=True, limit=10000, raise_on_missing_output=False)]


def _ray_job_id(cluster: LocalCluster, submission_id: str) -> str:
    return cluster.job_info(submission_id)["job_id"]


@pytest.mark.slow
def test_pipeline_runs_across_two_nodes(two_nodes, tmp_path):
    """md0 through `ray job submit`: Train workers, Ray Data encoding actors, index-shard tasks and searcher actors
    land on both nodes."""
    cluster = two_nodes
    nodes = cluster.node_ids()
    assert set(nodes) == {"head", "w1"}, nodes
    out = tmp_path / "run"
    res = cluster.submit(["python", "jobs/pipeline.py", "--preset", "tiny", "--out", str(out), "--stages", "md0",
                          *PLACEMENT, "--set", "encode.rows_per_shard=250", "--set", "index.shard_size=500"],
                         timeout=900)
    assert res.status == "SUCCEEDED" and res.returncode == 0, res.logs[-5000:]
    report = json.loads((out / "report.json").read_text())
    assert 0.0 <= report["stages"]["md0"]["mrr@10"] <= 1.0
    assert "stage md0: starting" in res.logs and "stage md0: done" in res.logs

    actors = _actors(cluster, _ray_job_id(cluster, res.job_id))
    train = {a["node_id"] for a in actors if TRAIN_WORKER in a["class_name"]}
    encode = {a["node_id"] for a in actors if SHARD_ENCODER in a["class_name"]}
    where = {v: k for k, v in nodes.items()}
    assert train == set(where), f"Train workers ran on {[where.get(n, n) for n in train]}"
    assert encode == set(where), f"encoding actors ran on {[where.get(n, n) for n in encode]}"
    searchers = {a["node_id"] for a in actors if SEARCHER in a["class_name"]}
    assert searchers == set(where), f"searcher actors ran on {[where.get(n, n) for n in searchers]}"
    shards = {t["node_id"] for t in _tasks(cluster, _ray_job_id(cluster, res.job_id), SHARD_TASK)}
    assert shards == set(where), f"index shards were filled on {[where.get(n, n) for n in shards]}"


def _synthetic_corpus(path: Path, n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    vocab = [f"w{i}" for i in range(2000)] + "the of and to in is was for on that by with".split()
    ids = []
    with open(path, "w") as f:
        for i in range(n):
            pid = f"p{i:06d}"
            ids.append(pid)
            text = " ".join(rng.choice(vocab) for _ in range(rng.randint(20, 60)))
            f.write(json.dumps({"_id": pid, "title": f"t{i % 97}", "text": text}) + "\n")
    return ids


@pytest.mark.slow
def test_encoding_survives_losing_a_node(two_nodes, tmp_path):
    """Kill the worker node (its whole process session, SIGKILL) while it encodes: the job still
    finishes, and every passage is encoded exactly once and correctly."""
    import numpy as np

    from rocketqa_ray.batch.encode import load_embeddings
    from rocketqa_ray.modeling.base import resolve_base
    from rocketqa_ray.modeling.dual_encoder import DualEncoder

    cluster = two_nodes
    if "w1" not in cluster.node_ids():  # this test must run first, or alone, or after a test that kept w1
        pytest.skip("the worker node is gone")
    corpus = tmp_path / "corpus.jsonl"
    n, per_shard = 6000, 150
    ids = _synthetic_corpus(corpus, n)
    n_shards = -(-n // per_shard)
    out = tmp_path / "emb"
    job = cluster.submit_async(["python", "jobs/encode.py", "--model", "tiny", "--data", str(corpus),
                                "--out", str(out), "--preset", "tiny", *PLACEMENT,
                                "--set", f"encode.rows_per_shard={per_shard}", "--set", "encode.batch_size=50"])
    w1 = cluster.node_ids()["w1"]
    deadline = time.time() + 300
    killed_at = None
    while time.time() < deadline:
        status = cluster.job_status(job)
        assert status in ("PENDING", "RUNNING"), f"job {status} before the node was killed:\n{cluster.job_logs(job)[-4000:]}"
        done = len(list(out.glob("part-*.parquet")))
        if done >= 2:
            on_w1 = [a for a in _actors(cluster, _ray_job_id(cluster, job))
                     if SHARD_ENCODER in a["class_name"] and a["node_id"] == w1 and a["state"] == "ALIVE"]
            if on_w1:
                killed_at = done
                cluster.workers[0].kill()
                break
        time.sleep(0.2)
    assert killed_at is not None, f"encoding never got going on w1:\n{cluster.job_logs(job)[-4000:]}"
    assert killed_at < n_shards, "the job finished before the kill; make the corpus bigger"

    status = cluster.wait_job(job, timeout=600)
    logs = cluster.job_logs(job)
    assert status == "SUCCEEDED", logs[-5000:]
    assert "w1" not in cluster.node_ids()

    # Ray restarted the dead actor (on the head) and retried its shard there.
    actors = [a for a in _actors(cluster, _ray_job_id(cluster, job)) if SHARD_ENCODER in a["class_name"]]
    assert any(a.get("num_restarts", 0) >= 1 for a in actors), actors

    # Exactly once: every shard computed once in this run, every passage present once, in corpus order.
    success = json.loads((out / "_SUCCESS.json").read_text())
    assert sorted(success["run"]["computed_shards"]) == list(range(n_shards))
    got_ids, emb = load_embeddings(out)
    assert got_ids == ids
    assert emb.shape == (n, emb.shape[1]) and np.isfinite(emb).all()
    assert not list(out.glob(".part-*")), "a partial shard file was left behind"

    # ...and correctly: spot-check rows from every shard against in-process encoding.
    model = DualEncoder.load(resolve_base("tiny"))
    rows = [s * per_shard + (s * 37) % per_shard for s in range(n_shards)]
    texts = [json.loads(line) for line in corpus.read_text().splitlines()]
    from rocketqa_ray.data.beir import passage_text

    ref = model.encode([passage_text(texts[r]["title"], texts[r]["text"]) for r in rows], "passage", 64, "false", "cpu")
    np.testing.assert_allclose(emb[rows], ref, atol=1e-4)
