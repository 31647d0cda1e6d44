"""The rerank verdict and per-retriever fusion (Ray-free): MRR on candidate groups, cross-fitting, the choice."""

from __future__ import annotations

import numpy as np
import pytest

from rocketqa_ray.evaluation import evaluate_run
from rocketqa_ray.retrieval.fusion import fit_fusion
from rocketqa_ray.retrieval.rerank_check import CandidateTable, RerankCheck, check_rerank, folds_of, mrr_at


def table(rng: np.random.Generator, n_q: int = 120, k: int = 10, dense_signal: float = 1.0, ce_signal: float = 1.0,
          dense_scale: float = 1.0, dense_shift: float = 0.0) -> CandidateTable:
    """k candidates per question, one positive (somewhere in the top k), features = signal * label + noise."""
    qids, labels = [], []
    for i in range(n_q):
        pos = int(rng.integers(k))
        qids += [f"q{i}"] * k
        labels += [1.0 if j == pos else 0.0 for j in range(k)]
    y = np.array(labels)
    dense = dense_shift + dense_scale * (dense_signal * y + rng.normal(size=len(y)))
    logit = ce_signal * y + rng.normal(size=len(y))
    ce = 1 / (1 + np.exp(-(logit - 2)))
    # the retriever's order within a question: by its own score, as a retriever returns them
    order = np.lexsort((-dense, np.array([int(q[1:]) for q in qids])))
    return CandidateTable([qids[i] for i in order], dense[order], ce[order], y[order])


def test_mrr_at_matches_ranx_on_the_same_candidates():
    rng = np.random.default_rng(0)
    t = table(rng, n_q=40)
    for scores in (t.dense, t.ce, rng.normal(size=len(t.qids))):
        run, qrels = {}, {}
        for i, (q, s, y) in enumerate(zip(t.qids, scores, t.labels)):
            run.setdefault(q, {})[f"p{i}"] = float(s)
            if y > 0.5:
                qrels.setdefault(q, {})[f"p{i}"] = 1
        assert mrr_at(t.qids, scores, t.labels) == pytest.approx(evaluate_run(run, qrels, ("mrr@10",))["mrr@10"], abs=5e-5)


def test_a_question_without_a_positive_counts_zero():
    qids = ["a", "a", "b", "b"]
    labels = np.array([0.0, 1.0, 0.0, 0.0])
    assert mrr_at(qids, np.array([1.0, 2.0, 1.0, 2.0]), labels) == pytest.approx(0.5)  # (1 + 0) / 2
    assert mrr_at(qids, np.array([2.0, 1.0, 0.0, 0.0]), labels) == pytest.approx(0.25)


def test_folds_are_by_question_and_balanced():
    qids = [f"q{i}" for i in range(101) for _ in range(3)]
    f = folds_of(qids, 2, seed=0)
    assert set(f) == set(qids) and sorted(np.bincount(list(f.values()))) == [50, 51]
    assert f == folds_of(list(reversed(qids)), 2, seed=0)  # the order the rows come in does not matter


def test_a_strong_cross_encoder_is_used():
    t = table(np.random.default_rng(1), dense_signal=0.5, ce_signal=3.0)
    c = check_rerank(t, retriever="md2")
    assert c.rerank is True
    assert c.dev["rerank_mrr@10"] > c.dev["retriever_mrr@10"]
    assert c.dev["rerank_scores"] == "fused (cross-fitted)"
    assert c.fusion is not None and c.fusion.ce > 0
    assert "is better than md2 alone" in c.reason and f"{c.dev['rerank_mrr@10']:.3f}" in c.reason


def test_a_cross_encoder_weaker_than_the_retriever_is_not_used_alone():
    t = table(np.random.default_rng(2), dense_signal=3.0, ce_signal=0.0)
    c = check_rerank(t, use_fusion=False, retriever="md2")
    assert c.fusion is None and c.dev["rerank_scores"] == "cross-encoder"
    assert c.dev["rerank_mrr@10"] == c.dev["ce_mrr@10"] < c.dev["retriever_mrr@10"]
    assert c.rerank is False and "not better than md2 alone" in c.reason


def test_the_verdict_is_judged_out_of_fold():
    """In-sample, a fusion with a useless feature always looks at least as good as the retriever; the verdict
    uses scores from fusions fit on the other fold, which equal what `check_rerank` reports."""
    t = table(np.random.default_rng(3), n_q=60, dense_signal=2.0, ce_signal=0.0)
    c = check_rerank(t, seed=7)
    fold = folds_of(t.qids, 2, seed=7)
    rows = np.array([fold[q] for q in t.qids])
    oof = np.zeros(len(t.qids))
    for f in (0, 1):
        fit = np.where(rows != f)[0]
        fu = fit_fusion(t.ce[fit], t.dense[fit], t.labels[fit])
        held = np.where(rows == f)[0]
        oof[held] = fu(t.ce[held], t.dense[held])
    assert c.dev["rerank_mrr@10"] == pytest.approx(round(mrr_at(t.qids, oof, t.labels), 4))
    # and the kept fusion is the fit on all of them
    full = fit_fusion(t.ce, t.dense, t.labels)
    assert c.fusion.to_dict() == pytest.approx(full.to_dict())


def test_a_fusion_fit_for_one_retriever_ranks_its_candidates_better_than_one_fit_for_another():
    """Why each rerank gets its own fusion: retriever B's scores are on another scale (a later dual encoder's
    are), so step 2's weights, fit on A's, weigh them wrongly."""
    rng = np.random.default_rng(4)
    a = table(rng, n_q=300, dense_signal=1.0, ce_signal=1.5)
    b = table(rng, n_q=300, dense_signal=2.5, ce_signal=1.5, dense_scale=0.05, dense_shift=0.6)
    fit_a, fit_b = check_rerank(a).fusion, check_rerank(b).fusion
    b_test = table(rng, n_q=300, dense_signal=2.5, ce_signal=1.5, dense_scale=0.05, dense_shift=0.6)
    own = mrr_at(b_test.qids, fit_b(b_test.ce, b_test.dense), b_test.labels)
    other = mrr_at(b_test.qids, fit_a(b_test.ce, b_test.dense), b_test.labels)
    assert own > other + 0.02


def test_no_positive_among_the_candidates_leaves_the_rerank_unchecked():
    t = CandidateTable(["a", "a", "b"], np.array([0.3, 0.2, 0.1]), np.array([0.5, 0.4, 0.3]), np.zeros(3))
    c = check_rerank(t)
    assert c.rerank is True and c.fusion is None and "unchecked" in c.reason
    assert c.dev["questions"] == 2 and c.dev["questions_with_positive"] == 0


def test_round_trip():
    c = check_rerank(table(np.random.default_rng(5), n_q=30))
    back = RerankCheck.from_dict(c.to_dict())
    assert back.rerank == c.rerank and back.dev == c.dev and back.reason == c.reason
    assert back.fusion == c.fusion


def test_paired_standard_error_of_a_difference():
    from rocketqa_ray.retrieval.rerank_check import paired_se, reciprocal_ranks

    t = table(np.random.default_rng(6), n_q=200, dense_signal=1.0, ce_signal=1.0)
    ra, rb = reciprocal_ranks(t.qids, t.ce, t.labels), reciprocal_ranks(t.qids, t.dense, t.labels)
    d = np.array([ra[q] - rb[q] for q in ra])
    assert paired_se(t.qids, t.ce, t.dense, t.labels) == pytest.approx(d.std(ddof=1) / np.sqrt(len(d)))
    assert paired_se(t.qids, t.ce, t.ce, t.labels) == 0.0
    c = check_rerank(t)
    assert c.dev["ce_minus_retriever_se"] == pytest.approx(round(paired_se(t.qids, t.ce, t.dense, t.labels), 4))
