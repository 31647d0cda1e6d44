"""Corpus-encoding benchmark: the Ray Data pipeline vs a plain in-process PyTorch loop, and memory vs corpus size.

1. Throughput (passages/s) on the first `--n` SQuAD passages, same model, same machine, same batch size,
   bf16 per `--bf16` (auto = native bf16 CPUs and CUDA):
   - `in_process`: `DualEncoder.encode` in this process with all cores' threads (the reference loop);
   - `ray_1_actor`: `encode_corpus` with one actor holding all cores;
   - `ray_2_actors`: two actors with half the cores each.
   For Ray, `wall_pps` counts everything (actor start-up, model loading, Parquet writes); `steady_pps`
   divides by the actors' busy time (read + encode + write of each shard), i.e. the rate once running,
   which is what the in-process figure measures too (its model is loaded and warmed before timing).
2. Memory: peak RSS of the driver and of the workers for `--mem-n` and 10x `--mem-n` synthetic passages
   with a 1-layer MiniLM; each size runs in a fresh process with its own Ray cluster so peaks do not mix.

    python bench/bench_encode.py --n 2000 --mem-n 2000        # small (default)
    python bench/bench_encode.py --n 20000 --mem-n 10000      # closer to the issue's figures

Prints JSON and writes bench/results/encode.json (or --out). On a shared machine the numbers are noisy.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import resource
import subprocess
import sys
import tempfile
import time
import typing
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from rocketqa_ray.config import AutoBool, EncodeConfig, ModelConfig, RayConfig  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
SQUAD = ROOT.parent / "shared" / "data" / "squad" / "corpus.jsonl"
MINI = ROOT / "data" / "squad-mini" / "corpus.jsonl"


def squad_subset(n: int, path: Path) -> int:
    """Write the first n SQuAD passages (full squad if present, else squad-mini) to `path`; returns the count."""
    src = SQUAD if SQUAD.exists() else MINI
    count = 0
    with open(src, encoding="utf-8") as f, open(path, "w", encoding="utf-8") as g:
        for line in f:
            if count == n:
                break
            g.write(line)
            count += 1
    return count


def synthetic_corpus(path: Path, n: int, words: int = 100, seed: int = 0) -> None:
    """n passages of `words` random words, streamed to disk (never held in memory)."""
    rng = random.Random(seed)
    vocab = [f"w{i}" for i in range(5000)] + "the of and river city war music team state church".split()
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            f.write(json.dumps({"_id": f"s{i}", "title": f"t{i % 97}",
                                "text": " ".join(rng.choices(vocab, k=words))}) + "\n")


def save_model(base: str, out: Path, layers: int | None = None) -> Path:
    """The dual encoder on `base` (optionally cut to its first `layers` layers), saved like a trained one."""
    from transformers import AutoModel, AutoTokenizer

    from rocketqa_ray.modeling.base import resolve_base
    from rocketqa_ray.modeling.dual_encoder import DualEncoder

    path = resolve_base(base)
    kwargs = {"num_hidden_layers": layers} if layers else {}
    model = DualEncoder(AutoModel.from_pretrained(path, **kwargs), None, AutoTokenizer.from_pretrained(path),
                        ModelConfig(base=str(path)))
    return model.save(out)


def in_process(model_dir: Path, corpus: Path, batch_size: int, bf16: str, threads: int) -> dict:
    import torch

    from rocketqa_ray.data.beir import iter_corpus, passage_text
    from rocketqa_ray.modeling.dual_encoder import DualEncoder

    torch.set_num_threads(threads)
    texts = [passage_text(p["title"], p["text"]) for p in iter_corpus(corpus)]
    model = DualEncoder.load(model_dir)
    model.encode(texts[: 2 * batch_size], batch_size=batch_size, bf16=bf16)  # warm-up
    t0 = time.perf_counter()
    emb = model.encode(texts, batch_size=batch_size, bf16=bf16)
    sec = time.perf_counter() - t0
    return {"passages": len(texts), "seconds": round(sec, 2), "pps": round(len(texts) / sec, 1),
            "threads": threads, "dim": int(emb.shape[1])}


def ray_data(model_dir: Path, corpus: Path, out: Path, cfg: EncodeConfig) -> dict:
    from rocketqa_ray.batch.encode import embeddings_info, encode_corpus

    t0 = time.perf_counter()
    encode_corpus(corpus, model_dir, out, cfg, overwrite=True)
    wall = time.perf_counter() - t0
    run = embeddings_info(out)["run"]
    n = run["computed_rows"]
    return {"passages": n, "actors": run["num_actors"], "cpus_per_actor": cfg.cpus_per_actor,
            "wall_seconds": round(wall, 2), "wall_pps": round(n / wall, 1),
            "steady_pps": round(n * run["num_actors"] / run["busy_seconds"], 1),
            "worker_peak_rss_mb": round(run["worker_peak_rss_mb"], 1)}


def memory_child(args: argparse.Namespace) -> None:
    """One encoding run in a fresh process; prints the driver's and the workers' peak RSS."""
    from rocketqa_ray.batch.encode import embeddings_info, encode_corpus
    from rocketqa_ray.ray_utils import ensure_ray

    ensure_ray(RayConfig(local_num_cpus=4))
    cfg = EncodeConfig(batch_size=args.batch_size, num_actors=2, cpus_per_actor=1.0, bf16=args.bf16,
                       rows_per_shard=args.rows_per_shard)
    t0 = time.perf_counter()
    encode_corpus(args.corpus, args.model, args.out, cfg, overwrite=True)
    run = embeddings_info(args.out)["run"]
    print(json.dumps({"driver_peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
                      "worker_peak_rss_mb": round(run["worker_peak_rss_mb"], 1),
                      "seconds": round(time.perf_counter() - t0, 1), "passages": run["computed_rows"]}))


def memory(args: argparse.Namespace, work: Path) -> dict:
    model = save_model(args.base, work / "model-1layer", layers=1)
    out: dict = {"model": f"{args.base} cut to 1 layer", "rows_per_shard": args.rows_per_shard, "runs": {}}
    for n in (args.mem_n, 10 * args.mem_n):
        corpus = work / f"synthetic-{n}.jsonl"
        synthetic_corpus(corpus, n)
        cmd = [sys.executable, __file__, "--memory-child", "--corpus", str(corpus), "--model", str(model),
               "--out-dir", str(work / f"mem-{n}"), "--batch-size", str(args.batch_size), "--bf16", args.bf16,
               "--rows-per-shard", str(args.rows_per_shard)]
        res = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if res.returncode != 0:
            raise RuntimeError(f"memory run n={n} failed:\n{res.stderr[-3000:]}")
        line = [ln for ln in res.stdout.splitlines() if ln.startswith('{"driver_peak_rss_mb"')][-1]
        out["runs"][str(n)] = json.loads(line)
        corpus.unlink()
    small, big = (out["runs"][str(n)] for n in (args.mem_n, 10 * args.mem_n))
    out["driver_ratio_10x"] = round(big["driver_peak_rss_mb"] / small["driver_peak_rss_mb"], 3)
    out["worker_ratio_10x"] = round(big["worker_peak_rss_mb"] / small["worker_peak_rss_mb"], 3)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=2000, help="SQuAD passages for the throughput runs")
    ap.add_argument("--base", default="minilm", help="model for the throughput runs (minilm, tiny or a path)")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--bf16", default="auto", choices=typing.get_args(AutoBool))
    ap.add_argument("--mem-n", type=int, default=2000, help="synthetic passages for the memory runs (and 10x)")
    ap.add_argument("--rows-per-shard", type=int, default=512)
    ap.add_argument("--skip-memory", action="store_true")
    ap.add_argument("--skip-throughput", action="store_true")
    ap.add_argument("--out", default=str(RESULTS / "encode.json"))
    # internal: one memory run in a child process
    ap.add_argument("--memory-child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--corpus", help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--out-dir", help=argparse.SUPPRESS)
    args = ap.parse_args()

    from rocketqa_ray.cli import setup_logging

    setup_logging()
    if args.memory_child:
        args.out = args.out_dir
        memory_child(args)
        return
    cores = os.cpu_count() or 1
    result: dict = {
        "benchmark": "encode",
        "machine": {"cpus": cores, "platform": platform.platform(), "loadavg_start": os.getloadavg()},
        "params": {"n": args.n, "base": args.base, "batch_size": args.batch_size, "bf16": args.bf16,
                   "rows_per_shard": args.rows_per_shard, "mem_n": args.mem_n},
        "note": "measured on a shared machine: provisional",
    }
    with tempfile.TemporaryDirectory(prefix="bench-encode-") as tmp:
        work = Path(tmp)
        if not args.skip_throughput:
            import torch

            from rocketqa_ray.modeling.base import use_bf16
            from rocketqa_ray.ray_utils import ensure_ray

            result["params"]["bf16_active"] = use_bf16(args.bf16, "cpu")
            result["params"]["torch"] = torch.__version__
            model = save_model(args.base, work / "model")
            corpus = work / "corpus.jsonl"
            n = squad_subset(args.n, corpus)
            rows = max(32, min(args.rows_per_shard, n // 8))  # several shards per actor
            tp = {"in_process": in_process(model, corpus, args.batch_size, args.bf16, cores)}
            ensure_ray(RayConfig(local_num_cpus=4))
            for name, actors in (("ray_1_actor", 1), ("ray_2_actors", 2)):
                cfg = EncodeConfig(batch_size=args.batch_size, num_actors=actors, cpus_per_actor=cores / actors,
                                   bf16=args.bf16, rows_per_shard=rows)
                tp[name] = ray_data(model, corpus, work / name, cfg)
            base = tp["in_process"]["pps"]
            for name in ("ray_1_actor", "ray_2_actors"):
                tp[name]["steady_vs_in_process"] = round(tp[name]["steady_pps"] / base, 3)
                tp[name]["wall_vs_in_process"] = round(tp[name]["wall_pps"] / base, 3)
            tp["rows_per_shard"] = rows
            result["throughput"] = tp
        if not args.skip_memory:
            result["memory"] = memory(args, work)
    result["machine"]["loadavg_end"] = os.getloadavg()
    text = json.dumps(result, indent=2)
    print(text)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
