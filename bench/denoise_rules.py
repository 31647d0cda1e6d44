"""Which denoising rule removes the known false negatives (issue 21): every rule and setting on one run's scores.

    python bench/denoise_rules.py --run runs/medquad [--qrels qrels/train_expanded.tsv]

Reads step 3's scored candidates of a finished run (`md1/denoise_scores.parquet`: the scores denoising decided
on - the cross-encoder's probabilities, or their fusion with M_D0 and BM25 where the cross-encoder failed its
check - with each question's positive) and, when present, the cross-encoder's raw probabilities
(`md1/denoise_scores/`). Applies each rule of `mining.denoise` over a grid of its setting (`rocketqa.denoise`)
and counts, against the diagnostic qrels of known positives (never trained on): how many candidates it drops,
the recall of known false negatives among them, the precision lower bound, and the questions left without a
negative. No training: this chooses which rules are worth a held-out dev run of M_D1.
Prints JSON; writes bench/results/denoise_rules.json and .png.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

ROOT = Path(__file__).resolve().parent.parent
GRID = {
    "threshold": [0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 0.9],
    "relative": [0.5, 0.7, 0.8, 0.9, 0.95, 1.0],
    "margin": [-0.1, 0.0, 0.05, 0.1, 0.2, 0.3],
}


def load_used(run: Path) -> tuple[dict, dict[str, str], dict[str, list[str]]]:
    """(scores of the pairs, each question's positive, candidates per question) from the used file."""
    import pyarrow.parquet as pq

    rows = pq.read_table(run / "md1" / "denoise_scores.parquet").to_pylist()
    scores = {(r["qid"], r["pid"]): float(r["score"]) for r in rows}
    gold = {r["qid"]: r["pid"] for r in rows if r["positive"]}
    cands: dict[str, list[str]] = {}
    for r in rows:
        if not r["positive"]:
            cands.setdefault(r["qid"], []).append(r["pid"])
    return scores, gold, cands


def sweep(scores: dict, gold: dict[str, str], cands: dict[str, list[str]], known: dict) -> list[dict]:
    from rocketqa_ray.rocketqa.denoise import DenoiseRule, denoise
    from rocketqa_ray.rocketqa.diagnostics import removal_report

    top = max(map(len, cands.values()))
    positives = {q: scores[(q, p)] for q, p in gold.items()}
    out = []
    rules = [DenoiseRule("none")] + [DenoiseRule("threshold", threshold=v) for v in GRID["threshold"]]
    rules += [DenoiseRule("relative", relative=v) for v in GRID["relative"]]
    rules += [DenoiseRule("margin", margin=v) for v in GRID["margin"]]
    for rule in rules:
        res = denoise(cands, scores, rule, top, positives)
        rep = removal_report(cands, res.dropped, known)
        out.append({**rule.describe(), "dropped_frac": res.stats["dropped_frac"],
                    "questions_without_negatives": res.stats["questions_without_negatives"],
                    **{k: rep[k] for k in ("candidates", "known_false_negatives", "dropped",
                                           "known_false_negatives_dropped", "recall", "precision_lower_bound")}})
    return out


def plot(results: dict[str, list[dict]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(6 * len(results), 4.5), squeeze=False)
    for ax, (name, rows) in zip(axes[0], results.items()):
        for kind, marker in (("threshold", "o"), ("relative", "s"), ("margin", "^")):
            pts = [r for r in rows if r["rule"] == kind and r["recall"] is not None]
            ax.plot([r["dropped_frac"] for r in pts], [r["recall"] for r in pts], marker=marker, label=f"{kind} recall")
            ax.plot([r["dropped_frac"] for r in pts], [r["precision_lower_bound"] or 0 for r in pts], marker=marker,
                    linestyle=":", label=f"{kind} precision (lower bound)")
            for r in pts:
                ax.annotate(f"{r['rule_value']:g}", (r["dropped_frac"], r["recall"]), fontsize=7)
        ax.set_xlabel("share of candidates dropped")
        ax.set_ylabel("known false negatives: recall / precision")
        ax.set_title(f"denoising rules on {name} scores")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", required=True, help="a finished run directory with md1")
    ap.add_argument("--qrels", default=None, help="diagnostic qrels (default: the run's data.diagnostic_qrels)")
    ap.add_argument("--name", default="denoise_rules", help="bench/results/<name>.json and .png")
    a = ap.parse_args()

    from rocketqa_ray.batch.pair_flow import read_pair_scores
    from rocketqa_ray.data.beir import load_qrels
    from rocketqa_ray.io import read_json, write_json
    from rocketqa_ray.pipeline.runner import COMPLETE
    from rocketqa_ray.rocketqa.diagnostics import resolve_diagnostic_qrels

    run = Path(a.run)
    cfg = read_json(run / "config.json")
    qrels = a.qrels or cfg["data"].get("diagnostic_qrels")
    if not qrels:
        sys.exit(f"{run}: the run has no data.diagnostic_qrels; give --qrels")
    known = load_qrels(resolve_diagnostic_qrels(qrels, cfg["data"]["path"]))
    scores, gold, cands = load_used(run)
    marker = run / "md1" / COMPLETE
    md1 = read_json(marker).get("stats", {}) if marker.exists() else {}
    used = "fused" if str(md1.get("denoise_scores", "")).startswith("fused") else "cross-encoder"
    results = {used: sweep(scores, gold, cands, known)}
    raw_dir = run / "md1" / "denoise_scores"
    if used == "fused" and raw_dir.exists():  # the fallback's fusion vs the cross-encoder alone, same candidates
        results["cross-encoder"] = sweep(read_pair_scores(raw_dir), gold, cands, known)
    out = {"run": str(run), "used_scores": used, "questions": len(cands), "results": results,
           "configured_rule": md1.get("rule"), "configured_value": md1.get("rule_value")}
    res_dir = ROOT / "bench" / "results"
    write_json(res_dir / f"{a.name}.json", out)
    plot(results, res_dir / f"{a.name}.png")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
