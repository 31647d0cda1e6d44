"""The product's answer: M_D2's top-k reranked by the cross-encoder M_C fused with M_D2's and BM25's scores (a
fusion fit for M_D2 on held-out dev), or M_D2's own ranking where held-out dev showed the rerank no better."""

from __future__ import annotations

from pathlib import Path

from rocketqa_ray.config import Config
from rocketqa_ray.pipeline.context import Context
from rocketqa_ray.pipeline.registry import StageResult, stage
from rocketqa_ray.pipeline.reranking import rerank_eval


@stage("md2_rerank", deps=("md2", "mc"), sections=("data", "cross", "eval", "bm25"), label="M_D2 + M_C rerank",
       reranks="md2")
def md2_rerank(ctx: Context, cfg: Config, d: Path) -> StageResult:
    metrics, stats = rerank_eval(ctx, "md2", d)
    return StageResult(metrics, stats)
