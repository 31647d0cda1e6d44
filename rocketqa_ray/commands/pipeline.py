"""Run the RocketQA pipeline: BM25 and zero-shot baselines, M_D0, M_C, M_D1, M_D2, M_D2 + M_C rerank.

    rocketqa-ray pipeline --data data/squad-mini --out runs/squad-mini [--preset cpu] [--set key=value ...]
    python jobs/pipeline.py --data data/squad-mini --out runs/squad-mini     # the same, from a checkout

Rerunning with the same --out resumes after the last completed stage.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from rocketqa_ray.commands.args import add_config_args, check_out_dir


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--data", default=None, help="BEIR-layout dataset directory (default: the preset's data.path)")
    ap.add_argument("--out", required=True, help="run directory (reused to resume)")
    ap.add_argument("--stages", default=None, help="comma-separated subset, e.g. bm25,zero_shot,md0")
    ap.add_argument("--ablations", action="store_true", help="also run the in-batch and undenoised ablations")
    ap.add_argument("--strict", action="store_true",
                    help="stop when a trained model is no better than what it should improve on (held-out checks); "
                         "by default the run says so and goes on with the documented fallback")
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
    if args.strict:
        overrides.append("pipeline.strict=true")
    cfg = load_config(args.preset, args.config, overrides)
    report = Pipeline(cfg, args.out, preset=args.preset).run()
    print(summary_table(report["stages"]))
    failed = [f"{name} ({st['check']['name']})" for name, st in report["stats"].items()
              if st.get("check") and not st["check"]["passed"]]
    if failed:
        print(f"checks failed: {', '.join(failed)}; the report's 'Checks' section has the figures and the fallback used")
    print(f"report: {Path(args.out) / 'report.md'} (all figures: report.json; logs: {Path(args.out) / 'logs'})")
    return 0


def summary_table(stages: dict[str, dict[str, float]]) -> str:
    """One line per stage with its test metrics, aligned: what a person reads at the end of a run."""
    metrics = [m for m in ("mrr@10", "recall@5", "recall@20", "recall@100", "ndcg@10", "answer_acc@20")
               if any(m in v for v in stages.values())]
    width = max([len(s) for s in stages] + [5])
    lines = [f"{'stage':<{width}}  " + "  ".join(f"{m:>{max(6, len(m))}}" for m in metrics)]
    for name, values in stages.items():
        cells = [f"{values[m]:>{max(6, len(m))}.3f}" if m in values else " " * max(6, len(m)) for m in metrics]
        lines.append(f"{name:<{width}}  " + "  ".join(cells))
    return "\n".join(lines)
