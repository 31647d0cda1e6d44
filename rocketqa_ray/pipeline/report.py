"""The human report: a Markdown table of stages x metrics and a PNG plot (matplotlib)."""

from __future__ import annotations

from pathlib import Path

from rocketqa_ray.io import atomic_path, write_text

METRIC_ORDER = ("mrr@10", "recall@5", "recall@20", "recall@100", "ndcg@10", "answer_acc@20")
# stats shown in their own sections (or plot), not in a stage's statistics table
OWN_SECTION = ("rerank_check", "check", "validation_curve", "false_negatives", "pseudo_known_positives")
CURVES_PLOT = "training.png"


def _metrics_present(stages: dict[str, dict]) -> list[str]:
    seen = {m for v in stages.values() for m in v}
    return [m for m in METRIC_ORDER if m in seen]


def plot(stages: dict[str, dict], path: str | Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    metrics = _metrics_present(stages)
    names = list(stages)
    fig, ax = plt.subplots(figsize=(max(8, 1.3 * len(names) + 2), 4.8))
    width = 0.8 / max(1, len(metrics))
    x = np.arange(len(names))
    for i, m in enumerate(metrics):
        vals = [stages[s].get(m, np.nan) for s in names]
        ax.bar(x + i * width - 0.4 + width / 2, vals, width, label=m)
    ax.set_xticks(x, names, rotation=20)
    lo = min((v for s in stages.values() for v in s.values() if isinstance(v, (int, float))), default=0.0)
    ax.set_ylim(max(0.0, lo - 0.1), 1.0)
    ax.set_ylabel("test split")
    ax.set_title("rocketqa-ray: retrieval quality per stage")
    ax.legend(ncol=min(6, len(metrics)), fontsize=8, loc="lower right")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return Path(path)


def plot_curves(stats: dict[str, dict], path: str | Path) -> Path | None:
    """Held-out MRR@10 against training step for each stage that validated while training (None if none did)."""
    curves = {name: st["validation_curve"] for name, st in stats.items() if st.get("validation_curve")}
    if not curves:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for name, curve in curves.items():
        steps, vals = zip(*curve)
        line, = ax.plot(steps, vals, marker="o", ms=3, label=name)
        best = stats[name].get("early_stopping", {}).get("best_step")
        if best is not None and best in steps:
            ax.plot([best], [vals[steps.index(best)]], marker="*", ms=12, color=line.get_color())
    ax.set_xlabel("training step")
    ax.set_ylabel("held-out groups MRR@10")
    ax.set_title("validation while training (star: the step kept)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return Path(path)


def training_section(stats: dict[str, dict]) -> list[str]:
    """How long each model trained, and with early stopping which step was kept and why."""
    rows = [(name, st) for name, st in stats.items() if "trained_steps" in st]
    if not rows:
        return []
    out = ["## Training", ""]
    for name, st in rows:
        es = st.get("early_stopping")
        line = f"- {name}: {st['trained_steps']} steps"
        if es:
            how = "stopped early (patience)" if es.get("stopped_early") else "ran to its last step"
            line += (f", {how}; the model kept is step {es['best_step']}'s (held-out groups MRR@10 "
                     f"{es['best_val_mrr@10']:.3f}, best of {es['evaluations']} evaluations)")
        out.append(line + ".")
    if any(st.get("validation_curve") for _, st in rows):
        out += ["", f"![held-out MRR@10 while training]({CURVES_PLOT})"]
    return [*out, ""]


def markdown(report: dict, plot_name: str = "report.png") -> str:
    from rocketqa_ray.pipeline.registry import stages as registered

    registry = registered()
    stages = report["stages"]
    metrics = _metrics_present(stages)
    lines = ["# rocketqa-ray report", "", f"Data: `{report.get('data', '')}`, preset: `{report.get('preset', '')}`. "
             "Test split only.", "", f"![metrics per stage]({plot_name})", ""]
    stats = report.get("stats", {})
    heldout = any("heldout_mrr@10" in st for st in stats.values())
    head = "| stage | " + " | ".join(metrics) + (" | held-out dev mrr@10 |" if heldout else " |") + \
        " paper MS MARCO MRR@10 | time (s) |"
    lines += [head, "|" + "---|" * (len(metrics) + 3 + heldout)]
    for s, m in stages.items():
        cells = [f"{m[k]:.3f}" if k in m else "" for k in metrics]
        if heldout:
            dev = stats.get(s, {}).get("heldout_mrr@10")
            cells.append(f"{dev:.3f}" if dev is not None else "")
        st_def = registry.get(s)
        paper = st_def.paper_mrr10 if st_def else None
        secs = report.get("timings_s", {}).get(s)
        label = st_def.label if st_def else s
        if s == "bm25" and stats.get(s, {}).get("stemmed"):
            label = label.replace("BM25", "BM25, stemmed")
        if st_def and "denoised" in st_def.label and s in stats and "rule" not in stats[s]:  # nothing was judged
            label = label.replace("denoised ", "") + " (not denoised)"
        if stats.get(s, {}).get("rerank_choice") == "retriever":
            label += f" (not reranked: no better than {stats[s].get('retriever', 'the retriever')} on held-out dev)"
        elif stats.get(s, {}).get("scores") == "fused":
            bm25 = "bm25" in stats[s].get("fusion_features", "")
            label += " (CE fused with the dense" + (" and BM25 scores)" if bm25 else " score)")
        lines.append(f"| {label} | " + " | ".join(cells)
                     + f" | {paper if paper is not None else ''} | {secs if secs is not None else ''} |")
    lines += ["", "The paper's figures are MS MARCO dev MRR@10 (x100), shown for the expected ordering only.",
              "Held-out dev: training questions held out with their labels (`data.dev_fraction`), which no stage "
              "trains on (without a dev split: step 4's unlabelled questions, for the stages before step 4). Choose "
              "settings with it, not with the test split.", ""]
    lines += (checks_section(stats) + training_section(stats) + false_negative_section(stats)
              + budget_line(report.get("budget", {})))
    for name, st in stats.items():
        if not st:
            continue
        lines += [f"## {name}", ""]
        if "rerank_check" in st:
            lines += rerank_section(st)
        lines += ["| statistic | value |", "|---|---|"]
        lines += [f"| {k} | {v} |" for k, v in st.items() if k not in OWN_SECTION]
        lines.append("")
    return "\n".join(lines)


def checks_section(stats: dict[str, dict]) -> list[str]:
    """Each trained model against what it should improve on, on held-out questions (`pipeline.checks`)."""
    checks = [(name, st["check"]) for name, st in stats.items() if st.get("check")]
    if not checks:
        return []
    out = ["## Checks (held-out questions)", ""]
    for name, c in checks:
        mark = "passed" if c["passed"] else "**FAILED**"
        fallback = f" The run went on: {c['fallback']}." if c.get("fallback") else ""
        out.append(f"- {name}: {c['name']}: {mark}: {c['message']}.{fallback}")
    return [*out, ""]


def false_negative_section(stats: dict[str, dict]) -> list[str]:
    """Denoising and pseudo-labels against the known positives of `data.diagnostic_qrels` (diagnostic only)."""
    rows = [(name, src, r) for name, st in stats.items() for src, r in st.get("false_negatives", {}).items()]
    pseudo = [(name, st["pseudo_known_positives"]) for name, st in stats.items() if st.get("pseudo_known_positives")]
    if not rows and not pseudo:
        return []

    def f(v: float | None) -> str:
        return "-" if v is None else f"{v:.3f}"

    out = ["## False negatives (known positives of `data.diagnostic_qrels`, never trained on)", ""]
    if rows:
        out += ["A mined negative listed as a known positive is a known false negative. Recall: the share of them the "
                "cross-encoder dropped. Precision: the share of drops that are known false negatives, a lower bound "
                "(the list is incomplete).", "",
                "| stage | candidates from | candidates | known false negatives | dropped | known FN dropped | "
                "recall | precision (lower bound) | known FN trained on as negatives |",
                "|---|---|---|---|---|---|---|---|---|"]
        for name, src, r in rows:
            out.append(f"| {name} | {src} | {r['candidates']} | {r['known_false_negatives']} "
                       f"({f(r['known_false_negative_share'])}) | {r['dropped']} | {r['known_false_negatives_dropped']} | "
                       f"{f(r['recall'])} | {f(r['precision_lower_bound'])} | {r['known_false_negatives_kept']} |")
        out.append("")
    for name, r in pseudo:
        out += [f"Pseudo-labels ({name}): {r['judged']} positives judged; precision {f(r['precision_vs_labels'])} against "
                f"the hidden labels, {f(r['precision_vs_labels_and_known'])} against labels + known positives "
                f"({r['known_unlabelled_positives_found']} were known unlabelled positives).", ""]
    return out


def budget_line(b: dict) -> list[str]:
    if "budget_minutes" not in b:
        return []
    over = b.get("over_minutes", 0)
    how = f"**{over:g} min over** it" if over > 0 else "within it"
    return [f"Time: the stages took {b['minutes']:g} min; this preset is sized for {b['budget_minutes']:g} min: {how}.",
            ""]


def rerank_section(st: dict) -> list[str]:
    """A rerank stage's three candidates for the answer - its retriever alone, the cross-encoder alone, the fused
    rerank - on held-out dev and on test, and which one the stage (and the service, by default) answers with."""
    dev, test = st["rerank_check"].get("dev", {}), st["rerank_check"].get("test", {})
    retriever = st.get("retriever", "retriever")

    def cell(v: float | None) -> str:
        return f"{v:.3f}" if isinstance(v, (int, float)) else "-"

    rows = [(f"{retriever} alone", "retriever_mrr@10", "retriever"), ("cross-encoder alone", "ce_mrr@10", "cross_encoder"),
            ("rerank (cross-encoder fused with the retriever" + (" and BM25)" if "bm25" in st.get("fusion_features", "")
                                                                  else ")") if st.get("scores") == "fused"
             else "rerank (cross-encoder)", "rerank_mrr@10", "rerank")]
    n = dev.get("questions")
    out = [f"Answer: **{'the rerank' if st.get('rerank_choice') == 'rerank' else retriever + ' alone'}**, because "
           f"{st.get('rerank_reason', '')}.", "",
           f"| ranking | held-out dev MRR@10{f' ({n} questions)' if n else ''} | test MRR@10 | test R@5 |",
           "|---|---|---|---|"]
    for label, dev_key, test_key in rows:
        t = test.get(test_key, {})
        out.append(f"| {label} | {cell(dev.get(dev_key))} | {cell(t.get('mrr@10'))} | {cell(t.get('recall@5'))} |")
    if "cross-fitted" in dev.get("rerank_scores", ""):
        out += ["", "The rerank's dev figure is cross-fitted: each half of the dev questions is reranked by a fusion fit "
                "on the other half; the fusion kept is fit on all of them."]
    return [*out, ""]


def write_reports(report: dict, run_dir: str | Path) -> None:
    run_dir = Path(run_dir)
    if report["stages"]:
        plot(report["stages"], run_dir / "report.png")
    plot_curves(report.get("stats", {}), run_dir / CURVES_PLOT)
    write_text(run_dir / "report.md", markdown(report))
