"""Platt scaling for the cross-encoder, folded into its classifier head (Ray-free).

A listwise-trained cross-encoder ranks well but its sigmoid scores are not probabilities, while
denoising and pseudo-labelling threshold them as probabilities (paper: < 0.1 negative, > 0.9 positive).
Fitting p = sigmoid(a * logit + b) on held-out labelled pairs and folding a, b into the last linear
layer keeps the saved model a plain `sentence_transformers.CrossEncoder` whose scores are calibrated.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from rocketqa_ray.errors import DataError


def fit_platt(logits: np.ndarray, labels: np.ndarray, steps: int = 200) -> tuple[float, float]:
    """(a, b) minimising the binary cross-entropy of sigmoid(a * logit + b) against `labels` [N] in {0, 1}.

    Needs both classes. L-BFGS on two parameters converges in a few iterations.
    """
    x = torch.as_tensor(np.asarray(logits, dtype=np.float64))
    y = torch.as_tensor(np.asarray(labels, dtype=np.float64))
    if x.shape != y.shape or x.dim() != 1:
        raise ValueError(f"expected logits and labels [N], got {tuple(x.shape)} and {tuple(y.shape)}")
    if not (bool((y > 0.5).any()) and bool((y < 0.5).any())):
        raise DataError("calibration needs held-out pairs of both labels (positives and negatives)")
    a = torch.ones((), dtype=torch.float64, requires_grad=True)
    b = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([a, b], lr=0.5, max_iter=steps, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = nn.functional.binary_cross_entropy_with_logits(a * x + b, y)
        loss.backward()
        return loss

    opt.step(closure)
    return float(a.detach()), float(b.detach())


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
