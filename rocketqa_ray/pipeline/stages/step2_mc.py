"""Step 2: the cross-encoder M_C, trained on question groups (gold positive + negatives sampled from M_D0's
top-k), then calibrated into probabilities and fused with the retriever and BM25 scores on held-out groups."""

from __future__ import annotations

import json
import logging
import random
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np

from rocketqa_ray.config import Config
from rocketqa_ray.data.examples import order_key
from rocketqa_ray.data.splits import holdout
from rocketqa_ray.io import atomic_dir, read_json, write_json
from rocketqa_ray.pipeline.context import Context
from rocketqa_ray.pipeline.registry import StageResult, stage
from rocketqa_ray.pipeline.reranking import rerank_eval
from rocketqa_ray.pipeline.shared import (
    EXAMPLES,
    TRAIN_TOP,
    VAL_NEGATIVES,
    ce_scores,
    dense_scores,
    gold_positive,
    start_ray,
    top_up_source,
    train_top,
    training_summary,
    write_training_examples,
)
from rocketqa_ray.retrieval.candidates import SUCCESS
from rocketqa_ray.rocketqa.question_negatives import MiningPlan, Question, decide
from rocketqa_ray.types import RankedIds

log = logging.getLogger(__name__)
CALIBRATION = "calibration.json"


# of `mining`, only how many of md0's candidates its groups draw negatives from, and the seed that draws them and
# the calibration groups: a new denoising rule reuses the cross-encoder
@stage("mc", deps=("md0",), sections=("data", "cross", "mining.top_k", "mining.seed", "eval", "bm25"),
       label="M_C reranking M_D0 top-k", reranks="md0")
def mc(ctx: Context, cfg: Config, d: Path) -> StageResult:
    from rocketqa_ray.data.examples import attach_texts, cross_id_groups
    from rocketqa_ray.train.launch import train_cross

    start_ray(ctx)
    c = cfg.cross
    train = ctx.splits.train
    pos = gold_positive(ctx, train)
    parts = holdout(train, {"calib": c.calibration_fraction}, seed=cfg.mining.seed)
    ex = training_groups(ctx, cfg, d, parts["rest"], pos)
    if c.init == "md0":  # M_D0's encoder, a new 1-logit head (from_base adds one to a dual-encoder folder)
        cfg = replace(cfg, cross=replace(c, base=str(ctx.stage_dir("md0") / "model")))
    # calibration and the fusion fit run here, on a bounded random sample of the held-out groups, drawn as the
    # training groups are
    calib = parts["calib"]
    if len(calib) > c.max_calibration_groups:
        calib = sorted(random.Random(cfg.mining.seed).sample(calib, c.max_calibration_groups))
    top = train_top(ctx, "md0", calib)
    negs = {r["qid"]: r["negative_ids"] for r in group_rows(ctx, cfg, calib, pos, top)}
    # early stopping on the calibration groups (never trained on), with M_D0's hardest negatives: a positive
    # among 3 sampled negatives is ranked first too often to tell one checkpoint from the next
    val = None
    if c.eval_every > 0:  # the first `val_groups` calibration groups (all that training uses), texts read here
        first = calib[: c.val_groups]
        val = attach_texts(cross_id_groups({q: ctx.qtext(q) for q in first}, {q: pos[q] for q in first},
                                           {q: top.get(q, [])[:VAL_NEGATIVES] for q in first}), ctx.passages.texts)
    raw = train_cross(cfg, str(ex), str(d / "train"), name="mc", val_rows=val)
    stats = {"train_questions": len(parts["rest"]), "negatives_per_positive": c.num_negatives, "loss": c.loss,
             "init": c.init, **training_summary(d / "train")}
    if not (d / "model").exists():
        stats.update(calibrate(ctx, cfg, raw, calib, pos, negs, d))
    elif (d / CALIBRATION).exists():
        stats.update(read_json(d / CALIBRATION))
    # M_C's quality: rerank M_D0's test top-k (with a fusion fit for M_D0 on held-out dev)
    metrics, rerank_stats = rerank_eval(ctx, "md0", d)
    stats.update(rerank_stats)
    stats.update(check_cross_encoder(cfg, stats, d))
    return StageResult(metrics, stats)


def group_plan(cfg: Config) -> MiningPlan:
    """Step 2's draw: `cross.num_negatives` of M_D0's candidates per question, nothing denoised."""
    return MiningPlan(None, 0, cfg.cross.num_negatives, cfg.mining.seed)


def group_rows(ctx: Context, cfg: Config, qids: list[str], pos: dict[str, str], top: RankedIds) -> list[dict]:
    """The questions' dual id rows for step 2, in training order: the gold positive and `cross.num_negatives`
    drawn from M_D0's candidates (`top`) by the question's own seeded draw (`rocketqa.question_negatives.decide`,
    no denoising), topped up from the corpus when short; the same rows `batch.negatives_flow` builds."""
    plan = group_plan(cfg)
    top_up = top_up_source(ctx)
    rows = [r for q in qids
            for r in decide(Question(q, ctx.qtext(q), [pos[q]], {"md0": top[q]} if top.get(q) else {}), plan,
                            top_up).rows]
    return sorted(rows, key=lambda r: order_key(plan.seed, r["qid"], r["positive_id"]))


def training_groups(ctx: Context, cfg: Config, d: Path, qids: list[str], pos: dict[str, str]) -> Path:
    """Step 2's training examples (question groups): up to `data.driver_max_examples` questions drawn here
    (`group_rows`), more by Ray Data (`batch.negatives_flow` reads M_D0's candidates folder and draws per
    question group; the examples flow gives them their texts), the same groups in the same order."""
    from rocketqa_ray.data.examples import cross_id_row

    if len(qids) <= cfg.data.driver_max_examples:
        rows = group_rows(ctx, cfg, qids, pos, train_top(ctx, "md0", qids))
        return write_training_examples(ctx, [cross_id_row(r) for r in rows], d / EXAMPLES)
    from rocketqa_ray.batch.examples_flow import cross_id_parts, examples_flow
    from rocketqa_ray.batch.negatives_flow import negatives_flow, write_question_positives
    from rocketqa_ray.data.passages import top_up_ids

    if (d / EXAMPLES / SUCCESS).exists():
        return d / EXAMPLES
    questions = write_question_positives([(q, ctx.qtext(q), [pos[q]]) for q in qids],
                                         d / "groups_inputs" / "questions.parquet")
    ids, _ = negatives_flow(questions, ctx.stage_dir("md0") / TRAIN_TOP, cfg.mining.top_k, group_plan(cfg), d / "groups",
                            top_up_ids(ctx.passages), ray_cfg=cfg.ray)
    return examples_flow(cross_id_parts(ids, d / "group_ids"), ctx.corpus_store, d / EXAMPLES, cfg.ray)


def check_cross_encoder(cfg: Config, stats: dict, d: Path) -> dict:
    """Did M_C learn? The cross-encoder alone against M_D0 on the same held-out candidates: M_D0's top-k for the
    dev questions, or without a dev split the calibration groups (which M_D0 trained on: a harder bar). Saved
    for steps 3 and 4, which fall back (`cross.fallback`) when it did not."""
    from rocketqa_ray.pipeline.checks import ce_check, report_check, save_ce_check

    mode = cfg.cross.fallback if cfg.cross.fusion else "skip"
    dev = stats.get("rerank_check", {}).get("dev", {})
    if "ce_mrr@10" in dev:
        res = ce_check("held-out dev questions (M_D0's top-k)", dev["questions"], dev["ce_mrr@10"],
                       dev["retriever_mrr@10"], dev["ce_top1"], dev["retriever_top1"], mode,
                       dev.get("ce_minus_retriever_se"))
    elif "calib_mrr_dense" in stats:
        res = ce_check("calibration groups", stats["calib_questions"], stats["calib_mrr_ce"],
                       stats["calib_mrr_dense"], stats["calib_top1_acc"], stats["calib_top1_acc_dense"], mode)
    else:
        return {}
    save_ce_check(d, res, mode)
    return {"check": report_check(res, "mc", cfg.pipeline.strict)}


def top1(pairs: list[tuple[str, str]], score: np.ndarray, pos: dict[str, str]) -> float:
    """The fraction of questions whose positive scores highest in its group."""
    by_q: dict[str, list[tuple[float, bool]]] = {}
    for (q, p), v in zip(pairs, score):
        by_q.setdefault(q, []).append((float(v), p == pos[q]))
    return round(float(np.mean([max(v)[1] for v in by_q.values()])), 4)


def calibrate(ctx: Context, cfg: Config, raw: Path, calib: list[str], pos: dict[str, str],
              negs: dict[str, list[str]], d: Path) -> dict:
    """Platt-scale the trained cross-encoder on held-out question groups, fit the fusion, save it as `d/model`."""
    from rocketqa_ray.modeling.cross_encoder import CrossEncoder
    from rocketqa_ray.retrieval.fusion import fit_fusion, logits_from_probs
    from rocketqa_ray.retrieval.rerank_check import mrr_at
    from rocketqa_ray.rocketqa.calibration import fit_platt, fold_into_head

    pairs = [(q, p) for q in calib for p in [pos[q], *negs.get(q, [])]]
    if not calib or not any(negs.get(q) for q in calib):
        with atomic_dir(d / "model") as tmp:
            shutil.copytree(raw, tmp, dirs_exist_ok=True)
        return {"calibrated": False}
    scores = ce_scores(ctx, pairs, d / "calib_scores", model_dir=raw)
    labels = np.array([1.0 if p == pos[q] else 0.0 for q, p in pairs])
    logits = logits_from_probs(np.array([scores[x] for x in pairs]))
    a, b = fit_platt(logits, labels)
    model = CrossEncoder.load(raw)
    fold_into_head(model.model, a, b)
    calibrated = 1 / (1 + np.exp(-(a * logits + b)))
    stats = {
        "calibrated": True, "calib_questions": len(calib), "calib_pairs": len(pairs),
        "platt_a": round(a, 4), "platt_b": round(b, 4),
        "calib_top1_acc": top1(pairs, calibrated, pos),
        "calib_mean_prob_pos": round(float(calibrated[labels == 1].mean()), 4),
        "calib_mean_prob_neg": round(float(calibrated[labels == 0].mean()), 4),
    }
    fusion = None
    if cfg.cross.fusion:
        dense = dense_scores(ctx, "md0", pairs)
        lexical = None
        if cfg.cross.fusion_bm25:
            bm25 = ctx.bm25_scores(pairs)
            lexical = np.array([bm25[x] for x in pairs])
        fusion = fit_fusion(calibrated, dense, labels, lexical)
        qids = [q for q, _ in pairs]
        stats.update({"fusion": {k: round(v, 4) for k, v in fusion.to_dict().items()},
                      "calib_mrr_ce": round(mrr_at(qids, calibrated, labels), 4),
                      "calib_mrr_dense": round(mrr_at(qids, dense, labels), 4),
                      "calib_top1_acc_dense": top1(pairs, dense, pos),
                      "calib_top1_acc_fused": top1(pairs, fusion(calibrated, dense, lexical), pos)})
        if lexical is not None:
            stats["calib_top1_acc_bm25"] = top1(pairs, lexical, pos)
    write_json(d / CALIBRATION, stats)
    model.save(d / "model", extra_meta={"calibration": stats, "fusion": fusion.to_dict() if fusion else None})
    log.info("mc: calibrated on %d held-out pairs: %s", len(pairs), json.dumps(stats))
    return stats
