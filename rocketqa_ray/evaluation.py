"""IR metrics (via ranx), answer accuracy, and TREC run files (Ray-free)."""

from __future__ import annotations

import re
import string
import unicodedata
from pathlib import Path

import numpy as np

from rocketqa_ray.errors import DataError
from rocketqa_ray.io import atomic_path

Run = dict[str, dict[str, float]]  # {qid: {pid: score}}
Qrels = dict[str, dict[str, int]]
METRICS = ("mrr@10", "recall@5", "recall@20", "recall@100", "ndcg@10")
_NO_PUNCT = str.maketrans("", "", string.punctuation)


def run_from_arrays(qids: list[str], pids: list[str] | np.ndarray, idx: np.ndarray, scores: np.ndarray) -> Run:
    """Top-k arrays ([Q, k] passage row indices, -1 = none, and scores) -> a run dict."""
    out: Run = {}
    for i, q in enumerate(qids):
        out[q] = {str(pids[j]): float(s) for j, s in zip(idx[i], scores[i]) if j >= 0}
    return out


def evaluate_run(run: Run, qrels: Qrels, metrics: tuple[str, ...] = METRICS) -> dict[str, float]:
    """Standard IR metrics over the queries of `qrels` (a query missing from the run scores 0)."""
    from ranx import Qrels as RQrels
    from ranx import Run as RRun
    from ranx import evaluate

    if not qrels:
        raise DataError("cannot evaluate: the qrels are empty")
    full = {q: run.get(q) or {"__none__": 0.0} for q in qrels}
    res = evaluate(RQrels(qrels), RRun(full), list(metrics), make_comparable=True)
    if isinstance(res, float):
        res = {metrics[0]: res}
    return {k: round(float(v), 4) for k, v in res.items()}


def normalize_answer(s: str) -> str:
    """SQuAD's answer normalisation: lower case, no punctuation, articles or extra spaces."""
    s = unicodedata.normalize("NFD", s).lower().translate(_NO_PUNCT)
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


def has_answer(text: str, answers: list[str]) -> bool:
    t = f" {normalize_answer(text)} "
    return any(f" {normalize_answer(a)} " in t for a in answers if normalize_answer(a))


def answer_accuracy(run: Run, answers: dict[str, list[str]], passage_text: dict[str, str], k: int = 20) -> float:
    """Fraction of questions with an answer string in one of their top-k passages (DPR's top-k accuracy)."""
    qids = [q for q in answers if answers[q]]
    if not qids:
        raise DataError("answer accuracy needs questions with answers")
    hits = 0
    for q in qids:
        top = sorted(run.get(q, {}).items(), key=lambda x: -x[1])[:k]
        hits += any(has_answer(passage_text[p], answers[q]) for p, _ in top)
    return round(hits / len(qids), 4)


def write_trec_run(run: Run, path: str | Path, tag: str = "rocketqa_ray") -> Path:
    """`qid Q0 pid rank score tag` lines, ranks from 1, atomically."""
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for q in sorted(run):
            for rank, (p, s) in enumerate(sorted(run[q].items(), key=lambda x: -x[1]), 1):
                f.write(f"{q} Q0 {p} {rank} {s:.6f} {tag}\n")
    return Path(path)


def read_trec_run(path: str | Path) -> Run:
    run: Run = {}
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            parts = line.split()
            if len(parts) != 6:
                raise DataError(f"{path}:{lineno}: a TREC run line needs 6 fields (qid Q0 pid rank score tag)")
            run.setdefault(parts[0], {})[parts[2]] = float(parts[4])
    return run


def full_report(run: Run, qrels: Qrels, answers: dict[str, list[str]] | None = None,
                passage_text: dict[str, str] | None = None, answer_k: int = 20) -> dict[str, float]:
    """The report's metric set: MRR@10, R@5/20/100, nDCG@10, and answer_acc@k where answers exist."""
    m = evaluate_run(run, qrels)
    if answers and passage_text is not None and all(answers.get(q) for q in qrels):
        m[f"answer_acc@{answer_k}"] = answer_accuracy(run, {q: answers[q] for q in qrels}, passage_text, answer_k)
    return m
