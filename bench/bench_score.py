"""Cross-encoder scoring benchmark: (question, passage) pairs/s through Ray Data vs a plain in-process loop.

Same model (a cross-encoder on `--base`, fresh 1-logit head: speed does not depend on the weights), same
pairs (SQuAD-mini test questions x passages: the gold one and random others), same batch size and bf16
setting. `in_process` is `CrossEncoder.score` in this process with all cores' threads; `ray_1_actor` and
`ray_2_actors` are `score_pairs` (resumable Parquet shards) with one actor holding all cores or two
with half each. `wall_pps` includes actor start-up and model loading; `steady_pps` divides by the
actors' busy time (read, score, write of each shard).

    python bench/bench_score.py --n 1000

Prints JSON and writes bench/results/score.json (or --out). On a shared machine the numbers are noisy.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sys
import tempfile
import time
import typing
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from rocketqa_ray.config import AutoBool, EncodeConfig, RayConfig  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
MINI = ROOT / "data" / "squad-mini"


def make_pairs(n: int, seed: int = 0) -> list[dict]:
    from rocketqa_ray.data.beir import load_corpus, load_qrels, load_queries, passage_text

    corpus = load_corpus(MINI / "corpus.jsonl")
    queries = load_queries(MINI / "queries.jsonl")
    qrels = load_qrels(MINI / "qrels" / "test.tsv")
    pids = sorted(corpus)
    rng = random.Random(seed)
    rows: list[dict] = []
    qids = sorted(qrels)
    while len(rows) < n:
        q = qids[len(rows) % len(qids)]
        p = next(iter(qrels[q])) if rng.random() < 0.25 else rng.choice(pids)
        rows.append({"qid": q, "pid": p, "query": queries[q]["text"],
                     "passage": passage_text(corpus[p]["title"], corpus[p]["text"])})
    return rows


def in_process(model_dir: Path, pairs: list[dict], batch_size: int, bf16: str, threads: int) -> dict:
    import torch

    from rocketqa_ray.modeling.cross_encoder import CrossEncoder

    torch.set_num_threads(threads)
    model = CrossEncoder.load(model_dir)
    qs, ps = [r["query"] for r in pairs], [r["passage"] for r in pairs]
    model.score(qs[: 2 * batch_size], ps[: 2 * batch_size], batch_size=batch_size, bf16=bf16)  # warm-up
    t0 = time.perf_counter()
    model.score(qs, ps, batch_size=batch_size, bf16=bf16)
    sec = time.perf_counter() - t0
    return {"pairs": len(pairs), "seconds": round(sec, 2), "pps": round(len(pairs) / sec, 1), "threads": threads}


def ray_data(model_dir: Path, pairs: list[dict], out: Path, cfg: EncodeConfig) -> dict:
    from rocketqa_ray.batch.score import score_pairs
    from rocketqa_ray.batch.shards import success_record

    t0 = time.perf_counter()
    score_pairs(pairs, model_dir, out, cfg, overwrite=True)
    wall = time.perf_counter() - t0
    run = success_record(out)["run"]
    n = run["computed_rows"]
    return {"pairs": n, "actors": run["num_actors"], "cpus_per_actor": cfg.cpus_per_actor,
            "wall_seconds": round(wall, 2), "wall_pps": round(n / wall, 1),
            "steady_pps": round(n * run["num_actors"] / run["busy_seconds"], 1),
            "worker_peak_rss_mb": round(run["worker_peak_rss_mb"], 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=1000, help="pairs to score")
    ap.add_argument("--base", default="minilm", help="cross-encoder base (minilm, tiny or a path)")
    ap.add_argument("--max-len", type=int, default=160)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--bf16", default="auto", choices=typing.get_args(AutoBool))
    ap.add_argument("--rows-per-shard", type=int, default=256)
    ap.add_argument("--out", default=str(RESULTS / "score.json"))
    args = ap.parse_args()

    import torch

    from rocketqa_ray.cli import setup_logging
    from rocketqa_ray.modeling.base import use_bf16
    from rocketqa_ray.modeling.cross_encoder import CrossEncoder
    from rocketqa_ray.ray_utils import ensure_ray

    setup_logging()
    cores = os.cpu_count() or 1
    result: dict = {
        "benchmark": "score",
        "machine": {"cpus": cores, "platform": platform.platform(), "loadavg_start": os.getloadavg()},
        "params": {"n": args.n, "base": args.base, "max_len": args.max_len, "batch_size": args.batch_size,
                   "bf16": args.bf16, "bf16_active": use_bf16(args.bf16, "cpu"), "torch": torch.__version__},
        "note": "measured on a shared machine: provisional",
    }
    pairs = make_pairs(args.n)
    with tempfile.TemporaryDirectory(prefix="bench-score-") as tmp:
        work = Path(tmp)
        model = CrossEncoder.from_base(args.base, max_len=args.max_len).save(work / "ce")
        res = {"in_process": in_process(model, pairs, args.batch_size, args.bf16, cores)}
        ensure_ray(RayConfig(local_num_cpus=4))
        rows = max(32, min(args.rows_per_shard, args.n // 8))
        for name, actors in (("ray_1_actor", 1), ("ray_2_actors", 2)):
            cfg = EncodeConfig(batch_size=args.batch_size, num_actors=actors, cpus_per_actor=cores / actors,
                               bf16=args.bf16, rows_per_shard=rows)
            res[name] = ray_data(model, pairs, work / name, cfg)
            res[name]["steady_vs_in_process"] = round(res[name]["steady_pps"] / res["in_process"]["pps"], 3)
            res[name]["wall_vs_in_process"] = round(res[name]["wall_pps"] / res["in_process"]["pps"], 3)
        res["rows_per_shard"] = rows
        result["throughput"] = res
    result["machine"]["loadavg_end"] = os.getloadavg()
    text = json.dumps(result, indent=2)
    print(text)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
