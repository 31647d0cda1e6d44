"""Does reranking a retriever's top-k help? The fusion fit for that retriever, and the answer measured on held-out
dev questions (Ray-free).

A cross-encoder trained for minutes can be weaker than the dense model it reranks, and a fusion fit on another
retriever's scores weighs this one's wrongly (a later dual encoder's scores are distributed differently). So each
rerank gets its own fusion, fit on question groups drawn from *its* retriever's top-k for held-out dev questions
(labelled, never trained on), and a verdict: the fused rerank against the retriever alone, by MRR@10 on the same
dev questions. The verdict must not be judged on the questions the fusion was fit on (an in-sample fit always
looks good), so it is cross-fitted: the dev questions are split into folds, each fold is scored by a fusion fit on
the others, and the out-of-fold scores are what is compared. The fusion kept is then fit on all of them.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import numpy as np

from rocketqa_ray.retrieval.fusion import Fusion, fit_fusion

FOLDS = 2
RERANK_CHECK = "rerank_check.json"  # a rerank stage's verdict and fusion, beside its other outputs


@dataclass
class CandidateTable:
    """One row per (question, candidate) of a retriever's top-k, in the retriever's order within a question."""

    qids: list[str]
    dense: np.ndarray  # the retriever's score
    ce: np.ndarray  # the calibrated cross-encoder probability
    labels: np.ndarray  # 1 for a labelled positive
    bm25: np.ndarray | None = None  # BM25 score, when the fusion weighs it

    def subset(self, rows: np.ndarray) -> CandidateTable:
        return CandidateTable([self.qids[i] for i in rows], self.dense[rows], self.ce[rows], self.labels[rows],
                              None if self.bm25 is None else self.bm25[rows])


@dataclass
class RerankCheck:
    """The fusion for one retriever and whether reranking its top-k beat it on held-out dev."""

    fusion: Fusion | None
    rerank: bool  # the verdict: the service's default and the stage's answer
    dev: dict = field(default_factory=dict)  # {questions, pairs, retriever_mrr@10, ce_mrr@10, rerank_mrr@10, ...}
    reason: str = ""

    def to_dict(self) -> dict:
        return {"fusion": self.fusion.to_dict() if self.fusion else None, "rerank": self.rerank, "dev": self.dev,
                "reason": self.reason}

    @classmethod
    def from_dict(cls, d: dict) -> RerankCheck:
        return cls(Fusion.from_dict(d.get("fusion")), bool(d["rerank"]), dict(d.get("dev", {})), d.get("reason", ""))


def reciprocal_ranks(qids: list[str], scores: np.ndarray, labels: np.ndarray, k: int = 10) -> dict[str, float]:
    """Per question, 1 / rank of its first positive when its candidates are ranked by `scores` (ties keep the
    given order), 0 beyond rank k or without a positive."""
    groups: dict[str, list[int]] = {}
    for i, q in enumerate(qids):
        groups.setdefault(q, []).append(i)
    out = {}
    for q, rows in groups.items():
        order = sorted(rows, key=lambda i: -float(scores[i]))  # stable: ties keep the retriever's order
        out[q] = next((1.0 / rank for rank, i in enumerate(order[:k], start=1) if labels[i] > 0.5), 0.0)
    return out


def mrr_at(qids: list[str], scores: np.ndarray, labels: np.ndarray, k: int = 10) -> float:
    """MRR@k of ranking each question's candidates by `scores`; a question with no positive among its candidates
    counts 0 for every ranking, as in the full-run metric."""
    rr = reciprocal_ranks(qids, scores, labels, k)
    return float(np.mean(list(rr.values()))) if rr else 0.0


def paired_se(qids: list[str], a: np.ndarray, b: np.ndarray, labels: np.ndarray, k: int = 10) -> float:
    """The standard error of MRR@k(a) - MRR@k(b) on the same questions (how much of a difference is noise)."""
    ra, rb = reciprocal_ranks(qids, a, labels, k), reciprocal_ranks(qids, b, labels, k)
    diff = np.array([ra[q] - rb[q] for q in ra])
    return float(diff.std(ddof=1) / np.sqrt(len(diff))) if len(diff) > 1 else 0.0


def top1(qids: list[str], scores: np.ndarray, labels: np.ndarray) -> float:
    """The fraction of questions whose best-scored candidate is a positive (ties keep the given order)."""
    return mrr_at(qids, scores, labels, k=1)


def folds_of(qids: list[str], folds: int, seed: int) -> dict[str, int]:
    """A deterministic fold per question."""
    order = sorted(set(qids))
    random.Random(seed).shuffle(order)
    return {q: i % folds for i, q in enumerate(order)}


def both_classes(labels: np.ndarray) -> bool:
    return bool((labels > 0.5).any() and (labels < 0.5).any())


def fit_for(t: CandidateTable, use_fusion: bool) -> Fusion | None:
    if not use_fusion:
        return None
    return fit_fusion(t.ce, t.dense, t.labels, t.bm25)


def rerank_scores(t: CandidateTable, fusion: Fusion | None) -> np.ndarray:
    return t.ce if fusion is None else fusion(t.ce, t.dense, t.bm25)


def check_rerank(t: CandidateTable, use_fusion: bool = True, folds: int = FOLDS, seed: int = 0,
                 retriever: str = "the retriever", min_gain: float = 0.0) -> RerankCheck:
    """Fit the fusion on `t` and decide, from out-of-fold dev MRR@10, whether reranking beats `retriever` alone
    (by more than `min_gain`).

    Without usable groups (no positive among the candidates, or only positives) there is nothing to fit or judge:
    the verdict is to rerank with the cross-encoder's fusion as it is (`fusion` None here; the caller keeps the
    previous one) and the reason says why.
    """
    n_q = len(set(t.qids))
    dev = {"questions": n_q, "pairs": len(t.qids),
           "questions_with_positive": len({q for q, y in zip(t.qids, t.labels) if y > 0.5})}
    if not both_classes(t.labels):
        return RerankCheck(None, True, dev, "no held-out dev question has a labelled positive among the candidates: "
                                            "the rerank is unchecked")
    fold = folds_of(t.qids, folds, seed)
    fold_of_row = np.array([fold[q] for q in t.qids])
    oof = np.zeros(len(t.qids))
    cross_fitted = use_fusion
    if use_fusion:
        for f in range(folds):
            held, fit_rows = np.where(fold_of_row == f)[0], np.where(fold_of_row != f)[0]
            if not both_classes(t.labels[fit_rows]):
                cross_fitted = False
                break
            oof[held] = rerank_scores(t.subset(held), fit_for(t.subset(fit_rows), True))
    fusion = fit_for(t, use_fusion)
    if not cross_fitted:
        oof = rerank_scores(t, fusion)  # too few positives to split: judged in-sample (flagged in the figures)
    dev.update({"retriever_mrr@10": round(mrr_at(t.qids, t.dense, t.labels), 4),
                "ce_mrr@10": round(mrr_at(t.qids, t.ce, t.labels), 4),
                "rerank_mrr@10": round(mrr_at(t.qids, oof, t.labels), 4),
                "retriever_top1": round(top1(t.qids, t.dense, t.labels), 4),
                "ce_top1": round(top1(t.qids, t.ce, t.labels), 4),
                "ce_minus_retriever_se": round(paired_se(t.qids, t.ce, t.dense, t.labels), 4),
                "rerank_scores": "fused (cross-fitted)" if cross_fitted else ("fused (in-sample)" if use_fusion
                                                                              else "cross-encoder")})
    better = dev["rerank_mrr@10"] > dev["retriever_mrr@10"] + min_gain
    verdict = "better than" if better else "not better than"
    if min_gain:
        verdict += f" (by more than {min_gain:g})"
    reason = (f"on {n_q} held-out dev questions the rerank's MRR@10 {dev['rerank_mrr@10']:.3f} is {verdict} "
              f"{retriever} alone ({dev['retriever_mrr@10']:.3f}; cross-encoder alone {dev['ce_mrr@10']:.3f})")
    return RerankCheck(fusion, better, dev, reason)
