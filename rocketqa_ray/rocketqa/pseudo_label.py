"""Pseudo-labelling unlabelled questions with the cross-encoder (RocketQA step 4; Ray-free)."""

from __future__ import annotations

from dataclasses import dataclass, field

from rocketqa_ray.types import PairScores, Qrels, RankedIds


@dataclass
class PseudoLabels:
    positives: dict[str, str]  # qid -> pid
    negatives: dict[str, list[str]]  # qid -> pids (only for questions with a positive)
    stats: dict = field(default_factory=dict)


def pseudo_label(candidates: RankedIds, scores: PairScores, pos_threshold: float, neg_threshold: float,
                 hidden_gold: Qrels | None = None) -> PseudoLabels:
    """Label unlabelled questions with the cross-encoder: the best-scored candidate is a positive when its score
    exceeds `pos_threshold`; candidates below `neg_threshold` become its negatives. Questions with no confident
    positive are left out. With `hidden_gold`, precision of the pseudo-positives is measured against it.
    """
    positives: dict[str, str] = {}
    negatives: dict[str, list[str]] = {}
    for q, ps in candidates.items():
        if not ps:
            continue
        best = max(ps, key=lambda p: scores[(q, p)])
        if scores[(q, best)] > pos_threshold:
            positives[q] = best
            negatives[q] = [p for p in ps if p != best and scores[(q, p)] < neg_threshold]
    stats: dict = {
        "questions": len(candidates),
        "labelled": len(positives),
        "coverage": round(len(positives) / max(1, len(candidates)), 4),
        "negatives_per_question": round(sum(map(len, negatives.values())) / max(1, len(negatives)), 2),
        "pos_threshold": pos_threshold,
        "neg_threshold": neg_threshold,
    }
    if hidden_gold is not None:
        judged = [q for q in positives if q in hidden_gold]
        correct = sum(1 for q in judged if positives[q] in hidden_gold[q])
        stats["precision"] = round(correct / len(judged), 4) if judged else None
        # what a perfect labeller could have reached: gold inside the candidates at all
        stats["gold_in_candidates"] = round(
            sum(1 for q, ps in candidates.items() if set(ps) & set(hidden_gold.get(q, {}))) / max(1, len(candidates)), 4)
    return PseudoLabels(positives, negatives, stats)
