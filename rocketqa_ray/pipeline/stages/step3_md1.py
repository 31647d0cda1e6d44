"""Step 3: the dual encoder M_D1, trained with hard negatives from M_D0's top-k (and optionally BM25's), minus
those the cross-encoder finds likely positive (denoising); the ablation trains on them undenoised."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from rocketqa_ray.batch.pair_flow import read_pair_scores
from rocketqa_ray.config import Config
from rocketqa_ray.data.examples import order_key
from rocketqa_ray.evaluation import has_answer
from rocketqa_ray.io import write_json
from rocketqa_ray.pipeline.checks import ce_fallback
from rocketqa_ray.pipeline.context import Context
from rocketqa_ray.pipeline.registry import StageResult, stage
from rocketqa_ray.pipeline.shared import (
    EXAMPLES,
    TRAIN_TOP,
    bm25_negatives,
    candidate_score_folder,
    dense_eval,
    dense_scores,
    dual_encoder_check,
    gold_positive,
    heldout_eval,
    top_up_source,
    train_dual_encoder,
    train_top,
    training_summary,
)
from rocketqa_ray.rocketqa.denoise import DenoiseResult, DenoiseRule, answer_rates
from rocketqa_ray.rocketqa.question_negatives import MiningPlan, Question, decide, stats_of
from rocketqa_ray.types import PairScores, RankedIds

if TYPE_CHECKING:
    from rocketqa_ray.retrieval.fusion import Fusion

# bm25: mining.bm25_negatives joins BM25's top passages to the pool (and the fused fallback weighs BM25)
SECTIONS = ("data", "model", "dual", "mining", "index", "eval", "bm25", "distill")
POOL = "hard_negative_pool.json"
SCORES = "denoise_scores.parquet"  # the scores denoising used (fused under the fallback), the positives flagged
FUSED_SCORES = "fused_scores"  # in flows under the fallback: the pairs with their fused score (and `ce`)


def train_md1(ctx: Context, cfg: Config, d: Path, denoised: bool) -> StageResult:
    m = cfg.mining
    train = ctx.splits.train
    fallback = ce_fallback(ctx.stage_dir("mc")) if denoised else None
    scoring = denoised and m.denoise != "none" and fallback != "skip"
    plan = mining_plan(cfg, scoring)
    stats: dict = {}
    lexical = bm25_negatives(ctx, train, m.bm25_negatives) if m.bm25_negatives else {}
    scores: Path | None = None
    in_flow = len(train) > cfg.data.driver_max_examples
    if scoring:
        scores = denoise_scores(ctx, d, lexical, fallback == "fused", in_flow)
        if fallback == "fused":
            stats["denoise_scores"] = "fused (cross-encoder check failed)"
    elif fallback == "skip" and m.denoise != "none":
        stats["denoise_scores"] = "skipped (cross-encoder check failed)"
    if in_flow:
        examples, decided = decide_in_flow(ctx, plan, d, lexical, scores)
        rows: list[dict] = []
    else:
        rows, decided = decide_in_driver(ctx, plan, d, lexical, scores)
        examples = None
    stats.update(decided)
    init = ctx.stage_dir("md0") / "model" if cfg.dual.init == "previous" else None
    model_dir = train_dual_encoder(ctx, cfg, d, rows, init=init, before=[examples] if examples else ())
    metrics, index_dir = dense_eval(ctx, model_dir, d, d.name)
    stats.update(training_summary(d, [d / EXAMPLES], cfg))
    heldout = heldout_eval(ctx, model_dir, index_dir, d)
    stats.update(heldout)
    if denoised:
        stats.update(dual_encoder_check(ctx, d.name, "md0", heldout))
    return StageResult(metrics, stats)


def mining_plan(cfg: Config, scoring: bool) -> MiningPlan:
    """How each question's rows are decided: the denoise rule (None: no scores), the pool size, the negatives per
    row, the seed and the candidates' sources."""
    m = cfg.mining
    rule = DenoiseRule(m.denoise, m.denoise_threshold, m.denoise_relative, m.denoise_margin) if scoring else None
    return MiningPlan(rule, m.denoise_top + m.bm25_negatives, cfg.dual.num_hard_negatives, m.seed,
                      ("md0", "bm25") if m.bm25_negatives else ("md0",))


def denoise_scores(ctx: Context, d: Path, lexical: RankedIds, fused: bool, in_flow: bool) -> Path:
    """The scores denoising decides on: the cross-encoder's probabilities for md0's top `denoise_top` candidates,
    BM25's additions and each question's positive, or (`fused`: the cross-encoder alone failed its check) their
    fusion with M_D0's and BM25's scores by the fusion step 2 fit for M_D0 on dev. In flows (`in_flow`) each pair
    gets its dense and BM25 features while it has its texts and is fused by a Ray Data map; else the driver fuses
    (`fused_md0_scores`) and writes the result to d/SCORES."""
    from rocketqa_ray.batch.pair_dense import DenseFeature
    from rocketqa_ray.batch.pair_flow import fuse_pair_files

    m, train = ctx.cfg.mining, ctx.splits.train
    # the positive is scored too: the bar of a relative/margin rule, the teacher's score of the positive for
    # distillation, and what lets bench/denoise_rules.py compare every rule on the same scores. md0's candidates
    # are scored from its candidates folder, joined to their texts by Ray Data; only BM25's additions and the gold
    # positives travel as ids from here
    gold = gold_positive(ctx, train)
    mined = {(q, p) for q, ps in train_top(ctx, "md0").items() for p in ps[: m.denoise_top]} if lexical else set()
    extra = list(dict.fromkeys([*((q, p) for q, ps in lexical.items() for p in ps if (q, p) not in mined),
                                *gold.items()]))
    fusion = md0_fusion(ctx) if fused else None
    features = None
    if in_flow and fusion is not None:  # the fusion's features come with each pair, where it has its texts
        enc = ctx.cfg.encode
        features = {"dense": DenseFeature(str(ctx.stage_dir("md0") / "model"), enc.batch_size, enc.bf16),
                    "bm25": ctx.bm25_feature() if fusion.uses_bm25 else None}
    scores = candidate_score_folder(ctx, "md0", m.denoise_top, extra, train, d / "denoise_scores", features)
    if in_flow:  # no fusion fit: the cross-encoder's probability alone, as fused_md0_scores gives
        return fuse_pair_files(scores, fusion, d / FUSED_SCORES, ctx.cfg.ray) if fusion is not None else scores
    if fused:
        raw = read_pair_scores(scores)
        return write_scores(fused_md0_scores(ctx, list(raw), raw), gold, d / SCORES)
    return scores


def decide_in_driver(ctx: Context, plan: MiningPlan, d: Path, lexical: RankedIds,
                     scores: Path | None) -> tuple[list[dict], dict]:
    """Every question's rows decided here (`rocketqa.question_negatives.decide`), for a set small enough to hold:
    also writes the kept pools (d/POOL), the scores decided on (d/SCORES) and how often dropped and kept
    negatives contain an answer string (data with answers)."""
    train = ctx.splits.train
    top = ctx.cfg.mining.denoise_top
    md0 = {q: v[:top] for q, v in train_top(ctx, "md0").items()}
    by_q: dict[str, dict[str, float]] = {}
    if scores is not None:
        for (q, p), v in read_pair_scores(scores).items():
            by_q.setdefault(q, {})[p] = v
    qrels, known = ctx.train_qrels, ctx.known_positives
    pool, dropped, counts, rows = {}, {}, [], []
    top_up = top_up_source(ctx)
    for q in train:
        if not qrels.get(q):
            continue
        sources = {name: v for name, v in (("md0", md0.get(q)), ("bm25", lexical.get(q))) if v}
        x = Question(q, ctx.qtext(q), list(qrels[q]), sources, by_q.get(q, {}) if plan.rule is not None else None,
                     set(known.get(q, {})) if known is not None else None)
        res = decide(x, plan, top_up)
        pool[q], dropped[q] = res.kept, res.dropped
        counts.append(res.counts)
        rows += res.rows
    rows.sort(key=lambda r: order_key(plan.seed, r["qid"], r["positive_id"]))
    stats = {**stats_of(counts, plan), "train_questions": len(rows)}
    write_json(d / POOL, pool)
    if scores is not None and scores.is_dir():  # the fused scores were written there already
        gold = gold_positive(ctx, train)
        write_scores({(q, p): v for q, ps in by_q.items() for p, v in ps.items()}, gold, d / SCORES)
    if plan.rule is not None and ctx.data.has_answers(train):
        texts = ctx.ptexts(p for part in (dropped, pool) for ps in part.values() for p in ps)
        stats.update(answer_rates(DenoiseResult(pool, dropped), {q: ctx.data.queries[q]["answers"] for q in train},
                                  has_answer, texts.__getitem__))
    return rows, stats


def decide_in_flow(ctx: Context, plan: MiningPlan, d: Path, lexical: RankedIds,
                   scores: Path | None) -> tuple[Path, dict]:
    """Every question's rows decided per question group by Ray Data (`batch.negatives_flow`) and given their texts
    by the examples flow: the driver writes the questions (and BM25's candidates, known positives) as files."""
    from rocketqa_ray.batch.examples_flow import examples_flow
    from rocketqa_ray.batch.negatives_flow import negatives_flow, write_question_positives, write_ranked
    from rocketqa_ray.data.passages import top_up_ids

    train, qrels, known = ctx.splits.train, ctx.train_qrels, ctx.known_positives
    inputs = d / "decide_inputs"
    questions = write_question_positives([(q, ctx.qtext(q), list(qrels[q])) for q in train if qrels.get(q)],
                                         inputs / "questions.parquet")
    extra = [write_ranked(lexical, inputs / "bm25.parquet")] if "bm25" in plan.sources else []
    known_file = write_ranked({q: list(v) for q, v in known.items()}, inputs / "known.parquet") \
        if known is not None else None
    ids, stats = negatives_flow(questions, ctx.stage_dir("md0") / TRAIN_TOP, ctx.cfg.mining.denoise_top, plan,
                                d / "decided", top_up_ids(ctx.passages), scores=[scores] if scores else [],
                                extra=extra, known=known_file, ray_cfg=ctx.cfg.ray)
    return examples_flow(ids, ctx.corpus_store, d / EXAMPLES, ctx.cfg.ray), stats


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


def md0_fusion(ctx: Context) -> Fusion | None:
    """The fusion step 2 fit for M_D0 on held-out dev (`mc/rerank_check.json`; None: the cross-encoder alone)."""
    from rocketqa_ray.io import read_json
    from rocketqa_ray.retrieval.rerank_check import RERANK_CHECK, RerankCheck

    return RerankCheck.from_dict(read_json(ctx.stage_dir("mc") / RERANK_CHECK)).fusion


def fused_md0_scores(ctx: Context, pairs: list[tuple[str, str]], ce: PairScores) -> PairScores:
    """The cross-encoder's probabilities for M_D0's candidates fused with M_D0's and BM25's scores, by the fusion
    step 2 fit for M_D0 on held-out dev (`mc/rerank_check.json`)."""
    from rocketqa_ray.retrieval.fusion import fuse_scores

    fusion = md0_fusion(ctx)
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
