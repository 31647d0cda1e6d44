"""Denoising, pseudo-labelling and reranking on hand-made scores."""

import pytest

from rocketqa_ray.evaluation import has_answer
from rocketqa_ray.retrieval.fusion import fuse_scores, rerank
from rocketqa_ray.rocketqa.denoise import answer_rates, denoise
from rocketqa_ray.rocketqa.negatives import exclude_gold
from rocketqa_ray.rocketqa.pseudo_label import pseudo_label


def test_exclude_gold_removes_positives_and_cuts_depth():
    ranked = {"q1": ["p1", "p2", "p3", "p4"], "q2": ["p9", "p8"]}
    out = exclude_gold(ranked, {"q1": {"p2": 1}, "q2": {"p7": 1}}, top_k=2)
    assert out == {"q1": ["p1", "p3"], "q2": ["p9", "p8"]}


def test_denoise_keeps_only_confident_negatives_within_top():
    cands = {"q1": ["a", "b", "c", "d"], "q2": ["e", "f"]}
    scores = {("q1", "a"): 0.95, ("q1", "b"): 0.05, ("q1", "c"): 0.5, ("q2", "e"): 0.01, ("q2", "f"): 0.2}
    res = denoise(cands, scores, threshold=0.1, top=3)  # "d" is beyond the scored top: unused
    assert res.kept == {"q1": ["b"], "q2": ["e"]}
    assert res.dropped == {"q1": ["a", "c"], "q2": ["f"]}
    assert res.stats["kept"] == 2 and res.stats["dropped"] == 3 and res.stats["dropped_frac"] == 0.6


def test_denoise_requires_scores():
    with pytest.raises(KeyError, match="no cross-encoder score"):
        denoise({"q": ["x"]}, {}, 0.1, 5)


def test_answer_rates_measure_false_negatives():
    texts = {"a": "Paris is the capital of France", "b": "Berlin is big", "c": "the Eiffel tower, in Paris"}
    cands = {"q": ["a", "b", "c"]}
    res = denoise(cands, {("q", "a"): 0.99, ("q", "b"): 0.01, ("q", "c"): 0.3}, threshold=0.1, top=3)
    rates = answer_rates(res, {"q": ["Paris"]}, has_answer, texts.__getitem__)
    assert rates["dropped_with_answer"] == 1.0 and rates["kept_with_answer"] == 0.0
    assert rates["dropped_checked"] == 2 and rates["kept_checked"] == 1


def test_pseudo_labels_thresholds_and_precision():
    cands = {"q1": ["a", "b", "c"], "q2": ["d", "e"], "q3": ["f"]}
    scores = {("q1", "a"): 0.2, ("q1", "b"): 0.97, ("q1", "c"): 0.05,
              ("q2", "d"): 0.6, ("q2", "e"): 0.01,  # best 0.6 < 0.9: no label
              ("q3", "f"): 0.95}
    gold = {"q1": {"b": 1}, "q2": {"d": 1}, "q3": {"z": 1}}
    pl = pseudo_label(cands, scores, 0.9, 0.1, hidden_gold=gold)
    assert pl.positives == {"q1": "b", "q3": "f"}
    assert pl.negatives == {"q1": ["c"], "q3": []}  # "a" (0.2) is neither confident positive nor negative
    assert pl.stats["coverage"] == round(2 / 3, 4)
    assert pl.stats["precision"] == 0.5
    assert pl.stats["gold_in_candidates"] == round(2 / 3, 4)


def test_pseudo_labels_question_by_question_add_up_to_the_all_at_once_labels():
    """Labelling each question from its own data (what a Ray Data group does) and summing the counts in any
    grouping gives `pseudo_label`'s labels and stats over all of them."""
    import random

    from rocketqa_ray.rocketqa.pseudo_label import label_question, pseudo_stats

    rng = random.Random(3)
    pids = [f"p{i}" for i in range(40)]
    cands = {f"q{i}": rng.sample(pids, rng.randint(0, 6)) for i in range(60)}
    scores = {(q, p): rng.random() for q, ps in cands.items() for p in ps}
    hidden = {q: {rng.choice(pids): 1} for q in list(cands)[::2]}  # half the questions have held-back labels
    whole = pseudo_label(cands, scores, 0.7, 0.3, hidden_gold=hidden)
    qids = list(cands)
    rng.shuffle(qids)
    total: dict = {}
    for part in (qids[:10], qids[10:35], qids[35:]):
        group: dict = {}
        for q in part:
            res = label_question(cands[q], {p: scores[(q, p)] for p in cands[q]}, 0.7, 0.3, hidden.get(q))
            assert (res.positive, res.negatives) == (whole.positives.get(q), whole.negatives.get(q, []))
            for k, v in res.counts.items():
                group[k] = group.get(k, 0) + v
        for k, v in group.items():
            total[k] = total.get(k, 0) + v
    assert pseudo_stats(total, 0.7, 0.3, with_hidden=True) == whole.stats
    assert 0 < whole.stats["labelled"] < len(cands) and whole.stats["precision"] is not None


def test_rerank_reorders_head_and_keeps_tail():
    ranked = {"q": [("a", 0.9), ("b", 0.8), ("c", 0.7), ("d", 0.6)]}
    scores = {("q", "a"): 0.1, ("q", "b"): 0.9, ("q", "c"): 0.5}
    run = rerank(ranked, scores, top=3)
    assert [p for p, _ in sorted(run["q"].items(), key=lambda x: -x[1])] == ["b", "c", "a", "d"]


def test_fused_rerank_lets_a_strong_dense_score_overrule_a_close_cross_encoder_call():
    from rocketqa_ray.retrieval.fusion import Fusion

    ranked = {"q": [("a", 0.9), ("b", 0.5), ("c", 0.4)]}
    scores = {("q", "a"): 0.45, ("q", "b"): 0.5, ("q", "c"): 0.05}
    fused = fuse_scores(ranked, scores, Fusion(ce=1.0, dense=10.0, bias=-5.0))
    assert set(fused) == set(scores) and all(0 < v < 1 for v in fused.values())
    def order(sc):
        return [p for p, _ in sorted(rerank(ranked, sc, top=3)["q"].items(), key=lambda x: -x[1])]
    assert order(scores) == ["b", "a", "c"]  # the cross-encoder alone
    assert order(fused) == ["a", "b", "c"]  # dense 0.9 vs 0.5 outweighs 0.45 vs 0.5
    # no dense score for a pair: it is left out rather than guessed
    assert ("q", "z") not in fuse_scores(ranked, {**scores, ("q", "z"): 0.9}, Fusion(1.0, 1.0, 0.0))


def test_positive_aware_rules_judge_each_candidate_against_its_questions_positive():
    from rocketqa_ray.rocketqa.denoise import DenoiseRule

    cands = {"q1": ["a", "b", "c"], "q2": ["d", "e"]}
    scores = {("q1", "a"): 0.85, ("q1", "b"): 0.5, ("q1", "c"): 0.05, ("q2", "d"): 0.3, ("q2", "e"): 0.02}
    pos = {"q1": 0.9, "q2": 0.3}  # q2: the cross-encoder finds its own positive hard
    # fixed bar 0.5: q1 loses a and b; q2 keeps d, which the cross-encoder rates as high as q2's positive
    assert denoise(cands, scores, 0.5, 3).kept == {"q1": ["c"], "q2": ["d", "e"]}
    # relative 0.9: bars 0.81 (q1) and 0.27 (q2): a and d are dropped, b is kept
    rel = denoise(cands, scores, DenoiseRule("relative", relative=0.9), 3, pos)
    assert rel.kept == {"q1": ["b", "c"], "q2": ["e"]} and rel.stats["rule"] == "relative"
    assert rel.stats["rule_value"] == 0.9
    # margin 0.1: bars 0.8 and 0.2
    assert denoise(cands, scores, DenoiseRule("margin", margin=0.1), 3, pos).dropped == {"q1": ["a"], "q2": ["d"]}
    assert denoise(cands, scores, DenoiseRule("none"), 3).dropped == {"q1": [], "q2": []}
    with pytest.raises(KeyError, match="positive of question 'q2'"):
        denoise(cands, scores, DenoiseRule("relative"), 3, {"q1": 0.9})
