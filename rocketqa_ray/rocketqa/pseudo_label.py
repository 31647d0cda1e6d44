"""Pseudo-labelling unlabelled questions with the cross-encoder (RocketQA step 4; Ray-free).

One question is labelled from its own candidates and scores alone (`label_question`), and what it adds to the
stage's stats comes back as counts that add up over questions (summed into the stats by `pseudo_stats`): so the same rule
can label a bounded set in one process (`pseudo_label`) or each question group of a Ray Data flow, with the same
labels and stats.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from rocketqa_ray.types import PairScores, Qrels, RankedIds


@dataclass
class PseudoLabels:
    positives: dict[str, str]  # qid -> pid
    negatives: dict[str, list[str]]  # qid -> pids (only for questions with a positive)
    stats: dict = field(default_factory=dict)


@dataclass
class QuestionLabel:
    positive: str | None  # None: no candidate was confident enough
    negatives: list[str]
    counts: dict[str, int]


def label_question(candidates: Sequence[str], scores: dict[str, float], pos_threshold: float,
                   neg_threshold: float, hidden: Iterable[str] | None = None) -> QuestionLabel:
    """The best-scored candidate is the question's positive when its score exceeds `pos_threshold`; then the
    candidates scored below `neg_threshold` are its negatives. `hidden`: the question's held-back labels, when it
    has them (diagnostic: precision of the positive, and whether a label was among the candidates at all).
    Counts: questions, labelled, negatives; with `hidden` also judged, correct, gold_in_candidates."""
    counts = {"questions": 1, "labelled": 0, "negatives": 0}
    positive, negatives = None, []
    if candidates:
        best = max(candidates, key=lambda p: scores[p])
        if scores[best] > pos_threshold:
            positive = best
            negatives = [p for p in candidates if p != best and scores[p] < neg_threshold]
            counts.update(labelled=1, negatives=len(negatives))
    if hidden is not None:
        gold = set(hidden)
        judged = positive is not None
        counts.update(judged=int(judged), correct=int(judged and positive in gold),
                      gold_in_candidates=int(bool(gold & set(candidates))))
    return QuestionLabel(positive, negatives, counts)


def pseudo_stats(total: dict[str, float], pos_threshold: float, neg_threshold: float, with_hidden: bool) -> dict:
    """The stage's pseudo-label stats from its questions' summed counts."""
    n, labelled = total.get("questions", 0), total.get("labelled", 0)
    stats: dict = {
        "questions": int(n),
        "labelled": int(labelled),
        "coverage": round(labelled / max(1, n), 4),
        "negatives_per_question": round(total.get("negatives", 0) / max(1, labelled), 2),
        "pos_threshold": pos_threshold,
        "neg_threshold": neg_threshold,
    }
    if with_hidden:
        judged = total.get("judged", 0)
        stats["precision"] = round(total.get("correct", 0) / judged, 4) if judged else None
        # what a perfect labeller could have reached: a label among the candidates at all
        stats["gold_in_candidates"] = round(total.get("gold_in_candidates", 0) / max(1, n), 4)
    return stats


def pseudo_label(candidates: RankedIds, scores: PairScores, pos_threshold: float, neg_threshold: float,
                 hidden_gold: Qrels | None = None) -> PseudoLabels:
    """Label every question of `candidates` (`label_question`); questions with no confident positive are left out.
    With `hidden_gold`, the positives' precision is measured against it."""
    positives: dict[str, str] = {}
    negatives: dict[str, list[str]] = {}
    total: Counter = Counter()
    for q, ps in candidates.items():
        hidden = hidden_gold.get(q) if hidden_gold is not None else None
        res = label_question(ps, {p: scores[(q, p)] for p in ps}, pos_threshold, neg_threshold, hidden)
        if res.positive is not None:
            positives[q], negatives[q] = res.positive, res.negatives
        total.update(res.counts)
    return PseudoLabels(positives, negatives, pseudo_stats(total, pos_threshold, neg_threshold,
                                                           hidden_gold is not None))
