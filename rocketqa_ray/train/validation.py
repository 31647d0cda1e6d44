"""Validation inside the training loop: held-out groups scored every `eval_every` steps, early stopping with
patience, and the best weights kept (Ray-free).

A held-out group is one question with its positive and some negatives, in the training rows' own format. Every
worker scores its slice (`rows[rank::world]`) and the sums are all-reduced (`distributed.sum_over_workers`), so
every worker sees the same metric and takes the same stop decision (no collective can hang), and N workers give
the figure of one process.

The metric is the mean reciprocal rank of the positive within its group (ties count against it), with top-1
accuracy beside it. It ranks a handful of candidates, not the corpus: cheap enough to run during training,
and what the cross-encoder does when it reranks.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch


def group_ranks(scores: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[G, W] scores, 0/1 labels and a mask of real slots -> [G] rank (1-based) of each group's best-ranked
    positive; a negative tied with it ranks ahead (a model that scores everything the same learns nothing)."""
    neg_inf = torch.finfo(scores.dtype).min
    s = scores.masked_fill(~mask, neg_inf)
    best_pos = s.masked_fill(labels <= 0, neg_inf).max(dim=1).values
    ahead = ((s >= best_pos[:, None]) & mask & (labels <= 0)).sum(dim=1)
    return ahead + 1


def rank_sums(ranks: torch.Tensor, k: int = 10) -> torch.Tensor:
    """[sum of reciprocal ranks (0 beyond k), number ranked first, groups] as one float64 vector to all-reduce."""
    rr = torch.where(ranks <= k, 1.0 / ranks.double(), torch.zeros((), dtype=torch.float64))
    return torch.stack([rr.sum(), (ranks == 1).sum().double(), torch.tensor(float(len(ranks)), dtype=torch.float64)])


def worker_slice(rows: list, rank: int, size: int) -> list:
    return rows[rank::size]


@dataclass
class EarlyStopping:
    """Patience on a held-out metric (higher is better), and the best weights seen.

    `patience` evaluations without an improvement of more than `min_delta` stop training; 0 never stops
    early (the best weights are still kept). With `tolerance` > 0 the weights kept are the latest ones within
    `tolerance` of the best figure so far: a few held-out groups cannot tell 0.8437 from 0.8430, and the model
    with more training should win such a tie. The weights are copied to CPU memory on the rank that exports.
    """

    patience: int = 0
    min_delta: float = 0.0
    tolerance: float = 0.0
    best: float | None = None  # the kept weights' figure
    best_step: int | None = None
    top: float | None = None  # the best figure seen
    bad_evals: int = 0
    history: list[dict] = field(default_factory=list)
    best_state: dict | None = field(default=None, repr=False)

    def update(self, step: int, metrics: dict, model: torch.nn.Module | None, key: str = "val_mrr@10") -> bool:
        """Record an evaluation; keep `model`'s weights when it is the best so far (`model` None: only count).
        Returns whether to stop."""
        value = float(metrics[key])
        self.history.append({"step": step, **metrics})
        if self.top is None or value > self.top + self.min_delta:
            self.bad_evals = 0
        else:
            self.bad_evals += 1
        self.top = value if self.top is None else max(self.top, value)
        if value >= self.top - self.tolerance:
            self.best, self.best_step = value, step
            if model is not None:
                self.best_state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
        return self.patience > 0 and self.bad_evals >= self.patience

    def restore_best(self, model: torch.nn.Module) -> bool:
        """Load the best weights into `model` (True) unless none were kept."""
        if self.best_state is None:
            return False
        model.load_state_dict(self.best_state)
        return True

    def state_dict(self) -> dict:
        return {k: copy.deepcopy(v) if k != "best_state" else v for k, v in self.__dict__.items()}

    def load_state_dict(self, state: dict) -> None:
        for k, v in state.items():
            setattr(self, k, v)

    def summary(self) -> dict:
        return {"best_step": self.best_step, "best_val_mrr@10": None if self.best is None else round(self.best, 4),
                "evaluations": len(self.history), "patience": self.patience}
