"""Cross-encoder: listwise softmax cross-entropy over a question's group (Ray-free).

For group g with logits z_g1..z_gn and positives P_g (uniform target over them):

    L = -1/G sum_g 1/|P_g| sum_{j in P_g} log softmax(z_g)_j

Its scores are calibrated into probabilities afterwards (`rocketqa/calibration.py`), since the paper reads
them as probabilities thresholded at 0.1 / 0.9 for denoising and pseudo-labels.
"""

from __future__ import annotations

import torch


def listwise_loss(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Softmax cross-entropy of each group's positive against the group's other passages.

    logits [G, n] scores of G question groups of n passages, labels [G, n] with the positive(s) at 1.0,
    mask [G, n] bool, False for padding slots (groups with fewer passages) -> scalar mean over G.
    A group with several positives spreads its target uniformly over them.
    """
    if logits.shape != labels.shape or logits.dim() != 2:
        raise ValueError(f"expected logits and labels [G, n], got {tuple(logits.shape)} and {tuple(labels.shape)}")
    logits = logits.float()
    labels = labels.to(logits.device).float()
    if mask is not None:
        mask = mask.to(logits.device)
        logits = logits.masked_fill(~mask, float("-inf"))
        labels = labels * mask
    pos = labels.sum(1, keepdim=True)
    if bool((pos <= 0).any()):
        raise ValueError("every group needs a positive (a label > 0)")
    logp = torch.log_softmax(logits, dim=1).masked_fill(labels == 0, 0.0)
    return -(logp * labels / pos).sum(1).mean()
