"""Build a FAISS index from an encoding job's Parquet shards (see `rocketqa-ray encode`).

    rocketqa-ray index --embeddings OUT/embeddings --out OUT/index --kind flat
    rocketqa-ray index --embeddings OUT/embeddings --out OUT/index --kind ivfpq --set index.nprobe=64
    python jobs/index.py ...                                           # the same, from a checkout

Each shard (`index.shard_size` vectors) is filled and written by its own Ray task, reading the embedding parts
itself; the index records the encoding model's fingerprint, so searching it with another model is refused.
Prints the index description (kind, size, dim, fingerprint) as JSON.
"""

from __future__ import annotations

import argparse
import json
import typing

from rocketqa_ray.commands.args import add_config_args, check_out_dir
from rocketqa_ray.config import IndexKind


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--embeddings", required=True, help="output directory of jobs/encode.py")
    ap.add_argument("--out", required=True, help="index directory to write")
    ap.add_argument("--kind", default=None, choices=typing.get_args(IndexKind),
                    help="index kind (default: the config's index.kind)")
    add_config_args(ap)


def run(args: argparse.Namespace) -> int:
    from rocketqa_ray.batch.index_build import build_index
    from rocketqa_ray.config import load_config

    check_out_dir(args.out, "--out")
    overrides = list(args.overrides) + ([f"index.kind={args.kind}"] if args.kind else [])
    cfg = load_config(args.preset, args.config, overrides)
    meta = build_index(args.embeddings, cfg.index, args.out, cfg.ray)
    print(json.dumps(meta, indent=2))
    return 0
