"""Retrieve for a split's queries with a dual encoder and its index; write the run and print metrics JSON.

    rocketqa-ray search --model minilm --index OUT/index --data ../shared/data/squad --split test \
        --k 100 --out OUT/test.trec [--parquet OUT/test.parquet]
    python jobs/search.py ...                                          # the same, from a checkout

Queries are encoded through the Ray Data actor pool (`--in-process` encodes them in this process).
The index must have been built from the same model (checked by fingerprint).
"""

from __future__ import annotations

import argparse
import json
import time

from rocketqa_ray.commands.args import add_config_args, check_out_file, check_positive


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--model", required=True, help="dual encoder folder (or 'minilm' / 'tiny') the index was built with")
    ap.add_argument("--index", required=True, help="index directory from jobs/index.py")
    ap.add_argument("--data", required=True, help="BEIR dataset folder (queries.jsonl, qrels/<split>.tsv)")
    ap.add_argument("--split", default="test")
    ap.add_argument("--k", type=int, default=100)
    ap.add_argument("--out", required=True, help="TREC run file to write")
    ap.add_argument("--parquet", default=None, help="also write the run as Parquet (qid, pid, rank, score)")
    ap.add_argument("--in-process", action="store_true", help="encode the queries in this process, not Ray Data")
    add_config_args(ap)


def run(args: argparse.Namespace) -> int:
    from rocketqa_ray.batch.encode import resolve_model_dir
    from rocketqa_ray.config import load_config
    from rocketqa_ray.data.beir import load_beir, load_corpus, passage_text
    from rocketqa_ray.evaluation import full_report
    from rocketqa_ray.index import DenseIndex
    from rocketqa_ray.modeling.base import model_fingerprint
    from rocketqa_ray.retrieval.dense import retrieve, to_run, write_run_parquet, write_trec

    check_positive(args.k, "--k")  # before the model loads, not 20 s later
    check_out_file(args.out, "--out")
    check_out_file(args.parquet, "--parquet")
    cfg = load_config(args.preset, args.config, args.overrides)
    data = load_beir(args.data, splits=(args.split,), check_corpus=False)
    qrels = data.split(args.split)
    qids = data.split_queries(args.split)
    index = DenseIndex.load(args.index, expect_fingerprint=model_fingerprint(resolve_model_dir(args.model)))
    t0 = time.perf_counter()
    ranked = retrieve(args.model, index, qids, data.query_texts(qids), args.k, cfg=cfg.encode,
                      use_ray=not args.in_process, ray_cfg=cfg.ray)
    seconds = time.perf_counter() - t0
    write_trec(ranked, args.out)
    if args.parquet:
        write_run_parquet(ranked, args.parquet)
    run_scores = to_run(ranked)
    answers = {q: data.queries[q]["answers"] for q in qids}
    texts = None
    if data.has_answers(qids):
        texts = {pid: passage_text(p["title"], p["text"]) for pid, p in load_corpus(data.corpus_path).items()}
    metrics = full_report(run_scores, qrels, answers if texts else None, texts, cfg.eval.answer_k)
    report = {"split": args.split, "queries": len(qids), "k": args.k, "index": index.kind, "passages": len(index),
              "retrieve_seconds": round(seconds, 2), "metrics": metrics}
    print(json.dumps(report, indent=2))
    return 0
