"""How to start and how long to train the cross-encoder (issue 20), chosen on held-out dev, side by side.

    python bench/cross_encoder_init.py --from RUN_DIR \\
        base:cross.epochs=1.2,cross.eval_every=20,cross.patience=0 \\
        md0:cross.epochs=1.2,cross.eval_every=20,cross.patience=0,cross.init=md0 \\
        head_lr:cross.epochs=1.2,cross.eval_every=20,cross.patience=0,cross.head_lr_scale=20
    python bench/cross_encoder_init.py --collect bench/results/cross_encoder_init   # table + plot only

Each variant runs step 2 (`mc`) alone on a copy of a finished run's M_D0 (same M_D0, same training and
calibration groups, same dev questions), with the `cpu` preset plus the variant's overrides, into
`--work/<variant>/`. Reported per variant: the held-out curve while training (calibration groups, M_D0's 7
hardest negatives), the step kept, and on the dev questions (M_D0's top `eval.rerank_top_k`) the cross-encoder
alone vs M_D0 (the check of `pipeline/checks.py`) and the cross-fitted rerank; test M_C only as a
by-product (never used to choose). Writes `bench/results/cross_encoder_init.json` and `.png`.
Variants run one after another (2 cores: never two at once); ~20 min each on squad-mini.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

ROOT = Path(__file__).resolve().parent.parent
REUSED = ("md0", "bm25_stats", "zero_shot", "config.json")  # what step 2 reads from the finished run


def run_variant(src: Path, work: Path, name: str, overrides: list[str], data: str) -> dict:
    from rocketqa_ray.config import load_config
    from rocketqa_ray.pipeline.context import Context
    from rocketqa_ray.pipeline.registry import stages
    from rocketqa_ray.ray_utils import ray_scope

    out = work / name
    out.mkdir(parents=True, exist_ok=True)
    for part in REUSED:
        s, t = src / part, out / part
        if s.exists() and not t.exists():
            (shutil.copytree if s.is_dir() else shutil.copy)(s, t)
    shutil.rmtree(out / "mc", ignore_errors=True)
    (out / "mc").mkdir()
    cfg = load_config("cpu", overrides=[f"data.path={data}", *overrides])
    t0 = time.time()
    with ray_scope():
        res = stages()["mc"].run(Context(cfg, out), cfg, out / "mc")
    summary = {"overrides": overrides, "seconds": round(time.time() - t0), "test_mc": res.metrics,
               **{k: res.stats.get(k) for k in ("trained_steps", "early_stopping", "check")},
               "dev": res.stats.get("rerank_check", {}).get("dev")}
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary


def collect(work: Path) -> dict:
    """Each variant's summary and held-out curve, from `work/<variant>/`."""
    out = {}
    for d in sorted(p for p in work.iterdir() if (p / "summary.json").exists()):
        s = json.loads((d / "summary.json").read_text())
        if "test" in s:  # the prototype of this script named it so
            s["test_mc"] = s.pop("test")
        val = d / "mc" / "train" / "validation.json"
        s["curve"] = [[h["step"], h["val_mrr@10"]] for h in json.loads(val.read_text())["history"]] \
            if val.exists() else []
        out[d.name] = s
    return out


def plot(results: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for name, r in results.items():
        if r["curve"]:
            steps, vals = zip(*r["curve"])
            dev = r.get("dev") or {}
            ax.plot(steps, vals, marker="o", ms=3,
                    label=f"{name}: dev CE alone {dev.get('ce_mrr@10', float('nan')):.3f} "
                          f"(M_D0 {dev.get('retriever_mrr@10', float('nan')):.3f})")
    ax.set_xlabel("training step (8 question groups per step)")
    ax.set_ylabel("calibration groups MRR@10 (1 + 7 negatives)")
    ax.set_title(f"cross-encoder while training, {title}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("variants", nargs="*", help="name:key=value,key=value (config overrides of the cpu preset)")
    ap.add_argument("--from", dest="src", help="a finished run (RUN_DIR) whose M_D0 every variant reuses")
    ap.add_argument("--data", default=str(ROOT / "data" / "squad-mini"), help="that run's dataset")
    ap.add_argument("--work", default="runs/cross_encoder_init", help="where the variants' runs go")
    ap.add_argument("--collect", help="only gather the finished variants under this folder into the results")
    ap.add_argument("--results", default="cross_encoder_init", help="name of the results files in bench/results/")
    ap.add_argument("--title", default="squad-mini (same M_D0)", help="what the plot's title says the data "
                    "and the M_D0 are")
    args = ap.parse_args()
    work = Path(args.collect or args.work)
    for v in args.variants:
        if not args.src:
            ap.error("--from RUN_DIR is needed to run variants")
        name, _, sets = v.partition(":")
        run_variant(Path(args.src), work, name, [s for s in sets.split(",") if s], args.data)
    results = collect(work)
    dest = ROOT / "bench" / "results"
    dest.mkdir(parents=True, exist_ok=True)
    (dest / f"{args.results}.json").write_text(json.dumps(results, indent=1))
    plot(results, dest / f"{args.results}.png", args.title)
    print(json.dumps({k: {"best_step": (r.get("early_stopping") or {}).get("best_step"),
                          "dev_ce": (r.get("dev") or {}).get("ce_mrr@10"),
                          "dev_rerank": (r.get("dev") or {}).get("rerank_mrr@10")} for k, r in results.items()},
                     indent=1))


if __name__ == "__main__":
    main()
