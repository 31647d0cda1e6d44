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

from typing import get_args

import torch

from rocketqa_ray.types import DistillKind

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

    Nothing is read back to the host (on CUDA a read would wait for all queued work every step): questions
    left out are masked rather than dropped, and the count stays a tensor on the device, all-reduced there.
    Pass the teacher on the student's device.
    """
    from rocketqa_ray.distributed import world

    if student.shape != teacher.shape or student.dim() != 2:
        raise ValueError(f"expected student and teacher [B, G], got {tuple(student.shape)} and {tuple(teacher.shape)}")
    if kind not in get_args(DistillKind):
        raise ValueError(f"unknown distillation kind {kind!r}; use one of {', '.join(get_args(DistillKind))}")
    s = student.float()
    t = teacher.to(s.device).float()
    scored = ~torch.isnan(t)
    rows = scored[:, 0] & scored[:, 1:].any(1)  # [B] questions that count
    if kind == "kl":
        keep = scored & rows[:, None]
        # a counted row's unscored slots are -inf (out of both softmaxes); a row left out is all 0, so that its
        # unused softmax stays finite and passes no gradient
        fill = torch.where(rows, float("-inf"), 0.0)[:, None]
        log_pt = torch.log_softmax(torch.where(keep, t, fill), dim=1)
        log_ps = torch.log_softmax(torch.where(keep, s, fill), dim=1)
        total = torch.where(keep, log_pt.exp() * (log_pt - log_ps), 0.0).sum()
        count = rows.sum()
    elif kind == "margin_mse":
        keep = scored[:, 1:] & rows[:, None]
        student_margin = s[:, :1] - s[:, 1:]
        teacher_margin = torch.nan_to_num(t[:, :1] - t[:, 1:])
        total = torch.where(keep, (student_margin - teacher_margin) ** 2, 0.0).sum()
        count = keep.sum()
    else:
        total = s.sum() * 0.0
        count = torch.zeros((), dtype=torch.long, device=s.device)
    count = count.to(torch.float64)
    scale = 1.0
    if over_workers and world()[1] > 1:
        import torch.distributed as dist

        dist.all_reduce(count)  # on the device: no host sync
        scale = float(world()[1])
    # total * scale / count, or total (0) when nothing is scored anywhere; the factor rounded to float32 as
    # a Python float's would be
    return total * (scale / count.clamp(min=1.0)).to(total.dtype)
