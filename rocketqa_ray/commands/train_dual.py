"""Train a dual encoder on Ray Train (RocketQA step 1, M_D0), on its own, and print a JSON summary.

    rocketqa-ray train-dual --data data/squad-mini --out runs/md0
    rocketqa-ray train-dual --data data/squad-mini --out runs/md0-inbatch --set dual.cross_batch=false
    rocketqa-ray train-dual --data DIR --out runs/md1 --examples hard_negatives.parquet --init runs/md0/model
    python jobs/train_dual.py ...                                      # the same, from a checkout

Without `--examples`, examples are built from the train qrels (one row per question and gold passage,
in-batch and cross-batch negatives only), for the labelled training questions the pipeline uses: the
train split minus the `data.dev_fraction` and `data.pseudo_fraction` hold-outs, capped at
`data.max_train_queries`. Rerunning the same command resumes an interrupted run from its last
checkpoint in OUT/ray_train. Evaluate the result with `rocketqa-ray evaluate --retriever OUT/model`.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from rocketqa_ray.commands.args import add_config_args, check_out_dir
from rocketqa_ray.errors import ConfigError


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--data", required=True, help="BEIR-layout dataset folder")
    ap.add_argument("--out", required=True, help="output folder: model/, ray_train/ checkpoints, history.json")
    ap.add_argument("--examples", default=None, help="training examples (Parquet) instead of the train qrels")
    ap.add_argument("--init", default=None, help="start from this saved dual encoder instead of model.base")
    ap.add_argument("--name", default="md0", help="name in logs (default: md0)")
    add_config_args(ap)


def run(args: argparse.Namespace) -> int:
    from rocketqa_ray.config import load_config
    from rocketqa_ray.data.beir import load_beir, load_corpus
    from rocketqa_ray.data.examples import build_dual_examples, write_examples
    from rocketqa_ray.data.splits import split_questions
    from rocketqa_ray.train.launch import read_history, train_dual

    check_out_dir(args.out, "--out")
    cfg = load_config(args.preset, args.config, args.overrides)
    out = Path(args.out)
    if args.init and not (Path(args.init) / "config.json").exists():
        raise ConfigError(f"--init {args.init} is not a saved model folder (no config.json)")
    if args.examples:
        examples = Path(args.examples)
    else:
        examples = out / "train_examples.parquet"
        if not examples.exists():
            data = load_beir(args.data, splits=(cfg.data.train_split,))
            qids = split_questions(data, cfg.data).train  # held out exactly as the pipeline does
            rows = build_dual_examples(data, load_corpus(data.corpus_path), qids, None, 0, cfg.dual.seed,
                                       split=cfg.data.train_split)
            write_examples(rows, examples)
    t0 = time.time()
    model_dir = train_dual(cfg, str(examples), str(out), init_model=args.init, name=args.name)
    history = read_history(out)
    print(json.dumps({"model": str(model_dir), "examples": str(examples), "seconds": round(time.time() - t0, 1),
                      "workers": cfg.ray.num_workers, "cross_batch": cfg.dual.cross_batch,
                      "last": history[-1] if history else None}))
    return 0
