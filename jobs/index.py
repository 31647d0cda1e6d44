"""Build a FAISS index from an encoding job's Parquet shards (see jobs/encode.py).

    python jobs/index.py --embeddings OUT/embeddings --out OUT/index --kind flat
    python jobs/index.py --embeddings OUT/embeddings --out OUT/index --kind ivfpq --set index.nprobe=64

The index records the encoding model's fingerprint, so searching it with another model is refused.
Prints the index description (kind, size, dim, fingerprint) as JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from rocketqa_ray.cli import add_config_args, run_main  # noqa: E402


def main(args: argparse.Namespace) -> int:
    from rocketqa_ray.config import load_config
    from rocketqa_ray.index.build import build_index_from_embeddings
    from rocketqa_ray.io import read_json

    overrides = list(args.overrides) + ([f"index.kind={args.kind}"] if args.kind else [])
    cfg = load_config(args.preset, args.config, overrides)
    out = build_index_from_embeddings(args.embeddings, cfg.index, args.out)
    print(json.dumps(read_json(Path(out) / "meta.json"), indent=2))
    return 0


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--embeddings", required=True, help="output directory of jobs/encode.py")
    ap.add_argument("--out", required=True, help="index directory to write")
    ap.add_argument("--kind", default=None, choices=["flat", "ivfpq", "hnsw", "auto"],
                    help="index kind (default: the config's index.kind)")
    add_config_args(ap)
    run_main(main, ap)
