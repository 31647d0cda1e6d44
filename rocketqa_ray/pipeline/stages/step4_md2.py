"""Step 4: the dual encoder M_D2, trained on step 3's examples plus pseudo-labelled questions: M_D1 retrieves
for the unlabelled questions, the (fused) cross-encoder labels a confident positive and confident negatives."""

from __future__ import annotations

from pathlib import Path

from rocketqa_ray.config import Config
from rocketqa_ray.data.examples import check_examples
from rocketqa_ray.pipeline.checks import ce_fallback
from rocketqa_ray.pipeline.context import Context
from rocketqa_ray.pipeline.registry import StageResult, stage
from rocketqa_ray.pipeline.shared import (
    EXAMPLES,
    ce_scores,
    dense_eval,
    dual_encoder_check,
    dual_examples,
    fusion,
    heldout_eval,
    retrieve,
    train_dual_encoder,
    training_summary,
)
from rocketqa_ray.rocketqa.pseudo_label import pseudo_label


@stage("md2", deps=("md1", "mc"), sections=("data", "model", "dual", "mining", "index", "eval", "distill"),
       label="M_D2: + pseudo-labels", retriever=True, paper_mrr10=37.0)
def md2(ctx: Context, cfg: Config, d: Path) -> StageResult:
    from rocketqa_ray.retrieval.fusion import fuse_scores
    from rocketqa_ray.rocketqa.diagnostics import pseudo_report

    m = cfg.mining
    md1 = ctx.stage_dir("md1")
    md1_model = md1 / "model"
    labelled = md1 / EXAMPLES  # md2 trains on md1's examples, then its own pseudo-labelled ones
    stats: dict = {"labelled_questions": check_examples(labelled, "dual")["rows"]}
    rows: list[dict] = []
    pseudo_q = ctx.splits.pseudo
    fallback = ce_fallback(ctx.stage_dir("mc"))
    if fallback is not None and fusion(ctx) is None:
        fallback = "skip"  # no fusion to fall back on
    if fallback is not None:
        stats["pseudo_scores"] = f"{'fused' if fallback == 'fused' else 'skipped'} (cross-encoder check failed)"
    if m.pseudo and pseudo_q and fallback != "skip":
        ranked = retrieve(ctx, md1_model, md1 / "index", pseudo_q, m.pseudo_top_k)
        cands = {q: [p for p, _ in v] for q, v in ranked.items()}
        scores = ce_scores(ctx, [(q, p) for q, ps in cands.items() for p in ps], d / "pseudo_scores")
        fused = fusion(ctx)
        if fused is not None:
            scores = fuse_scores(ranked, scores, fused, ctx.bm25_scores(list(scores)) if fused.uses_bm25 else None)
        qrels = ctx.train_qrels
        hidden = {q: qrels[q] for q in pseudo_q if q in qrels}
        pl = pseudo_label(cands, scores, m.pseudo_pos_threshold, m.pseudo_neg_threshold, hidden_gold=hidden or None)
        stats.update({f"pseudo_{k}": v for k, v in pl.stats.items()})
        if ctx.known_positives is not None:  # diagnostic only
            stats["pseudo_known_positives"] = pseudo_report(pl.positives, hidden, ctx.known_positives)
        rows = dual_examples(ctx, sorted(pl.positives), pl.negatives, positives=pl.positives, scores=scores)
    stats["train_questions"] = stats["labelled_questions"] + len(rows)
    init = md1_model if cfg.dual.init == "previous" else None
    model_dir = train_dual_encoder(ctx, cfg, d, rows, init=init, before=[labelled])
    metrics, index_dir = dense_eval(ctx, model_dir, d, "md2")
    heldout = heldout_eval(ctx, model_dir, index_dir, d, trained_on_pseudo=True)
    stats.update(heldout)
    stats.update(training_summary(d, [labelled, *([d / EXAMPLES] if rows else [])], cfg))
    stats.update(dual_encoder_check(ctx, "md2", "md1", heldout))
    return StageResult(metrics, stats)
