"""Platt scaling folded into a real (tiny) cross-encoder's head."""

import numpy as np
import pytest
import torch

from rocketqa_ray.errors import DataError
from rocketqa_ray.modeling.cross_encoder import CrossEncoder
from rocketqa_ray.retrieval.fusion import Fusion, fit_fusion, logits_from_probs
from rocketqa_ray.rocketqa.calibration import fit_platt, fold_into_head


def test_fit_platt_recovers_the_generating_parameters():
    rng = np.random.default_rng(0)
    x = rng.normal(0, 3, 20_000)
    y = (rng.random(x.size) < 1 / (1 + np.exp(-(0.4 * x - 1.5)))).astype(float)
    a, b = fit_platt(x, y)
    assert a == pytest.approx(0.4, abs=0.03) and b == pytest.approx(-1.5, abs=0.08)


def test_fit_platt_needs_both_labels():
    with pytest.raises(DataError, match="both labels"):
        fit_platt(np.array([0.1, 2.0]), np.array([1.0, 1.0]))


def test_logits_from_probs_inverts_sigmoid_and_clips():
    z = np.array([-3.0, 0.0, 2.5])
    np.testing.assert_allclose(logits_from_probs(1 / (1 + np.exp(-z))), z, atol=1e-6)
    assert np.isfinite(logits_from_probs(np.array([0.0, 1.0]))).all()


def test_fold_into_head_maps_every_logit_and_survives_save_load(tmp_path):
    from sentence_transformers import CrossEncoder as STCrossEncoder

    ce = CrossEncoder.from_base("tiny", 32)
    qs, ps = ["who wrote it", "where is it", "when"], ["someone wrote it", "it is here", "yesterday at noon"]
    ce.eval()
    with torch.no_grad():
        before = ce(ce.tokenize(qs, ps)).numpy()
    fold_into_head(ce.model, 2.5, -0.7)
    with torch.no_grad():
        after = ce(ce.tokenize(qs, ps)).numpy()
    np.testing.assert_allclose(after, 2.5 * before - 0.7, rtol=1e-5, atol=1e-5)
    ce.save(tmp_path / "ce")
    st = STCrossEncoder(str(tmp_path / "ce"), device="cpu").predict(list(zip(qs, ps)))
    np.testing.assert_allclose(st, 1 / (1 + np.exp(-after)), atol=1e-5)


def test_fit_fusion_weighs_the_informative_score_and_ranks_better_than_either():
    rng = np.random.default_rng(1)
    n = 6000
    y = (rng.random(n) < 0.3).astype(float)
    ce_logit = 1.5 * y + rng.normal(0, 1.2, n)  # two noisy views of the label
    dense = 0.1 * y + rng.normal(0, 0.08, n)
    ce_prob = 1 / (1 + np.exp(-ce_logit))
    fusion = fit_fusion(ce_prob, dense, y)
    assert fusion.ce > 0 and fusion.dense > 0
    fused = fusion(ce_prob, dense)
    assert ((fused >= 0) & (fused <= 1)).all()

    def auc(s):
        pos, neg = s[y == 1], s[y == 0]
        return (pos[:, None] > neg[None, :]).mean()

    assert auc(fused) > max(auc(ce_prob), auc(dense)) + 0.01
    assert Fusion.from_dict(fusion.to_dict()) == fusion and Fusion.from_dict(None) is None


def test_fusion_with_bm25_uses_the_lexical_view_and_needs_its_scores():
    rng = np.random.default_rng(2)
    n = 6000
    y = (rng.random(n) < 0.3).astype(float)
    ce_prob = 1 / (1 + np.exp(-(1.5 * y + rng.normal(0, 1.2, n))))
    dense = 0.1 * y + rng.normal(0, 0.08, n)
    bm25 = 4.0 * y + rng.gamma(2.0, 2.0, n)  # a third noisy view on BM25's scale (0 .. ~30)
    two, three = fit_fusion(ce_prob, dense, y), fit_fusion(ce_prob, dense, y, bm25)
    assert not two.uses_bm25 and three.uses_bm25 and three.bm25 > 0

    def auc(s):
        pos, neg = s[y == 1], s[y == 0]
        return (pos[:, None] > neg[None, :]).mean()

    assert auc(three(ce_prob, dense, bm25)) > auc(two(ce_prob, dense)) + 0.01
    assert Fusion.from_dict(three.to_dict()) == three
    with pytest.raises(ValueError, match="BM25"):
        three(ce_prob, dense)
    # a fusion saved before the BM25 feature existed still loads, without it
    old = {"ce": 1.0, "dense": 2.0, "bias": -0.5}
    assert Fusion.from_dict(old) == Fusion(1.0, 2.0, -0.5) and not Fusion.from_dict(old).uses_bm25
