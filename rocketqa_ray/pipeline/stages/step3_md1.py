"""Step 3: the dual encoder M_D1, trained with hard negatives from M_D0's top-k (and optionally BM25's), minus
those the cross-encoder finds likely positive (denoising); the ablation trains on them undenoised."""

from __future__ import annotations

from pathlib import Path

from rocketqa_ray.config import Config
from rocketqa_ray.evaluation import has_answer
from rocketqa_ray.io import write_json
from rocketqa_ray.pipeline.checks import ce_fallback
from rocketqa_ray.pipeline.context import Context
from rocketqa_ray.pipeline.registry import StageResult, stage
from rocketqa_ray.pipeline.shared import (
    EXAMPLES,
    bm25_negatives,
    candidate_ce_scores,
    dense_eval,
    dense_scores,
    dual_encoder_check,
    dual_examples,
    gold_positive,
    heldout_eval,
    train_dual_encoder,
    train_top,
    training_summary,
)
from rocketqa_ray.rocketqa.denoise import DenoiseRule, answer_rates, denoise
from rocketqa_ray.rocketqa.diagnostics import denoise_report
from rocketqa_ray.types import PairScores, RankedIds

# bm25: mining.bm25_negatives joins BM25's top passages to the pool (and the fused fallback weighs BM25)
SECTIONS = ("data", "model", "dual", "mining", "index", "eval", "bm25", "distill")
POOL = "hard_negative_pool.json"
SCORES = "denoise_scores.parquet"  # the scores denoising used (fused under the fallback), the positives flagged


def train_md1(ctx: Context, cfg: Config, d: Path, denoised: bool) -> StageResult:
    m = cfg.mining
    train = ctx.splits.train
    md0_top = {q: v[: m.denoise_top] for q, v in train_top(ctx, "md0").items()}
    cands = md0_top
    sources = {"md0": cands}
    stats: dict = {}
    if m.bm25_negatives:
        lexical = bm25_negatives(ctx, train, m.bm25_negatives)
        sources["bm25"] = lexical
        cands = {q: list(dict.fromkeys(cands.get(q, []) + lexical.get(q, []))) for q in train}
        stats["pool_per_question"] = round(sum(map(len, cands.values())) / max(1, len(cands)), 2)
    fallback = ce_fallback(ctx.stage_dir("mc")) if denoised else None
    rule = DenoiseRule(m.denoise, m.denoise_threshold, m.denoise_relative, m.denoise_margin)
    dropped: RankedIds = {}
    scores: PairScores | None = None
    if denoised and m.denoise != "none" and fallback != "skip":
        pairs = [(q, p) for q, ps in cands.items() for p in ps]
        # the positive is scored too: the bar of a relative/margin rule, the teacher's score of the positive for
        # distillation, and what lets bench/denoise_rules.py compare every rule on the same scores
        gold = gold_positive(ctx, list(cands))
        pairs += [(q, p) for q, p in gold.items()]
        # md0's candidates are scored from its candidates folder, joined to their texts by Ray Data; only BM25's
        # additions and the gold positives travel as ids from here
        mined = {(q, p) for q, ps in md0_top.items() for p in ps}
        extra = list(dict.fromkeys(pair for pair in pairs if pair not in mined))
        scores = candidate_ce_scores(ctx, "md0", m.denoise_top, extra, list(cands), d / "denoise_scores")
        if fallback == "fused":  # the cross-encoder alone failed its check: its fusion with M_D0 and BM25 decides
            scores = fused_md0_scores(ctx, pairs, scores)
            stats["denoise_scores"] = "fused (cross-encoder check failed)"
        positives = {q: scores[(q, p)] for q, p in gold.items()}
        write_scores(scores, gold, d / SCORES)
        if positives:
            stats["positive_score_mean"] = round(sum(positives.values()) / len(positives), 4)
        res = denoise(cands, scores, rule, m.denoise_top + m.bm25_negatives, positives)
        pool, dropped = res.kept, res.dropped
        stats.update(res.stats)
        if ctx.data.has_answers(train):
            texts = ctx.ptexts(p for part in (res.dropped, res.kept) for ps in part.values() for p in ps)
            stats.update(answer_rates(res, {q: ctx.data.queries[q]["answers"] for q in train}, has_answer,
                                      texts.__getitem__))
    else:
        pool = cands
        if fallback == "skip" and m.denoise != "none":
            stats["denoise_scores"] = "skipped (cross-encoder check failed)"
    if ctx.known_positives is not None:  # diagnostic only: how many known false negatives denoising removed
        stats["false_negatives"] = denoise_report(cands, dropped, ctx.known_positives, sources)
    write_json(d / POOL, pool)
    rows = dual_examples(ctx, train, pool, scores=scores)  # the scores: distillation's soft targets
    init = ctx.stage_dir("md0") / "model" if cfg.dual.init == "previous" else None
    model_dir = train_dual_encoder(ctx, cfg, d, rows, init=init)
    metrics, index_dir = dense_eval(ctx, model_dir, d, d.name)
    stats["train_questions"] = len(rows)
    stats.update(training_summary(d, [d / EXAMPLES], cfg))
    heldout = heldout_eval(ctx, model_dir, index_dir, d)
    stats.update(heldout)
    if denoised:
        stats.update(dual_encoder_check(ctx, d.name, "md0", heldout))
    return StageResult(metrics, stats)


def write_scores(scores: PairScores, gold: dict[str, str], path: Path) -> Path:
    """(qid, pid, score, positive) of every scored pair, atomically: what the denoising decided on."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from rocketqa_ray.io import atomic_path

    keys = list(scores)
    table = pa.table({"qid": [q for q, _ in keys], "pid": [p for _, p in keys],
                      "score": pa.array([scores[k] for k in keys], pa.float32()),
                      "positive": [gold.get(q) == p for q, p in keys]})
    with atomic_path(path, suffix=".parquet") as tmp:
        pq.write_table(table, tmp)
    return path


def fused_md0_scores(ctx: Context, pairs: list[tuple[str, str]], ce: PairScores) -> PairScores:
    """The cross-encoder's probabilities for M_D0's candidates fused with M_D0's and BM25's scores, by the fusion
    step 2 fit for M_D0 on held-out dev (`mc/rerank_check.json`)."""
    from rocketqa_ray.io import read_json
    from rocketqa_ray.retrieval.fusion import fuse_scores
    from rocketqa_ray.retrieval.rerank_check import RERANK_CHECK, RerankCheck

    fusion = RerankCheck.from_dict(read_json(ctx.stage_dir("mc") / RERANK_CHECK)).fusion
    if fusion is None:
        return ce
    dense = dense_scores(ctx, "md0", pairs)
    ranked = {}
    for (q, p), v in zip(pairs, dense):
        ranked.setdefault(q, []).append((p, float(v)))
    return fuse_scores(ranked, ce, fusion, ctx.bm25_scores(pairs) if fusion.uses_bm25 else None)


@stage("md1", deps=("md0", "mc"), sections=SECTIONS, label="M_D1: + denoised hard negatives", retriever=True,
       paper_mrr10=36.4)
def md1(ctx: Context, cfg: Config, d: Path) -> StageResult:
    return train_md1(ctx, cfg, d, denoised=True)


@stage("md1_undenoised", deps=("md0",), sections=SECTIONS, label="ablation: M_D1 without denoising", ablation=True,
       variant=True, retriever=True)
def md1_undenoised(ctx: Context, cfg: Config, d: Path) -> StageResult:
    return train_md1(ctx, cfg, d, denoised=False)
