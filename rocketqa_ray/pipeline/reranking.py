"""A rerank stage: the cross-encoder reranks a retriever's test top-k, with a fusion fit for that retriever and
a verdict from held-out dev (`retrieval.rerank_check`) on whether reranking beats the retriever alone.

The stage's answer is what the service answers by default: the fused rerank where it won on dev, the retriever's
own ranking where it did not (said on the console and in the report, with the figures). Both are always
evaluated on test as well, and the cross-encoder alone, so nothing is hidden. The verdict and the fusion are
saved as `<rerank stage>/rerank_check.json`; the service reads the one whose retriever it serves.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from rocketqa_ray.console import say
from rocketqa_ray.io import read_json_if_valid, write_json
from rocketqa_ray.pipeline.context import Context
from rocketqa_ray.pipeline.shared import ce_scores, evaluate, fusion, retrieve
from rocketqa_ray.retrieval.rerank_check import RERANK_CHECK, CandidateTable, RerankCheck, check_rerank
from rocketqa_ray.types import RankedHits

log = logging.getLogger(__name__)
CHOICE_METRICS = ("mrr@10", "recall@5")


def candidate_table(ctx: Context, ranked: RankedHits, scores: dict, labels: dict[str, dict[str, int]],
                    with_bm25: bool) -> CandidateTable:
    pairs = [(q, p) for q, items in ranked.items() for p, _ in items]
    lexical = ctx.bm25_scores(pairs) if with_bm25 else None
    return CandidateTable(
        qids=[q for q, _ in pairs],
        dense=np.array([s for items in ranked.values() for _, s in items], dtype=np.float64),
        ce=np.array([scores[x] for x in pairs], dtype=np.float64),
        labels=np.array([1.0 if labels.get(q, {}).get(p, 0) > 0 else 0.0 for q, p in pairs]),
        bm25=None if lexical is None else np.array([lexical[x] for x in pairs], dtype=np.float64))


def dev_check(ctx: Context, retriever: str, d: Path) -> RerankCheck:
    """The fusion for `retriever` and the rerank verdict, fit and judged on its top `eval.rerank_top_k` for the
    held-out dev questions (read back from d/rerank_check.json on a resumed run)."""
    saved = read_json_if_valid(d / RERANK_CHECK)
    if saved is not None:
        return RerankCheck.from_dict(saved)
    cfg = ctx.cfg
    dev = [q for q in ctx.splits.dev if q in ctx.train_qrels]
    step2 = fusion(ctx)
    if not cfg.eval.rerank_check or not dev:
        why = ("eval.rerank_check is off" if not cfg.eval.rerank_check
               else "there are no held-out dev questions (data.dev_fraction is 0)")
        check = RerankCheck(step2, True, {}, f"{why}: the rerank uses step 2's fusion and is not checked")
    else:
        model_dir = ctx.stage_dir(retriever) / "model"
        ranked = retrieve(ctx, model_dir, ctx.stage_dir(retriever) / "index", dev, cfg.eval.rerank_top_k)
        scores = ce_scores(ctx, [(q, p) for q, items in ranked.items() for p, _ in items], d / "dev_scores")
        use_fusion = cfg.cross.fusion
        table = candidate_table(ctx, ranked, scores, ctx.train_qrels, use_fusion and cfg.cross.fusion_bm25)
        check = check_rerank(table, use_fusion=use_fusion, seed=cfg.data.seed, retriever=retriever,
                             min_gain=cfg.eval.rerank_min_gain)
        if check.fusion is None and use_fusion:
            check.fusion = step2  # nothing to fit on: keep step 2's
    write_json(d / RERANK_CHECK, {"retriever": retriever, **check.to_dict()})
    return check


def rerank_eval(ctx: Context, retriever: str, d: Path) -> tuple[dict, dict]:
    """Rerank `retriever`'s test run (its top `eval.rerank_top_k`) as `dev_check` decided and evaluate; the
    retriever alone, the cross-encoder alone and the fused rerank are reported side by side, on dev and test."""
    from rocketqa_ray.evaluation import evaluate_run, read_trec_run
    from rocketqa_ray.retrieval.fusion import fuse_scores, rerank

    check = dev_check(ctx, retriever, d)
    run = read_trec_run(ctx.stage_dir(retriever) / "test.trec")
    ranked = {q: sorted(v.items(), key=lambda x: -x[1]) for q, v in run.items()}
    top = ctx.cfg.eval.rerank_top_k
    pairs = [(q, p) for q, items in ranked.items() for p, _ in items[:top]]
    ce = ce_scores(ctx, pairs, d / "test_scores")
    fused = ce
    if check.fusion is not None:
        fused = fuse_scores(ranked, ce, check.fusion, ctx.bm25_scores(pairs) if check.fusion.uses_bm25 else None)
    reranked = rerank(ranked, fused, top)

    def figures(r: dict) -> dict:
        return {k: round(v, 4) for k, v in evaluate_run(r, ctx.test_qrels, CHOICE_METRICS).items()}

    test = {"retriever": figures(run), "cross_encoder": figures(rerank(ranked, ce, top)), "rerank": figures(reranked)}
    stats: dict = {
        "reranked_depth": top, "pairs_scored": len(pairs), "retriever": retriever,
        "scores": "fused" if check.fusion is not None else "cross-encoder",
        "rerank_choice": "rerank" if check.rerank else "retriever", "rerank_reason": check.reason,
        "rerank_check": {"dev": check.dev, "test": test},
    }
    if check.fusion is not None:
        stats["fusion_features"] = "ce+dense+bm25" if check.fusion.uses_bm25 else "ce+dense"
        stats["rerank_fusion"] = {k: round(v, 4) for k, v in check.fusion.to_dict().items()}
    if check.rerank:
        log.info("%s: %s", d.name, check.reason)
    else:
        say("%s: the rerank is NOT used: %s. The stage's ranking and the service's default are %s's own "
            "(a request can still ask for rerank=true).", d.name, check.reason, retriever)
    return evaluate(ctx, reranked if check.rerank else run, d, d.name), stats
