"""Pieces several stages share: encode + index a dual encoder's corpus, retrieve, evaluate, score pairs with the
cross-encoder, train a dual encoder, rerank a stage's test run. Each takes the run's `Context`; the Ray work
happens inside the Ray Data and Ray Train wrappers these call."""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from rocketqa_ray.config import Config
from rocketqa_ray.evaluation import full_report, write_trec_run
from rocketqa_ray.io import read_json_if_valid, write_json
from rocketqa_ray.pipeline.context import Context
from rocketqa_ray.retrieval.candidates import read_hits
from rocketqa_ray.types import PairScores, RankedHits, RankedIds, Run

if TYPE_CHECKING:
    from rocketqa_ray.retrieval.fusion import Fusion

TRAIN_TOP = "train_top"  # candidates folder: md0's top-k for the labelled training questions, gold excluded
HELDOUT = "heldout.json"
EXAMPLES = "train_examples.parquet"  # a stage's training examples: one file, or a folder of parts (the flow's)  # a dual encoder's held-out figures (`heldout_eval`)


def start_ray(ctx: Context) -> None:
    from rocketqa_ray.ray_utils import ensure_ray

    ensure_ray(ctx.cfg.ray)


def evaluate(ctx: Context, run: Run, d: Path, name: str) -> dict:
    """The test-split metrics of `run` (and answer accuracy where the data has answers); writes d/test.trec."""
    write_trec_run(run, d / "test.trec", tag=name)
    test = ctx.splits.test
    answers = {q: ctx.data.queries[q]["answers"] for q in test}
    has = ctx.data.has_answers(test)
    k = ctx.cfg.eval.answer_k
    texts = ctx.ptexts(p for hits in run.values() for p in sorted(hits, key=hits.get, reverse=True)[:k]) if has else None
    return full_report(run, ctx.test_qrels, answers if has else None, texts, k)


def dense_index(ctx: Context, model_dir: Path, d: Path) -> Path:
    """Encode the corpus with Ray Data and build the FAISS index shard by shard in Ray tasks (`index.*` config);
    returns the index folder, d/index. The driver never holds the embeddings or the index."""
    from rocketqa_ray.batch.encode import encode_corpus
    from rocketqa_ray.batch.index_build import build_index
    from rocketqa_ray.index.store import read_meta
    from rocketqa_ray.modeling.base import model_fingerprint

    start_ray(ctx)
    out = d / "index"
    if (out / "meta.json").exists():
        read_meta(out, expect_fingerprint=model_fingerprint(model_dir))
        return out
    emb_dir = encode_corpus(str(ctx.corpus_store), str(model_dir), str(d / "embeddings"), ctx.cfg.encode)
    build_index(emb_dir, ctx.cfg.index, out, ctx.cfg.ray, seed=ctx.cfg.data.seed)
    return out


def retrieve(ctx: Context, model_dir: Path, index_dir: Path, qids: list[str], k: int,
             exclude: dict[str, set[str]] | None = None) -> RankedHits:
    """Top-k (pid, score) per question from the stage's searcher actors, minus `exclude[qid]`. Up to
    `encode.driver_max_queries` questions are encoded here and searched directly; more go through the Ray Data
    flow (`mine_candidates`), whose candidates are read back."""
    from rocketqa_ray.retrieval.dense import encode_queries

    if len(qids) > ctx.cfg.encode.driver_max_queries:
        # a scratch folder: the flow keeps nothing in the driver, the caller asked for the hits in memory
        scratch = index_dir.parent / "candidates" / "scratch"
        return read_hits(mine_candidates(ctx, model_dir, index_dir, qids, k, exclude, scratch))
    if not qids:
        return {}
    searchers = ctx.searchers(index_dir, model_dir)
    q = encode_queries(model_dir, qids, [ctx.qtext(x) for x in qids], ctx.cfg.encode, use_ray=False)
    ex = [sorted(exclude.get(x, ())) for x in qids] if exclude else None
    return dict(zip(qids, searchers.search(q, k, ex)))


def mine_candidates(ctx: Context, model_dir: Path, index_dir: Path, qids: list[str], k: int,
         exclude: dict[str, set[str]] | None, out: Path) -> Path:
    """Every question's top-k (minus `exclude`) into the candidates folder `out`, through Ray Data and the
    searcher actors (`batch.search.retrieve_to_parquet`): nothing per question stays in the driver."""
    from rocketqa_ray.batch.search import retrieve_to_parquet

    searchers = ctx.searchers(index_dir, model_dir)
    return retrieve_to_parquet(searchers, model_dir, qids, [ctx.qtext(x) for x in qids], out, k,
                               {q: sorted(v) for q, v in (exclude or {}).items()}, ctx.cfg.encode, ctx.cfg.ray)


def dense_eval(ctx: Context, model_dir: Path, d: Path, name: str) -> tuple[dict, Path]:
    """Index the corpus with `model_dir`, retrieve for the test questions, evaluate; returns the index folder too."""
    index_dir = dense_index(ctx, model_dir, d)
    ranked = retrieve(ctx, model_dir, index_dir, ctx.splits.test, ctx.cfg.eval.depth)
    run = {q: dict(items) for q, items in ranked.items()}
    return evaluate(ctx, run, d, name), index_dir


def heldout_eval(ctx: Context, model_dir: Path, index_dir: Path, d: Path, trained_on_pseudo: bool = False) -> dict:
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
    ranked = retrieve(ctx, model_dir, index_dir, qids, 20)
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
    """Cross-encoder probabilities for (qid, pid) pairs, by the Ray Data pair flow (`batch.pair_flow`): the driver
    writes the pairs' ids and their questions' texts, the flow joins the passages' texts from the corpus store; a
    rerun of the same pairs reads the scores back."""
    return _flow_scores(ctx, d, pairs, model_dir=model_dir)


def candidate_score_folder(ctx: Context, stage: str, top: int, extra: list[tuple[str, str]], qids: list[str],
                           d: Path, features: dict | None = None) -> Path:
    """The folder d of cross-encoder probabilities (qid, pid, rank, score) of `stage`'s top `top` hard-negative
    candidates per question (its TRAIN_TOP folder) plus the `extra` pairs, by the same flow: the candidates go
    from their folder to the scorer without passing through the driver. `features`: `score_pair_files`' `bm25`
    and `dense`, for a fusion."""
    return _score_folder(ctx, d, extra, candidates=ctx.stage_dir(stage) / TRAIN_TOP, top=top, qids=qids,
                         features=features)


def _flow_scores(ctx: Context, d: Path, extra: list[tuple[str, str]], model_dir: Path | None = None) -> PairScores:
    from rocketqa_ray.batch.pair_flow import read_pair_scores

    return read_pair_scores(_score_folder(ctx, d, extra, model_dir=model_dir)) if extra else {}


def _score_folder(ctx: Context, d: Path, extra: list[tuple[str, str]], candidates: Path | None = None, top: int = 0,
                  qids: list[str] | None = None, model_dir: Path | None = None, features: dict | None = None) -> Path:
    from rocketqa_ray.batch.pair_flow import score_pair_files, write_pairs, write_questions

    start_ray(ctx)
    qids = list(dict.fromkeys(q for q, _ in extra)) if qids is None else qids
    inputs = d.with_name(d.name + "_inputs")
    questions = write_questions(qids, [ctx.qtext(q) for q in qids], inputs / "questions.parquet")
    extra_file = write_pairs(extra, inputs / "extra.parquet") if extra else None
    return score_pair_files(model_dir or ctx.stage_dir("mc") / "model", ctx.corpus_store, questions, d,
                            ctx.cfg.encode, candidates=candidates, top=top, extra=extra_file, ray_cfg=ctx.cfg.ray,
                            **(features or {}))


# negatives per held-out group of early stopping: enough that the positive's rank says something, few enough to
# score every `eval_every` steps
VAL_NEGATIVES = 7


def train_dual_encoder(ctx: Context, cfg: Config, d: Path, rows: list[dict], init: Path | None = None,
                       before: Sequence[Path] = ()) -> Path:
    """Write the examples (once, `write_training_examples`) and train a dual encoder on Ray Train into d/model, on
    the example files `before` (e.g. the previous stage's) followed by these rows; a stage that continues from a
    previous dual encoder (`init`) trains for `dual.continue_epochs` / `continue_min_steps` when set."""
    from rocketqa_ray.train.launch import train_dual

    start_ray(ctx)
    ctx.close()  # the searchers' CPUs go to the Train workers
    if init is not None:
        d_cfg = cfg.dual
        cfg = replace(cfg, dual=replace(
            d_cfg, epochs=d_cfg.epochs if d_cfg.continue_epochs is None else d_cfg.continue_epochs,
            min_steps=d_cfg.min_steps if d_cfg.continue_min_steps is None else d_cfg.continue_min_steps))
    examples = [*before, write_training_examples(ctx, rows, d / EXAMPLES)] if rows else list(before)
    val = dev_groups(ctx, cfg.dual.val_groups) if cfg.dual.eval_every > 0 else None
    return Path(train_dual(cfg, examples, str(d), init_model=str(init) if init else None, name=d.name, val_rows=val))


def write_training_examples(ctx: Context, rows: list[dict], path: Path) -> Path:
    """Id rows (`data.examples.dual_id_rows` / `cross_id_groups`) -> training examples at `path`, once: up to
    `data.driver_max_examples` rows get their passages' texts here (one Parquet file), more from the Ray Data
    examples flow (a folder of parts in the same order), so no process holds a large set's texts."""
    from rocketqa_ray.batch.examples_flow import examples_flow, write_id_rows
    from rocketqa_ray.data.examples import attach_texts, write_examples

    if path.exists():
        return path
    if len(rows) <= ctx.cfg.data.driver_max_examples:
        return write_examples(attach_texts(rows, ctx.passages.texts), path)
    start_ray(ctx)
    ids = write_id_rows(rows, path.with_name(path.stem + "_ids.parquet"))
    return examples_flow(ids, ctx.corpus_store, path, ctx.cfg.ray)


def training_summary(out_dir: Path, examples: Sequence[Path] = (), cfg: Config | None = None) -> dict:
    """What a stage's training did, for its stats: steps, with early stopping the step kept and the held-out
    figure there, and with distillation on how many of the `examples`' rows had the teacher's scores."""
    from rocketqa_ray.data.examples import teacher_counts
    from rocketqa_ray.train.launch import read_history, read_validation

    hist, val = read_history(out_dir), read_validation(out_dir)
    out: dict = {"trained_steps": hist[-1]["step"]} if hist else {}
    if cfg is not None and examples and cfg.distill.kind != "none":
        rows, taught = teacher_counts(examples)
        out["distill"] = {"kind": cfg.distill.kind, "weight": cfg.distill.weight, "rows_with_teacher": taught,
                          "rows": rows}
    if val:
        out["early_stopping"] = {k: val[k] for k in ("best_step", "best_val_mrr@10", "evaluations", "stopped_early")
                                 if k in val}
        out["validation_curve"] = [[h["step"], h["val_mrr@10"]] for h in val.get("history", [])]
    return out


def bm25_negatives(ctx: Context, qids: list[str], n: int) -> RankedIds:
    """BM25's top `n` passages per question, its labelled positives excluded."""
    from rocketqa_ray.rocketqa.negatives import exclude_gold

    if not ctx.bm25_fits:
        return {q: [] for q in qids}
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
    if not qids or not ctx.bm25_fits:
        return []
    pos = gold_positive(ctx, qids)
    negs = bm25_negatives(ctx, qids, VAL_NEGATIVES)
    texts = ctx.ptexts([*pos.values(), *(p for ps in negs.values() for p in ps)])
    return [{"qid": q, "query": ctx.qtext(q), "positive_id": pos[q], "positive": texts[pos[q]],
             "negative_ids": negs.get(q, []), "negatives": [texts[p] for p in negs.get(q, [])]} for q in qids]


def dual_examples(ctx: Context, qids: list[str], negatives: RankedIds | None,
                  positives: dict[str, str] | None = None, scores: PairScores | None = None) -> list[dict]:
    """Dual-encoder rows for `qids`, as ids (`train_dual_encoder` gives them their texts): gold (or given pseudo)
    positives, `dual.num_hard_negatives` drawn from each question's `negatives` pool (none for step 1), with the
    cross-encoder's `scores` of them as the teacher's (distillation) when given."""
    from rocketqa_ray.data.examples import dual_id_rows

    cfg = ctx.cfg
    return dual_id_rows(
        ctx.data, top_up_source(ctx), qids, negatives, cfg.dual.num_hard_negatives if negatives else 0,
        cfg.mining.seed, split=cfg.data.train_split,
        positives={q: {p: 1} for q, p in positives.items()} if positives is not None else None,
        queries={q: ctx.qtext(q) for q in qids} if positives is not None else None, scores=scores)


def top_up_source(ctx: Context) -> Callable[[], list[str]]:
    """The passages a question short of hard negatives is topped up from (`data.passages.top_up_ids`: bounded),
    read on the first top-up only."""
    from rocketqa_ray.data.passages import top_up_ids

    return functools.cache(functools.partial(top_up_ids, ctx.passages))


def gold_positive(ctx: Context, qids: list[str]) -> dict[str, str]:
    """One positive per question (the first listed); SQuAD has exactly one."""
    qrels = ctx.train_qrels
    return {q: next(iter(qrels[q])) for q in qids}


def train_top(ctx: Context, stage: str = "md0", qids: Sequence[str] | None = None) -> RankedIds:
    """The stage's top-k for the labelled training questions (or only `qids`), gold excluded (hard-negative
    candidates)."""
    return {q: [p for p, _ in hits] for q, hits in read_hits(ctx.stage_dir(stage) / TRAIN_TOP, qids).items()}


def fusion(ctx: Context) -> Fusion | None:
    from rocketqa_ray.retrieval.fusion import load_fusion

    return load_fusion(ctx.stage_dir("mc") / "model", ctx.cfg.cross.fusion)


def dense_scores(ctx: Context, stage: str, pairs: list[tuple[str, str]]) -> np.ndarray:
    """A dense stage's scores q . p for (qid, pid) pairs: the passages' vectors are read from its embedding parts
    (only those), the questions encoded here."""
    from rocketqa_ray.batch.encode import lookup_embeddings
    from rocketqa_ray.modeling.dual_encoder import DualEncoder

    model = DualEncoder.load(ctx.stage_dir(stage) / "model")
    vec = lookup_embeddings(ctx.stage_dir(stage) / "embeddings", {p for _, p in pairs})
    qids = sorted({q for q, _ in pairs})
    qemb = dict(zip(qids, model.encode([ctx.qtext(q) for q in qids], "query", ctx.cfg.encode.batch_size,
                                       ctx.cfg.encode.bf16)))
    return np.array([float(qemb[q] @ vec[p]) for q, p in pairs])
