"""Pieces several stages share: encode + index a dual encoder's corpus, retrieve, evaluate, score pairs with the
cross-encoder, train a dual encoder, rerank a stage's test run. Each takes the run's `Context`; the Ray work
happens inside the Ray Data and Ray Train wrappers these call."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from rocketqa_ray.config import Config
from rocketqa_ray.evaluation import full_report, write_trec_run
from rocketqa_ray.io import read_json, read_json_if_valid, write_json
from rocketqa_ray.pipeline.context import Context, TextView
from rocketqa_ray.types import PairScores, RankedHits, RankedIds, Run

if TYPE_CHECKING:
    from rocketqa_ray.index import DenseIndex
    from rocketqa_ray.retrieval.fusion import Fusion

TRAIN_TOP = "train_top.json"  # md0's top-k for the labelled training questions, gold excluded
HELDOUT = "heldout.json"  # a dual encoder's held-out figures (`heldout_eval`)


def start_ray(ctx: Context) -> None:
    from rocketqa_ray.ray_utils import ensure_ray

    ensure_ray(ctx.cfg.ray)


def evaluate(ctx: Context, run: Run, d: Path, name: str) -> dict:
    """The test-split metrics of `run` (and answer accuracy where the data has answers); writes d/test.trec."""
    write_trec_run(run, d / "test.trec", tag=name)
    test = ctx.splits.test
    answers = {q: ctx.data.queries[q]["answers"] for q in test}
    has = ctx.data.has_answers(test)
    return full_report(run, ctx.test_qrels, answers if has else None, TextView(ctx), ctx.cfg.eval.answer_k)


def dense_index(ctx: Context, model_dir: Path, d: Path) -> DenseIndex:
    """Encode the corpus with Ray Data and build (or load) the FAISS index for `model_dir`."""
    from rocketqa_ray.batch.encode import encode_corpus, load_embeddings
    from rocketqa_ray.index import DenseIndex
    from rocketqa_ray.modeling.base import model_fingerprint

    start_ray(ctx)
    fp = model_fingerprint(model_dir)
    if (d / "index" / "meta.json").exists():
        return DenseIndex.load(d / "index", expect_fingerprint=fp)
    emb_dir = encode_corpus(str(ctx.data.corpus_path), str(model_dir), str(d / "embeddings"), ctx.cfg.encode)
    ids, emb = load_embeddings(emb_dir)
    index = DenseIndex.build(emb, ids, ctx.cfg.index, model_fingerprint=fp)
    index.save(d / "index")
    return index


def retrieve(ctx: Context, model_dir: Path, index: DenseIndex, qids: list[str], k: int,
             exclude: dict[str, set[str]] | None = None) -> RankedHits:
    from rocketqa_ray.retrieval.dense import retrieve as retrieve_dense

    return retrieve_dense(str(model_dir), index, qids, [ctx.qtext(q) for q in qids], k, exclude=exclude,
                          cfg=ctx.cfg.encode)


def dense_eval(ctx: Context, model_dir: Path, d: Path, name: str) -> tuple[dict, DenseIndex]:
    """Index the corpus with `model_dir`, retrieve for the test questions, evaluate."""
    index = dense_index(ctx, model_dir, d)
    ranked = retrieve(ctx, model_dir, index, ctx.splits.test, ctx.cfg.eval.depth)
    run = {q: dict(items) for q, items in ranked.items()}
    return evaluate(ctx, run, d, name), index


def heldout_eval(ctx: Context, model_dir: Path, index: DenseIndex, d: Path, trained_on_pseudo: bool = False) -> dict:
    """MRR@10 / R@20 on held-out questions no model trains on: the dev split (`data.dev_fraction`), or where
    there is none, step 4's questions with their hidden labels (unless this model trained on them). For choosing
    settings without the test split, and for the check that a dual encoder improved on the previous one; written
    to d/heldout.json for the next stage's check."""
    from rocketqa_ray.evaluation import evaluate_run

    qrels = ctx.train_qrels
    which, qids = "dev", [q for q in ctx.splits.dev if q in qrels]
    if not qids and not trained_on_pseudo:
        which, qids = "pseudo", [q for q in ctx.splits.pseudo if q in qrels]
    if not qids:
        return {}
    ranked = retrieve(ctx, model_dir, index, qids, 20)
    m = evaluate_run({q: dict(v) for q, v in ranked.items()}, {q: qrels[q] for q in qids}, ("mrr@10", "recall@20"))
    out = {"heldout_set": which, "heldout_questions": len(qids), **{f"heldout_{k}": v for k, v in m.items()}}
    write_json(d / HELDOUT, out)
    return out


def dual_encoder_check(ctx: Context, stage: str, previous: str, heldout: dict) -> dict:
    """{"check": ...} for the stats when `stage` and `previous` were measured on the same held-out questions: a
    dual encoder no better than the one before it is said (or stops the run under pipeline.strict)."""
    from rocketqa_ray.pipeline.checks import dual_check, report_check

    before = read_json_if_valid(ctx.stage_dir(previous) / HELDOUT) or {}
    res = dual_check(stage, previous, heldout, before)
    return {} if res is None else {"check": report_check(res, stage, ctx.cfg.pipeline.strict)}


def ce_scores(ctx: Context, pairs: list[tuple[str, str]], d: Path, model_dir: Path | None = None) -> PairScores:
    """Cross-encoder probabilities for (qid, pid) pairs, through the Ray Data scoring job (resumable)."""
    from rocketqa_ray.batch.score import load_scores, score_pairs

    start_ray(ctx)
    rows = [{"qid": q, "pid": p, "query": ctx.qtext(q), "passage": ctx.ptext(p)} for q, p in pairs]
    out = score_pairs(rows, str(model_dir or ctx.stage_dir("mc") / "model"), str(d), ctx.cfg.encode)
    return load_scores(out)


# negatives per held-out group of early stopping: enough that the positive's rank says something, few enough to
# score every `eval_every` steps
VAL_NEGATIVES = 7


def train_dual_encoder(ctx: Context, cfg: Config, d: Path, rows: list[dict], init: Path | None = None) -> Path:
    """Write the examples (once) and train a dual encoder on Ray Train into d/model; a stage that continues from
    a previous dual encoder (`init`) trains for `dual.continue_epochs` / `continue_min_steps` when set."""
    from rocketqa_ray.data.examples import write_examples
    from rocketqa_ray.train.launch import train_dual

    start_ray(ctx)
    if init is not None:
        d_cfg = cfg.dual
        cfg = replace(cfg, dual=replace(
            d_cfg, epochs=d_cfg.epochs if d_cfg.continue_epochs is None else d_cfg.continue_epochs,
            min_steps=d_cfg.min_steps if d_cfg.continue_min_steps is None else d_cfg.continue_min_steps))
    ex = d / "train_examples.parquet"
    if not ex.exists():
        write_examples(rows, ex)
    val = dev_groups(ctx, cfg.dual.val_groups) if cfg.dual.eval_every > 0 else None
    return Path(train_dual(cfg, str(ex), str(d), init_model=str(init) if init else None, name=d.name, val_rows=val))


def training_summary(out_dir: Path) -> dict:
    """What a stage's training did, for its stats: steps, and with early stopping the step kept and the held-out
    figure there."""
    from rocketqa_ray.train.launch import read_history, read_validation

    hist, val = read_history(out_dir), read_validation(out_dir)
    out: dict = {"trained_steps": hist[-1]["step"]} if hist else {}
    if val:
        out["early_stopping"] = {k: val[k] for k in ("best_step", "best_val_mrr@10", "evaluations", "stopped_early")
                                 if k in val}
        out["validation_curve"] = [[h["step"], h["val_mrr@10"]] for h in val.get("history", [])]
    return out


def bm25_negatives(ctx: Context, qids: list[str], n: int) -> RankedIds:
    """BM25's top `n` passages per question, its labelled positives excluded."""
    from rocketqa_ray.rocketqa.negatives import exclude_gold

    qrels = ctx.train_qrels
    extra = max((len(qrels.get(q, {})) for q in qids), default=0)
    idx, _ = ctx.bm25.search([ctx.qtext(q) for q in qids], k=n + extra)
    ranked = {q: [ctx.bm25.ids[j] for j in row] for q, row in zip(qids, idx)}
    return exclude_gold(ranked, qrels, n)


def dev_groups(ctx: Context, limit: int) -> list[dict]:
    """Held-out groups for a dual encoder's early stopping: up to `limit` dev questions, each with its gold
    positive and BM25's top `VAL_NEGATIVES` other passages (the same for every dual-encoder stage, so the
    stages' curves compare)."""
    qrels = ctx.train_qrels
    qids = [q for q in ctx.splits.dev if q in qrels][:limit]
    if not qids:
        return []
    pos = gold_positive(ctx, qids)
    negs = bm25_negatives(ctx, qids, VAL_NEGATIVES)
    return [{"qid": q, "query": ctx.qtext(q), "positive_id": pos[q], "positive": ctx.ptext(pos[q]),
             "negative_ids": negs.get(q, []), "negatives": [ctx.ptext(p) for p in negs.get(q, [])]} for q in qids]


def dual_examples(ctx: Context, qids: list[str], negatives: RankedIds | None,
                  positives: dict[str, str] | None = None) -> list[dict]:
    """Dual-encoder rows for `qids`: gold (or given pseudo) positives, `dual.num_hard_negatives` drawn from
    each question's `negatives` pool (none for step 1)."""
    from rocketqa_ray.data.examples import build_dual_examples

    cfg = ctx.cfg
    return build_dual_examples(
        ctx.data, ctx.corpus, qids, negatives, cfg.dual.num_hard_negatives if negatives else 0,
        cfg.mining.seed, split=cfg.data.train_split,
        positives={q: {p: 1} for q, p in positives.items()} if positives is not None else None,
        queries={q: ctx.qtext(q) for q in qids} if positives is not None else None)


def gold_positive(ctx: Context, qids: list[str]) -> dict[str, str]:
    """One positive per question (the first listed); SQuAD has exactly one."""
    qrels = ctx.train_qrels
    return {q: next(iter(qrels[q])) for q in qids}


def train_top(ctx: Context, stage: str = "md0") -> RankedIds:
    """The stage's top-k for the labelled training questions, gold excluded (hard-negative candidates)."""
    return read_json(ctx.stage_dir(stage) / TRAIN_TOP)


def fusion(ctx: Context) -> Fusion | None:
    from rocketqa_ray.retrieval.fusion import load_fusion

    return load_fusion(ctx.stage_dir("mc") / "model", ctx.cfg.cross.fusion)


def dense_scores(ctx: Context, stage: str, pairs: list[tuple[str, str]]) -> np.ndarray:
    """A dense stage's scores q . p for (qid, pid) pairs, from its corpus embeddings (queries encoded here)."""
    from rocketqa_ray.batch.encode import load_embeddings
    from rocketqa_ray.modeling.dual_encoder import DualEncoder

    model = DualEncoder.load(ctx.stage_dir(stage) / "model")
    ids, emb = load_embeddings(ctx.stage_dir(stage) / "embeddings")
    row = {pid: i for i, pid in enumerate(ids)}
    qids = sorted({q for q, _ in pairs})
    qemb = dict(zip(qids, model.encode([ctx.qtext(q) for q in qids], "query", ctx.cfg.encode.batch_size,
                                       ctx.cfg.encode.bf16)))
    return np.array([float(qemb[q] @ emb[row[p]]) for q, p in pairs])
