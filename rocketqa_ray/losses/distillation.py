"""Dual encoder: distillation of the cross-encoder's scores over each question's own group (Ray-free).

Beyond the paper (RocketQAv2, Tevatron, sentence-transformers and FlagEmbedding offer it): the contrastive loss
treats a hard negative as wholly wrong, while the cross-encoder says how wrong. Steps 3 and 4 already score
every training question's positive and its candidates; those scores become soft targets. For query i with its
own group (positive first, then its hard negatives), student scores s_ij = q_i . p_ij / tau and teacher
logits t_ij = logit(P_ij) / T from the cross-encoder's calibrated probabilities P_ij:

- `kl` (listwise, RocketQAv2):   L = 1/B sum_i sum_j softmax(t_i)_j (log softmax(t_i)_j - log softmax(s_i)_j)
- `margin_mse` (Hofstaetter et al.): L = 1/(B n) sum_i sum_{j>0} ((s_i0 - s_ij) - (t_i0 - t_ij))^2

Passages the teacher did not score (NaN: a random top-up, a padding slot) are left out; a question whose
positive is unscored, or that has no scored negative, adds nothing.
"""

from __future__ import annotations

from typing import Literal

import torch

DistillKind = Literal["none", "kl", "margin_mse"]
EPS = 1e-6  # probabilities are clamped to [EPS, 1 - EPS] before the logit


def teacher_logits(probs: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Calibrated probabilities -> logit(p) / temperature; NaN (unscored) stays NaN."""
    p = probs.float().clamp(EPS, 1 - EPS)
    return torch.log(p / (1 - p)) / temperature


def distillation_loss(student: torch.Tensor, teacher: torch.Tensor, kind: DistillKind,
                      over_workers: bool = False) -> torch.Tensor:
    """student [B, G] scores of each query's own group (positive at column 0), teacher [B, G] logits with NaN
    where unscored -> scalar loss (0 with a graph when nothing is scored).

    The mean is over scored questions (kl) or scored negatives (margin_mse). With `over_workers` the count is
    summed over the process group and the loss scaled by its size, so that averaging the workers' gradients
    (as DDP does) gives the gradient of one process over all their rows, however the unscored rows fall;
    every worker must then call this (it all-reduces).
    """
    from rocketqa_ray.distributed import sum_over_workers, world

    if student.shape != teacher.shape or student.dim() != 2:
        raise ValueError(f"expected student and teacher [B, G], got {tuple(student.shape)} and {tuple(teacher.shape)}")
    if kind not in ("none", "kl", "margin_mse"):
        raise ValueError(f"unknown distillation kind {kind!r}; use none, kl or margin_mse")
    s = student.float()
    t = teacher.to(s.device).float()
    scored = ~torch.isnan(t)
    rows = scored[:, 0] & scored[:, 1:].any(1)
    total = s.sum() * 0.0
    count = 0
    if kind != "none" and bool(rows.any()):
        s, t, scored = s[rows], t[rows], scored[rows]
        if kind == "kl":
            neg_inf = torch.tensor(float("-inf"), device=s.device)
            log_pt = torch.log_softmax(torch.where(scored, t, neg_inf), dim=1)
            log_ps = torch.log_softmax(torch.where(scored, s, neg_inf), dim=1)
            total = torch.where(scored, log_pt.exp() * (log_pt - log_ps), torch.zeros_like(s)).sum()
            count = int(rows.sum())
        else:
            student_margin = s[:, :1] - s[:, 1:]
            teacher_margin = torch.nan_to_num(t[:, :1] - t[:, 1:])
            mask = scored[:, 1:]
            total = (((student_margin - teacher_margin) ** 2) * mask).sum()
            count = int(mask.sum())
    scale = 1.0
    if over_workers and world()[1] > 1:
        count = int(sum_over_workers(torch.tensor([float(count)]), s.device)[0])
        scale = float(world()[1])
    return total * (scale / count) if count else total
