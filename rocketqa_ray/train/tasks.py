"""What a training step computes, per task (Ray-free): batches -> forward -> loss -> backward.

`DualTask` (steps 1, 3, 4): queries and passages through the dual encoder, contrastive loss with in-batch and
(with `dual.cross_batch`) cross-batch negatives, optionally through the gradient cache. `CrossTask` (step 2):
question groups through the cross-encoder, listwise and/or BCE loss. The Ray Train loop (`train.loop`)
calls `build`, `loss_backward` and `export`; tests call them directly.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

from rocketqa_ray.config import Config, ModelConfig
from rocketqa_ray.losses import (
    PAD_KEY,
    bce_loss,
    contrastive_loss,
    distillation_loss,
    listwise_loss,
    passage_key,
    teacher_logits,
)
from rocketqa_ray.modeling.base import autocast, batched_inference
from rocketqa_ray.modeling.cross_encoder import CrossEncoder
from rocketqa_ray.modeling.dual_encoder import DualEncoder
from rocketqa_ray.train.gradcache import cached_backward
from rocketqa_ray.train.validation import group_ranks, rank_sums

VALIDATION_BATCH = 64  # sequences per forward when scoring held-out groups


def _enable_checkpointing(model: nn.Module) -> None:
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def _grid(groups: list[list[float]], labels: list[list[float]]) -> tuple[torch.Tensor, ...]:
    width = max(len(g) for g in groups)
    scores = torch.zeros(len(groups), width)
    lab = torch.zeros(len(groups), width)
    mask = torch.zeros(len(groups), width, dtype=torch.bool)
    for i, (g, y) in enumerate(zip(groups, labels)):
        scores[i, : len(g)] = torch.tensor(g)
        lab[i, : len(y)] = torch.tensor(y)
        mask[i, : len(g)] = True
    return scores, lab, mask


def _split(flat: list[float], sizes: list[int]) -> list[list[float]]:
    out, i = [], 0
    for n in sizes:
        out.append(flat[i : i + n])
        i += n
    return out


def length_bucketed(lengths: list[int], buckets: int, run: Callable[[list[int]], torch.Tensor]) -> torch.Tensor:
    """`run(indices)` on `buckets` chunks of similar length, outputs concatenated back in input order.

    A batch padded to its longest text wastes most of its compute when lengths vary (squad passages:
    median 148 tokens, 99th percentile 378); chunks sorted by length pad far less. The graph is kept, so
    the loss and gradients are those of one forward over the whole batch (up to dropout draws).
    """
    n = len(lengths)
    if buckets <= 1 or n <= 1:
        return run(list(range(n)))
    order = sorted(range(n), key=lengths.__getitem__)
    size = math.ceil(n / min(buckets, n))
    chunks = [order[i : i + size] for i in range(0, n, size)]
    out = torch.cat([run(c) for c in chunks])
    inverse = torch.empty(n, dtype=torch.long)
    inverse[torch.tensor([i for c in chunks for i in c])] = torch.arange(n)
    return out[inverse.to(out.device)]


class DualTask:
    """Dual-encoder batches: tokenise, encode (optionally with gradient caching), contrastive loss, backward."""

    kind = "dual"
    head: tuple[str, ...] = ()  # no freshly initialised layers

    def __init__(self, cfg: Config, num_negatives: int):
        self.cfg = cfg
        self.tcfg = cfg.dual
        self.n = num_negatives  # hard negatives per query in the batch layout (group size 1 + n)

    def build(self, init_model: str | None) -> DualEncoder:
        if init_model:
            model = DualEncoder.load(init_model)
            model.cfg = _merge_model_cfg(model.cfg, self.cfg)
        else:
            model = DualEncoder.from_base(self.cfg.model)
        if self.tcfg.gradient_checkpointing:
            for m in {id(model.query_model): model.query_model, id(model.p_model): model.p_model}.values():
                _enable_checkpointing(m)
        return model

    def sequences_per_row(self) -> int:
        return 2 + self.n

    def _negatives(self, row: dict, epoch: int) -> list[tuple[str, str, float]]:
        ids = row.get("negative_ids") or []
        teacher = _teacher_scores(row, len(ids))
        negs = list(zip(ids, row.get("negatives") or [], teacher[1:]))
        if len(negs) > self.n:
            # A fresh sample of the row's negatives each epoch (Tevatron/RocketQA sample from the pool).
            rng = random.Random(f"{self.tcfg.seed}:{epoch}:{row['qid']}:{row['positive_id']}")
            negs = rng.sample(negs, self.n)
        return negs

    def batch(self, rows: list[dict], epoch: int) -> tuple[list[str], list[str], torch.Tensor, torch.Tensor]:
        """Rows -> query texts [B], passage texts [B*(1+n)] in per-query groups, passage keys [B*(1+n)], and the
        teacher's probabilities [B, 1+n] of each group (NaN where unscored or padding)."""
        queries, passages, keys, teacher = [], [], [], []
        for row in rows:
            queries.append(row["query"])
            passages.append(row["positive"])
            keys.append(passage_key(row["positive_id"]))
            negs = self._negatives(row, epoch)
            group = [_teacher_scores(row, len(row.get("negative_ids") or []))[0]]
            for pid, text, score in negs:
                passages.append(text)
                keys.append(passage_key(pid))
                group.append(score)
            for _ in range(self.n - len(negs)):  # too few negatives: masked padding slots
                passages.append("")
                keys.append(PAD_KEY)
                group.append(math.nan)
            teacher.append(group)
        return queries, passages, torch.tensor(keys, dtype=torch.long), torch.tensor(teacher, dtype=torch.float32)

    def loss_backward(self, model: DualEncoder, rows: list[dict], device: torch.device, bf16: bool,
                      epoch: int = 0) -> torch.Tensor:
        """Forward and backward for this worker's rows; returns the detached loss (scalar)."""
        queries, passages, keys, teacher = self.batch(rows, epoch)
        qf = {k: v.to(device) for k, v in model.tokenize(queries, "query").items()}
        distill = self.cfg.distill
        # decided by the config alone: every worker must take part in the distillation loss's all-reduce
        distilling = distill.kind != "none" and distill.weight > 0
        t_logits = teacher_logits(teacher, distill.temperature).to(device) if distilling else None

        def enc_q(f: dict) -> torch.Tensor:
            with autocast(bf16, device):
                return model.encode_queries(f)

        def enc_p(f: dict) -> torch.Tensor:
            with autocast(bf16, device):
                return model.encode_passages(f)

        def loss_fn(q: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
            loss = contrastive_loss(q, p, model.cfg.temperature, p_keys=keys.to(device),
                                    cross_batch=self.tcfg.cross_batch)
            if t_logits is None:
                return loss
            # each query against its own group only (this worker's passages, before any cross-batch gather)
            own = (q.float().unsqueeze(1) * p.float().view(q.shape[0], -1, p.shape[1])).sum(-1) / model.cfg.temperature
            return loss + distill.weight * distillation_loss(own, t_logits, distill.kind, over_workers=True)

        if self.tcfg.grad_cache:
            pf = {k: v.to(device) for k, v in model.tokenize(passages, "passage").items()}
            return cached_backward([(enc_q, qf), (enc_p, pf)], loss_fn, self.tcfg.grad_cache_chunk)

        def enc_p_chunk(idx: list[int]) -> torch.Tensor:
            return enc_p({k: v.to(device) for k, v in model.tokenize([passages[i] for i in idx], "passage").items()})

        q = enc_q(qf)  # queries first: the same dropout draws as the cached path
        p = length_bucketed([len(t) for t in passages], self.tcfg.length_buckets, enc_p_chunk)
        loss = loss_fn(q, p)
        loss.backward()
        return loss.detach()

    @torch.no_grad()
    def validate(self, model: DualEncoder, rows: list[dict], device: torch.device, bf16: bool) -> torch.Tensor:
        """Rank each held-out question's positive among its group (positive + all its listed negatives) by
        the dual encoder's similarity -> `rank_sums` of these rows."""
        if not rows:
            return rank_sums(torch.zeros(0, dtype=torch.long))
        groups = [[r["positive"], *(r.get("negatives") or [])] for r in rows]
        flag = "true" if bf16 else "false"
        q = torch.from_numpy(model.encode([r["query"] for r in rows], "query", VALIDATION_BATCH, flag, device))
        p = torch.from_numpy(model.encode([t for g in groups for t in g], "passage", VALIDATION_BATCH, flag, device))
        owner = torch.tensor([i for i, g in enumerate(groups) for _ in g])
        sims = (q[owner] * p).sum(-1).tolist()
        scores, lab, mask = _grid(_split(sims, [len(g) for g in groups]),
                                  [[1.0] + [0.0] * (len(g) - 1) for g in groups])
        return rank_sums(group_ranks(scores, lab, mask))

    def export(self, model: DualEncoder, path: Path, meta: dict) -> None:
        model.save(path, extra_meta={"training": meta})


def _teacher_scores(row: dict, n_negatives: int) -> list[float]:
    """The row's teacher probabilities for [positive, *negatives]; NaN for each when the row has none."""
    scores = row.get("teacher_scores")
    if scores is None or len(scores) != 1 + n_negatives:
        return [math.nan] * (1 + n_negatives)
    return [math.nan if v is None else float(v) for v in scores]


def _merge_model_cfg(saved: ModelConfig, cfg: Config) -> ModelConfig:
    # Pooling/normalisation belong to the saved weights; lengths and temperature to this run.
    return replace(saved, temperature=cfg.model.temperature, query_max_len=cfg.model.query_max_len,
                   passage_max_len=cfg.model.passage_max_len)


class CrossTask:
    """Cross-encoder batches: question groups (a positive and its negatives) -> logits -> listwise and/or BCE loss."""

    kind = "cross"
    # the scoring head on top of an encoder (BERT's pooler and classifier): new, or barely trained in a
    # sentence-transformers checkpoint, so it learns at cross.head_lr_scale x the encoder's rate
    head: tuple[str, ...] = (".pooler.", "classifier.")

    def __init__(self, cfg: Config, num_negatives: int = 0):
        self.cfg = cfg
        self.tcfg = cfg.cross
        self.n = num_negatives  # most negatives in a group (the padded group size is 1 + n)

    def build(self, init_model: str | None) -> CrossEncoder:
        if init_model:
            return CrossEncoder.load(init_model)
        return CrossEncoder.from_base(self.cfg.cross.base, self.cfg.cross.max_len)

    def sequences_per_row(self) -> int:
        return 1 + self.n

    def loss_backward(self, model: CrossEncoder, rows: list[dict], device: torch.device, bf16: bool,
                      epoch: int = 0) -> torch.Tensor:
        queries = [r["query"] for r in rows for _ in r["passages"]]
        passages = [p for r in rows for p in r["passages"]]
        flat_labels = torch.tensor([float(x) for r in rows for x in r["labels"]], device=device)

        def forward(idx: list[int]) -> torch.Tensor:
            feats = model.tokenize([queries[i] for i in idx], [passages[i] for i in idx])
            with autocast(bf16, device):
                return model({k: v.to(device) for k, v in feats.items()})

        logits = length_bucketed([len(q) + len(p) for q, p in zip(queries, passages)], self.tcfg.length_buckets, forward)
        loss = torch.zeros((), device=device)
        if "listwise" in self.tcfg.loss:
            width = max(len(r["passages"]) for r in rows)
            slot = torch.tensor([i * width + j for i, r in enumerate(rows) for j in range(len(r["passages"]))], device=device)
            grid = torch.full((len(rows) * width,), float("-inf"), device=device).index_copy(0, slot, logits.float())
            lab = torch.zeros(len(rows) * width, device=device).index_copy(0, slot, flat_labels)
            mask = torch.zeros(len(rows) * width, dtype=torch.bool, device=device).index_fill(0, slot, True)
            loss = loss + listwise_loss(grid.view(len(rows), width), lab.view(len(rows), width), mask.view(len(rows), width))
        if "bce" in self.tcfg.loss:
            loss = loss + bce_loss(logits, flat_labels)
        loss.backward()
        return loss.detach()

    @torch.no_grad()
    def validate(self, model: CrossEncoder, rows: list[dict], device: torch.device, bf16: bool) -> torch.Tensor:
        """Rank each held-out group's passages by the cross-encoder's logit -> `rank_sums` of these rows."""
        if not rows:
            return rank_sums(torch.zeros(0, dtype=torch.long))
        pairs = [(r["query"], p) for r in rows for p in r["passages"]]

        def forward(idx: list[int], dev: torch.device) -> torch.Tensor:  # logits: a sigmoid could tie them
            f = model.tokenize([pairs[j][0] for j in idx], [pairs[j][1] for j in idx])
            return model({k: v.to(dev) for k, v in f.items()})

        flat = batched_inference(model, [q + p for q, p in pairs], VALIDATION_BATCH, "true" if bf16 else "false",
                                 device, forward).tolist()
        scores, lab, mask = _grid(_split(flat, [len(r["passages"]) for r in rows]), [r["labels"] for r in rows])
        return rank_sums(group_ranks(scores, lab, mask))

    def export(self, model: CrossEncoder, path: Path, meta: dict) -> None:
        model.save(path, extra_meta={"training": meta})


TASKS = {"dual": DualTask, "cross": CrossTask}
