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
    mine_candidates,
    retrieve,
    train_dual_encoder,
    training_summary,
)
from rocketqa_ray.rocketqa.pseudo_label import pseudo_label

LABELS = "pseudo_labels"  # the flow's output: every question's counts, and the labelled questions' id rows


@stage("md2", deps=("md1", "mc"), sections=("data", "model", "dual", "mining", "index", "eval", "distill"),
       label="M_D2: + pseudo-labels", retriever=True, paper_mrr10=37.0)
def md2(ctx: Context, cfg: Config, d: Path) -> StageResult:
    m = cfg.mining
    md1 = ctx.stage_dir("md1")
    md1_model = md1 / "model"
    labelled = md1 / EXAMPLES  # md2 trains on md1's examples, then its own pseudo-labelled ones
    stats: dict = {"labelled_questions": check_examples(labelled, "dual")["rows"]}
    rows: list[dict] = []
    pseudo: Path | None = None  # the flow's examples folder
    pseudo_q = ctx.splits.pseudo
    fallback = ce_fallback(ctx.stage_dir("mc"))
    if fallback is not None and fusion(ctx) is None:
        fallback = "skip"  # no fusion to fall back on
    if fallback is not None:
        stats["pseudo_scores"] = f"{'fused' if fallback == 'fused' else 'skipped'} (cross-encoder check failed)"
    added = 0
    if m.pseudo and pseudo_q and fallback != "skip":
        if len(pseudo_q) > cfg.data.driver_max_examples:
            pseudo, labels = label_in_flow(ctx, cfg, d)
        else:
            rows, labels = label_in_driver(ctx, cfg, d)
        stats.update({f"pseudo_{k}": v for k, v in labels.items()})
        added = labels["labelled"]
    stats["train_questions"] = stats["labelled_questions"] + added
    init = md1_model if cfg.dual.init == "previous" else None
    model_dir = train_dual_encoder(ctx, cfg, d, rows, init=init, before=[labelled, *([pseudo] if pseudo else [])])
    metrics, index_dir = dense_eval(ctx, model_dir, d, "md2")
    heldout = heldout_eval(ctx, model_dir, index_dir, d, trained_on_pseudo=True)
    stats.update(heldout)
    stats.update(training_summary(d, [labelled, *([d / EXAMPLES] if added else [])], cfg))
    stats.update(dual_encoder_check(ctx, "md2", "md1", heldout))
    return StageResult(metrics, stats)


def label_in_driver(ctx: Context, cfg: Config, d: Path) -> tuple[list[dict], dict]:
    """Step 4 for a set of questions small enough to hold (`data.driver_max_examples`): their dual id rows, and
    the pseudo-label stats (`known_positives` with diagnostic qrels)."""
    from rocketqa_ray.retrieval.fusion import fuse_scores
    from rocketqa_ray.rocketqa.diagnostics import pseudo_report

    m, md1, pseudo_q = cfg.mining, ctx.stage_dir("md1"), ctx.splits.pseudo
    ranked = retrieve(ctx, md1 / "model", md1 / "index", pseudo_q, m.pseudo_top_k)
    cands = {q: [p for p, _ in v] for q, v in ranked.items()}
    scores = ce_scores(ctx, [(q, p) for q, ps in cands.items() for p in ps], d / "pseudo_scores")
    fused = fusion(ctx)
    if fused is not None:
        scores = fuse_scores(ranked, scores, fused, ctx.bm25_scores(list(scores)) if fused.uses_bm25 else None)
    qrels = ctx.train_qrels
    hidden = {q: qrels[q] for q in pseudo_q if q in qrels}
    pl = pseudo_label(cands, scores, m.pseudo_pos_threshold, m.pseudo_neg_threshold, hidden_gold=hidden or None)
    stats = dict(pl.stats)
    if ctx.known_positives is not None:  # diagnostic only
        stats["known_positives"] = pseudo_report(pl.positives, hidden, ctx.known_positives)
    return dual_examples(ctx, sorted(pl.positives), pl.negatives, positives=pl.positives, scores=scores), stats


def label_in_flow(ctx: Context, cfg: Config, d: Path) -> tuple[Path | None, dict]:
    """Step 4 at any size: M_D1's candidates mined into a folder, scored (with their BM25 when the fusion weighs
    it) by the pair flow, labelled per question by Ray Data (`batch.pseudo_flow`) and given their texts by the
    examples flow; the driver writes the questions and passes paths. Returns the examples folder (None when no
    question was labelled) and the same stats as `label_in_driver`."""
    from rocketqa_ray.batch.examples_flow import examples_flow
    from rocketqa_ray.batch.negatives_flow import write_ranked
    from rocketqa_ray.batch.pair_flow import score_pair_files
    from rocketqa_ray.batch.pseudo_flow import PseudoPlan, pseudo_flow, write_pseudo_questions
    from rocketqa_ray.data.passages import top_up_ids

    m, md1, pseudo_q = cfg.mining, ctx.stage_dir("md1"), ctx.splits.pseudo
    cands = mine_candidates(ctx, md1 / "model", md1 / "index", pseudo_q, m.pseudo_top_k, None,
                            d / "pseudo_candidates")
    qrels, known = ctx.train_qrels, ctx.known_positives
    inputs = d / "pseudo_inputs"
    questions = write_pseudo_questions([(q, ctx.qtext(q), list(qrels[q]) if q in qrels else None) for q in pseudo_q],
                                       inputs / "questions.parquet")
    fused = fusion(ctx)
    feature = ctx.bm25_feature() if fused is not None and fused.uses_bm25 else None
    scores = score_pair_files(ctx.stage_dir("mc") / "model", ctx.corpus_store, questions, d / "pseudo_scores",
                              cfg.encode, candidates=cands, top=m.pseudo_top_k, ray_cfg=cfg.ray, bm25=feature)
    known_file = write_ranked({q: list(known[q]) for q in pseudo_q if q in known}, inputs / "known.parquet") \
        if known is not None else None
    plan = PseudoPlan(m.pseudo_pos_threshold, m.pseudo_neg_threshold, cfg.dual.num_hard_negatives, m.seed, fused)
    ids, stats = pseudo_flow(questions, cands, m.pseudo_top_k, scores, plan, d / LABELS, top_up_ids(ctx.passages),
                             known=known_file, ray_cfg=cfg.ray)
    return (examples_flow(ids, ctx.corpus_store, d / EXAMPLES, cfg.ray) if ids else None), stats
