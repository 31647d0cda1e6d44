"""The four RocketQA steps as resumable stages, plus baselines, ablations and the report.

Each stage writes into RUN_DIR/<stage>/ and marks itself complete (`_COMPLETE.json`, written last and
atomically) with a fingerprint of the config it depends on and of its upstream stages. A rerun skips
complete stages with the same fingerprint and refuses to mix runs when the fingerprint changed.
Inside a stage, the heavy parts resume on their own (encoding/scoring shards, training checkpoints).
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

from rocketqa_ray.config import Config, section_dict
from rocketqa_ray.data import BeirData, holdout, load_beir, load_corpus, load_unlabeled, passage_text
from rocketqa_ray.errors import DataError, StageConfigChanged
from rocketqa_ray.evaluation import full_report, run_from_arrays, write_trec_run
from rocketqa_ray.io import read_json, write_json
from rocketqa_ray.mining import (
    answer_rates,
    denoise,
    exclude_gold,
    fuse_scores,
    pseudo_label,
    rerank,
    sample_negatives,
)

log = logging.getLogger(__name__)

COMPLETE = "_COMPLETE.json"
ABLATIONS = ("md0_inbatch", "md1_undenoised")
REPORT_STAGES = ("bm25", "zero_shot", "md0", "md0_inbatch", "mc", "md1", "md1_undenoised", "md2", "md2_rerank")
# What each stage reads from the config (besides upstream stages): changing anything else never invalidates it.
STAGE_SECTIONS = {
    "bm25": ("data", "bm25"),
    "zero_shot": ("data", "model", "index", "eval"),
    "md0": ("data", "model", "dual", "index", "eval"),
    "md0_inbatch": ("data", "model", "dual", "index", "eval"),
    "mc": ("data", "cross", "mining", "eval", "bm25"),
    "md1": ("data", "model", "dual", "mining", "index", "eval"),
    "md1_undenoised": ("data", "model", "dual", "mining", "index", "eval"),
    "md2": ("data", "model", "dual", "mining", "index", "eval"),
    "md2_rerank": ("eval",),
}
STAGE_DEPS = {
    "bm25": (), "zero_shot": (), "md0": (), "md0_inbatch": (), "mc": ("md0",), "md1": ("md0", "mc"),
    "md1_undenoised": ("md0",), "md2": ("md1", "mc"), "md2_rerank": ("md2", "mc"),
}
# Keys that change how fast, not what, a stage computes.
_IGNORED = {"dual": ("log_every", "checkpoint_every", "length_buckets"),
            "cross": ("log_every", "checkpoint_every", "length_buckets")}


@dataclass
class StageResult:
    metrics: dict = field(default_factory=dict)
    stats: dict = field(default_factory=dict)
    seconds: float = 0.0


@dataclass
class Splits:
    train: list[str]  # labelled training questions
    pseudo: list[str]  # questions whose labels are hidden (step 4's unlabelled questions)
    dev: list[str]
    test: list[str]
    unlabeled_texts: dict[str, str] = field(default_factory=dict)  # from a user's file, if given


class Pipeline:
    def __init__(self, cfg: Config, run_dir: str | Path, preset: str | None = None):
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.preset = preset
        self.results: dict[str, StageResult] = {}
        self._fingerprints: dict[str, str] = {}
        self._data: BeirData | None = None
        self._corpus: dict[str, dict] | None = None
        self._splits: Splits | None = None
        self._bm25 = None

    # ------------------------------------------------------------------------------------ data access
    @property
    def data(self) -> BeirData:
        if self._data is None:
            self._data = load_beir(self.cfg.data.path, splits=(self.cfg.data.train_split, self.cfg.data.test_split))
        return self._data

    @property
    def corpus(self) -> dict[str, dict]:
        if self._corpus is None:
            self._corpus = load_corpus(self.data.corpus_path)
        return self._corpus

    def ptext(self, pid: str) -> str:
        c = self.corpus[pid]
        return passage_text(c["title"], c["text"])

    @property
    def splits(self) -> Splits:
        if self._splits is None:
            d, c = self.data, self.cfg.data
            train_all = sorted(d.split(c.train_split))
            fracs = {"dev": c.dev_fraction}
            if not c.unlabeled_queries:
                fracs["pseudo"] = c.pseudo_fraction
            parts = holdout(train_all, fracs, seed=c.seed)
            train = parts["rest"]
            if c.max_train_queries:
                train = train[: c.max_train_queries]
                if "pseudo" in parts:
                    parts["pseudo"] = parts["pseudo"][: max(1, c.max_train_queries // 2)]
            unl = load_unlabeled(c.unlabeled_queries) if c.unlabeled_queries else {}
            self._splits = Splits(train=train, pseudo=parts.get("pseudo", sorted(unl)), dev=parts["dev"],
                                  test=sorted(d.split(c.test_split)), unlabeled_texts=unl)
            if not train:
                raise DataError("no labelled training questions left after holding out dev/pseudo fractions")
        return self._splits

    @property
    def bm25(self):
        """The corpus's BM25 index (`bm25` config section), built once per run of the driver."""
        from rocketqa_ray.bm25 import BM25Retriever

        if self._bm25 is None:
            ids = list(self.corpus)
            self._bm25 = BM25Retriever.from_config(ids, [self.ptext(i) for i in ids], self.cfg.bm25)
        return self._bm25

    def bm25_scores(self, pairs: list[tuple[str, str]]) -> dict[tuple[str, str], float]:
        q = {qid: self.qtext(qid) for qid, _ in pairs}
        return dict(zip(pairs, self.bm25.score_pairs(pairs, q).tolist()))

    def qtext(self, qid: str) -> str:
        if qid in self.data.queries:
            return self.data.queries[qid]["text"]
        return self.splits.unlabeled_texts[qid]

    # -------------------------------------------------------------------------------------- stages
    def stage_dir(self, name: str) -> Path:
        return self.run_dir / name

    def fingerprint(self, name: str) -> dict:
        sections = section_dict(self.cfg, *STAGE_SECTIONS[name])
        for sec, keys in _IGNORED.items():
            for k in keys:
                sections.get(sec, {}).pop(k, None)
        if name in ABLATIONS or name.startswith("md0"):
            sections["variant"] = name
        deps = {d: self._fingerprints[d] for d in STAGE_DEPS[name] if d in self._fingerprints}
        return {"config": sections, "deps": deps}

    def _run_stage(self, name: str, fn: Callable[[Path], StageResult]) -> StageResult:
        for dep in STAGE_DEPS[name]:
            if dep not in self.results:
                self.run_stage(dep)
        d = self.stage_dir(name)
        fp = self.fingerprint(name)
        digest = hashlib.sha1(json.dumps(fp, sort_keys=True, default=str).encode()).hexdigest()[:16]
        marker = d / COMPLETE
        if marker.exists():
            done = read_json(marker)
            if done.get("digest") != digest:
                raise StageConfigChanged(
                    f"stage '{name}' in {d} was completed with a different config ({_diff(done.get('fingerprint', {}), fp)}); "
                    f"use a new --out directory, or delete {d} (and the stages after it) to redo it"
                )
            log.info("stage %s: already complete, skipping (%.0f s before)", name, done.get("seconds", 0))
            res = StageResult(done.get("metrics", {}), done.get("stats", {}), done.get("seconds", 0.0))
        else:
            log.info("stage %s: starting", name)
            t0 = time.time()
            d.mkdir(parents=True, exist_ok=True)
            res = fn(d)
            res.seconds = round(time.time() - t0, 1)
            write_json(marker, {"stage": name, "digest": digest, "fingerprint": fp, "metrics": res.metrics,
                                "stats": res.stats, "seconds": res.seconds})
            log.info("stage %s: done in %.0f s %s", name, res.seconds, json.dumps(res.metrics))
        self._fingerprints[name] = digest
        self.results[name] = res
        return res

    def run_stage(self, name: str) -> StageResult:
        if name in self.results:
            return self.results[name]
        fn = getattr(self, f"_stage_{name}")
        return self._run_stage(name, fn)

    def run(self, stages: list[str] | None = None) -> dict:
        stages = list(stages or self.cfg.pipeline.stages)
        if self.cfg.pipeline.ablations:
            stages += [a for a in ABLATIONS if a not in stages]
        self.run_dir.mkdir(parents=True, exist_ok=True)
        write_json(self.run_dir / "config.json", {**self.cfg.to_dict(), "data": {
            **self.cfg.to_dict()["data"], "path": str(Path(self.cfg.data.path).resolve())}})
        for s in sorted(stages, key=lambda s: REPORT_STAGES.index(s)):
            self.run_stage(s)
            self.write_report()
        return self.write_report()

    # ------------------------------------------------------------------------------- shared steps
    def _ray(self) -> None:
        from rocketqa_ray.ray_utils import ensure_ray

        ensure_ray(self.cfg.ray)

    def _evaluate(self, run: dict, d: Path, name: str) -> dict:
        write_trec_run(run, d / "test.trec", tag=name)
        answers = {q: self.data.queries[q]["answers"] for q in self.splits.test}
        has = self.data.has_answers(self.splits.test)
        return full_report(run, self.data.split(self.cfg.data.test_split), answers if has else None,
                           _TextView(self), self.cfg.eval.answer_k)

    def _dense_index(self, model_dir: Path, d: Path):
        """Encode the corpus with Ray Data and build (or load) the FAISS index for `model_dir`."""
        from rocketqa_ray.encoding import encode_corpus, load_embeddings
        from rocketqa_ray.index import DenseIndex
        from rocketqa_ray.models import fingerprint

        self._ray()
        fp = fingerprint(model_dir)
        if (d / "index" / "meta.json").exists():
            return DenseIndex.load(d / "index", expect_fingerprint=fp)
        emb_dir = encode_corpus(str(self.data.corpus_path), str(model_dir), str(d / "embeddings"), self.cfg.encode)
        ids, emb = load_embeddings(emb_dir)
        index = DenseIndex.build(emb, ids, self.cfg.index, model_fingerprint=fp)
        index.save(d / "index")
        return index

    def _retrieve(self, model_dir: Path, index, qids: list[str], k: int,
                  exclude: dict[str, set[str]] | None = None) -> dict[str, list[tuple[str, float]]]:
        from rocketqa_ray.retrieval import retrieve

        return retrieve(str(model_dir), index, qids, [self.qtext(q) for q in qids], k, exclude=exclude,
                        cfg=self.cfg.encode)

    def _dense_eval(self, model_dir: Path, d: Path, name: str) -> tuple[dict, object]:
        index = self._dense_index(model_dir, d)
        ranked = self._retrieve(model_dir, index, self.splits.test, self.cfg.eval.depth)
        run = {q: dict(items) for q, items in ranked.items()}
        return self._evaluate(run, d, name), index

    def _heldout_eval(self, model_dir: Path, index) -> dict:
        """MRR@10 / R@20 on the step-4 questions whose labels are hidden (none of steps 1-3 train on them): a
        dev figure for choosing settings without looking at the test split."""
        from rocketqa_ray.evaluation import evaluate_run

        qrels = self.data.split(self.cfg.data.train_split)
        qids = [q for q in self.splits.pseudo if q in qrels]
        if not qids:
            return {}
        ranked = self._retrieve(model_dir, index, qids, 20)
        m = evaluate_run({q: dict(v) for q, v in ranked.items()}, {q: qrels[q] for q in qids}, ("mrr@10", "recall@20"))
        return {"heldout_questions": len(qids), **{f"heldout_{k}": v for k, v in m.items()}}

    def _ce_scores(self, pairs: list[tuple[str, str]], d: Path,
                   model_dir: Path | None = None) -> dict[tuple[str, str], float]:
        """Cross-encoder probabilities for (qid, pid) pairs, through the Ray Data scoring job (resumable)."""
        from rocketqa_ray.scoring import load_scores, score_pairs

        self._ray()
        rows = [{"qid": q, "pid": p, "query": self.qtext(q), "passage": self.ptext(p)} for q, p in pairs]
        out = score_pairs(rows, str(model_dir or self.stage_dir("mc") / "model"), str(d), self.cfg.encode)
        return load_scores(out)

    def _train_dual(self, d: Path, rows: list[dict], variant_cfg: Config | None = None,
                    init: Path | None = None) -> Path:
        from rocketqa_ray.examples import write_examples
        from rocketqa_ray.training import train_dual

        self._ray()
        cfg = variant_cfg or self.cfg
        if init is not None and cfg.dual.continue_epochs is not None:
            cfg = replace(cfg, dual=replace(cfg.dual, epochs=cfg.dual.continue_epochs))
        ex = d / "train_examples.parquet"
        if not ex.exists():
            write_examples(rows, ex)
        return Path(train_dual(cfg, str(ex), str(d), init_model=str(init) if init else None, name=d.name))

    def _examples(self, qids: list[str], negatives: dict[str, list[str]] | None,
                  positives: dict[str, str] | None = None) -> list[dict]:
        """Dual-encoder rows for `qids`: gold (or given pseudo) positives, `dual.num_hard_negatives` drawn from
        each question's `negatives` pool (none for step 1)."""
        from rocketqa_ray.examples import build_dual_examples

        return build_dual_examples(
            self.data, self.corpus, qids, negatives, self.cfg.dual.num_hard_negatives if negatives else 0,
            self.cfg.mining.seed, split=self.cfg.data.train_split,
            positives={q: {p: 1} for q, p in positives.items()} if positives is not None else None,
            queries={q: self.qtext(q) for q in qids} if positives is not None else None)

    def _gold_positive(self, qids: list[str]) -> dict[str, str]:
        qrels = self.data.split(self.cfg.data.train_split)
        # one positive per question (the first listed); SQuAD has exactly one
        return {q: next(iter(qrels[q])) for q in qids}

    def _train_ranked(self, stage: str) -> dict[str, list[str]]:
        """The stage's top-k for the labelled training questions, gold excluded (hard-negative candidates)."""
        path = self.stage_dir(stage) / "train_top.json"
        return read_json(path)

    # ------------------------------------------------------------------------------------ baselines
    def _stage_bm25(self, d: Path) -> StageResult:
        r = self.bm25
        qids = self.splits.test
        idx, scores = r.search([self.qtext(q) for q in qids], k=self.cfg.eval.depth)
        run = run_from_arrays(qids, r.ids, idx, scores)
        b = self.cfg.bm25
        return StageResult(self._evaluate(run, d, "bm25"), {"stemmed": b.stem, "k1": b.k1, "b": b.b})

    def _stage_zero_shot(self, d: Path) -> StageResult:
        from rocketqa_ray.models import DualEncoder

        model_dir = d / "model"
        if not model_dir.exists():
            DualEncoder.from_base(self.cfg.model).save(model_dir)
        metrics, index = self._dense_eval(model_dir, d, "zero_shot")
        return StageResult(metrics, self._heldout_eval(model_dir, index))

    # ------------------------------------------------------------------------------------ step 1
    def _md0(self, d: Path, cfg: Config) -> StageResult:
        train = self.splits.train
        rows = self._examples(train, None)
        model_dir = self._train_dual(d, rows, cfg)
        metrics, index = self._dense_eval(model_dir, d, d.name)
        stats = {"train_questions": len(train), "cross_batch": cfg.dual.cross_batch, "workers": cfg.ray.num_workers,
                 "negatives_per_query": cfg.dual.batch_size * (cfg.ray.num_workers if cfg.dual.cross_batch else 1) - 1,
                 **self._heldout_eval(model_dir, index)}
        if d.name == "md0":
            qrels = self.data.split(self.cfg.data.train_split)
            k = self.cfg.mining.top_k
            ranked = self._retrieve(model_dir, index, train, k, exclude={q: set(qrels[q]) for q in train})
            write_json(d / "train_top.json", exclude_gold({q: [p for p, _ in v] for q, v in ranked.items()}, qrels, k))
        return StageResult(metrics, stats)

    def _stage_md0(self, d: Path) -> StageResult:
        return self._md0(d, self.cfg)

    def _stage_md0_inbatch(self, d: Path) -> StageResult:
        return self._md0(d, replace(self.cfg, dual=replace(self.cfg.dual, cross_batch=False)))

    # ------------------------------------------------------------------------------------ step 2
    def _stage_mc(self, d: Path) -> StageResult:
        from rocketqa_ray.examples import build_cross_examples, write_examples
        from rocketqa_ray.training import train_cross

        self._ray()
        c = self.cfg.cross
        train = self.splits.train
        pos = self._gold_positive(train)
        negs = sample_negatives(self._train_ranked("md0"), c.num_negatives, seed=self.cfg.mining.seed)
        parts = holdout(train, {"calib": c.calibration_fraction}, seed=self.cfg.mining.seed)
        queries = {q: self.qtext(q) for q in train}
        ex = d / "train_examples.parquet"
        if not ex.exists():
            write_examples(build_cross_examples(queries, {q: pos[q] for q in parts["rest"]}, negs, self.ptext), ex)
        raw = train_cross(self.cfg, str(ex), str(d / "train"), name="mc")
        stats = {"train_questions": len(parts["rest"]), "negatives_per_positive": c.num_negatives, "loss": c.loss}
        if not (d / "model").exists():
            stats.update(self._calibrate(raw, parts["calib"], pos, negs, d))
        elif (d / "calibration.json").exists():
            stats.update(read_json(d / "calibration.json"))
        # M_C's quality: rerank M_D0's test top-k
        metrics, rerank_stats = self._rerank_eval("md0", d)
        return StageResult(metrics, {**stats, **rerank_stats})

    def _calibrate(self, raw: Path, calib: list[str], pos: dict[str, str], negs: dict[str, list[str]],
                   d: Path) -> dict:
        """Platt-scale the trained cross-encoder on held-out question groups, save it as `d/model`."""
        import shutil

        import numpy as np

        from rocketqa_ray.calibration import fit_fusion, fit_platt, fold_into_head, logits_from_probs
        from rocketqa_ray.io import atomic_dir
        from rocketqa_ray.models import CrossEncoder

        pairs = [(q, p) for q in calib for p in [pos[q], *negs.get(q, [])]]
        if not calib or not any(negs.get(q) for q in calib):
            with atomic_dir(d / "model") as tmp:
                shutil.copytree(raw, tmp, dirs_exist_ok=True)
            return {"calibrated": False}
        scores = self._ce_scores(pairs, d / "calib_scores", model_dir=raw)
        labels = np.array([1.0 if p == pos[q] else 0.0 for q, p in pairs])
        logits = logits_from_probs(np.array([scores[x] for x in pairs]))
        a, b = fit_platt(logits, labels)
        model = CrossEncoder.load(raw)
        fold_into_head(model.model, a, b)
        calibrated = 1 / (1 + np.exp(-(a * logits + b)))

        def top1(score: np.ndarray) -> float:
            by_q: dict[str, list[tuple[float, bool]]] = {}
            for (q, p), v in zip(pairs, score):
                by_q.setdefault(q, []).append((float(v), p == pos[q]))
            return round(float(np.mean([max(v)[1] for v in by_q.values()])), 4)

        stats = {
            "calibrated": True, "calib_questions": len(calib), "calib_pairs": len(pairs),
            "platt_a": round(a, 4), "platt_b": round(b, 4),
            "calib_top1_acc": top1(calibrated),
            "calib_mean_prob_pos": round(float(calibrated[labels == 1].mean()), 4),
            "calib_mean_prob_neg": round(float(calibrated[labels == 0].mean()), 4),
        }
        fusion = None
        if self.cfg.cross.fusion:
            dense = self._dense_scores("md0", pairs)
            lexical = None
            if self.cfg.cross.fusion_bm25:
                lexical = self.bm25.score_pairs(pairs, {q: self.qtext(q) for q, _ in pairs})
            fusion = fit_fusion(calibrated, dense, labels, lexical)
            stats.update({"fusion": {k: round(v, 4) for k, v in fusion.to_dict().items()},
                          "calib_top1_acc_dense": top1(dense),
                          "calib_top1_acc_fused": top1(fusion(calibrated, dense, lexical))})
            if lexical is not None:
                stats["calib_top1_acc_bm25"] = top1(lexical)
        write_json(d / "calibration.json", stats)
        model.save(d / "model", extra_meta={"calibration": stats, "fusion": fusion.to_dict() if fusion else None})
        log.info("mc: calibrated on %d held-out pairs: %s", len(pairs), json.dumps(stats))
        return stats

    def _dense_scores(self, stage: str, pairs: list[tuple[str, str]]):
        """A dense stage's scores q . p for (qid, pid) pairs, from its corpus embeddings (queries encoded here)."""
        import numpy as np

        from rocketqa_ray.encoding import load_embeddings
        from rocketqa_ray.models import DualEncoder

        model = DualEncoder.load(self.stage_dir(stage) / "model")
        ids, emb = load_embeddings(self.stage_dir(stage) / "embeddings")
        row = {pid: i for i, pid in enumerate(ids)}
        qids = sorted({q for q, _ in pairs})
        qemb = dict(zip(qids, model.encode([self.qtext(q) for q in qids], "query", self.cfg.encode.batch_size,
                                           self.cfg.encode.bf16)))
        return np.array([float(qemb[q] @ emb[row[p]]) for q, p in pairs])

    def _fusion(self):
        from rocketqa_ray.calibration import Fusion
        from rocketqa_ray.models import read_meta

        return Fusion.from_dict(read_meta(self.stage_dir("mc") / "model").get("fusion")) if self.cfg.cross.fusion else None

    def _rerank_eval(self, stage: str, d: Path) -> tuple[dict, dict]:
        from rocketqa_ray.evaluation import evaluate_run, read_trec_run

        run = read_trec_run(self.stage_dir(stage) / "test.trec")
        ranked = {q: sorted(v.items(), key=lambda x: -x[1]) for q, v in run.items()}
        top = self.cfg.eval.rerank_top_k
        pairs = [(q, p) for q, items in ranked.items() for p, _ in items[:top]]
        scores = self._ce_scores(pairs, d / "test_scores")
        stats: dict = {"reranked_depth": top, "pairs_scored": len(pairs)}
        fusion = self._fusion()
        if fusion is not None:
            # the cross-encoder alone, for comparison; the row in the report is the fused reranker
            # (metrics only: the stage's test.trec and answer accuracy are the fused run's)
            ce_only = evaluate_run(rerank(ranked, scores, top), self.data.split(self.cfg.data.test_split),
                                   ("mrr@10", "recall@5"))
            stats.update({"scores": "fused", "fusion_features": "ce+dense+bm25" if fusion.uses_bm25 else "ce+dense",
                          **{f"ce_only_{k}": v for k, v in ce_only.items()}})
            scores = fuse_scores(ranked, scores, fusion, self.bm25_scores(pairs) if fusion.uses_bm25 else None)
        return self._evaluate(rerank(ranked, scores, top), d, d.name), stats

    # ------------------------------------------------------------------------------------ step 3
    def _md1(self, d: Path, denoised: bool) -> StageResult:
        m = self.cfg.mining
        train = self.splits.train
        cands = {q: v[: m.denoise_top] for q, v in self._train_ranked("md0").items()}
        stats: dict = {}
        if m.bm25_negatives:
            lexical = self._bm25_negatives(train, m.bm25_negatives)
            cands = {q: list(dict.fromkeys(cands.get(q, []) + lexical.get(q, []))) for q in train}
            stats["pool_per_question"] = round(sum(map(len, cands.values())) / max(1, len(cands)), 2)
        if denoised and m.denoise:
            scores = self._ce_scores([(q, p) for q, ps in cands.items() for p in ps], d / "denoise_scores")
            res = denoise(cands, scores, m.denoise_threshold, m.denoise_top + m.bm25_negatives)
            pool = res.kept
            stats.update(res.stats)
            if self.data.has_answers(train):
                stats.update(answer_rates(res, {q: self.data.queries[q]["answers"] for q in train},
                                          _has_answer, self.ptext))
        else:
            pool = cands
        write_json(d / "hard_negative_pool.json", pool)
        rows = self._examples(train, pool)
        init = self.stage_dir("md0") / "model" if self.cfg.dual.init == "previous" else None
        model_dir = self._train_dual(d, rows, init=init)
        metrics, index = self._dense_eval(model_dir, d, d.name)
        stats["train_questions"] = len(rows)
        stats.update(self._heldout_eval(model_dir, index))
        return StageResult(metrics, stats)

    def _bm25_negatives(self, qids: list[str], n: int) -> dict[str, list[str]]:
        """BM25's top `n` passages per question, its labelled positives excluded."""
        qrels = self.data.split(self.cfg.data.train_split)
        extra = max((len(qrels.get(q, {})) for q in qids), default=0)
        idx, _ = self.bm25.search([self.qtext(q) for q in qids], k=n + extra)
        ranked = {q: [self.bm25.ids[j] for j in row] for q, row in zip(qids, idx)}
        return exclude_gold(ranked, qrels, n)

    def _stage_md1(self, d: Path) -> StageResult:
        return self._md1(d, denoised=True)

    def _stage_md1_undenoised(self, d: Path) -> StageResult:
        return self._md1(d, denoised=False)

    # ------------------------------------------------------------------------------------ step 4
    def _stage_md2(self, d: Path) -> StageResult:
        from rocketqa_ray.index import DenseIndex
        from rocketqa_ray.models import fingerprint

        m = self.cfg.mining
        md1 = self.stage_dir("md1")
        md1_model = md1 / "model"
        rows = _read_parquet_rows(md1 / "train_examples.parquet")
        stats: dict = {"labelled_questions": len(rows)}
        pseudo_q = self.splits.pseudo
        if m.pseudo and pseudo_q:
            index = DenseIndex.load(md1 / "index", expect_fingerprint=fingerprint(md1_model))
            ranked = self._retrieve(md1_model, index, pseudo_q, m.pseudo_top_k)
            cands = {q: [p for p, _ in v] for q, v in ranked.items()}
            scores = self._ce_scores([(q, p) for q, ps in cands.items() for p in ps], d / "pseudo_scores")
            fusion = self._fusion()
            if fusion is not None:
                scores = fuse_scores(ranked, scores, fusion, self.bm25_scores(list(scores)) if fusion.uses_bm25 else None)
            hidden = {q: self.data.split(self.cfg.data.train_split)[q] for q in pseudo_q
                      if q in self.data.split(self.cfg.data.train_split)}
            pl = pseudo_label(cands, scores, m.pseudo_pos_threshold, m.pseudo_neg_threshold,
                              hidden_gold=hidden or None)
            stats.update({f"pseudo_{k}": v for k, v in pl.stats.items()})
            rows = rows + self._examples(sorted(pl.positives), pl.negatives, positives=pl.positives)
        stats["train_questions"] = len(rows)
        init = md1_model if self.cfg.dual.init == "previous" else None
        model_dir = self._train_dual(d, rows, init=init)
        metrics, _ = self._dense_eval(model_dir, d, "md2")
        return StageResult(metrics, stats)

    def _stage_md2_rerank(self, d: Path) -> StageResult:
        metrics, stats = self._rerank_eval("md2", d)
        return StageResult(metrics, stats)

    # ------------------------------------------------------------------------------------ report
    def write_report(self) -> dict:
        from rocketqa_ray.report import write_reports

        stages = {s: self.results[s].metrics for s in REPORT_STAGES if s in self.results and self.results[s].metrics}
        report = {
            "stages": stages,
            "stats": {s: self.results[s].stats for s in REPORT_STAGES if s in self.results and self.results[s].stats},
            "timings_s": {s: r.seconds for s, r in self.results.items()},
            "data": str(self.cfg.data.path),
            "preset": self.preset,
            "splits": {"train": len(self.splits.train), "pseudo": len(self.splits.pseudo), "dev": len(self.splits.dev),
                       "test": len(self.splits.test)},
        }
        write_json(self.run_dir / "report.json", report)
        write_reports(report, self.run_dir)
        return report


class _TextView:
    """A read-only {pid: passage text} view for answer accuracy, without building a second dict."""

    def __init__(self, pipe: Pipeline):
        self._p = pipe

    def __getitem__(self, pid: str) -> str:
        return self._p.ptext(pid)


def _has_answer(text: str, answers: list[str]) -> bool:
    from rocketqa_ray.evaluation import has_answer

    return has_answer(text, answers)


def _read_parquet_rows(path: Path) -> list[dict]:
    import pyarrow.parquet as pq

    return pq.read_table(path).to_pylist()


def _diff(old: dict, new: dict, prefix: str = "") -> str:
    """First few differing keys between two fingerprints, as 'a.b: old -> new'."""
    out = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            sub = _diff(a, b, f"{prefix}{k}.")
            if sub:
                out.append(sub)
        elif a != b:
            out.append(f"{prefix}{k}: {a!r} -> {b!r}")
    return "; ".join(out[:5])
