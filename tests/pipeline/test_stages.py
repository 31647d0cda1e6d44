"""Every pipeline stage on its own, called through the registry with the tiny model on a small BEIR subset of
squad-mini, for real (one shared local Ray cluster, Ray Train, Ray Data, FAISS); plus the registry and the runner's
fingerprints. Upstream stages run once per module (`StageRunner`) and their folders are shared between tests.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from rocketqa_ray.config import Config, load_config
from rocketqa_ray.errors import ConfigError
from rocketqa_ray.evaluation import read_trec_run
from rocketqa_ray.io import read_json
from rocketqa_ray.modeling.base import model_fingerprint, read_meta
from rocketqa_ray.pipeline.context import Context
from rocketqa_ray.pipeline.registry import StageResult, retriever_stages, stage_names, stages
from rocketqa_ray.pipeline.runner import Pipeline
from rocketqa_ray.pipeline.shared import train_top
from rocketqa_ray.retrieval.candidates import read_hits
from rocketqa_ray.testing.small_data import N_PASSAGES, N_TEST, N_TRAIN, write_small_beir
from rocketqa_ray.types import RankedIds

METRICS = {"mrr@10", "recall@5", "recall@20", "recall@100", "ndcg@10", "answer_acc@20"}
# The recipe's run (and report) order: each stage after the stages it reads.
EXPECTED_ORDER = ["bm25", "zero_shot", "md0", "md0_inbatch", "mc", "md1", "md1_undenoised", "md2", "md2_rerank"]


# ------------------------------------------------------------------------------------------ shared fixtures
class StageRunner:
    """Runs registered stages directly (`stages()[name].run(ctx, cfg, out_dir)`), each at most once per module,
    upstream stages first; what they wrote stays in ctx.run_dir/<stage>/ for the tests that follow."""

    def __init__(self, cfg: Config, run_dir: Path):
        self.cfg = cfg
        self.ctx = Context(cfg, run_dir)
        self.results: dict[str, StageResult] = {}

    def __call__(self, name: str) -> StageResult:
        if name not in self.results:
            st = stages()[name]
            for dep in st.deps:
                self(dep)
            d = self.dir(name)
            d.mkdir(parents=True, exist_ok=True)
            res = st.run(self.ctx, self.cfg, d)
            assert isinstance(res, StageResult)
            self.results[name] = res
        return self.results[name]

    def dir(self, name: str) -> Path:
        return self.ctx.stage_dir(name)


KNOWN = "qrels/known.tsv"


def write_known_positives(data: Path) -> Path:
    """A diagnostic qrels file: each training question's label plus two other passages of its article (what a
    dual encoder mines first), as if they were known unlabelled positives."""
    from rocketqa_ray.data.beir import load_corpus, load_qrels

    corpus = load_corpus(data / "corpus.jsonl")
    by_title: dict[str, list[str]] = {}
    for pid in sorted(corpus):
        by_title.setdefault(corpus[pid]["title"], []).append(pid)
    lines = ["query-id\tcorpus-id\tscore\n"]
    for q, labels in sorted(load_qrels(data / "qrels" / "train.tsv").items()):
        gold = next(iter(labels))
        extra = [p for p in by_title[corpus[gold]["title"]] if p not in labels][:2]
        lines += [f"{q}\t{p}\t1\n" for p in [*labels, *extra]]
    (data / KNOWN).write_text("".join(lines))
    return data / KNOWN


@pytest.fixture(scope="module")
def small_data(tmp_path_factory) -> Path:
    data = write_small_beir(tmp_path_factory.mktemp("beir") / "squad-small")
    write_known_positives(data)
    return data


def _cfg(data: Path, *overrides: str) -> Config:
    # Pseudo-label thresholds at 0: every step-4 question gets a positive from the untrained cross-encoder,
    # so md2 always has pseudo-labelled rows to add. The diagnostic qrels feed only the false-negative reports.
    # The index: 3 shards of 120 passages in 2 searcher actors, so every stage searches a sharded index.
    return load_config("tiny", overrides=[f"data.path={data}", "mining.pseudo_pos_threshold=0.0",
                                          "mining.pseudo_neg_threshold=0.0", f"data.diagnostic_qrels={KNOWN}",
                                          "index.shard_size=120", "index.shards_per_searcher=2",
                                          "index.searcher_cpus=0.1", *overrides])


@pytest.fixture(scope="module")
def run(ray_session, small_data, tmp_path_factory) -> StageRunner:
    return StageRunner(_cfg(small_data), tmp_path_factory.mktemp("run"))


def _metrics_ok(metrics: dict) -> None:
    assert set(metrics) == METRICS
    for k, v in metrics.items():
        assert 0.0 <= v <= 1.0, (k, v)


def _ranked(path: Path) -> dict[str, list[str]]:
    """A TREC run's passages per question, best first (the order `rerank_eval` reads them in)."""
    return {q: [p for p, _ in sorted(v.items(), key=lambda x: -x[1])] for q, v in read_trec_run(path).items()}


def _spec(d: Path) -> dict:
    return read_json(d / "train_spec.json")


def _parquet_rows(path: Path) -> list[dict]:
    import pyarrow.parquet as pq

    return pq.read_table(path).to_pylist()


def _bm25_pool(run: StageRunner) -> RankedIds:
    """md1's candidate pool, recomputed: md0's top `denoise_top` then BM25's negatives, deduplicated."""
    from rocketqa_ray.pipeline.shared import bm25_negatives

    m, ctx = run.cfg.mining, run.ctx
    top = train_top(run.ctx, "md0")
    lexical = bm25_negatives(ctx, ctx.splits.train, m.bm25_negatives)
    return {q: list(dict.fromkeys(top[q][: m.denoise_top] + lexical[q])) for q in ctx.splits.train}


def test_report_says_when_md1_was_not_denoised():
    """md1 with `mining.denoise=none` (or no scores to judge by) trains on the raw hard negatives: its row must
    not claim denoising, while a judged pool keeps the registry's label."""
    from rocketqa_ray.pipeline.report import markdown

    label = stages()["md1"].label
    judged = markdown({"stages": {"md1": {"mrr@10": 0.5}}, "stats": {"md1": {"rule": "threshold", "dropped": 3}}})
    assert f"| {label} |" in judged and "not denoised" not in judged
    raw = markdown({"stages": {"md1": {"mrr@10": 0.5}}, "stats": {"md1": {"train_questions": 7}}})
    assert label not in raw and "| M_D1: + hard negatives (not denoised) |" in raw


# ------------------------------------------------------------------------------------------ registry and runner
def test_report_lists_stages_in_registry_order(small_data, tmp_path):
    reg = stages()
    assert set(reg) == set(EXPECTED_ORDER)
    assert all(st.name == name for name, st in reg.items())
    assert stage_names(ablations=True) == ["md0_inbatch", "md1_undenoised"]
    assert retriever_stages() == ["md2", "md1", "md0", "zero_shot"]
    # whatever order the stages finished in, the report (json and markdown) follows the registry
    p = Pipeline(load_config("tiny", overrides=[f"data.path={small_data}"]), tmp_path / "run", preset="tiny")
    for i, name in enumerate(reversed(EXPECTED_ORDER)):
        p.results[name] = StageResult({"mrr@10": i / 10}, {"n": i, "rule": "threshold"}, float(i))
    report = p.write_report()
    assert list(report["stages"]) == list(report["stats"]) == list(reg)
    md = (tmp_path / "run" / "report.md").read_text()
    positions = [md.index(f"| {reg[s].label}") for s in reg]
    assert positions == sorted(positions)
    dev, pseudo = round(p.cfg.data.dev_fraction * N_TRAIN), round(p.cfg.data.pseudo_fraction * N_TRAIN)
    assert dev > 0 and pseudo > 0
    assert report["splits"] == {"train": N_TRAIN - dev - pseudo, "pseudo": pseudo, "dev": dev, "test": N_TEST}


def test_registry_order_is_run_order():
    reg = stages()
    for i, (name, st) in enumerate(reg.items()):
        for dep in st.deps:
            assert dep in reg and list(reg).index(dep) < i, f"{name} depends on {dep}, registered after it"
    assert list(reg) == EXPECTED_ORDER


# a change to every config section, and keys that never invalidate a stage
SECTION_CHANGE = {
    "data": "data.seed=7", "model": "model.temperature=0.07", "dual": "dual.lr=0.5", "cross": "cross.lr=0.5",
    "mining": "mining.denoise_threshold=0.3", "bm25": "bm25.k1=1.5", "index": "index.nprobe=7",
    "encode": "encode.batch_size=7", "ray": "ray.cpus_per_worker=0.25", "eval": "eval.depth=50",
    "serve": "serve.port=9", "pipeline": "pipeline.ablations=true", "distill": "distill.weight=0.5",
}
RUNTIME_CHANGES = ["dual.log_every=3", "dual.checkpoint_every=5", "dual.length_buckets=2", "cross.log_every=3",
                   "cross.length_buckets=1"]


@pytest.mark.parametrize("name", EXPECTED_ORDER)
def test_stage_fingerprint_follows_the_sections_it_reads(name, small_data, tmp_path):
    from dataclasses import fields

    assert set(SECTION_CHANGE) == {f.name for f in fields(Config)}
    st = stages()[name]
    base = Pipeline(_cfg(small_data), tmp_path).stage_fingerprint(st)
    assert set(base["config"]) == {s.partition(".")[0] for s in st.sections} | ({"variant"} if st.variant else set())
    for change in SECTION_CHANGE.values():
        fp = Pipeline(_cfg(small_data, change), tmp_path).stage_fingerprint(st)
        assert (fp != base) == st.reads(change.partition("=")[0]), f"{name}: --set {change}"
    for change in RUNTIME_CHANGES:
        assert Pipeline(_cfg(small_data, change), tmp_path).stage_fingerprint(st) == base, f"{name}: {change}"
    # upstream stages' digests are part of it
    p = Pipeline(_cfg(small_data), tmp_path)
    p._digests.update({d: "0123456789abcdef" for d in st.deps})
    assert (p.stage_fingerprint(st) != base) == bool(st.deps)


# (stage, a change to a section it reads without declaring it)
UNDECLARED = [
    pytest.param("bm25", "eval.depth=50", id="bm25-eval.depth"),  # search depth: recall@100
    pytest.param("bm25", "eval.answer_k=5", id="bm25-eval.answer_k"),  # answer_acc@k
    pytest.param("md0", "mining.top_k=20", id="md0-mining.top_k"),  # length of md0/train_top
    pytest.param("md0", "mining.seed=3", id="md0-mining.seed"),  # shuffles its training rows (dual_examples)
    pytest.param("md0_inbatch", "mining.seed=3", id="md0_inbatch-mining.seed"),
    pytest.param("mc", "mining.top_k=20", id="mc-mining.top_k"),  # its groups' negatives come from md0's top-k
    pytest.param("mc", "mining.seed=3", id="mc-mining.seed"),  # draws the calibration groups and the negatives
    pytest.param("md1", "dual.continue_epochs=0.5", id="md1-dual.continue_epochs"),
    pytest.param("md2", "dual.init=base", id="md2-dual.init"),
    pytest.param("md1_undenoised", "bm25.k1=1.5", id="md1_undenoised-bm25.k1"),  # its BM25 negatives (no mc dep)
]


@pytest.mark.parametrize("name,change", UNDECLARED)
def test_stage_fingerprint_covers_what_it_reads(name, change, small_data, tmp_path):
    st = stages()[name]
    assert Pipeline(_cfg(small_data, change), tmp_path).stage_fingerprint(st) != \
        Pipeline(_cfg(small_data), tmp_path).stage_fingerprint(st)


# (stage, a change to a key of its sections that it does not read): tuning steps 3-4 must not retrain md0 or mc
NOT_READ = [
    pytest.param("md0", "mining.denoise=none", id="md0-mining.denoise"),
    pytest.param("md0", "mining.pseudo_top_k=3", id="md0-mining.pseudo_top_k"),
    pytest.param("md0", "dual.continue_epochs=0.5", id="md0-dual.continue_epochs"),
    pytest.param("md0", "dual.init=base", id="md0-dual.init"),
    pytest.param("md0_inbatch", "dual.continue_min_steps=5", id="md0_inbatch-dual.continue_min_steps"),
    pytest.param("mc", "mining.denoise=relative", id="mc-mining.denoise"),
    pytest.param("mc", "mining.denoise_threshold=0.3", id="mc-mining.denoise_threshold"),
]


@pytest.mark.parametrize("name,change", NOT_READ)
def test_stage_fingerprint_ignores_what_it_does_not_read(name, change, small_data, tmp_path):
    st = stages()[name]
    assert not st.reads(change.partition("=")[0])
    assert Pipeline(_cfg(small_data, change), tmp_path).stage_fingerprint(st) == \
        Pipeline(_cfg(small_data), tmp_path).stage_fingerprint(st)


def test_a_stage_recorded_with_wider_sections_is_still_reused():
    """A run folder from before a stage's sections were narrowed recorded keys the stage no longer reads: it stays
    valid while every key the stage reads now has its old value, and not otherwise."""
    from rocketqa_ray.pipeline.runner import diff, project, same_reads

    now = {"config": {"mining": {"top_k": 50, "seed": 0}, "dual": {"lr": 5e-5}}, "deps": {"bm25": "ab"}}
    stored = {"config": {"mining": {"top_k": 50, "seed": 0, "denoise": "threshold"},
                         "dual": {"lr": 5e-5, "continue_epochs": 0.4}}, "deps": {"bm25": "ab"}}
    assert same_reads(stored, now)
    changed = {**stored, "config": {**stored["config"], "mining": {**stored["config"]["mining"], "top_k": 20}}}
    assert not same_reads(changed, now)
    assert diff(project(changed, now), now) == "config.mining.top_k: 20 -> 50"  # the message names only what it reads
    assert not same_reads({**stored, "deps": {"bm25": "cd"}}, now)


def test_variants_share_code_but_not_fingerprints(small_data, tmp_path):
    p = Pipeline(_cfg(small_data), tmp_path)
    reg = stages()
    assert reg["md0"].sections == reg["md0_inbatch"].sections
    assert p.stage_fingerprint(reg["md0"]) != p.stage_fingerprint(reg["md0_inbatch"])
    assert p.stage_fingerprint(reg["md0_inbatch"])["config"]["variant"] == "md0_inbatch"


def test_validate_rejects_an_unknown_stage_listing_the_valid_ones(small_data):
    with pytest.raises(ConfigError) as e:
        load_config("tiny", overrides=[f"data.path={small_data}", "pipeline.stages=bm25,md9"])
    msg = str(e.value)
    assert "'md9'" in msg and "bm25" not in msg.split("valid stages:")[0]
    assert msg.split("valid stages:")[1].strip().split(", ") == stage_names()
    # one ablation may be named, without pipeline.ablations running all of them
    assert load_config("tiny", overrides=["pipeline.stages=md0,md1_undenoised"]).pipeline.stages == [
        "md0", "md1_undenoised"]
    assert load_config("tiny", overrides=["pipeline.stages=bm25,md2"]).pipeline.stages == ["bm25", "md2"]


def test_small_dataset_splits(small_data):
    ctx = Context(_cfg(small_data), small_data.parent / "unused")
    s = ctx.splits
    assert len(s.test) == N_TEST
    c = ctx.cfg.data
    assert len(s.train) + len(s.pseudo) + len(s.dev) == N_TRAIN
    assert len(s.pseudo) == round(c.pseudo_fraction * N_TRAIN) and len(s.dev) == round(c.dev_fraction * N_TRAIN) > 0
    assert not set(s.train) & set(s.pseudo) and not set(s.dev) & (set(s.train) | set(s.pseudo))
    assert len(ctx.passages) == N_PASSAGES
    gold = {p for q in s.train + s.pseudo + s.dev for p in ctx.train_qrels[q]} | {p for r in ctx.test_qrels.values() for p in r}
    assert gold <= set(ctx.passages.ids())


# ------------------------------------------------------------------------------------------ baselines
def test_bm25(run):
    res = run("bm25")
    _metrics_ok(res.metrics)
    b = run.cfg.bm25
    assert res.stats == {"stemmed": b.stem, "k1": b.k1, "b": b.b}
    assert (run.ctx.bm25.stemmer is not None) == b.stem and (run.ctx.bm25.model.k1, run.ctx.bm25.model.b) == (b.k1, b.b)
    assert res.metrics["mrr@10"] > 0.5  # lexical matching works on SQuAD questions
    trec = read_trec_run(run.dir("bm25") / "test.trec")
    assert set(trec) == set(run.ctx.splits.test)
    assert all(0 < len(v) <= run.cfg.eval.depth for v in trec.values())


def test_bm25_is_skipped_above_its_size_cap(run, small_data, tmp_path):
    """A corpus past bm25.max_passages gets no in-memory BM25 index: no reference row, no BM25 negatives, no
    held-out groups (early stopping off), each said, nothing built."""
    from rocketqa_ray.pipeline.shared import bm25_negatives, dev_groups

    ctx = Context(_cfg(small_data, f"bm25.max_passages={N_PASSAGES - 1}"), tmp_path)
    res = stages()["bm25"].run(ctx, ctx.cfg, tmp_path / "bm25")
    assert res.metrics == {} and "bm25.max_passages" in res.stats["skipped"]
    assert bm25_negatives(ctx, ctx.splits.train[:3], 2) == {q: [] for q in ctx.splits.train[:3]}
    assert dev_groups(ctx, 5) == [] and ctx._bm25 is None
    assert Context(_cfg(small_data, f"bm25.max_passages={N_PASSAGES}"), tmp_path).bm25_fits


def test_dev_groups_for_dual_encoder_early_stopping(run):
    """Dev questions (never trained on) with their gold positive and BM25's top other passages, in BM25's order."""
    from rocketqa_ray.pipeline.shared import VAL_NEGATIVES, dev_groups

    ctx = run.ctx
    groups = dev_groups(ctx, 5)
    assert [g["qid"] for g in groups] == [q for q in ctx.splits.dev if q in ctx.train_qrels][:5]
    assert not set(g["qid"] for g in groups) & set(ctx.splits.train)
    idx, _ = ctx.bm25.search([g["query"] for g in groups], k=VAL_NEGATIVES + 1)
    for g, row in zip(groups, idx):
        assert g["positive_id"] in ctx.train_qrels[g["qid"]] and g["positive"] == ctx.ptexts([g["positive_id"]])[g["positive_id"]]
        bm25 = [ctx.bm25.ids[j] for j in row if ctx.bm25.ids[j] not in ctx.train_qrels[g["qid"]]]
        assert g["negative_ids"] == bm25[:VAL_NEGATIVES]
        texts = ctx.ptexts(g["negative_ids"])
        assert g["negatives"] == [texts[p] for p in g["negative_ids"]]


def test_bm25_stats_follow_its_config(small_data, tmp_path):
    cfg = _cfg(small_data, "bm25.stem=false", "bm25.k1=1.2", "bm25.b=0.75")
    ctx = Context(cfg, tmp_path)
    res = stages()["bm25"].run(ctx, cfg, tmp_path)
    assert res.stats == {"stemmed": False, "k1": 1.2, "b": 0.75}
    _metrics_ok(res.metrics)
    # ... and they are what the retriever was built with
    assert ctx.bm25.stemmer is None and (ctx.bm25.model.k1, ctx.bm25.model.b) == (1.2, 0.75)


def test_zero_shot(run, tmp_path):
    from rocketqa_ray.index import DenseIndex
    from rocketqa_ray.modeling.dual_encoder import DualEncoder

    res = run("zero_shot")
    d = run.dir("zero_shot")
    _metrics_ok(res.metrics)
    assert (d / "model" / "config.json").exists()
    index = DenseIndex.load(d / "index", expect_fingerprint=model_fingerprint(d / "model"))
    assert len(index) == N_PASSAGES and index.meta["shards"] == len(read_json(d / "index" / "meta.json")["files"])
    assert set(index.ids) == set(run.ctx.passages.ids())
    # the untrained base model, as saved by DualEncoder.from_base
    again = DualEncoder.from_base(run.cfg.model).save(tmp_path / "model")
    assert model_fingerprint(again) == model_fingerprint(d / "model")
    assert res.stats["heldout_questions"] == len(run.ctx.splits.dev) and res.stats["heldout_set"] == "dev"
    assert 0.0 <= res.stats["heldout_mrr@10"] <= res.stats["heldout_recall@20"] <= 1.0  # one gold per question


# ------------------------------------------------------------------------------------------ step 1
def test_md0_mines_top_k_without_gold(run):
    res = run("md0")
    d, ctx, k = run.dir("md0"), run.ctx, run.cfg.mining.top_k
    _metrics_ok(res.metrics)
    top = train_top(ctx, "md0")
    assert set(top) == set(ctx.splits.train)
    assert len(read_hits(d / "train_top")) == len(top)  # the candidates folder, one row per question
    for q, pids in top.items():
        assert len(pids) == k and len(set(pids)) == k
        assert not set(pids) & set(ctx.train_qrels[q]), f"{q}: gold passage among its hard-negative candidates"
        assert set(pids) <= set(ctx.passages.ids())
    assert res.stats["train_questions"] == len(ctx.splits.train)
    assert res.stats["cross_batch"] is True and res.stats["workers"] == run.cfg.ray.num_workers == 2
    assert res.stats["negatives_per_query"] == run.cfg.dual.batch_size * 2 - 1
    assert res.stats["heldout_questions"] == len(ctx.splits.dev)
    spec = _spec(d)
    assert spec["init_model"] is None and spec["config"]["dual"]["cross_batch"] is True
    assert spec["config"]["dual"]["max_steps"] == run.cfg.dual.max_steps
    assert len(_parquet_rows(d / "train_examples.parquet")) == len(ctx.splits.train)
    run("zero_shot")
    assert model_fingerprint(d / "model") != model_fingerprint(run.dir("zero_shot") / "model")  # it trained


def test_md0_inbatch(run):
    res = run("md0_inbatch")
    d = run.dir("md0_inbatch")
    _metrics_ok(res.metrics)
    assert res.stats["cross_batch"] is False
    assert res.stats["negatives_per_query"] == run.cfg.dual.batch_size - 1
    assert _spec(d)["config"]["dual"]["cross_batch"] is False
    assert not (d / "train_top").exists()  # only md0 mines
    assert (d / "index" / "meta.json").exists()
    # same rows and seed as md0: only the negatives seen in the loss differ, so the weights do
    run("md0")
    assert model_fingerprint(d / "model") != model_fingerprint(run.dir("md0") / "model")


# ------------------------------------------------------------------------------------------ step 2
def _calibration_data(run: StageRunner) -> tuple[np.ndarray, np.ndarray]:
    """mc's held-out calibration pairs: the raw (uncalibrated) cross-encoder's logits and the labels."""
    from rocketqa_ray.batch.pair_flow import read_pair_scores
    from rocketqa_ray.retrieval.fusion import logits_from_probs

    raw = read_pair_scores(run.dir("mc") / "calib_scores")
    pairs = sorted(raw)
    labels = np.array([1.0 if p in run.ctx.train_qrels[q] else 0.0 for q, p in pairs])
    return logits_from_probs(np.array([raw[x] for x in pairs])), labels


def _bce(logits: np.ndarray, labels: np.ndarray, a: float, b: float) -> float:
    p = np.clip(1 / (1 + np.exp(-(a * logits + b))), 1e-12, 1 - 1e-12)
    return float(-np.mean(labels * np.log(p) + (1 - labels) * np.log(1 - p)))


def test_mc_groups_in_flows_equal_the_driver(run, tmp_path):
    """data.driver_max_examples=0 (the corpus-scale path): step 2's training groups drawn per question by Ray Data
    from md0's candidates folder and given their texts by the examples flow are the groups drawn in the driver, in
    the same order: the gold positive, then `cross.num_negatives` of md0's candidates."""
    from dataclasses import replace

    from rocketqa_ray.pipeline.stages.step2_mc import training_groups

    run("md0")
    ctx, cfg = run.ctx, run.cfg
    qids = ctx.splits.train[:60]
    pos = {q: next(iter(ctx.train_qrels[q])) for q in qids}
    (tmp_path / "driver").mkdir()
    here = training_groups(ctx, cfg, tmp_path / "driver", qids, pos)
    flow = training_groups(ctx, replace(cfg, data=replace(cfg.data, driver_max_examples=0)), tmp_path / "flow",
                           qids, pos)
    assert (flow / "_SUCCESS.json").exists() and here.is_file()
    rows = _parquet_rows(here)
    assert _parquet_rows(flow) == rows and sorted(r["qid"] for r in rows) == sorted(qids)
    top = train_top(ctx, "md0", qids)
    for r in rows:
        q = r["qid"]
        assert r["labels"] == [1.0] + [0.0] * cfg.cross.num_negatives
        assert r["passages"][0] == ctx.ptexts([pos[q]])[pos[q]]
        assert set(r["passages"][1:]) <= set(ctx.ptexts(top[q]).values())


def test_mc_calibrates_fuses_and_reranks_md0(run):
    from rocketqa_ray.batch.pair_flow import read_pair_scores
    from rocketqa_ray.modeling.cross_encoder import CrossEncoder
    from rocketqa_ray.retrieval.fusion import logits_from_probs
    from rocketqa_ray.rocketqa.calibration import head_layer

    res = run("mc")
    d, ctx, cfg = run.dir("mc"), run.ctx, run.cfg
    _metrics_ok(res.metrics)
    s = res.stats
    n_calib = round(cfg.cross.calibration_fraction * len(ctx.splits.train))
    assert s["calibrated"] is True and s["calib_questions"] == n_calib
    assert s["train_questions"] == len(ctx.splits.train) - n_calib
    assert len(_parquet_rows(d / "train_examples.parquet")) == s["train_questions"]
    assert s["calib_pairs"] == n_calib * (1 + cfg.cross.num_negatives)
    assert 0.0 <= s["calib_top1_acc"] <= 1.0
    # the calibration stats are those of sigmoid(a * raw logit + b) on the held-out pairs, and (a, b) fit them
    logits, labels = _calibration_data(run)
    assert len(labels) == s["calib_pairs"] and labels.sum() == n_calib
    a, b = s["platt_a"], s["platt_b"]
    p = 1 / (1 + np.exp(-(a * logits + b)))
    assert p[labels == 1].mean() == pytest.approx(s["calib_mean_prob_pos"], abs=1e-3)
    assert p[labels == 0].mean() == pytest.approx(s["calib_mean_prob_neg"], abs=1e-3)
    assert p.mean() == pytest.approx(labels.mean(), abs=2e-3)  # a logistic fit with a bias matches the base rate
    base_rate = labels.mean()
    assert _bce(logits, labels, a, b) <= _bce(logits, labels, 0.0, math.log(base_rate / (1 - base_rate))) + 1e-6
    # Platt scaling is folded into the saved head: logit' = a * logit + b
    raw_head = head_layer(CrossEncoder.load(d / "train" / "model").model)
    head = head_layer(CrossEncoder.load(d / "model").model)
    raw_w = raw_head.weight.detach().numpy()
    np.testing.assert_allclose(head.weight.detach().numpy(), a * raw_w, rtol=0, atol=5e-5 * np.abs(raw_w).max() + 1e-7)
    raw_b = float(raw_head.bias)
    assert float(head.bias) == pytest.approx(a * raw_b + b, abs=6e-5 + 5e-5 * abs(raw_b))
    # ... so the saved model scores sigmoid(a * logit(raw score) + b) (a, b rounded to 4 decimals in the stats)
    raw = read_pair_scores(d / "calib_scores")
    pairs = sorted(raw)[:8]
    texts = ctx.ptexts(p for _, p in pairs)
    calibrated = CrossEncoder.load(d / "model").score([ctx.qtext(q) for q, _ in pairs],
                                                      [texts[p] for _, p in pairs], bf16="false", device="cpu")
    raw_logits = logits_from_probs(np.array([raw[x] for x in pairs]))
    expect = 1 / (1 + np.exp(-(a * raw_logits + b)))
    # raw scores are stored as float32 probabilities: their logits carry ~1e-7 of rounding, which a multiplies
    np.testing.assert_allclose(calibrated, expect,
                               atol=0.25 * (5e-5 * (1 + np.abs(raw_logits).max()) + 1e-6 * abs(a)) + 1e-6)
    # step 2's fusion is stored with the model, where md2's pseudo-labels read it
    meta = read_meta(d / "model")
    assert set(meta["fusion"]) == {"ce", "dense", "bm25", "bias"}
    assert all(math.isfinite(v) for v in meta["fusion"].values())
    assert meta["fusion"]["bm25"] != 0.0  # cross.fusion_bm25
    assert s["fusion"] == {k: round(v, 4) for k, v in meta["fusion"].items()}
    assert meta["calibration"]["platt_a"] == a
    assert read_json(d / "calibration.json") == meta["calibration"]
    assert {"calib_top1_acc_dense", "calib_top1_acc_fused", "calib_top1_acc_bm25"} <= set(s)
    # training was validated on the calibration groups (with M_D0's hardest negatives) every eval_every steps; the
    # model kept is the best of those
    val = read_json(d / "train" / "validation.json")
    steps = list(range(cfg.cross.eval_every, cfg.cross.max_steps + 1, cfg.cross.eval_every))
    assert [h["step"] for h in val["history"]] == steps  # a fresh head is not worth scoring before training
    assert all(h["val_groups"] == n_calib for h in val["history"])
    best = max(val["history"], key=lambda h: h["val_mrr@10"])
    assert val["best_step"] == best["step"] and s["early_stopping"]["best_step"] == best["step"]
    assert s["trained_steps"] == cfg.cross.max_steps and val["stopped_early"] is False
    assert read_meta(d / "train" / "model")["training"]["validation"]["best_step"] == best["step"]
    # M_C reranks md0's test top-k with a fusion fit for md0 on held-out dev, checked there
    assert s["scores"] == "fused" and s["fusion_features"] == "ce+dense+bm25"
    assert s["reranked_depth"] == cfg.eval.rerank_top_k
    _assert_reranks(run, "md0", "mc")
    _assert_rerank_check(run, "md0", "mc")


def test_mc_platt_fit_is_the_maximum_likelihood(run):
    from rocketqa_ray.retrieval.fusion import fit_logistic

    s = run("mc").stats
    logits, labels = _calibration_data(run)
    # the same fit on standardised logits, mapped back
    m, sd = logits.mean(), logits.std()
    w, b = fit_logistic(((logits - m) / sd)[:, None], labels)
    best = _bce(logits, labels, w[0] / sd, b - w[0] * m / sd)
    assert _bce(logits, labels, s["platt_a"], s["platt_b"]) <= best + 1e-5
    # a maximum-likelihood fit never ranks the classes the wrong way round; they tie when the tiny random
    # cross-encoder's logits carry no signal after its 4 steps (a ~ 0, every probability the base rate)
    assert s["calib_mean_prob_pos"] >= s["calib_mean_prob_neg"]


def _assert_reranks(run: StageRunner, stage: str, reranker: str) -> None:
    """`reranker`'s test run is `stage`'s with only the top `eval.rerank_top_k` reordered."""
    top = run.cfg.eval.rerank_top_k
    before, after = _ranked(run.dir(stage) / "test.trec"), _ranked(run.dir(reranker) / "test.trec")
    assert set(before) == set(after) == set(run.ctx.splits.test)
    for q in before:
        assert set(after[q][:top]) == set(before[q][:top])
        assert after[q][top:] == before[q][top:]
    assert run.results[reranker].metrics["recall@100"] == run.results[stage].metrics["recall@100"]
    assert run.results[reranker].stats["pairs_scored"] == sum(min(top, len(v)) for v in before.values())


def _assert_rerank_check(run: StageRunner, retriever: str, reranker: str) -> None:
    """The fusion is the one fit on `retriever`'s own top-k for the held-out dev questions (recomputed here from
    the stage's dev scores), the verdict follows the dev figures, and the stage answers with what it chose."""
    from rocketqa_ray.batch.pair_flow import read_pair_scores
    from rocketqa_ray.evaluation import evaluate_run
    from rocketqa_ray.retrieval.fusion import Fusion, fit_fusion
    from rocketqa_ray.retrieval.rerank_check import mrr_at

    ctx, cfg, d = run.ctx, run.cfg, run.dir(reranker)
    s = run.results[reranker].stats
    saved = read_json(d / "rerank_check.json")
    assert saved["retriever"] == s["retriever"] == retriever
    dev = [q for q in ctx.splits.dev if q in ctx.train_qrels]
    assert len(dev) > 0 and saved["dev"]["questions"] == len(dev)
    # the dev groups are the retriever's top rerank_top_k, scored by the cross-encoder
    ranked = _ranked_dev(run, retriever, dev)
    scores = read_pair_scores(d / "dev_scores")
    pairs = [(q, p) for q in dev for p, _ in ranked[q]]
    assert set(scores) == set(pairs) and len(pairs) == saved["dev"]["pairs"] == len(dev) * cfg.eval.rerank_top_k
    labels = np.array([1.0 if p in ctx.train_qrels[q] else 0.0 for q, p in pairs])
    dense = np.array([sc for q in dev for _, sc in ranked[q]])
    ce = np.array([scores[x] for x in pairs])
    bm25 = ctx.bm25_scores(pairs)
    lexical = np.array([bm25[x] for x in pairs])
    full = fit_fusion(ce, dense, labels, lexical)
    assert Fusion.from_dict(saved["fusion"]).to_dict() == pytest.approx(full.to_dict(), rel=1e-3)
    qids = [q for q, _ in pairs]
    assert saved["dev"]["retriever_mrr@10"] == pytest.approx(mrr_at(qids, dense, labels), abs=1e-4)
    assert saved["dev"]["ce_mrr@10"] == pytest.approx(mrr_at(qids, ce, labels), abs=1e-4)
    # the verdict: rerank only if it beat the retriever on dev, so the answer is never worse there
    chose_rerank = saved["dev"]["rerank_mrr@10"] > saved["dev"]["retriever_mrr@10"] + cfg.eval.rerank_min_gain
    assert saved["rerank"] is chose_rerank and s["rerank_choice"] == ("rerank" if chose_rerank else "retriever")
    answer_dev = saved["dev"]["rerank_mrr@10"] if chose_rerank else saved["dev"]["retriever_mrr@10"]
    assert answer_dev >= saved["dev"]["retriever_mrr@10"]
    # test: the three rankings are reported, and the stage's run is the chosen one
    test = s["rerank_check"]["test"]
    before = read_trec_run(run.dir(retriever) / "test.trec")
    assert test["retriever"]["mrr@10"] == pytest.approx(evaluate_run(before, ctx.test_qrels, ("mrr@10",))["mrr@10"])
    assert set(test) == {"retriever", "cross_encoder", "rerank"}
    after = _ranked(d / "test.trec")
    if not chose_rerank:
        assert after == _ranked(run.dir(retriever) / "test.trec")
    assert run.results[reranker].metrics["mrr@10"] == pytest.approx(
        test["rerank" if chose_rerank else "retriever"]["mrr@10"], abs=1e-4)


def _ranked_dev(run: StageRunner, retriever: str, dev: list[str]) -> dict[str, list[tuple[str, float]]]:
    """The retriever's top rerank_top_k for the dev questions, by exhaustive inner products over its embeddings."""
    from rocketqa_ray.batch.encode import load_embeddings
    from rocketqa_ray.modeling.dual_encoder import DualEncoder

    ctx = run.ctx
    ids, emb = load_embeddings(run.dir(retriever) / "embeddings")
    model = DualEncoder.load(run.dir(retriever) / "model")
    q = model.encode([ctx.qtext(x) for x in dev], "query", bf16=run.cfg.encode.bf16, device="cpu")
    sims = q @ emb.T
    k = run.cfg.eval.rerank_top_k
    return {x: [(ids[j], float(sims[i, j])) for j in np.argsort(-sims[i], kind="stable")[:k]]
            for i, x in enumerate(dev)}


def test_a_rerank_not_better_on_dev_is_not_the_answer(run, tmp_path, caplog):
    """eval.rerank_min_gain=1 (no rerank can gain more than 1 MRR): the stage answers with md2's own ranking,
    says so on the console, and records the choice the service follows."""
    import logging
    from dataclasses import replace

    from rocketqa_ray.console import CONSOLE_LOGGER
    from rocketqa_ray.pipeline.report import markdown
    from rocketqa_ray.pipeline.reranking import rerank_eval

    run("md2_rerank")
    cfg = replace(run.cfg, eval=replace(run.cfg.eval, rerank_min_gain=1.0))
    ctx = Context(cfg, run.ctx.run_dir)
    d = tmp_path / "md2_rerank"
    d.mkdir()
    with caplog.at_level(logging.INFO, logger=CONSOLE_LOGGER):
        metrics, stats = rerank_eval(ctx, "md2", d)
    assert stats["rerank_choice"] == "retriever" and read_json(d / "rerank_check.json")["rerank"] is False
    assert _ranked(d / "test.trec") == _ranked(run.dir("md2") / "test.trec")
    assert metrics["mrr@10"] == run.results["md2"].metrics["mrr@10"]
    line = next(r.getMessage() for r in caplog.records if "NOT used" in r.getMessage())
    assert "md2" in line and f"{stats['rerank_check']['dev']['retriever_mrr@10']:.3f}" in line
    md = markdown({"stages": {"md2": run.results["md2"].metrics, "md2_rerank": metrics},
                   "stats": {"md2_rerank": stats}})
    assert "not reranked: no better than md2 on held-out dev" in md
    assert "Answer: **md2 alone**" in md and "| cross-encoder alone |" in md


# ------------------------------------------------------------------------------------------ step 3
def test_md1_denoised_pool(run):
    from rocketqa_ray.batch.pair_flow import read_pair_scores

    res = run("md1")
    d, ctx, m = run.dir("md1"), run.ctx, run.cfg.mining
    _metrics_ok(res.metrics)
    pool = read_json(d / "hard_negative_pool.json")
    cands = _bm25_pool(run)
    md0_top = train_top(run.ctx, "md0")
    assert set(pool) == set(ctx.splits.train)
    for q, pids in pool.items():
        assert set(pids) <= set(cands[q])  # md0's candidates plus BM25's negatives, nothing else
        assert not set(pids) & set(ctx.train_qrels[q])
    assert any(set(c) - set(md0_top[q]) for q, c in cands.items())  # BM25 added passages md0 did not rank
    s = res.stats
    n_cands = sum(map(len, cands.values()))
    assert s["kept"] + s["dropped"] == s["scored"] == n_cands
    assert s["kept"] == sum(map(len, pool.values()))
    assert s["questions"] == len(ctx.splits.train)
    assert s["threshold"] == m.denoise_threshold and s["top"] == m.denoise_top + m.bm25_negatives
    assert s["pool_per_question"] == round(n_cands / len(cands), 2)
    assert s["kept_checked"] + s["dropped_checked"] == s["scored"]
    # kept = exactly the candidates the cross-encoder scored below the threshold (fused with M_D0 and BM25 where
    # the tiny cross-encoder failed its check: tests/pipeline/test_checks.py pins that path)
    scores = read_pair_scores(d / "denoise_scores")
    gold = {q: next(iter(ctx.train_qrels[q])) for q in cands}  # scored too: rules, distillation, the rules bench
    assert set(scores) == {(q, p) for q, ps in cands.items() for p in ps} | set(gold.items())
    if not run.results["mc"].stats["check"]["passed"]:
        from rocketqa_ray.pipeline.stages.step3_md1 import fused_md0_scores

        assert s["denoise_scores"] == "fused (cross-encoder check failed)"
        scores = fused_md0_scores(ctx, list(scores), scores)
    used = _parquet_rows(d / "denoise_scores.parquet")  # what denoising decided on, positives flagged
    assert {(r["qid"], r["pid"]) for r in used} == set(scores)
    assert {(r["qid"], r["pid"]) for r in used if r["positive"]} == set(gold.items())
    assert all(r["score"] == pytest.approx(scores[(r["qid"], r["pid"])], abs=1e-6) for r in used)
    for q, ps in cands.items():
        assert pool[q] == [p for p in ps if scores[(q, p)] < m.denoise_threshold]
    # trained on them, continuing from md0 (dual.init: previous)
    rows = _parquet_rows(d / "train_examples.parquet")
    assert s["train_questions"] == len(rows) == len(ctx.splits.train)
    for r in rows:
        assert len(r["negative_ids"]) == run.cfg.dual.num_hard_negatives
        if pool[r["qid"]]:
            assert set(r["negative_ids"]) <= set(pool[r["qid"]])
        # distillation's soft targets: the scores denoising used (None for a random top-up)
        expect = [scores.get((r["qid"], p)) for p in [r["positive_id"], *r["negative_ids"]]]
        assert r["teacher_scores"] == pytest.approx(expect, abs=1e-6) if None not in expect else \
            [v is None for v in r["teacher_scores"]] == [v is None for v in expect]
    assert _spec(d)["init_model"] == model_fingerprint(run.dir("md0") / "model")
    assert s["heldout_questions"] == len(ctx.splits.dev)


def test_md1_reports_known_false_negatives_removed(run):
    """Against the diagnostic qrels: the known false negatives among md1's candidates, those denoising dropped
    (recall) and the share of drops they make (precision), overall and per source, recounted from the files."""
    from rocketqa_ray.data.beir import load_qrels
    from rocketqa_ray.pipeline.report import markdown

    res = run("md1")
    known = load_qrels(run.cfg.data.path + "/" + KNOWN)
    cands = _bm25_pool(run)
    pool = read_json(run.dir("md1") / "hard_negative_pool.json")
    fn = [(q, p) for q, ps in cands.items() for p in ps if p in known.get(q, {})]
    dropped = [(q, p) for q, ps in cands.items() for p in ps if p not in pool[q]]
    fn_dropped = [x for x in dropped if x in set(fn)]
    r = res.stats["false_negatives"]["all"]
    assert r["candidates"] == sum(map(len, cands.values()))
    assert r["known_false_negatives"] == len(fn) > 0  # the fixture's known positives are what md0 mines
    assert r["dropped"] == len(dropped) == res.stats["dropped"]
    assert r["known_false_negatives_dropped"] == len(fn_dropped)
    assert r["recall"] == pytest.approx(len(fn_dropped) / len(fn), abs=1e-4)
    if dropped:
        assert r["precision_lower_bound"] == pytest.approx(len(fn_dropped) / len(dropped), abs=1e-4)
    assert r["known_false_negatives_kept"] == len(fn) - len(fn_dropped)
    # per source: md0's top denoise_top and BM25's negatives, each counted over its own candidates
    top = train_top(run.ctx, "md0")
    md0_fn = sum(1 for q, ps in top.items() for p in ps[: run.cfg.mining.denoise_top] if p in known.get(q, {}))
    assert res.stats["false_negatives"]["md0"]["known_false_negatives"] == md0_fn
    assert set(res.stats["false_negatives"]) == {"all", "md0", "bm25"}
    text = markdown({"stages": {"md1": res.metrics}, "stats": {"md1": res.stats}})
    assert "## False negatives" in text and f"| md1 | all | {r['candidates']} |" in text


def test_md1_relative_denoising_judges_against_each_positive(run, small_data, tmp_path):
    """mining.denoise=relative on the same M_D0 and M_C: the gold pairs are scored too, and a candidate is dropped
    exactly when it scores above denoise_relative x its question's positive."""
    import shutil

    from rocketqa_ray.batch.negatives_flow import read_pools
    from rocketqa_ray.batch.pair_flow import read_pair_scores
    from rocketqa_ray.pipeline.checks import ce_fallback
    from rocketqa_ray.pipeline.stages.step3_md1 import FUSED_SCORES, md0_fusion

    run("mc")
    # with distillation on as well: the same scores become md1's soft targets; and every question's rows are
    # decided and given their texts by Ray Data flows (the corpus-scale path: a folder of parts, trained on as such)
    cfg = _cfg(small_data, "mining.denoise=relative", "mining.denoise_relative=0.5", "distill.kind=kl",
               "data.driver_max_examples=0")
    other = StageRunner(cfg, tmp_path / "run")
    for name in ("md0", "mc"):  # reuse md1's upstream stages: only step 3 differs
        shutil.copytree(run.dir(name), other.dir(name))
        other.results[name] = run.results[name]
    if run.dir("bm25_stats").exists():  # corpus statistics of the BM25 feature, built once per run
        shutil.copytree(run.dir("bm25_stats"), other.dir("bm25_stats"))
    res = other("md1")
    # what the rule judged: the cross-encoder's probabilities, or, where M_C failed its check, their fusion with
    # M_D0's and BM25's scores, which the flow path fuses per pair (`pair_flow.fuse_pair_files`; equal to the
    # driver's `fused_md0_scores` within 1e-4: tests/pipeline/test_checks.py)
    fused = ce_fallback(other.dir("mc")) == "fused" and md0_fusion(other.ctx) is not None
    scores = read_pair_scores(other.dir("md1") / (FUSED_SCORES if fused else "denoise_scores"))
    # decided per question by Ray Data (the corpus-scale path): what denoising kept rides on the flow's rows
    pool = read_pools(other.dir("md1") / "decided")
    assert not (other.dir("md1") / "hard_negative_pool.json").exists()
    cands = _bm25_pool(run)
    gold = {q: next(iter(run.ctx.train_qrels[q])) for q in cands}
    assert all((q, g) in scores for q, g in gold.items())  # the positives were scored
    for q, ps in cands.items():
        bar = 0.5 * scores[(q, gold[q])]
        assert pool[q] == [p for p in ps if scores[(q, p)] <= bar], q
    assert res.stats["rule"] == "relative" and res.stats["rule_value"] == 0.5
    assert res.stats["positive_score_mean"] == pytest.approx(
        sum(scores[(q, g)] for q, g in gold.items()) / len(gold), abs=1e-4)
    assert _spec(other.dir("md1"))["config"]["distill"]["kind"] == "kl"
    assert (other.dir("md1") / "train_examples.parquet" / "_SUCCESS.json").exists()  # the flow's folder
    rows = _parquet_rows(other.dir("md1") / "train_examples.parquet")
    assert all(r["teacher_scores"][0] == pytest.approx(scores[(r["qid"], gold[r["qid"]])], abs=1e-6) for r in rows)
    assert res.stats["trained_steps"] > 0
    assert res.stats["distill"] == {"kind": "kl", "weight": 1.0, "rows": len(rows), "rows_with_teacher": sum(
        1 for r in rows if r["teacher_scores"][0] is not None and any(v is not None for v in r["teacher_scores"][1:]))}


def test_md1_undenoised_pool_is_all_candidates(run):
    res = run("md1_undenoised")
    d = run.dir("md1_undenoised")
    _metrics_ok(res.metrics)
    assert read_json(d / "hard_negative_pool.json") == _bm25_pool(run)
    assert "kept" not in res.stats and "dropped" not in res.stats
    assert not (d / "denoise_scores").exists() and "mc" not in stages()["md1_undenoised"].deps
    assert _spec(d)["init_model"] == model_fingerprint(run.dir("md0") / "model")
    rows = _parquet_rows(d / "train_examples.parquet")
    pool = read_json(d / "hard_negative_pool.json")
    assert all(set(r["negative_ids"]) <= set(pool[r["qid"]]) for r in rows)


# ------------------------------------------------------------------------------------------ step 4
def test_md2_adds_pseudo_labelled_questions(run):
    from rocketqa_ray.batch.pair_flow import read_pair_scores

    res = run("md2")
    d, ctx = run.dir("md2"), run.ctx
    _metrics_ok(res.metrics)
    s = res.stats
    pseudo = ctx.splits.pseudo
    assert s["labelled_questions"] == run.results["md1"].stats["train_questions"]
    assert s["pseudo_questions"] == len(pseudo)
    assert s["pseudo_labelled"] == len(pseudo) and s["pseudo_coverage"] == 1.0  # thresholds at 0
    assert s["pseudo_pos_threshold"] == 0.0
    assert 0.0 <= s["pseudo_precision"] <= 1.0 and 0.0 <= s["pseudo_gold_in_candidates"] <= 1.0
    assert s["train_questions"] == s["labelled_questions"] + s["pseudo_labelled"] > s["labelled_questions"]
    # trained on md1's examples, then its own pseudo-labelled ones (md1's are not copied)
    own = _parquet_rows(d / "train_examples.parquet")
    assert sorted(r["qid"] for r in own) == sorted(pseudo)
    md1_rows = _parquet_rows(run.dir("md1") / "train_examples.parquet")
    assert len(md1_rows) == s["labelled_questions"]
    rows = md1_rows + own
    # a pseudo positive is one of md1's top `pseudo_top_k` for the question, scored by the cross-encoder
    scores = read_pair_scores(d / "pseudo_scores")
    for r in rows:
        if r["qid"] in pseudo:
            assert (r["qid"], r["positive_id"]) in scores
    assert len(scores) == len(pseudo) * run.cfg.mining.pseudo_top_k
    assert _spec(d)["init_model"] == model_fingerprint(run.dir("md1") / "model")
    assert (d / "index" / "meta.json").exists()
    # against the diagnostic qrels: the pseudo-positives that are labelled or known positives, recounted
    from rocketqa_ray.data.beir import load_qrels

    known = load_qrels(run.cfg.data.path + "/" + KNOWN)
    pk = s["pseudo_known_positives"]
    pseudo_rows = [r for r in rows if r["qid"] in pseudo]
    assert pk["judged"] == len(pseudo_rows)
    assert pk["precision_vs_labels"] == s["pseudo_precision"]  # the same figure as pseudo_label's own
    hits = sum(1 for r in pseudo_rows if r["positive_id"] in known[r["qid"]])
    assert pk["precision_vs_labels_and_known"] == pytest.approx(hits / len(pseudo_rows), abs=1e-4)


def test_md2_in_flows_labels_as_the_driver(run, small_data, tmp_path):
    """data.driver_max_examples=0 (the corpus-scale path): M_D1's candidates mined into a folder, scored with their
    BM25 by the pair flow, labelled per question by Ray Data and given their texts by the examples flow: the same
    pseudo-labelled rows and stats as md2's driver path (training on a flow's folder: md1's flow test)."""
    import shutil

    from rocketqa_ray.pipeline.stages.step4_md2 import label_in_flow

    want = run("md2")
    other = StageRunner(_cfg(small_data, "data.driver_max_examples=0"), tmp_path / "run")
    for name in ("md1", "mc", "bm25_stats"):  # md2's inputs: only step 4's path differs
        shutil.copytree(run.dir(name), other.dir(name))
    d = other.dir("md2")
    d.mkdir()
    examples, stats = label_in_flow(other.ctx, other.cfg, d)
    assert (d / "pseudo_labels" / "_SUCCESS.json").exists() and (d / "pseudo_candidates" / "_SUCCESS.json").exists()
    assert examples == d / "train_examples.parquet" and (examples / "_SUCCESS.json").exists()  # the flow's folder
    assert {f"pseudo_{k}": v for k, v in stats.items()} == {
        k: v for k, v in want.stats.items() if k.startswith("pseudo_") and k != "pseudo_scores"}
    got = _parquet_rows(examples)
    for r in got:
        r["teacher_scores"] = [pytest.approx(v, abs=1e-5) for v in r["teacher_scores"]]
    assert got == _parquet_rows(run.dir("md2") / "train_examples.parquet")
    assert len(got) == stats["labelled"] == want.stats["train_questions"] - want.stats["labelled_questions"]


def test_md2_rerank(run):
    res = run("md2_rerank")
    s = res.stats
    _metrics_ok(res.metrics)
    assert s["reranked_depth"] == run.cfg.eval.rerank_top_k
    assert s["pairs_scored"] == run.cfg.eval.rerank_top_k * len(run.ctx.splits.test)
    assert s["scores"] == "fused" and s["fusion_features"] == "ce+dense+bm25"
    _assert_reranks(run, "md2", "md2_rerank")
    _assert_rerank_check(run, "md2", "md2_rerank")
    assert not (run.dir("md2_rerank") / "model").exists()  # not a retriever


def test_fusion_bm25_feature_comes_from_corpus_statistics_saved_for_the_service(run):
    """The fusion's BM25 feature: per pair from the corpus's statistics (equal to the BM25 index's scores),
    counted once into RUN_DIR/bm25_stats, which the service reads instead of building an index."""
    from rocketqa_ray.retrieval.bm25_stats import STATS_DIR, CorpusStats
    from rocketqa_ray.serving.artifacts import find_artifacts

    run("md2_rerank")
    ctx = run.ctx
    stats_dir = ctx.run_dir / STATS_DIR
    saved = CorpusStats.load(stats_dir)
    assert saved.n_docs == len(ctx.passages) and saved.stem == run.cfg.bm25.stem
    pairs = [(q, p) for q in ctx.splits.test[:5] for p in ctx.passages.ids()[:7]]
    got = ctx.bm25_scores(pairs)
    for q in ctx.splits.test[:5]:
        pids = [p for qq, p in pairs if qq == q]
        np.testing.assert_allclose([got[(q, p)] for p in pids], ctx.bm25.score(ctx.qtext(q), pids), rtol=1e-5,
                                   atol=1e-6)
    # a new context of the same run reads them back instead of counting again
    fresh = Context(run.cfg, ctx.run_dir)
    before = (stats_dir / "bm25_df.parquet").stat().st_mtime_ns
    assert fresh.bm25_scores(pairs[:3]) == {k: got[k] for k in pairs[:3]}
    assert (stats_dir / "bm25_df.parquet").stat().st_mtime_ns == before
    if (ctx.run_dir / "config.json").exists():
        assert find_artifacts(ctx.run_dir).bm25_stats == stats_dir
