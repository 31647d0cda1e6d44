"""Run the RocketQA pipeline: BM25 and zero-shot baselines, M_D0, M_C, M_D1, M_D2, M_D2 + M_C rerank.

    rocketqa-ray pipeline --data data/squad-mini --out runs/squad-mini [--preset cpu] [--set key=value ...]
    python jobs/pipeline.py --data data/squad-mini --out runs/squad-mini     # the same, from a checkout

Rerunning with the same --out resumes after the last completed stage.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from rocketqa_ray.commands.args import add_config_args, check_out_dir


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--data", default=None, help="BEIR-layout dataset directory (default: the preset's data.path)")
    ap.add_argument("--out", required=True, help="run directory (reused to resume)")
    ap.add_argument("--stages", default=None, help="comma-separated subset, e.g. bm25,zero_shot,md0")
    ap.add_argument("--ablations", action="store_true", help="also run the in-batch and undenoised ablations")
    add_config_args(ap)


def run(args: argparse.Namespace) -> int:
    from rocketqa_ray.config import load_config
    from rocketqa_ray.pipeline.runner import Pipeline

    check_out_dir(args.out, "--out")
    overrides = list(args.overrides)
    if args.data:
        overrides.insert(0, f"data.path={args.data}")
    if args.stages:
        overrides.append(f"pipeline.stages={args.stages}")
    if args.ablations:
        overrides.append("pipeline.ablations=true")
    cfg = load_config(args.preset, args.config, overrides)
    report = Pipeline(cfg, args.out, preset=args.preset).run()
    print(json.dumps(report["stages"], indent=1))
    print(f"report: {Path(args.out) / 'report.md'}")
    return 0
