"""Hard negatives, cross-encoder denoising (RocketQA step 3) and pseudo-labels (step 4); Ray-free.

Inputs are plain dicts: `ranked[qid]` is a dual encoder's ranking as a list of passage ids, best first;
`scores[(qid, pid)]` is the cross-encoder's probability that `pid` answers `qid`.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field

Ranked = dict[str, list[str]]
Scores = dict[tuple[str, str], float]


def exclude_gold(ranked: Ranked, qrels: dict[str, dict[str, int]], top_k: int) -> Ranked:
    """Top-k candidates per question with its labelled positives removed (the raw, undenoised hard negatives)."""
    return {q: [p for p in ps if p not in qrels.get(q, {})][:top_k] for q, ps in ranked.items()}


def sample_negatives(candidates: Ranked, n: int, seed: int = 0) -> dict[str, list[str]]:
    """n negatives per question drawn uniformly from its candidates (fewer if it has fewer)."""
    rng = random.Random(seed)
    return {q: rng.sample(ps, min(n, len(ps))) for q, ps in sorted(candidates.items())}


@dataclass
class DenoiseResult:
    kept: Ranked
    dropped: Ranked
    stats: dict = field(default_factory=dict)


def denoise(candidates: Ranked, scores: Scores, threshold: float, top: int) -> DenoiseResult:
    """Keep a mined negative only if the cross-encoder is confident it is not a positive (score < threshold).

    Only the top `top` candidates are scored (the paper scores the top 50); the rest are not used, since an
    unscored candidate could be an unlabelled positive just as well.
    """
    kept: Ranked = {}
    dropped: Ranked = {}
    for q, ps in candidates.items():
        head = ps[:top]
        missing = [p for p in head if (q, p) not in scores]
        if missing:
            raise KeyError(f"no cross-encoder score for question {q!r}, passage {missing[0]!r}")
        kept[q] = [p for p in head if scores[(q, p)] < threshold]
        dropped[q] = [p for p in head if scores[(q, p)] >= threshold]
    n_kept = sum(map(len, kept.values()))
    n_dropped = sum(map(len, dropped.values()))
    stats = {
        "questions": len(candidates),
        "scored": n_kept + n_dropped,
        "kept": n_kept,
        "dropped": n_dropped,
        "dropped_frac": round(n_dropped / max(1, n_kept + n_dropped), 4),
        "questions_without_negatives": sum(1 for v in kept.values() if not v),
        "threshold": threshold,
        "top": top,
    }
    return DenoiseResult(kept, dropped, stats)


def answer_rates(result: DenoiseResult, answers: dict[str, list[str]], has_answer: Callable[[str, list[str]], bool],
                 passage_text: Callable[[str], str]) -> dict:
    """How often dropped vs kept negatives contain an answer string: do we drop false negatives?"""
    out = {}
    for name, part in (("dropped", result.dropped), ("kept", result.kept)):
        n = hits = 0
        for q, ps in part.items():
            if not answers.get(q):
                continue
            for p in ps:
                n += 1
                hits += has_answer(passage_text(p), answers[q])
        out[f"{name}_with_answer"] = round(hits / n, 4) if n else None
        out[f"{name}_checked"] = n
    return out


@dataclass
class PseudoLabels:
    positives: dict[str, str]  # qid -> pid
    negatives: dict[str, list[str]]  # qid -> pids (only for questions with a positive)
    stats: dict = field(default_factory=dict)


def pseudo_label(candidates: Ranked, scores: Scores, pos_threshold: float, neg_threshold: float,
                 hidden_gold: dict[str, dict[str, int]] | None = None) -> PseudoLabels:
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


def fuse_scores(ranked: dict[str, list[tuple[str, float]]], scores: Scores, fusion,
                bm25: Scores | None = None) -> Scores:
    """Cross-encoder probabilities fused with the retriever scores in `ranked` (and the `bm25` pair scores when
    the fusion weighs them; `calibration.Fusion`), for the pairs of `scores`."""
    import numpy as np

    dense = {(q, p): s for q, items in ranked.items() for p, s in items}
    keys = [k for k in scores if k in dense]
    lexical = np.array([bm25[k] for k in keys]) if fusion.uses_bm25 and bm25 is not None else None
    fused = fusion(np.array([scores[k] for k in keys]), np.array([dense[k] for k in keys]), lexical)
    return {k: float(v) for k, v in zip(keys, fused)}


def rerank(ranked: dict[str, list[tuple[str, float]]], scores: Scores, top: int) -> dict[str, dict[str, float]]:
    """Re-order each question's top `top` by cross-encoder score; the tail keeps the dual encoder's order below.

    Returned as a run {qid: {pid: score}} whose scores sort in the new order (head: 1 + CE probability, tail:
    decreasing values below 1), so recall@100 is unchanged while the head is reranked.
    """
    run: dict[str, dict[str, float]] = {}
    for q, items in ranked.items():
        head = [p for p, _ in items[:top]]
        tail = [p for p, _ in items[top:]]
        order = sorted(head, key=lambda p: -scores[(q, p)])
        r = {p: 1.0 + scores[(q, p)] for p in order}
        n = len(tail)
        for i, p in enumerate(tail):
            r[p] = (n - i) / (n + 1)  # in (0, 1), decreasing
        run[q] = r
    return run
