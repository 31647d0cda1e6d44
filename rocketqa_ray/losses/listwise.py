"""Cross-encoder: listwise softmax cross-entropy over a question's group (Ray-free).

For group g with logits z_g1..z_gn and positives P_g (uniform target over them):

    L = -1/G sum_g 1/|P_g| sum_{j in P_g} log softmax(z_g)_j

Its scores are calibrated into probabilities afterwards (`rocketqa/calibration.py`), since the paper reads
them as probabilities thresholded at 0.1 / 0.9 for denoising and pseudo-labels.

The loss reads nothing back from the device (on CUDA a read would wait for all queued work every step): that
every group has a positive is checked by `check_groups` on the CPU labels, at collate time.
"""

from __future__ import annotations

import torch


def check_groups(labels: torch.Tensor, mask: torch.Tensor | None = None) -> None:
    """Raise ValueError unless every group (row of labels [G, n], padding slots where mask is False left out)
    has a positive (a label > 0). Meant for CPU tensors, before they go to the device: there it reads a value
    back, which on CUDA waits for the device."""
    labels = labels.float()
    if mask is not None:
        labels = labels * mask.to(labels.device)
    if bool((labels.sum(1) <= 0).any()):
        raise ValueError("every group needs a positive (a label > 0)")


def listwise_loss(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Softmax cross-entropy of each group's positive against the group's other passages.

    logits [G, n] scores of G question groups of n passages, labels [G, n] with the positive(s) at 1.0,
    mask [G, n] bool, False for padding slots (groups with fewer passages) -> scalar mean over G.
    A group with several positives spreads its target uniformly over them.

    CPU labels (and mask) are checked here (`check_groups`: ValueError for a group without a positive); labels
    already on another device are not, to make no host sync - check them before the move (a group without a
    positive would make the loss NaN).
    """
    if logits.shape != labels.shape or logits.dim() != 2:
        raise ValueError(f"expected logits and labels [G, n], got {tuple(logits.shape)} and {tuple(labels.shape)}")
    if labels.device.type == "cpu" and (mask is None or mask.device.type == "cpu"):
        check_groups(labels, mask)
    logits = logits.float()
    labels = labels.to(logits.device).float()
    if mask is not None:
        mask = mask.to(logits.device)
        logits = logits.masked_fill(~mask, float("-inf"))
        labels = labels * mask
    pos = labels.sum(1, keepdim=True)
    logp = torch.log_softmax(logits, dim=1).masked_fill(labels == 0, 0.0)
    return -(logp * labels / pos).sum(1).mean()
