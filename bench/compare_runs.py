"""One comparison table for a data set (issue 21): a run's stages, variants of it, and the sentence-transformers
peer, side by side, with the standard error of each paired difference on the test split.

    python bench/compare_runs.py --run runs/medquad [--variant distill_kl=runs/medquad-kl] \\
        [--peer-python /path/to/venv/bin/python | --peer-json hard=peer-hard.json --peer-json inbatch=...] \\
        [--name medquad_comparison]
    python bench/compare_runs.py --from-json bench/results/medquad_comparison.json --peer-json hard=... \
        --name medquad_comparison      # adds (or replaces) the peer's rows in a saved comparison

- Stages: test MRR@10 / R@5 / nDCG@10 from each run's report.json, held-out dev MRR@10 where the stage has one.
- Paired differences: per-question reciprocal ranks from the stages' `test.trec` against the test qrels (ranx);
  the standard error of the mean difference says whether a gap exceeds the test split's noise (done-when: md1
  beats md1_undenoised and md0 by more than one).
- The peer: `../shared/peers/st_recipe.py` on the same data set, in-batch and `--hard`, run here with
  `--peer-python` (a venv with sentence-transformers; ~30-60 min each on 2 cores), or its saved JSON lines.
Prints JSON; writes bench/results/<name>.json and .png.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

ROOT = Path(__file__).resolve().parent.parent
PEER = ROOT.parent / "shared" / "peers" / "st_recipe.py"
PAIRS = [("md1", "md1_undenoised"), ("md1", "md0"), ("md2", "md1"), ("md2_rerank", "md2"), ("md2_rerank", "bm25")]


def reciprocal_ranks(trec: Path, qrels: dict) -> dict[str, float]:
    from ranx import Qrels, Run, evaluate

    from rocketqa_ray.evaluation import read_trec_run

    run = read_trec_run(trec)
    qids = sorted(qrels)
    run = {q: run.get(q) or {"__none__": 0.0} for q in qids}
    values = evaluate(Qrels({q: qrels[q] for q in qids}), Run(run), "mrr@10", return_mean=False)
    return dict(zip(qids, (float(v) for v in values)))


def stage_rows(name: str, run: Path, qrels: dict) -> tuple[list[dict], dict[str, dict[str, float]]]:
    from rocketqa_ray.io import read_json

    report = read_json(run / "report.json")
    rows, rr = [], {}
    for stage, m in report["stages"].items():
        dev = report.get("stats", {}).get(stage, {}).get("heldout_mrr@10")
        label = stage if name == "run" else f"{stage} [{name}]"
        rows.append({"name": label, "stage": stage, "source": name, "mrr@10": m.get("mrr@10"),
                     "recall@5": m.get("recall@5"), "ndcg@10": m.get("ndcg@10"), "dev_mrr@10": dev,
                     "seconds": report.get("timings_s", {}).get(stage)})
        if (run / stage / "test.trec").exists():
            rr[label] = reciprocal_ranks(run / stage / "test.trec", qrels)
    return rows, rr


def paired(rr: dict[str, dict[str, float]], a: str, b: str) -> dict | None:
    """a - b per test question: the mean, its standard error, `z` (mean / SE: negative when a is worse) and
    whether a is *better* than b by more than one / two SE (one-sided, as the issue's goals read)."""
    if a not in rr or b not in rr:
        return None
    qids = sorted(set(rr[a]) & set(rr[b]))
    d = np.array([rr[a][q] - rr[b][q] for q in qids])
    se = float(d.std(ddof=1) / np.sqrt(len(d)))
    return {"a": a, "b": b, "questions": len(qids), "difference": round(float(d.mean()), 4), "se": round(se, 4),
            "z": round(float(d.mean()) / se, 2) if se > 0 else None, "beyond_one_se": bool(d.mean() > se), "beyond_two_se": bool(d.mean() > 2 * se)}


def run_peer(python: str, data: str, hard: bool) -> dict:
    cmd = [python, str(PEER), data] + (["--hard"] if hard else [])
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(6, 0.6 * len(rows)), 4.5))
    colours = ["tab:gray" if r["source"] == "peer" else "tab:blue" if r["source"] == "run" else "tab:orange"
               for r in rows]
    ax.bar(range(len(rows)), [r["mrr@10"] or 0 for r in rows], color=colours,
           yerr=[r.get("se") or 0 for r in rows], capsize=3)
    ax.set_xticks(range(len(rows)), [r["name"] for r in rows], rotation=45, ha="right", fontsize=8)
    ax.set_ylabel("test MRR@10 (bar: one standard error)")
    lo = min(r["mrr@10"] for r in rows if r["mrr@10"] is not None)
    ax.set_ylim(max(0, lo - 0.1), 1.0)
    ax.set_title(title)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--run", help="a finished run directory")
    src.add_argument("--from-json", help="a saved comparison (bench/results/<name>.json): keep its stages and "
                     "paired differences, (re)place the peer rows; for when the runs are gone or a peer came later")
    ap.add_argument("--variant", action="append", default=[], metavar="NAME=RUN_DIR",
                    help="another run of the same data (e.g. with distillation); its stages join the table")
    ap.add_argument("--peer-python", default=None, help="a Python with sentence-transformers: run the peer here")
    ap.add_argument("--peer-json", action="append", default=[], metavar="NAME=FILE",
                    help="a saved st_recipe JSON line instead of running it")
    ap.add_argument("--name", default="comparison", help="bench/results/<name>.json and .png")
    a = ap.parse_args()

    from rocketqa_ray.data.beir import load_qrels
    from rocketqa_ray.io import read_json, write_json

    saved = read_json(Path(a.from_json)) if a.from_json else None
    run = Path(saved["run"] if saved else a.run)
    data = saved["data"] if saved else read_json(run / "config.json")["data"]["path"]
    qrels = load_qrels(Path(data) / "qrels" / "test.tsv")
    if saved:
        rows, rr = [r for r in saved["rows"] if r["source"] != "peer"], {}
    else:
        rows, rr = stage_rows("run", run, qrels)
    for spec in a.variant:
        name, path = spec.split("=", 1)
        more, more_rr = stage_rows(name, Path(path), qrels)
        more = [r for r in more if r["stage"] in ("md1", "md2", "md2_rerank")]  # what a variant changes
        rows += more
        rr.update({r["name"]: more_rr[r["name"]] for r in more if r["name"] in more_rr})
    for label, values in rr.items():
        row = next(r for r in rows if r["name"] == label)
        row["se"] = round(float(np.std(list(values.values()), ddof=1) / np.sqrt(len(values))), 4)
    peers = {}
    for spec in a.peer_json:
        name, path = spec.split("=", 1)
        peers[name] = json.loads(Path(path).read_text().strip().splitlines()[-1])
    if a.peer_python:
        for name, hard in (("inbatch", False), ("hard", True)):
            peers.setdefault(name, run_peer(a.peer_python, data, hard))
    for name, p in peers.items():
        rows.append({"name": f"peer st_recipe {name}", "stage": None, "source": "peer", "mrr@10": p.get("mrr@10"),
                     "recall@5": p.get("recall@5"), "ndcg@10": p.get("ndcg@10"), "dev_mrr@10": None,
                     "seconds": p.get("train_s"), "recipe": p.get("recipe")})
    pairs = saved["paired"] if saved else [p for p in (paired(rr, x, y) for x, y in PAIRS) if p]
    for spec in a.variant:
        name = spec.split("=", 1)[0]
        pairs += [p for p in (paired(rr, f"{s} [{name}]", s) for s in ("md1", "md2", "md2_rerank")) if p]
    best_peer = max((r["mrr@10"] for r in rows if r["source"] == "peer"), default=None)
    final = next((r["mrr@10"] for r in rows if r["name"] == "md2_rerank"), None)
    out = {"run": str(run), "data": data, "test_questions": len(qrels), "rows": rows, "paired": pairs,
           "best_peer_mrr@10": best_peer,
           "md2_rerank_minus_best_peer": None if best_peer is None or final is None else round(final - best_peer, 4)}
    res = ROOT / "bench" / "results"
    write_json(res / f"{a.name}.json", out)
    plot(rows, res / f"{a.name}.png", f"{Path(data).name}: test MRR@10, {len(qrels)} questions")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
