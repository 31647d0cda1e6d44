"""Reference rows: BM25 and the untrained (zero-shot) base dual encoder."""

from __future__ import annotations

from pathlib import Path

from rocketqa_ray.config import Config
from rocketqa_ray.evaluation import run_from_arrays
from rocketqa_ray.pipeline.context import Context
from rocketqa_ray.pipeline.registry import StageResult, stage
from rocketqa_ray.pipeline.shared import dense_eval, evaluate, heldout_eval


@stage("bm25", sections=("data", "bm25", "eval"), label="BM25 (reference)", paper_mrr10=18.7)
def bm25(ctx: Context, cfg: Config, d: Path) -> StageResult:
    if not ctx.bm25_fits:
        return StageResult({}, {"skipped": f"{len(ctx.passages)} passages > bm25.max_passages "
                                           f"({cfg.bm25.max_passages}): no in-memory BM25 index"})
    r = ctx.bm25
    qids = ctx.splits.test
    idx, scores = r.search([ctx.qtext(q) for q in qids], k=cfg.eval.depth)
    run = run_from_arrays(qids, r.ids, idx, scores)
    b = cfg.bm25
    return StageResult(evaluate(ctx, run, d, "bm25"), {"stemmed": b.stem, "k1": b.k1, "b": b.b})


@stage("zero_shot", sections=("data", "model", "index", "eval"), label="zero-shot dual encoder (reference)",
       retriever=True)
def zero_shot(ctx: Context, cfg: Config, d: Path) -> StageResult:
    from rocketqa_ray.modeling.dual_encoder import DualEncoder

    model_dir = d / "model"
    if not model_dir.exists():
        DualEncoder.from_base(cfg.model).save(model_dir)
    metrics, index_dir = dense_eval(ctx, model_dir, d, "zero_shot")
    return StageResult(metrics, heldout_eval(ctx, model_dir, index_dir, d))
