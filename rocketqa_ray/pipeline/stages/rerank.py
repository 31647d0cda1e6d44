"""The product's answer: M_D2's top-k reranked by the (fused) cross-encoder M_C."""

from __future__ import annotations

from pathlib import Path

from rocketqa_ray.config import Config
from rocketqa_ray.pipeline.context import Context
from rocketqa_ray.pipeline.registry import StageResult, stage
from rocketqa_ray.pipeline.shared import rerank_eval


@stage("md2_rerank", deps=("md2", "mc"), sections=("eval",), label="M_D2 + M_C rerank")
def md2_rerank(ctx: Context, cfg: Config, d: Path) -> StageResult:
    metrics, stats = rerank_eval(ctx, "md2", d)
    return StageResult(metrics, stats)
