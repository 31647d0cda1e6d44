"""What a training step computes, per task (Ray-free): batches -> forward -> loss -> backward.

`DualTask` (steps 1, 3, 4): queries and passages through the dual encoder, contrastive loss with in-batch and
(with `dual.cross_batch`) cross-batch negatives, optionally through the gradient cache. `CrossTask` (step 2):
question groups through the cross-encoder, listwise and/or BCE loss.

A step is split in two: `collate` turns rows into CPU tensors (tokenising; the Ray Train loop, `train.loop`,
runs it for the next batch in a background thread while the current step runs) and `backward` runs the
forward and backward passes on a batch already on the device. `loss_backward` does both (tests, benchmarks).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from rocketqa_ray.config import Config, ModelConfig
from rocketqa_ray.losses import (
    PAD_KEY,
    bce_loss,
    check_groups,
    contrastive_loss,
    distillation_loss,
    listwise_loss,
    passage_key,
    teacher_logits,
)
from rocketqa_ray.modeling.base import autocast, batched_inference
from rocketqa_ray.modeling.cross_encoder import CrossEncoder
from rocketqa_ray.modeling.dual_encoder import DualEncoder
from rocketqa_ray.modeling.prefetch import to_device
from rocketqa_ray.train.gradcache import Features, cached_backward_chunks, split_features
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


def bucket_chunks(lengths: list[int], buckets: int) -> list[list[int]]:
    """Indices of the inputs in `buckets` chunks of similar length (shortest first); one chunk in input order
    when `buckets` <= 1.

    A batch padded to its longest text wastes most of its compute when lengths vary (squad passages:
    median 148 tokens, 99th percentile 378); chunks sorted by length pad far less.
    """
    n = len(lengths)
    if buckets <= 1 or n <= 1:
        return [list(range(n))]
    order = sorted(range(n), key=lengths.__getitem__)
    size = math.ceil(n / min(buckets, n))
    return [order[i : i + size] for i in range(0, n, size)]


def input_order(chunks: list[list[int]]) -> torch.Tensor | None:
    """The index that puts outputs concatenated chunk by chunk back in input order; None when one chunk holds
    all inputs in order."""
    if len(chunks) == 1:
        return None
    n = sum(len(c) for c in chunks)
    inverse = torch.empty(n, dtype=torch.long)
    inverse[torch.tensor([i for c in chunks for i in c])] = torch.arange(n)
    return inverse


def in_order(outputs: list[torch.Tensor], order: torch.Tensor | None) -> torch.Tensor:
    """Per-chunk outputs concatenated and put back in input order (`input_order`, on their device). The graph is
    kept, so the loss and gradients are those of one forward over the whole batch (up to dropout draws)."""
    out = torch.cat(outputs) if len(outputs) > 1 else outputs[0]
    return out if order is None else out[order]


@dataclass
class DualBatch:
    """One worker's dual-encoder step as tensors (`DualTask.collate`)."""

    queries: list[Features]  # [B] queries in chunks: one, or the gradient cache's
    passages: list[Features]  # [B*(1+n)] passages in chunks: length buckets, or the gradient cache's
    order: torch.Tensor | None  # puts the bucketed passages' embeddings back in input order (`input_order`)
    keys: torch.Tensor  # [B*(1+n)] passage keys
    teacher: torch.Tensor | None  # [B, 1+n] teacher logits; None without distillation


@dataclass
class CrossBatch:
    """One worker's cross-encoder step as tensors (`CrossTask.collate`): N pairs in G groups of up to W."""

    pairs: list[Features]  # tokenised (question, passage) pairs in length buckets
    order: torch.Tensor | None  # puts the bucketed logits back in input order (`input_order`)
    labels: torch.Tensor  # [N]
    slot: torch.Tensor  # [N] each pair's place in the flat [G*W] grid of groups
    grid_labels: torch.Tensor  # [G, W] labels in the grid (0 in padding slots)
    grid_mask: torch.Tensor  # [G, W] False in padding slots


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

    def distilling(self) -> bool:
        # decided by the config alone: every worker must take part in the distillation loss's all-reduce
        return self.cfg.distill.kind != "none" and self.cfg.distill.weight > 0

    def collate(self, model: DualEncoder, rows: list[dict], epoch: int = 0, tokenizer: Any = None) -> DualBatch:
        """This worker's rows -> CPU tensors (`tokenizer`: the calling thread's own copy of the model's)."""
        queries, passages, keys, teacher = self.batch(rows, epoch)
        qf = model.tokenize(queries, "query", tokenizer)
        t_logits = teacher_logits(teacher, self.cfg.distill.temperature) if self.distilling() else None
        if self.tcfg.grad_cache:
            chunk = self.tcfg.grad_cache_chunk
            pf = model.tokenize(passages, "passage", tokenizer)
            return DualBatch(split_features(qf, chunk), split_features(pf, chunk), None, keys, t_logits)
        chunks = bucket_chunks([len(t) for t in passages], self.tcfg.length_buckets)
        pf = [model.tokenize([passages[i] for i in c], "passage", tokenizer) for c in chunks]
        return DualBatch([qf], pf, input_order(chunks), keys, t_logits)

    def backward(self, model: DualEncoder, batch: DualBatch, device: torch.device, bf16: bool) -> torch.Tensor:
        """Forward and backward of a collated batch on `device`; returns the detached loss (scalar)."""
        distill = self.cfg.distill

        def enc_q(f: dict) -> torch.Tensor:
            with autocast(bf16, device):
                return model.encode_queries(f)

        def enc_p(f: dict) -> torch.Tensor:
            with autocast(bf16, device):
                return model.encode_passages(f)

        def loss_fn(q: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
            loss = contrastive_loss(q, p, model.cfg.temperature, p_keys=batch.keys, cross_batch=self.tcfg.cross_batch)
            if batch.teacher is None:
                return loss
            # each query against its own group only (this worker's passages, before any cross-batch gather)
            own = (q.float().unsqueeze(1) * p.float().view(q.shape[0], -1, p.shape[1])).sum(-1) / model.cfg.temperature
            return loss + distill.weight * distillation_loss(own, batch.teacher, distill.kind, over_workers=True)

        if self.tcfg.grad_cache:
            return cached_backward_chunks([(enc_q, batch.queries), (enc_p, batch.passages)], loss_fn)
        q = in_order([enc_q(f) for f in batch.queries], None)  # queries first: the same dropout draws as the cached path
        p = in_order([enc_p(f) for f in batch.passages], batch.order)
        loss = loss_fn(q, p)
        loss.backward()
        return loss.detach()

    def loss_backward(self, model: DualEncoder, rows: list[dict], device: torch.device, bf16: bool,
                      epoch: int = 0) -> torch.Tensor:
        """Forward and backward for this worker's rows; returns the detached loss (scalar)."""
        return self.backward(model, to_device(self.collate(model, rows, epoch), device), device, bf16)

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
        return CrossEncoder.from_base(self.cfg.cross.base, self.cfg.cross.max_len, self.cfg.cross.head)

    def sequences_per_row(self) -> int:
        return 1 + self.n

    def collate(self, model: CrossEncoder, rows: list[dict], epoch: int = 0, tokenizer: Any = None) -> CrossBatch:
        """This worker's question groups -> CPU tensors (`tokenizer`: the calling thread's own copy of the model's)."""
        queries = [r["query"] for r in rows for _ in r["passages"]]
        passages = [p for r in rows for p in r["passages"]]
        labels = torch.tensor([float(x) for r in rows for x in r["labels"]])
        chunks = bucket_chunks([len(q) + len(p) for q, p in zip(queries, passages)], self.tcfg.length_buckets)
        pairs = [model.tokenize([queries[i] for i in c], [passages[i] for i in c], tokenizer) for c in chunks]
        width = max(len(r["passages"]) for r in rows)
        slot = torch.tensor([i * width + j for i, r in enumerate(rows) for j in range(len(r["passages"]))])
        grid_labels = torch.zeros(len(rows) * width).index_copy(0, slot, labels).view(len(rows), width)
        grid_mask = torch.zeros(len(rows) * width, dtype=torch.bool).index_fill(0, slot, True).view(len(rows), width)
        if "listwise" in self.tcfg.loss:
            check_groups(grid_labels, grid_mask)  # here, on the CPU: in the loss on the device it would sync
        return CrossBatch(pairs, input_order(chunks), labels, slot, grid_labels, grid_mask)

    def backward(self, model: CrossEncoder, batch: CrossBatch, device: torch.device, bf16: bool) -> torch.Tensor:
        """Forward and backward of a collated batch on `device`; returns the detached loss (scalar)."""

        def forward(feats: Features) -> torch.Tensor:
            with autocast(bf16, device):
                return model(feats)

        logits = in_order([forward(f) for f in batch.pairs], batch.order)
        loss = torch.zeros((), device=device)
        if "listwise" in self.tcfg.loss:
            groups, width = batch.grid_mask.shape
            grid = torch.full((groups * width,), float("-inf"), device=device).index_copy(0, batch.slot, logits.float())
            loss = loss + listwise_loss(grid.view(groups, width), batch.grid_labels, batch.grid_mask)
        if "bce" in self.tcfg.loss:
            loss = loss + bce_loss(logits, batch.labels)
        loss.backward()
        return loss.detach()

    def loss_backward(self, model: CrossEncoder, rows: list[dict], device: torch.device, bf16: bool,
                      epoch: int = 0) -> torch.Tensor:
        """Forward and backward for this worker's rows; returns the detached loss (scalar)."""
        return self.backward(model, to_device(self.collate(model, rows, epoch), device), device, bf16)

    @torch.no_grad()
    def validate(self, model: CrossEncoder, rows: list[dict], device: torch.device, bf16: bool) -> torch.Tensor:
        """Rank each held-out group's passages by the cross-encoder's logit -> `rank_sums` of these rows."""
        if not rows:
            return rank_sums(torch.zeros(0, dtype=torch.long))
        pairs = [(r["query"], p) for r in rows for p in r["passages"]]
        flat = batched_inference(model, [q + p for q, p in pairs], VALIDATION_BATCH, "true" if bf16 else "false", device,
                                 lambda idx: model.tokenize([pairs[j][0] for j in idx], [pairs[j][1] for j in idx]),
                                 model).tolist()  # logits: a sigmoid could tie them
        scores, lab, mask = _grid(_split(flat, [len(r["passages"]) for r in rows]), [r["labels"] for r in rows])
        return rank_sums(group_ranks(scores, lab, mask))

    def export(self, model: CrossEncoder, path: Path, meta: dict) -> None:
        model.save(path, extra_meta={"training": meta})


TASKS = {"dual": DualTask, "cross": CrossTask}
