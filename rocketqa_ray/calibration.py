"""Calibrating the cross-encoder, and fusing it with the retriever's score (Ray-free).

A listwise-trained cross-encoder ranks well but its sigmoid scores are not probabilities, while
denoising and pseudo-labelling threshold them as probabilities (paper: < 0.1 negative, > 0.9 positive).
Fitting p = sigmoid(a * logit + b) on held-out labelled pairs (Platt scaling) and folding a, b into the
last linear layer keeps the saved model a plain `sentence_transformers.CrossEncoder` whose scores are
calibrated.

`Fusion` goes one step further: a logistic regression over (calibrated cross-encoder logit, dense score and,
with `cross.fusion_bm25`, the BM25 score), fit on the same held-out pairs. A small cross-encoder trained for
minutes knows things the dual encoder does not and vice versa, and term overlap is a third view; the fused
probability ranks better than any one of them (measured in the README) and is still a probability, so the
same thresholds apply. It is stored in the cross-encoder's folder.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from rocketqa_ray.errors import DataError


def fit_logistic(features: np.ndarray, labels: np.ndarray, steps: int = 200) -> tuple[np.ndarray, float]:
    """(w [k], b) minimising the binary cross-entropy of sigmoid(features @ w + b) against `labels` [N].

    features [N, k]; labels in {0, 1}; needs both classes. L-BFGS on k + 1 parameters converges in a few
    iterations; weights start at 1 so a single well-scaled feature starts at the identity.
    """
    x = torch.as_tensor(np.asarray(features, dtype=np.float64))
    y = torch.as_tensor(np.asarray(labels, dtype=np.float64))
    if x.dim() != 2 or y.dim() != 1 or x.shape[0] != y.shape[0]:
        raise ValueError(f"expected features [N, k] and labels [N], got {tuple(x.shape)} and {tuple(y.shape)}")
    if not (bool((y > 0.5).any()) and bool((y < 0.5).any())):
        raise DataError("calibration needs held-out pairs of both labels (positives and negatives)")
    w = torch.ones(x.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=0.5, max_iter=steps, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = nn.functional.binary_cross_entropy_with_logits(x @ w + b, y)
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach().numpy(), float(b.detach())


def fit_platt(logits: np.ndarray, labels: np.ndarray, steps: int = 200) -> tuple[float, float]:
    """(a, b) minimising the binary cross-entropy of sigmoid(a * logit + b) against `labels` [N] in {0, 1}."""
    logits = np.asarray(logits, dtype=np.float64)
    if logits.ndim != 1:
        raise ValueError(f"expected logits [N], got shape {logits.shape}")
    w, b = fit_logistic(logits[:, None], labels, steps)
    return float(w[0]), b


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


def logits_from_probs(p: np.ndarray, eps: float = 1e-7) -> np.ndarray:
    """Inverse sigmoid of probabilities (as the scoring job writes them), clipped away from 0 and 1."""
    p = np.clip(np.asarray(p, dtype=np.float64), eps, 1 - eps)
    return np.log(p) - np.log1p(-p)


def head_layer(model: nn.Module) -> nn.Linear:
    """The last linear layer of a 1-logit sequence classifier (BERT-like `classifier`, or `score`)."""
    for name in ("classifier", "score"):
        layer = getattr(model, name, None)
        if isinstance(layer, nn.Linear) and layer.out_features == 1:
            return layer
        if layer is not None and isinstance(getattr(layer, "out_proj", None), nn.Linear):  # RoBERTa-style heads
            return layer.out_proj
    linears = [m for m in model.modules() if isinstance(m, nn.Linear) and m.out_features == 1]
    if not linears:
        raise ValueError(f"{type(model).__name__} has no 1-output linear head to calibrate")
    return linears[-1]


@torch.no_grad()
def fold_into_head(model: nn.Module, a: float, b: float) -> None:
    """Make `model`'s logit l become a * l + b by rescaling its last linear layer in place."""
    if not (math.isfinite(a) and math.isfinite(b)):
        raise ValueError(f"calibration produced non-finite parameters a={a}, b={b}")
    layer = head_layer(model)
    layer.weight.mul_(a)
    if layer.bias is None:
        layer.bias = nn.Parameter(torch.zeros(1, dtype=layer.weight.dtype, device=layer.weight.device))
    layer.bias.mul_(a).add_(b)
