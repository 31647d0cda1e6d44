"""The offline path at two corpus sizes 10x apart: does the driver stay flat?

A synthetic corpus of N passages (2-5 sentences sampled from ../shared/data/squad, unique ids) and Q training
questions (a sentence of their gold passage, cut short), with the tiny BERT, run through the project's own
distributed path, one phase after another:

    ingest  corpus file -> validated Parquet parts (Ray tasks; duplicate ids by a Ray Data groupby)
    encode  passages -> embedding parts (Ray Data actor pool)
    index   flat FAISS shards of `--shard-size` vectors, each filled and written by a Ray task
    mine    questions -> query encoder -> searcher actors (one per shard) -> top-k, gold excluded -> Parquet
    bm25    the corpus's BM25 statistics (Ray Data: counted per batch, summed by a groupby over terms)
    score   every question's top `--score-top` candidates joined to passage and question texts (Ray Data joins),
            scored by a cross-encoder actor pool -> Parquet
    examples  step 3's rows: every question's scored candidates and gold grouped by Ray Data, denoised (threshold)
            and 4 negatives drawn per question (`batch.negatives_flow`), then given their texts by the examples
            flow (Ray Data joins and a groupby) -> Parquet in training order
    pseudo  step 4's rows: the same questions taken as unlabelled, their scored candidates and hidden labels grouped
            by Ray Data and pseudo-labelled per question (`batch.pseudo_flow`), given their texts by the
            examples flow -> Parquet in training order

Each size runs in a fresh process with its own Ray cluster. Reported per phase: wall time, the driver's peak RSS
during the phase (sampled every 50 ms), and the peak RSS of each worker kind (from the workers themselves).

    python bench/bench_scale.py                           # N = 100k / Q = 5k and N = 1M / Q = 50k
    python bench/bench_scale.py --sizes 20000,200000      # quicker

Prints JSON and writes bench/results/scale.json and scale.png.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import re
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
SQUAD = ROOT.parent / "shared" / "data" / "squad" / "corpus.jsonl"
PHASES = ("ingest", "encode", "index", "mine", "bm25", "score", "examples", "pseudo")


def sentences() -> list[str]:
    out = []
    with open(SQUAD, encoding="utf-8") as f:
        for line in f:
            out += [s.strip() for s in re.split(r"(?<=[.!?])\s+", json.loads(line)["text"]) if len(s.split()) >= 5]
    return out


def write_synthetic(folder: Path, n: int, q: int, seed: int = 0) -> None:
    """corpus.jsonl with n passages; questions.jsonl with q questions (qid, text, gold pid)."""
    rng = random.Random(seed)
    pool = sentences()
    folder.mkdir(parents=True, exist_ok=True)
    corpus = folder / "corpus.jsonl"
    gold = set(rng.sample(range(n), q))
    questions = []
    with open(corpus, "w", encoding="utf-8") as f:
        for i in range(n):
            sents = rng.sample(pool, rng.randint(2, 5))
            f.write(json.dumps({"_id": f"d{i:09d}", "title": "", "text": " ".join(sents)}) + "\n")
            if i in gold:
                words = rng.choice(sents).split()
                questions.append((f"q{i:09d}", " ".join(words[: max(4, len(words) // 2)]), f"d{i:09d}"))
    with open(folder / "questions.jsonl", "w", encoding="utf-8") as f:
        f.writelines(json.dumps(x) + "\n" for x in questions)


class PeakRSS:
    """The driver's peak RSS while a phase runs (ru_maxrss is the whole life's peak; this is the phase's)."""

    def __init__(self):
        import psutil

        self.proc, self.peak, self.stop = psutil.Process(), 0, threading.Event()

    def __enter__(self):
        self.peak = self.proc.memory_info().rss
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()
        return self

    def run(self):
        while not self.stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(0.05)

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()
        self.peak = max(self.peak, self.proc.memory_info().rss)


def child(args: argparse.Namespace) -> None:
    """One size, in this fresh process."""
    import ray

    from rocketqa_ray.batch.bm25_stats import count_corpus_stats
    from rocketqa_ray.batch.corpus import ingest_corpus
    from rocketqa_ray.batch.encode import embeddings_info, encode_corpus
    from rocketqa_ray.batch.index_build import build_index
    from rocketqa_ray.batch.pair_flow import score_pair_files, write_questions
    from rocketqa_ray.batch.search import Searchers, retrieve_to_parquet
    from rocketqa_ray.config import EncodeConfig, IndexConfig, ModelConfig, RayConfig
    from rocketqa_ray.modeling.cross_encoder import CrossEncoder
    from rocketqa_ray.modeling.dual_encoder import DualEncoder
    from rocketqa_ray.ray_utils import ensure_ray
    from rocketqa_ray.retrieval.candidates import count_rows

    work = Path(args.work)
    corpus = work / "data" / "corpus.jsonl"
    with open(work / "data" / "questions.jsonl", encoding="utf-8") as f:
        questions = [tuple(json.loads(line)) for line in f]
    model = DualEncoder.from_base(ModelConfig(base="tiny", query_max_len=16, passage_max_len=64)).save(work / "model")
    ce = CrossEncoder.from_base("tiny", max_len=96).save(work / "ce")
    write_questions([q for q, _, _ in questions], [t for _, t, _ in questions], work / "questions.parquet")
    ensure_ray(RayConfig(local_num_cpus=4))
    base_mb = PeakRSS().proc.memory_info().rss / 2**20
    enc = EncodeConfig(batch_size=256, num_actors=2, cpus_per_actor=1.0, rows_per_shard=20000)
    icfg = IndexConfig(kind="flat", shard_size=args.shard_size, use_gpu="false", build_cpus=1.0, searcher_cpus=0.5)
    out: dict = {"passages": args.n, "questions": args.q, "driver_after_ray_init_mb": round(base_mb, 1),
                 "phases": {}}

    def phase(name, fn):
        t0 = time.perf_counter()
        with PeakRSS() as rss:
            extra = fn() or {}
        out["phases"][name] = {"seconds": round(time.perf_counter() - t0, 2),
                               "driver_peak_rss_mb": round(rss.peak / 2**20, 1), **extra}
        print(json.dumps({name: out["phases"][name]}), file=sys.stderr, flush=True)

    def ingest():
        rec = ingest_corpus(corpus, work / "store", chunk_mb=16)
        return {"parts": len(rec["part_rows"]), "task_peak_rss_mb": rec["task_peak_rss_mb"]}

    def encode():
        encode_corpus(work / "store", model, work / "emb", enc)
        run = embeddings_info(work / "emb")["run"]
        return {"actors": run["num_actors"], "actor_peak_rss_mb": round(run["worker_peak_rss_mb"], 1),
                "steady_pps": round(run["computed_rows"] * run["num_actors"] / max(run["busy_seconds"], 1e-9))}

    def index():
        meta = build_index(work / "emb", icfg, work / "index")
        return {"shards": meta["shards"], "task_peak_rss_mb": meta["build"]["task_peak_rss_mb"]}

    def mine():
        qids, texts = [q for q, _, _ in questions], [t for _, t, _ in questions]
        exclude = {q: [g] for q, _, g in questions}
        with Searchers(work / "index", icfg) as s:
            folder = retrieve_to_parquet(s, model, qids, texts, work / "cands", args.top_k, exclude, enc)
            rss = ray.get([h.__ray_call__.remote(lambda a: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
                           for h in s.handles])
        assert count_rows(folder) == len(qids)
        return {"searchers": len(rss), "searcher_peak_rss_mb": [round(r / 1024, 1) for r in rss]}

    def bm25():
        stats = count_corpus_stats(work / "store", False, work / "bm25_stats")
        return {"terms": len(stats.df), "passages": stats.n_docs}

    def score():
        folder = score_pair_files(ce, work / "store", work / "questions.parquet", work / "scores", enc,
                                  candidates=work / "cands", top=args.score_top)
        return {"pairs": json.loads((folder / "_SUCCESS.json").read_text())["pairs"]}

    def examples():
        # what pipeline step 3 does above data.driver_max_examples: every question's candidates, scores and positive
        # grouped by Ray Data, denoised and its negatives drawn per question (batch.negatives_flow), the rows given
        # their texts by the examples flow; the driver writes the questions and sums counts
        from rocketqa_ray.batch.examples_flow import examples_flow
        from rocketqa_ray.batch.negatives_flow import negatives_flow, write_question_positives
        from rocketqa_ray.data.passages import Stored, top_up_ids
        from rocketqa_ray.rocketqa.denoise import DenoiseRule
        from rocketqa_ray.rocketqa.question_negatives import MiningPlan

        qfile = write_question_positives([(q, t, [g]) for q, t, g in questions], work / "positives.parquet")
        plan = MiningPlan(DenoiseRule("threshold", 0.9), args.score_top, 4, seed=0)
        ids, stats = negatives_flow(qfile, work / "cands", args.score_top, plan, work / "decided",
                                    top_up_ids(Stored(work / "store")), scores=[work / "scores"])
        folder = examples_flow(ids, work / "store", work / "examples")
        return {"rows": json.loads((folder / "_SUCCESS.json").read_text())["rows"], "scored": stats["scored"],
                "dropped": stats["dropped"]}

    def pseudo():
        # what pipeline step 4 does above data.driver_max_examples unlabelled questions (md2's label_in_flow); the
        # thresholds label every question (the tiny cross-encoder is untrained), so every question has rows
        from rocketqa_ray.batch.examples_flow import examples_flow
        from rocketqa_ray.batch.pseudo_flow import PseudoPlan, pseudo_flow, write_pseudo_questions
        from rocketqa_ray.data.passages import Stored, top_up_ids

        qfile = write_pseudo_questions([(q, t, [g]) for q, t, g in questions], work / "pseudo_questions.parquet")
        ids, stats = pseudo_flow(qfile, work / "cands", args.score_top, work / "scores",
                                 PseudoPlan(0.0, 1.0, 4, seed=0), work / "pseudo", top_up_ids(Stored(work / "store")))
        folder = examples_flow(ids, work / "store", work / "pseudo_examples")
        return {"rows": json.loads((folder / "_SUCCESS.json").read_text())["rows"], "labelled": stats["labelled"]}

    for name, fn in zip(PHASES, (ingest, encode, index, mine, bm25, score, examples, pseudo)):
        phase(name, fn)
    out["driver_peak_rss_mb"] = max(p["driver_peak_rss_mb"] for p in out["phases"].values())
    print(json.dumps(out))


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = result["runs"]
    fig, ax = plt.subplots(figsize=(7, 3.6))
    width = 0.8 / len(runs)
    for i, r in enumerate(runs):
        ys = [r["phases"][p]["driver_peak_rss_mb"] for p in PHASES]
        ax.bar([j + i * width for j in range(len(PHASES))], ys, width, label=f"N={r['passages']:,} Q={r['questions']:,}")
    ax.set_xticks([j + width * (len(runs) - 1) / 2 for j in range(len(PHASES))], PHASES)
    ax.set_ylabel("driver peak RSS (MB)")
    ax.set_title("Driver memory per phase at two corpus sizes")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="100000,1000000", help="corpus sizes (passages), comma-separated")
    ap.add_argument("--questions-per-passage", type=float, default=0.05, help="Q = this x N")
    ap.add_argument("--shard-size", type=int, default=250_000, help="vectors per index shard")
    ap.add_argument("--top-k", type=int, default=20)
    ap.add_argument("--score-top", type=int, default=2, help="candidates per question scored by the cross-encoder")
    ap.add_argument("--out", default=str(RESULTS / "scale.json"))
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--n", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--q", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--work", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args)
        return
    runs = []
    for n in [int(x) for x in args.sizes.split(",")]:
        q = max(1, int(n * args.questions_per_passage))
        with tempfile.TemporaryDirectory(prefix=f"scale-{n}-") as work:
            write_synthetic(Path(work) / "data", n, q)  # here, not in the measured process
            cmd = [sys.executable, __file__, "--child", "--n", str(n), "--q", str(q), "--work", work,
                   "--shard-size", str(args.shard_size), "--top-k", str(args.top_k),
                   "--score-top", str(args.score_top)]
            t0 = time.perf_counter()
            res = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=None, text=True, check=False,
                                 env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "HF_HUB_OFFLINE": "1"})
            if res.returncode != 0:
                sys.exit(f"size {n} failed (rc {res.returncode})")
            # the child's record is its last JSON line (Ray may print after it)
            run = json.loads(next(x for x in reversed(res.stdout.splitlines()) if x.startswith('{"passages"')))
            run["wall_seconds"] = round(time.perf_counter() - t0, 1)
            runs.append(run)
    small, large = runs[0], runs[-1]
    result = {
        "benchmark": "bench_scale", "model": "tiny BERT (random weights), passage_max_len 64", "index": "flat",
        "shard_size": args.shard_size, "top_k": args.top_k, "score_top": args.score_top, "runs": runs,
        "driver_growth": round(large["driver_peak_rss_mb"] / small["driver_peak_rss_mb"] - 1, 3),
        "goal": "driver peak RSS grows by at most 15% from the small to the large run",
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "load_avg_at_end": os.getloadavg()},
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    result["goal_met"] = result["driver_growth"] <= 0.15
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    plot(result, out.with_suffix(".png"))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
