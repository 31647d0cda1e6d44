"""Step 1: the dual encoder M_D0, trained on gold positives with cross-batch negatives (Ray Train); its top-k for
the training questions become the hard-negative candidates of steps 2 and 3."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from rocketqa_ray.config import CONTINUATION_KEYS, Config
from rocketqa_ray.pipeline.context import Context
from rocketqa_ray.pipeline.registry import StageResult, stage
from rocketqa_ray.pipeline.shared import (
    TRAIN_TOP,
    dense_eval,
    dual_encoder_check,
    dual_examples,
    heldout_eval,
    mine_candidates,
    train_dual_encoder,
    training_summary,
)

# md0 writes its top mining.top_k for the training questions (steps 2 and 3 read them); mining.seed orders its rows.
# The rest of `mining` (how steps 3-4 denoise and pseudo-label) and the continuation keys never retrain it.
SECTIONS = ("data", "model", "dual", "index", "eval", "mining.top_k", "mining.seed")


def train_md0(ctx: Context, cfg: Config, d: Path, mine: bool) -> StageResult:
    """Train on the labelled training questions, evaluate; with `mine`, write their top `mining.top_k`
    (gold excluded) to the candidates folder d/train_top."""
    train = ctx.splits.train
    model_dir = train_dual_encoder(ctx, cfg, d, dual_examples(ctx, train, None))
    metrics, index_dir = dense_eval(ctx, model_dir, d, d.name)
    stats = {"train_questions": len(train), "cross_batch": cfg.dual.cross_batch, "workers": cfg.ray.num_workers,
             "negatives_per_query": cfg.dual.batch_size * (cfg.ray.num_workers if cfg.dual.cross_batch else 1) - 1,
             **training_summary(d), **heldout_eval(ctx, model_dir, index_dir, d)}
    if mine:  # the recipe's M_D0, not its ablation: it must improve on the untrained model
        stats.update(dual_encoder_check(ctx, d.name, "zero_shot", stats))
    if mine:
        qrels = ctx.train_qrels
        k = cfg.mining.top_k
        mine_candidates(ctx, model_dir, index_dir, train, k, {q: set(qrels[q]) for q in train}, d / TRAIN_TOP)
    return StageResult(metrics, stats)


@stage("md0", sections=SECTIONS, label="M_D0: cross-batch negatives", variant=True, retriever=True,
       paper_mrr10=33.3, ignores=CONTINUATION_KEYS)
def md0(ctx: Context, cfg: Config, d: Path) -> StageResult:
    return train_md0(ctx, cfg, d, mine=True)


@stage("md0_inbatch", sections=SECTIONS, label="ablation: M_D0 in-batch only", ablation=True, variant=True,
       retriever=True, paper_mrr10=32.4, ignores=CONTINUATION_KEYS)
def md0_inbatch(ctx: Context, cfg: Config, d: Path) -> StageResult:
    return train_md0(ctx, replace(cfg, dual=replace(cfg.dual, cross_batch=False)), d, mine=False)
