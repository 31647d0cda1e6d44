"""The reranker's score: the calibrated cross-encoder fused with the retriever's score and BM25 (Ray-free).

`Fusion` is a logistic regression over (logit of the calibrated cross-encoder probability, the dense score
and, with `cross.fusion_bm25`, the BM25 score), fit on held-out question groups (step 2). A small
cross-encoder trained for minutes knows things the dual encoder does not and vice versa, and term overlap is a
third view; the fused probability ranks better than any one of them (measured in the README) and is still a
probability, so the denoising and pseudo-label thresholds apply to it. It is stored in the cross-encoder's
folder (`load_fusion`), and this module is the one place it is fit, loaded and applied - by the pipeline's
rerank and pseudo-label steps and by the service.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from rocketqa_ray.errors import DataError
from rocketqa_ray.types import PairScores, RankedHits, Run

# A whisper of L2 on the standardised weights: it leaves a fit on overlapping classes where it is, and keeps the
# weights finite when one feature separates the held-out pairs perfectly (BM25 on a few questions can).
L2 = 1e-6


def fit_logistic(features: np.ndarray, labels: np.ndarray, steps: int = 200) -> tuple[np.ndarray, float]:
    """(w [k], b) minimising the binary cross-entropy of sigmoid(features @ w + b) against `labels` [N].

    features [N, k]; labels in {0, 1}; needs both classes. The fit runs on standardised features (a barely
    trained cross-encoder's logits can differ by 1e-5, where L-BFGS on raw values stops at its starting point)
    and is mapped back; L-BFGS on k + 1 parameters converges in a few iterations.
    """
    x = torch.as_tensor(np.asarray(features, dtype=np.float64))
    y = torch.as_tensor(np.asarray(labels, dtype=np.float64))
    if x.dim() != 2 or y.dim() != 1 or x.shape[0] != y.shape[0]:
        raise ValueError(f"expected features [N, k] and labels [N], got {tuple(x.shape)} and {tuple(y.shape)}")
    if not (bool((y > 0.5).any()) and bool((y < 0.5).any())):
        raise DataError("calibration needs held-out pairs of both labels (positives and negatives)")
    mean = x.mean(0)
    std = x.std(0).clamp(min=1e-12)  # a constant feature stays 0 after centring: its weight stays 0
    z = (x - mean) / std
    w = torch.zeros(x.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=0.5, max_iter=steps, line_search_fn="strong_wolfe",
                            tolerance_grad=1e-10, tolerance_change=1e-12)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = nn.functional.binary_cross_entropy_with_logits(z @ w + b, y) + L2 * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    w_raw = (w / std).detach()
    return w_raw.numpy(), float((b - (w_raw * mean).sum()).detach())


def logits_from_probs(p: np.ndarray, eps: float = 1e-7) -> np.ndarray:
    """Inverse sigmoid of probabilities (as the scoring job writes them), clipped away from 0 and 1."""
    p = np.clip(np.asarray(p, dtype=np.float64), eps, 1 - eps)
    return np.log(p) - np.log1p(-p)


@dataclass(frozen=True)
class Fusion:
    """p = sigmoid(ce * logit(cross-encoder probability) + dense * retriever score + bm25 * BM25 score + bias).

    bm25 is 0 for a fusion fit without the lexical feature (and for folders saved before it existed).
    """

    ce: float
    dense: float
    bias: float
    bm25: float = 0.0

    @property
    def uses_bm25(self) -> bool:
        return self.bm25 != 0.0

    def __call__(self, ce_probs: np.ndarray, dense_scores: np.ndarray, bm25_scores: np.ndarray | None = None) -> np.ndarray:
        z = self.ce * logits_from_probs(ce_probs) + self.dense * np.asarray(dense_scores, dtype=np.float64) + self.bias
        if self.uses_bm25:
            if bm25_scores is None:
                raise ValueError("this fusion weighs BM25 scores (cross.fusion_bm25) but none were given")
            z = z + self.bm25 * np.asarray(bm25_scores, dtype=np.float64)
        return 1.0 / (1.0 + np.exp(-z))

    def to_dict(self) -> dict:
        return {"ce": self.ce, "dense": self.dense, "bm25": self.bm25, "bias": self.bias}

    @classmethod
    def from_dict(cls, d: dict | None) -> Fusion | None:
        if not d:
            return None
        return cls(float(d["ce"]), float(d["dense"]), float(d["bias"]), float(d.get("bm25", 0.0)))


def fit_fusion(ce_probs: np.ndarray, dense_scores: np.ndarray, labels: np.ndarray,
               bm25_scores: np.ndarray | None = None) -> Fusion:
    """The logistic fusion of calibrated cross-encoder probabilities [N], dense scores [N] and, if given, BM25
    scores [N] for `labels` [N]."""
    cols = [logits_from_probs(ce_probs), np.asarray(dense_scores, dtype=np.float64)]
    if bm25_scores is not None:
        cols.append(np.asarray(bm25_scores, dtype=np.float64))
    w, b = fit_logistic(np.stack(cols, axis=1), labels)
    return Fusion(float(w[0]), float(w[1]), b, float(w[2]) if bm25_scores is not None else 0.0)


def load_fusion(model_dir: str | Path | None, enabled: bool = True) -> Fusion | None:
    """The fusion stored beside a cross-encoder (None without one, or when `cross.fusion` is off)."""
    from rocketqa_ray.modeling.base import read_meta

    if model_dir is None or not enabled:
        return None
    return Fusion.from_dict(read_meta(model_dir).get("fusion"))


def fuse_hits(ce_probs: np.ndarray, hits: list[dict], fusion: Fusion) -> np.ndarray:
    """Fused probabilities for one question's hits ({score: dense score, bm25: BM25 score}) and their cross-encoder
    probabilities."""
    lexical = None
    if fusion.uses_bm25:
        if any("bm25" not in h for h in hits):
            raise ValueError("the reranker's fusion weighs BM25 scores but the retriever returned none")
        lexical = np.array([h["bm25"] for h in hits])
    return fusion(ce_probs, np.array([h["score"] for h in hits]), lexical)


def fuse_scores(ranked: RankedHits, scores: PairScores, fusion: Fusion, bm25: PairScores | None = None) -> PairScores:
    """Cross-encoder probabilities fused with the retriever scores in `ranked` (and the `bm25` pair scores when
    the fusion weighs them), for the pairs of `scores`."""
    dense = {(q, p): s for q, items in ranked.items() for p, s in items}
    keys = [k for k in scores if k in dense]
    lexical = np.array([bm25[k] for k in keys]) if fusion.uses_bm25 and bm25 is not None else None
    fused = fusion(np.array([scores[k] for k in keys]), np.array([dense[k] for k in keys]), lexical)
    return {k: float(v) for k, v in zip(keys, fused)}


def rerank(ranked: RankedHits, scores: PairScores, top: int) -> Run:
    """Re-order each question's top `top` by cross-encoder score; the tail keeps the dual encoder's order below.

    Returned as a run {qid: {pid: score}} whose scores sort in the new order (head: 1 + CE probability, tail:
    decreasing values below 1), so recall@100 is unchanged while the head is reranked.
    """
    run: Run = {}
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
