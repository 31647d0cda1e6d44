"""A cross-encoder that did not learn is said, and steps 3 and 4 fall back (issue 20): a run whose dual encoder is
all-MiniLM-L6-v2 (strong before any training) and whose cross-encoder is the random tiny BERT trained for one
step at a negligible learning rate, for real (local Ray, Ray Train, Ray Data, FAISS)."""

from __future__ import annotations

import logging
import shutil
from dataclasses import replace
from pathlib import Path

import pytest

from rocketqa_ray.config import Config, load_config
from rocketqa_ray.console import CONSOLE_LOGGER
from rocketqa_ray.io import read_json
from rocketqa_ray.pipeline.checks import CE_CHECK, QualityCheckFailed, ce_fallback
from rocketqa_ray.pipeline.report import markdown
from rocketqa_ray.pipeline.runner import COMPLETE, Pipeline
from rocketqa_ray.testing.small_data import write_small_beir


class Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def starved(data: Path, *more: str) -> Config:
    return load_config("tiny", overrides=[
        f"data.path={data}", "model.base=minilm", "dual.lr=1e-6", "dual.max_steps=2",
        "cross.max_steps=1", "cross.lr=1e-12",  # the starved cross-encoder
        "mining.pseudo_pos_threshold=0.0", "mining.pseudo_neg_threshold=0.0", *more])


@pytest.fixture(scope="module")
def starved_run(ray_session, tmp_path_factory):
    data = write_small_beir(tmp_path_factory.mktemp("beir") / "squad-small")
    p = Pipeline(starved(data), tmp_path_factory.mktemp("run") / "run")
    console, logger = Lines(), logging.getLogger(CONSOLE_LOGGER)
    level = logger.level
    logger.addHandler(console)
    logger.setLevel(logging.INFO)
    try:
        p.run_stage("md2")
    finally:
        logger.removeHandler(console)
        logger.setLevel(level)
    return p, console.lines, data


def test_a_starved_cross_encoder_fails_its_check_on_the_console_and_in_the_report(starved_run):
    p, lines, _ = starved_run
    s = p.results["mc"].stats
    check = s["check"]
    dev = s["rerank_check"]["dev"]
    assert check["passed"] is False and check["name"] == "cross-encoder learned"
    assert check["figures"]["ce_mrr@10"] == dev["ce_mrr@10"] <= dev["retriever_mrr@10"] == check["figures"]["dense_mrr@10"]
    assert check["figures"]["questions"] == len(p.ctx.splits.dev) > 0
    assert "fused score" in check["fallback"]
    assert read_json(p.run_dir / "mc" / CE_CHECK)["mode"] == "fused" and ce_fallback(p.run_dir / "mc") == "fused"
    line = next(x for x in lines if "CHECK FAILED" in x)
    assert "stage mc" in line and f"{dev['ce_mrr@10']:.3f}" in line and f"{dev['retriever_mrr@10']:.3f}" in line
    md = markdown(p.write_report())
    assert "## Checks (held-out questions)" in md
    assert "- mc: cross-encoder learned: **FAILED**" in md and "The run went on: denoising and pseudo-labels" in md


def test_denoising_falls_back_to_the_fused_score(starved_run):
    """md1's pool is what denoising with the fused score (M_C + M_D0 + BM25, fit for M_D0 on dev) keeps."""
    from rocketqa_ray.batch.pair_flow import read_pair_scores
    from rocketqa_ray.pipeline.shared import bm25_negatives, train_top
    from rocketqa_ray.pipeline.stages.step3_md1 import fused_md0_scores
    from rocketqa_ray.rocketqa.denoise import denoise

    p, _, _ = starved_run
    s, m = p.results["md1"].stats, p.cfg.mining
    assert s["denoise_scores"] == "fused (cross-encoder check failed)"
    raw = read_pair_scores(p.run_dir / "md1" / "denoise_scores")
    fused = fused_md0_scores(p.ctx, list(raw), raw)
    assert fused != raw
    ctx, train = p.ctx, p.ctx.splits.train
    top, lexical = train_top(ctx, "md0"), bm25_negatives(ctx, train, m.bm25_negatives)
    cands = {q: list(dict.fromkeys(top[q][: m.denoise_top] + lexical[q])) for q in train}
    gold = {q: next(iter(ctx.train_qrels[q])) for q in train}  # each positive is scored too
    assert set(raw) == {(q, x) for q, ps in cands.items() for x in ps} | set(gold.items())
    kept = denoise(cands, fused, m.denoise_threshold, m.denoise_top + m.bm25_negatives).kept
    assert read_json(p.run_dir / "md1" / "hard_negative_pool.json") == kept
    assert p.results["md2"].stats["pseudo_scores"] == "fused (cross-encoder check failed)"


def test_the_fused_fallback_in_flows_equals_the_driver(starved_run, tmp_path):
    """Above data.driver_max_examples each pair gets its M_D0 and BM25 scores in the pair flow (`PairDense`,
    `PairBM25`) and a Ray Data map fuses them: the same scores as the driver's fusion (stored passage vectors,
    bm25s) and the same denoised pools."""
    import pyarrow.parquet as pq

    from rocketqa_ray.batch.negatives_flow import read_pools
    from rocketqa_ray.batch.pair_flow import read_pair_scores
    from rocketqa_ray.pipeline.shared import bm25_negatives
    from rocketqa_ray.pipeline.stages.step3_md1 import (
        SCORES,
        decide_in_flow,
        denoise_scores,
        md0_fusion,
        mining_plan,
    )

    p, _, _ = starved_run
    ctx, m = p.ctx, p.cfg.mining
    assert md0_fusion(ctx) is not None
    lexical = bm25_negatives(ctx, ctx.splits.train, m.bm25_negatives)
    d = tmp_path / "md1"
    d.mkdir()
    folder = denoise_scores(ctx, d, lexical, fused=True, in_flow=True)
    cols = pq.read_table(folder, columns=["qid", "pid", "score", "ce"])
    got = dict(zip(zip(cols.column("qid").to_pylist(), cols.column("pid").to_pylist()), cols.column("score").to_pylist()))
    want = read_pair_scores(p.run_dir / "md1" / SCORES)  # what the run's driver fused and decided on
    assert got.keys() == want.keys() and got == pytest.approx(want, abs=1e-4)
    raw = read_pair_scores(p.run_dir / "md1" / "denoise_scores")
    assert dict(zip(got, cols.column("ce").to_pylist())) == pytest.approx(raw, abs=1e-6)
    _, stats = decide_in_flow(ctx, mining_plan(p.cfg, True), d, lexical, folder)
    assert read_pools(d / "decided") == read_json(p.run_dir / "md1" / "hard_negative_pool.json")
    assert stats["dropped"] == p.results["md1"].stats["dropped"]


def test_each_dual_encoder_is_checked_against_the_one_before(starved_run):
    p, lines, _ = starved_run
    for stage, previous in (("md1", "md0"), ("md2", "md1")):
        s = p.results[stage].stats
        before = p.results[previous].stats
        assert s["heldout_set"] == "dev" and s["heldout_questions"] == len(p.ctx.splits.dev)
        c = s["check"]
        assert c["passed"] is (s["heldout_mrr@10"] > before["heldout_mrr@10"])
        assert c["figures"][f"{previous}_mrr@10"] == before["heldout_mrr@10"]
        assert any(f"stage {stage}: CHECK FAILED" in x for x in lines) is (not c["passed"])
        assert any(f"stage {stage}: check passed" in x for x in lines) is c["passed"]


def copy_through(run_dir: Path, out: Path, redo: str | None = None) -> Path:
    """A copy of a run through md0 and mc, with `redo` no longer marked complete (its outputs kept, as after an
    interrupted run)."""
    shutil.copytree(run_dir, out, ignore=shutil.ignore_patterns("md1", "md1_*", "md2", "md2_*", "logs"))
    if redo:
        (out / redo / COMPLETE).unlink()
    return out


def test_strict_stops_the_run_at_the_failed_check(starved_run, tmp_path):
    p, _, _ = starved_run
    run = copy_through(p.run_dir, tmp_path / "run", "mc")
    strict = Pipeline(replace(p.cfg, pipeline=replace(p.cfg.pipeline, strict=True)), run)
    with pytest.raises(QualityCheckFailed, match=r"stage mc: cross-encoder learned check failed: on \d+ held-out dev"):
        strict.run_stage("md1")
    assert not (run / "mc" / COMPLETE).exists() and not (run / "md1").exists()


def test_the_skip_fallback_trains_md1_on_undenoised_candidates(starved_run, tmp_path):
    from rocketqa_ray.pipeline.shared import train_top

    p, _, _ = starved_run
    run = copy_through(p.run_dir, tmp_path / "run")
    shutil.rmtree(run / "mc")  # another cross.fallback is another mc (the starved one trains in seconds)
    skip = Pipeline(replace(p.cfg, cross=replace(p.cfg.cross, fallback="skip")), run)
    res = skip.run_stage("md1")
    assert read_json(run / "mc" / CE_CHECK)["mode"] == "skip"
    assert "skipped" in skip.results["mc"].stats["check"]["fallback"]
    assert res.stats["denoise_scores"] == "skipped (cross-encoder check failed)"
    assert not (run / "md1" / "denoise_scores").exists()
    pool = read_json(run / "md1" / "hard_negative_pool.json")
    m = p.cfg.mining
    top = train_top(skip.ctx, "md0")
    assert all(pool[q][: m.denoise_top] == top[q][: m.denoise_top] for q in pool)


@pytest.mark.parametrize("seconds, budget_min, needle", [
    (30 * 60, 20, "**10 min over** it"), (15 * 60, 20, "within it"), (15 * 60, None, None)])
def test_the_report_says_whether_a_run_kept_to_its_presets_budget(seconds, budget_min, needle):
    from rocketqa_ray.pipeline.runner import budget

    b = budget(seconds, budget_min)
    md = markdown({"stages": {"bm25": {"mrr@10": 0.5}}, "stats": {}, "budget": b})
    if needle is None:
        assert "sized for" not in md and b == {"minutes": 15.0}
    else:
        assert f"the stages took {seconds / 60:g} min; this preset is sized for {budget_min:g} min: {needle}" in md


def test_a_failed_cross_encoder_check_says_whether_the_loss_is_within_noise():
    from rocketqa_ray.pipeline.checks import ce_check

    tie = ce_check("held-out dev questions", 300, 0.799, 0.8035, 0.70, 0.72, "fused", se=0.01)
    assert not tie.passed and "by 0.004: within twice the difference's standard error (0.010)" in tie.message
    loss = ce_check("held-out dev questions", 80, 0.27, 0.62, 0.51, 0.74, "skip", se=0.04)
    assert not loss.passed and "beyond twice" in loss.message and loss.fallback.endswith("are skipped")
    won = ce_check("held-out dev questions", 300, 0.86, 0.80, 0.8, 0.7, "fused", se=0.01)
    assert won.passed and won.fallback is None and "standard error" not in won.message
