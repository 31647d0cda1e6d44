"""Length-bucketed training steps vs one padded batch, for the dual encoder and the cross-encoder.

    python bench/bench_buckets.py                # MiniLM, passages 256 tokens (dual) / pairs 128 (cross)
    python bench/bench_buckets.py --base tiny    # seconds, for a smoke run

Times the engine's own training step (`DualTask` / `CrossTask.loss_backward` + AdamW, bf16 where the CPU
has it), in one process, on squad-mini training questions with real passages (median 148 tokens, so one
batch padded to its longest passage wastes most of its compute). `length_buckets=1` is one padded batch;
`length_buckets=4` forwards four length-sorted chunks with the graph kept (same loss and gradients,
tested in tests/test_losses.py). Contenders alternate over `--repeats`; each keeps its best repeat.
Prints JSON and writes bench/results/buckets.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

ROOT = Path(__file__).resolve().parent.parent


def rows_for(kind: str, n: int) -> list[dict]:
    from rocketqa_ray.data.beir import load_beir, load_corpus, passage_text
    from rocketqa_ray.data.examples import build_cross_examples, build_dual_examples

    data = load_beir(ROOT / "data" / "squad-mini")
    corpus = load_corpus(data.corpus_path)
    qids = sorted(data.split("train"))[:n]
    if kind == "dual":
        return build_dual_examples(data, corpus, qids, None, 0, seed=0)
    pids = sorted(corpus)
    pos = {q: next(iter(data.split("train")[q])) for q in qids}
    negs = {q: [pids[(i * 7 + j) % len(pids)] for j in range(3)] for i, q in enumerate(qids)}
    return build_cross_examples({q: data.queries[q]["text"] for q in qids}, pos, negs,
                                lambda p: passage_text(corpus[p]["title"], corpus[p]["text"]))


def time_steps(kind: str, base: str, buckets: int, rows: list[dict], batch: int, steps: int) -> dict:
    import torch

    from rocketqa_ray.config import load_config
    from rocketqa_ray.modeling.base import use_bf16
    from rocketqa_ray.train.loop import make_optimizer
    from rocketqa_ray.train.tasks import CrossTask, DualTask

    cfg = load_config("cpu", overrides=[f"model.base={base}", f"cross.base={base}", "model.passage_max_len=256",
                                        f"dual.length_buckets={buckets}", f"cross.length_buckets={buckets}"])
    task = DualTask(cfg, 0) if kind == "dual" else CrossTask(cfg, 3)
    torch.manual_seed(0)
    model = task.build(None)
    model.train()
    opt = make_optimizer(model, 1e-5, 0.0)
    device = torch.device("cpu")
    bf16 = use_bf16("auto", device)
    times = []
    for i in range(steps + 1):  # the first step warms up
        chunk = rows[(i * batch) % len(rows):][:batch]
        t = time.perf_counter()
        task.loss_backward(model, chunk, device, bf16)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i:
            times.append(time.perf_counter() - t)
    seqs = batch * task.sequences_per_row()
    best = min(times)
    return {"step_s_median": round(sorted(times)[len(times) // 2], 3), "step_s_best": round(best, 3),
            "seq_per_s": round(seqs / (sum(times) / len(times)), 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", default="minilm")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--batch-dual", type=int, default=32, help="questions per step (1 query + 1 passage each)")
    ap.add_argument("--batch-cross", type=int, default=8, help="question groups per step (4 pairs each)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "buckets.json"))
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    results: dict = {"base": args.base, "cpu_count": os.cpu_count(), "load_avg_start": os.getloadavg()[0]}
    for kind, batch in (("dual", args.batch_dual), ("cross", args.batch_cross)):
        rows = rows_for(kind, batch * (args.steps + 1))
        best: dict[int, dict] = {}
        for _ in range(args.repeats):
            for buckets in (1, 4):
                r = time_steps(kind, args.base, buckets, rows, batch, args.steps)
                if buckets not in best or r["step_s_median"] < best[buckets]["step_s_median"]:
                    best[buckets] = r
        results[kind] = {"one_batch": best[1], "buckets_4": best[4],
                         "speedup": round(best[1]["step_s_median"] / best[4]["step_s_median"], 2)}
    results["load_avg_end"] = os.getloadavg()[0]
    text = json.dumps(results, indent=2)
    print(text)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
