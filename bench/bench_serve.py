"""Bounded load test of the Ray Serve search service on 127.0.0.1 (stops by itself).

For batching on and off, with and without rerank, at 1, 8 and 32 concurrent clients: p50/p95/p99
latency, requests/s and errors (must be 0). Also the same search in-process (SearchService, one
client) to show what Serve adds: HTTP proxy + ingress + three handle calls.

    python bench/bench_serve.py                        # tiny demo RUN_DIR built in a temp dir (fast)
    python bench/bench_serve.py --run-dir runs/cpu     # a real pipeline run (MiniLM)

Prints JSON and writes bench/results/serve.json. The numbers depend on what else the machine runs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.chdir(ROOT)  # Serve replicas import serve.app from the driver's working directory

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


def pct(xs: list[float]) -> dict[str, float]:
    if not xs:
        return {"p50": float("nan"), "p95": float("nan"), "p99": float("nan"), "mean": float("nan")}
    a = np.asarray(xs)
    return {"p50": float(np.percentile(a, 50)), "p95": float(np.percentile(a, 95)),
            "p99": float(np.percentile(a, 99)), "mean": float(a.mean())}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def in_process(svc, queries: list[str], rerank: bool, top_k: int, n: int, seconds: float) -> dict:
    """One client calling the same components in this process (no Ray, no HTTP)."""
    for q in queries[:3]:
        svc.search(q, top_k=top_k, rerank=rerank)  # warm-up
    lat, stages = [], {"encode": [], "retrieve": [], "rerank": []}
    t_end = time.perf_counter() + seconds
    start = time.perf_counter()
    for i in range(n):
        t0 = time.perf_counter()
        out = svc.search(queries[i % len(queries)], top_k=top_k, rerank=rerank)
        lat.append(1e3 * (time.perf_counter() - t0))
        for k in stages:
            stages[k].append(out["timings_ms"][k])
        if time.perf_counter() > t_end:
            break
    wall = time.perf_counter() - start
    return {"requests": len(lat), "latency_ms": pct(lat), "rps": len(lat) / wall,
            "stage_p50_ms": {k: float(np.median(v)) for k, v in stages.items()}}


def paired(svc, url: str, queries: list[str], rerank: bool, top_k: int, n: int, seconds: float) -> dict:
    """What Serve adds: the same query in-process, then over HTTP, alternating, so both see the same load
    on a busy machine. Reports medians, the median of the per-query differences, and where the difference goes:
    each step's time in the ingress (a handle call to its deployment) minus the same step in-process, and the
    client's latency minus the ingress's total (HTTP, the proxy, the ingress's routing and JSON)."""
    import requests

    s = requests.Session()
    local, served, diff = [], [], []
    steps: dict[str, list[float]] = {"encode": [], "retrieve": [], "rerank": [], "http_proxy_ingress": []}
    t_end = time.perf_counter() + seconds
    for i in range(n):
        body = {"query": queries[i % len(queries)], "top_k": top_k, "rerank": rerank}
        t0 = time.perf_counter()
        mine = svc.search(body["query"], top_k=top_k, rerank=rerank)["timings_ms"]
        t1 = time.perf_counter()
        r = s.post(f"{url}/search", json=body, timeout=120)
        t2 = time.perf_counter()
        if r.status_code != 200:
            raise RuntimeError(f"paired request failed: {r.status_code} {r.text[:200]}")
        theirs = r.json()["timings_ms"]
        local.append(1e3 * (t1 - t0))
        served.append(1e3 * (t2 - t1))
        diff.append(served[-1] - local[-1])
        for k in ("encode", "retrieve", "rerank"):
            steps[k].append(theirs[k] - mine[k])
        steps["http_proxy_ingress"].append(served[-1] - theirs["total"])
        if time.perf_counter() > t_end:
            break
    return {"pairs": len(diff), "in_process_p50_ms": float(np.median(local)), "serve_p50_ms": float(np.median(served)),
            "added_p50_ms": float(np.median(diff)),
            "added_by_step_p50_ms": {k: round(float(np.median(v)), 3) for k, v in steps.items()}}


def same_results(a: list[dict], b: list[dict], tol: float = 1e-4) -> bool:
    return [h["id"] for h in a] == [h["id"] for h in b] and all(
        abs(x["score"] - y["score"]) <= tol for x, y in zip(a, b))


def load(url: str, queries: list[str], rerank: bool, top_k: int, clients: int, n: int, seconds: float) -> dict:
    """`clients` threads with keep-alive sessions send `n` requests in total (or stop after `seconds`)."""
    import requests

    lock = threading.Lock()
    counter = iter(range(n))
    lat: list[float] = []
    server_total: list[float] = []
    errors: dict[str, int] = {}
    t_end = time.perf_counter() + seconds

    def client(_: int) -> None:
        s = requests.Session()
        while time.perf_counter() < t_end:
            with lock:
                i = next(counter, None)
            if i is None:
                return
            body = {"query": queries[i % len(queries)], "top_k": top_k, "rerank": rerank}
            t0 = time.perf_counter()
            try:
                r = s.post(f"{url}/search", json=body, timeout=120)
                ok = r.status_code == 200
                key = None if ok else f"http {r.status_code}"
            except requests.RequestException as e:
                ok, key = False, type(e).__name__
            dt = 1e3 * (time.perf_counter() - t0)
            with lock:
                if ok:
                    lat.append(dt)
                    server_total.append(r.json()["timings_ms"]["total"])
                else:
                    errors[key] = errors.get(key, 0) + 1

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(client, range(clients)))
    wall = time.perf_counter() - start
    return {"clients": clients, "requests": len(lat), "errors": sum(errors.values()), "error_kinds": errors,
            "latency_ms": pct(lat), "rps": len(lat) / wall, "wall_s": wall,
            "server_total_p50_ms": float(np.median(server_total)) if server_total else float("nan")}


def markdown(result: dict) -> str:
    """The latency table for the README."""
    lines = ["| retriever | batching | rerank | clients | p50 ms | p95 ms | p99 ms | req/s | errors |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for c in result["serve"]:
        lat = c["latency_ms"]
        lines.append(f"| {c['retriever']} | {c['batching']} | {'yes' if c['rerank'] else 'no'} | {c['clients']} | "
                     f"{lat['p50']:.1f} | {lat['p95']:.1f} | {lat['p99']:.1f} | {c['rps']:.1f} | {c['errors']} |")
    for name, r in result["in_process"].items():
        lat = r["latency_ms"]
        lines.append(f"| in-process | - | {'yes' if name.endswith('True') else 'no'} | 1 | {lat['p50']:.1f} | "
                     f"{lat['p95']:.1f} | {lat['p99']:.1f} | {r['rps']:.1f} | - |")
    return "\n".join(lines)


def wait_healthy(url: str, timeout: float = 180) -> dict:
    import requests

    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            r = requests.get(f"{url}/healthz", timeout=10)
            if r.status_code == 200:
                return r.json()
        except requests.RequestException:
            pass
        time.sleep(1)
    raise RuntimeError(f"service at {url} not healthy after {timeout} s")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run-dir", default=None, help="a pipeline RUN_DIR; default: a demo one in a temp dir")
    ap.add_argument("--demo-preset", default="tiny", choices=["tiny", "cpu"],
                    help="demo RUN_DIR models: tiny random BERT, or untrained all-MiniLM-L6-v2 (cpu)")
    ap.add_argument("--demo-passages", type=int, default=200)
    ap.add_argument("--concurrency", default="1,8,32", help="comma-separated client counts")
    ap.add_argument("--requests", type=int, default=200, help="requests per cell (cell = batching x rerank x clients)")
    ap.add_argument("--cell-seconds", type=float, default=20.0, help="time limit per cell")
    ap.add_argument("--top-k", type=int, default=10)
    ap.add_argument("--torch-threads", type=int, default=1, help="per model replica, and for the in-process run")
    ap.add_argument("--configs", default="unsharded:on,unsharded:off,sharded:on",
                    help="comma-separated retriever:batching pairs (retriever: unsharded = one Retriever holding every "
                         "shard, sharded = one per shard)")
    ap.add_argument("--demo-shards", type=int, default=3, help="index shards of the demo RUN_DIR")
    ap.add_argument("--compare", type=int, default=20, help="queries whose results are compared across configs")
    ap.add_argument("--batch-wait-timeout-s", type=float, default=None,
                    help="override serve.batch_wait_timeout_s (seconds a batched call waits for more requests)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "serve.json"))
    args = ap.parse_args()

    import ray
    import torch
    from ray import serve

    from rocketqa_ray.config import RayConfig
    from rocketqa_ray.io import write_json
    from rocketqa_ray.ray_utils import ensure_ray
    from rocketqa_ray.serving.artifacts import find_artifacts
    from rocketqa_ray.serving.local import SearchService
    from rocketqa_ray.testing.demo import demo_queries, make_demo_run_dir
    from serve.app import build_app

    tmp = None
    if args.run_dir:
        run_dir = Path(args.run_dir)
    else:
        tmp = tempfile.TemporaryDirectory(prefix="bench_serve_")
        run_dir = make_demo_run_dir(Path(tmp.name) / "run", n_passages=args.demo_passages, preset=args.demo_preset,
                                    shard_size=-(-args.demo_passages // args.demo_shards))
    arts = find_artifacts(run_dir)
    queries = demo_queries(run_dir)
    clients = [int(c) for c in args.concurrency.split(",")]
    configs = [c.strip().split(":") for c in args.configs.split(",")]
    n_shards = len(arts.shard_groups(1))
    load_before = os.getloadavg()

    # -- in process (same thread budget as one replica)
    torch.set_num_threads(args.torch_threads)
    svc = SearchService(arts)
    reranks = [False, True] if svc.reranker is not None else [False]
    inproc = {f"rerank={r}": in_process(svc, queries, r, args.top_k, args.requests, args.cell_seconds) for r in reranks}

    # -- over HTTP
    ensure_ray(RayConfig(local_num_cpus=4))
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    url = f"http://127.0.0.1:{port}"
    cells = []
    overhead: dict[str, dict] = {}
    health: dict[str, dict] = {}
    answers: dict[str, list] = {}
    try:
        for retriever, mode in configs:
            name = f"retriever={retriever},batching={mode}"
            app_args = {"run_dir": str(run_dir), "batching": mode, "torch_threads": args.torch_threads,
                        "shards_per_retriever": 1 if retriever == "sharded" else 0}
            if args.batch_wait_timeout_s is not None:
                app_args["batch_wait_timeout_s"] = args.batch_wait_timeout_s
            serve.run(build_app(app_args), name="bench", route_prefix="/")
            health[name] = wait_healthy(url)
            load(url, queries, True, args.top_k, 4, 16, 30)  # warm-up: first calls load lazily
            import requests

            answers[name] = [requests.post(f"{url}/search", json={"query": q, "top_k": args.top_k, "rerank": r},
                                           timeout=120).json()["results"]
                             for q in queries[: args.compare] for r in reranks]
            for rerank in reranks:
                overhead[f"{name},rerank={rerank}"] = paired(
                    svc, url, queries, rerank, args.top_k, min(args.requests, 50), args.cell_seconds)
                for c in clients:
                    res = load(url, queries, rerank, args.top_k, c, args.requests, args.cell_seconds)
                    res.update(retriever=retriever, batching=mode, rerank=rerank)
                    cells.append(res)
                    print(f"{retriever:9s} batching={mode:3s} rerank={rerank!s:5s} clients={c:2d}: "
                          f"p50 {res['latency_ms']['p50']:7.1f} ms  p95 {res['latency_ms']['p95']:7.1f}  "
                          f"p99 {res['latency_ms']['p99']:7.1f}  {res['rps']:6.1f} req/s  errors {res['errors']}",
                          file=sys.stderr, flush=True)
            serve.delete("bench")
    finally:
        serve.shutdown()
        ray.shutdown()
        if tmp is not None:
            tmp.cleanup()

    for c in cells:
        if c["clients"] == 1:
            # HTTP + proxy = client latency - the ingress's own total (which includes the handle calls)
            overhead[f"retriever={c['retriever']},batching={c['batching']},rerank={c['rerank']}"][
                "http_and_proxy_p50_ms"] = c["latency_ms"]["p50"] - c["server_total_p50_ms"]
    first = f"retriever={configs[0][0]},batching={configs[0][1]}"
    sharded = next((n for n in answers if n.startswith("retriever=sharded")), None)
    unsharded = next((n for n in answers if n.startswith("retriever=unsharded")), None)
    equal = None
    if sharded and unsharded:
        equal = all(same_results(a, b) for a, b in zip(answers[sharded], answers[unsharded]))
    memory = {n: [r["rss_mb"] for r in h["index"]["retrievers"]] for n, h in health.items()}
    result = {
        "benchmark": "serve",
        "run_dir": str(run_dir) if args.run_dir else
        f"demo RUN_DIR (make_demo_run_dir, preset {args.demo_preset}, {args.demo_passages} passages, untrained models)",
        "stage": arts.stage,
        "index": next(iter(health.values()))["index"] if health else None,
        "top_k": args.top_k,
        "rerank_top_k": arts.cfg.serve.rerank_top_k,
        "max_batch_size": arts.cfg.serve.max_batch_size,
        "torch_threads_per_replica": args.torch_threads,
        "requests_per_cell": args.requests,
        "cell_seconds": args.cell_seconds,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "loadavg_before": load_before,
                    "loadavg_after": os.getloadavg()},
        "note": "shared machine: provisional numbers; client threads run on the same cores as the service. "
                "serve_overhead pairs each HTTP request with the same search in-process (alternating, same load); "
                "batching=on adds up to batch_wait_timeout_s per batched deployment at 1 client.",
        "in_process": inproc,
        "serve": cells,
        "serve_overhead": overhead,
        "overhead_ms": {"config": first, "p50_1_client_no_rerank": overhead[f"{first},rerank=False"]["added_p50_ms"],
                        "by_step_p50_1_client_no_rerank": overhead[f"{first},rerank=False"]["added_by_step_p50_ms"]},
        "sharded": {"shards": n_shards, "retrievers": len(next((h for n, h in health.items() if n == sharded),
                                                                {"index": {"retrievers": []}})["index"]["retrievers"]),
                    "equal_to_unsharded": equal, "compared_requests": len(answers.get(sharded or "", []))},
        "retriever_replica_rss_mb": memory,
        "batch_wait_timeout_s": args.batch_wait_timeout_s if args.batch_wait_timeout_s is not None
        else arts.cfg.serve.batch_wait_timeout_s,
        "total_errors": sum(c["errors"] for c in cells),
    }
    result["markdown"] = markdown(result)
    write_json(args.out, result)
    print(result["markdown"], file=sys.stderr)
    print(json.dumps(result, indent=2))
    return 1 if result["total_errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
