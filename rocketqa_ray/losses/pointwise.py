"""Cross-encoder: pointwise binary cross-entropy (Ray-free).

    L = -1/B sum_i [ y_i log sigmoid(z_i) + (1 - y_i) log(1 - sigmoid(z_i)) ]

On 1:3 groups from a bi-encoder checkpoint with a fresh head it first learns only the label prior; the
listwise loss learns to rank far faster (`listwise.py`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def bce_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Pointwise binary cross-entropy for the cross-encoder.

    logits [B] raw scores, labels [B] in {0, 1} (floats; soft labels work too) -> scalar mean over B.
    Averaging parameter gradients over workers gives the gradient of the mean over all workers' pairs.
    """
    if logits.shape != labels.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and labels {tuple(labels.shape)} differ in shape")
    return F.binary_cross_entropy_with_logits(logits.float(), labels.to(logits.device).float())
