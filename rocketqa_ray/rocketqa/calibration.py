"""Calibrating the cross-encoder into probabilities (RocketQA step 2; Ray-free).

A listwise-trained cross-encoder ranks well but its sigmoid scores are not probabilities, while
denoising and pseudo-labelling threshold them as probabilities (paper: < 0.1 negative, > 0.9 positive).
Fitting p = sigmoid(a * logit + b) on held-out labelled pairs (Platt scaling) and folding a, b into the
last linear layer keeps the saved model a plain `sentence_transformers.CrossEncoder` whose scores are
calibrated. The fusion with the retriever's score is fit on the same pairs (`retrieval.fusion`).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from rocketqa_ray.retrieval.fusion import fit_logistic


def fit_platt(logits: np.ndarray, labels: np.ndarray, steps: int = 200) -> tuple[float, float]:
    """(a, b) minimising the binary cross-entropy of sigmoid(a * logit + b) against `labels` [N] in {0, 1}."""
    logits = np.asarray(logits, dtype=np.float64)
    if logits.ndim != 1:
        raise ValueError(f"expected logits [N], got shape {logits.shape}")
    w, b = fit_logistic(logits[:, None], labels, steps)
    return float(w[0]), b


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
