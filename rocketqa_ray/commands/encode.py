"""Encode a corpus with a dual encoder through Ray Data (resumable Parquet shards).

    rocketqa-ray encode --model RUN_DIR/md0/model --data data/squad-mini --out OUT/embeddings
    rocketqa-ray encode --model minilm --data ../shared/data/squad --out /tmp/squad-emb --set encode.num_actors=2
    python jobs/encode.py ...                                          # the same, from a checkout

Rerunning the same command after an interruption computes only the missing shards. Settings come from
the `encode` config section (batch_size, num_actors, cpus_per_actor, gpus_per_actor, bf16, rows_per_shard).
Prints the `_SUCCESS.json` record as JSON.
"""

from __future__ import annotations

import argparse
import json

from rocketqa_ray.commands.args import add_config_args, check_out_dir


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--model", required=True, help="saved dual encoder folder, or 'minilm' / 'tiny'")
    ap.add_argument("--data", required=True, help="BEIR dataset folder or corpus file (.jsonl, .jsonl.gz, .parquet)")
    ap.add_argument("--out", required=True, help="output directory for the Parquet shards")
    ap.add_argument("--kind", default="passage", choices=["passage", "query"], help="which tower encodes the texts")
    ap.add_argument("--overwrite", action="store_true", help="replace an output directory made for another model")
    add_config_args(ap)


def run(args: argparse.Namespace) -> int:
    from rocketqa_ray.batch.encode import embeddings_info, encode_corpus
    from rocketqa_ray.config import load_config

    check_out_dir(args.out, "--out")
    cfg = load_config(args.preset, args.config, args.overrides)
    # Ray starts only once the corpus has been validated (a bad row fails fast, without a cluster).
    out = encode_corpus(args.data, args.model, args.out, cfg.encode, kind=args.kind, overwrite=args.overwrite,
                        ray_cfg=cfg.ray)
    print(json.dumps(embeddings_info(out), indent=2))
    return 0
