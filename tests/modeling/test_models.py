"""Dual encoder and cross-encoder: save/load round trips, sentence-transformers compatibility, the
bundled MiniLM base, bf16 inference (real models: the tiny random BERT, and MiniLM once)."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from rocketqa_ray.config import ModelConfig
from rocketqa_ray.errors import ConfigError
from rocketqa_ray.modeling.base import (
    cpu_has_bf16,
    length_order,
    minilm_path,
    model_fingerprint,
    resolve_base,
)
from rocketqa_ray.modeling.cross_encoder import CrossEncoder
from rocketqa_ray.modeling.dual_encoder import DualEncoder, pool

QUERIES = ["who wrote the origin of species", "what is the capital of france", "when did the war end"]
PASSAGES = [
    "Charles Darwin published On the Origin of Species in 1859, introducing natural selection.",
    "Paris is the capital and most populous city of France.",
    "The war ended in 1945 after the surrender of the axis powers in europe and asia.",
    "short one",
]
TINY = ModelConfig(base="tiny", query_max_len=16, passage_max_len=48)


def _perturb(module: torch.nn.Module, seed: int) -> None:
    # Separate towers start as copies of the base; make them differ so a swapped tower would be caught.
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)


@pytest.mark.parametrize("shared, pooling", [(True, "mean"), (True, "cls"), (False, "mean"), (False, "cls")])
def test_dual_encoder_round_trip(tmp_path, shared, pooling):
    model = DualEncoder.from_base(replace(TINY, shared_tower=shared, pooling=pooling))
    if not shared:
        _perturb(model.query_model, seed=1)
    q0 = model.encode(QUERIES, kind="query", bf16="false")
    p0 = model.encode(PASSAGES, kind="passage", bf16="false")
    assert q0.shape == (3, model.dim) and p0.shape == (4, model.dim) and q0.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(p0, axis=1), 1.0, atol=1e-5)
    if not shared:  # the towers really are different
        assert not np.allclose(model.encode(QUERIES, kind="passage", bf16="false"), q0, atol=1e-3)

    path = model.save(tmp_path / "de")
    assert (path / "query_encoder").exists() != shared
    loaded = DualEncoder.load(path)
    assert loaded.cfg.pooling == pooling and loaded.cfg.shared_tower == shared
    assert loaded.cfg.query_max_len == 16 and loaded.cfg.passage_max_len == 48
    assert (loaded.passage_model is None) == shared
    np.testing.assert_allclose(loaded.encode(QUERIES, kind="query", bf16="false"), q0, atol=1e-6)
    np.testing.assert_allclose(loaded.encode(PASSAGES, kind="passage", bf16="false"), p0, atol=1e-6)
    assert model_fingerprint(path) == model_fingerprint(model.save(tmp_path / "de2"))


@pytest.mark.parametrize("shared, pooling, normalize", [(True, "mean", True), (False, "cls", False)])
def test_sentence_transformers_loads_dual_encoder(tmp_path, shared, pooling, normalize):
    from sentence_transformers import SentenceTransformer

    model = DualEncoder.from_base(replace(TINY, shared_tower=shared, pooling=pooling, normalize=normalize))
    if not shared:
        _perturb(model.query_model, seed=2)
    path = model.save(tmp_path / "de")
    st = SentenceTransformer(str(path), device="cpu")
    np.testing.assert_allclose(st.encode(PASSAGES), model.encode(PASSAGES, kind="passage", bf16="false"),
                               atol=1e-5, rtol=1e-4)
    # Separate towers: the query tower is its own sentence-transformers folder.
    q_path = path / "query_encoder" if not shared else path
    st_q = SentenceTransformer(str(q_path), device="cpu")
    np.testing.assert_allclose(st_q.encode(QUERIES), model.encode(QUERIES, kind="query", bf16="false"),
                               atol=1e-5, rtol=1e-4)


def test_cross_encoder_round_trip_and_sentence_transformers(tmp_path):
    from sentence_transformers import CrossEncoder as STCrossEncoder

    ce = CrossEncoder.from_base("tiny", max_len=64)
    scores = ce.score(QUERIES, PASSAGES[:3], bf16="false")
    assert scores.shape == (3,) and np.all((scores > 0) & (scores < 1))
    path = ce.save(tmp_path / "ce")

    ours = CrossEncoder.load(path)
    assert ours.max_len == 64
    np.testing.assert_allclose(ours.score(QUERIES, PASSAGES[:3], bf16="false"), scores, atol=1e-6)

    st = STCrossEncoder(str(path), device="cpu")
    st_scores = st.predict(list(zip(QUERIES, PASSAGES[:3])))
    np.testing.assert_allclose(st_scores, scores, atol=1e-5)


def test_maxsim_head_round_trip_calibration_and_masks(tmp_path):
    from rocketqa_ray.modeling.cross_encoder import MaxSimHead
    from rocketqa_ray.rocketqa.calibration import fold_into_head

    ce = CrossEncoder.from_base("tiny", max_len=64, head="maxsim")
    assert isinstance(ce.model, MaxSimHead)
    features = ce.tokenize(QUERIES, PASSAGES[:3])
    # the question's and the passage's word pieces, never [CLS], [SEP] or padding
    tok = ce.tokenizer
    for i, (q, p) in enumerate(zip(QUERIES, PASSAGES[:3])):
        assert int(features["question_mask"][i].sum()) == len(tok(q, add_special_tokens=False)["input_ids"])
        assert int(features["passage_mask"][i].sum()) == len(tok(p, add_special_tokens=False)["input_ids"])
    assert not (features["question_mask"] & features["passage_mask"]).any()
    scores = ce.score(QUERIES, PASSAGES[:3], bf16="false")
    assert scores.shape == (3,) and np.all((scores > 0) & (scores < 1)) and np.ptp(scores) > 0
    # Platt scaling folds into the 1 -> 1 layer, and the saved model scores the same after loading
    logits = np.log(scores / (1 - scores))
    fold_into_head(ce.model, 2.0, -1.0)
    calibrated = ce.score(QUERIES, PASSAGES[:3], bf16="false")
    np.testing.assert_allclose(calibrated, 1 / (1 + np.exp(-(2 * logits - 1))), atol=1e-5)
    loaded = CrossEncoder.load(ce.save(tmp_path / "ce"))
    assert loaded.head == "maxsim" and loaded.max_len == 64
    np.testing.assert_allclose(loaded.score(QUERIES, PASSAGES[:3], bf16="false"), calibrated, atol=1e-6)


def test_maxsim_head_ranks_the_answer_first_before_training():
    # why it exists: MiniLM's token similarities over a joint pass already rank, where a fresh [CLS] head is at chance
    ce = CrossEncoder.from_base("minilm", max_len=128, head="maxsim")
    grid = ce.score([q for q in QUERIES for _ in range(3)], [p for _ in QUERIES for p in PASSAGES[:3]],
                    bf16="false").reshape(3, 3)
    assert (grid.argmax(1) == np.arange(3)).all()


def test_cross_encoder_head_must_be_known():
    with pytest.raises(ConfigError, match="maxsim"):
        CrossEncoder.from_base("tiny", head="colbert")


def test_cross_encoder_truncates_a_question_longer_than_max_len():
    """A question that fills max_len is cut too (only_second would raise); a short one keeps every token and the
    passage alone is cut, as only_second would."""
    ce = CrossEncoder.from_base("tiny", max_len=96)
    long_q, short_q, passage = "what " * 200, "who wrote it", "a passage " * 100
    scores = ce.score([long_q, short_q], [passage, passage], 8, "false", "cpu")
    assert scores.shape == (2,) and np.isfinite(scores).all()
    ours = ce.tokenize([short_q], [passage])["input_ids"][0].tolist()
    ref = ce.tokenizer([short_q], [passage], truncation="only_second", max_length=96)["input_ids"][0]
    assert ours == ref and len(ours) == 96


def test_cross_encoder_forward_shape():
    ce = CrossEncoder.from_base("tiny", max_len=64)
    feats = ce.tokenize(QUERIES, PASSAGES[:3])
    assert feats["input_ids"].shape[0] == 3 and feats["input_ids"].shape[1] <= 64
    assert ce(feats).shape == (3,)


def test_minilm_base_offline():
    from sentence_transformers import SentenceTransformer

    model = DualEncoder.from_base(ModelConfig(base="minilm", query_max_len=256, passage_max_len=256))
    emb = model.encode(["A man is eating food.", "Paris is the capital of France."], bf16="false")
    assert model.dim == 384 and emb.shape == (2, 384)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    # The same numbers as sentence-transformers' own pipeline for the shipped model.
    ref = SentenceTransformer(str(minilm_path()), device="cpu").encode(["A man is eating food.",
                                                                        "Paris is the capital of France."])
    np.testing.assert_allclose(emb, ref, atol=1e-5)
    # A plain sentence-transformers folder (no rocketqa_ray metadata) loads with its own pooling/normalisation.
    plain = DualEncoder.load(minilm_path())
    assert plain.cfg.pooling == "mean" and plain.cfg.normalize is True


@pytest.mark.skipif(not cpu_has_bf16(), reason="CPU has no native bf16")
def test_bf16_close_to_fp32():
    model = DualEncoder.from_base(TINY)
    fp32 = model.encode(PASSAGES, bf16="false")
    bf16 = model.encode(PASSAGES, bf16="true")
    assert bf16.dtype == np.float32
    cos = (fp32 * bf16).sum(1) / np.linalg.norm(fp32, axis=1) / np.linalg.norm(bf16, axis=1)
    assert cos.min() > 0.99


def test_encode_keeps_input_order():
    model = DualEncoder.from_base(TINY)
    together = model.encode(PASSAGES, batch_size=2, bf16="false")  # batches are length-sorted inside
    one_by_one = np.stack([model.encode([p], bf16="false")[0] for p in PASSAGES])
    np.testing.assert_allclose(together, one_by_one, atol=1e-5)


def test_tokenize_max_lengths():
    model = DualEncoder.from_base(TINY)
    long = " ".join(["capital"] * 200)
    assert model.tokenize([long], "query")["input_ids"].shape[1] == 16
    assert model.tokenize([long], "passage")["input_ids"].shape[1] == 48


def test_pooling():
    h = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [100.0, 100.0]]])  # [1, 3, 2], last token is padding
    mask = torch.tensor([[1, 1, 0]])
    assert torch.allclose(pool(h, mask, "mean"), torch.tensor([[2.0, 3.0]]))
    assert torch.allclose(pool(h, mask, "cls"), torch.tensor([[1.0, 2.0]]))


def test_length_order():
    assert list(length_order(["a", "ccc", "bb", "ddd"])) == [1, 3, 2, 0]


def test_resolve_base_errors(tmp_path):
    with pytest.raises(ConfigError, match="is not 'minilm', 'tiny' or a local Hugging Face model folder"):
        resolve_base(str(tmp_path / "no-such-model"))
    with pytest.raises(ConfigError, match="no config.json"):
        DualEncoder.from_base(ModelConfig(base=str(tmp_path)))
    with pytest.raises(ConfigError, match="not a saved model folder"):
        DualEncoder.load(tmp_path)
    with pytest.raises(ConfigError, match="not a saved cross-encoder folder"):
        CrossEncoder.load(tmp_path)
    assert (resolve_base("tiny") / "config.json").exists()
    assert resolve_base(str(resolve_base("tiny"))) == resolve_base("tiny")  # any local HF folder is a base


def test_tiny_model_cache_built_by_several_processes_at_once(tmp_path):
    """A fresh machine: Train workers all build the tiny model cache at the same moment; each must load it."""
    import os
    import subprocess
    import sys

    code = ("from transformers import AutoModel; from rocketqa_ray.modeling.base import resolve_base; "
            "AutoModel.from_pretrained(resolve_base('tiny')); print('ok')")
    env = {**os.environ, "ROCKETQA_CACHE": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1"}
    procs = [subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(4)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0] * 4, [err[-500:] for _, err in outs]
    assert all(out.strip().endswith("ok") for out, _ in outs)
    assert len([p for p in (tmp_path / "cache").iterdir() if p.is_dir()]) == 1  # one cache folder, no leftovers


def test_a_cross_encoder_can_start_from_a_trained_dual_encoder(tmp_path):
    """cross.init=md0: the cross-encoder's transformer is the dual encoder's (it has seen the domain), its
    1-logit head is new."""
    model = DualEncoder.from_base(TINY)
    _perturb(model.query_model, seed=3)  # not the base's weights any more
    path = model.save(tmp_path / "md0")
    ce = CrossEncoder.from_base(str(path), max_len=64)
    dual = {k: v for k, v in model.query_model.state_dict().items() if k.startswith(("embeddings.", "encoder."))}
    cross = ce.model.base_model.state_dict()
    assert dual and all(torch.equal(v, cross[k]) for k, v in dual.items())
    base = CrossEncoder.from_base("tiny", max_len=64).model.base_model.state_dict()
    assert not all(torch.equal(v, base[k]) for k, v in dual.items())
    assert ce.model.config.num_labels == 1
    assert ce.score(QUERIES, PASSAGES[:3], bf16="false", device="cpu").shape == (3,)


def test_inference_tokenises_the_next_batch_while_the_model_runs():
    import threading

    from rocketqa_ray.modeling.base import batched_inference

    model = DualEncoder.from_base(TINY)
    featurized = {i: threading.Event() for i in range(len(PASSAGES))}
    overlapped: list[bool] = []

    def featurize(idx: list[int]) -> dict[str, torch.Tensor]:
        featurized[idx[0]].set()
        return model.tokenize([PASSAGES[i] for i in idx], "passage")

    first, second = length_order(PASSAGES)[:2]  # batches of one, longest first

    def run(features: dict[str, torch.Tensor]) -> torch.Tensor:
        if not overlapped:  # the first batch's forward waits until the second batch has been tokenised
            assert featurized[first].is_set()
            overlapped.append(featurized[second].wait(10.0))
        return model.encode_passages(features)

    out = batched_inference(model, PASSAGES, 1, "false", "cpu", featurize, run)
    assert overlapped == [True]
    np.testing.assert_allclose(out, model.encode(PASSAGES, bf16="false"), atol=1e-5)


def test_for_inference_gives_bf16_weights_only_when_bf16_is_on_and_they_encode_close_to_fp32():
    from rocketqa_ray.modeling.base import for_inference

    fp32_model = for_inference(DualEncoder.from_base(TINY).train(), "false", "cpu")
    assert not fp32_model.training and next(fp32_model.parameters()).dtype == torch.float32
    fp32 = fp32_model.encode(PASSAGES, batch_size=2, bf16="false")
    bf16_model = for_inference(DualEncoder.from_base(TINY).train(), "true", "cpu")
    assert not bf16_model.training and next(bf16_model.parameters()).dtype == torch.bfloat16
    # the encoder runs bf16 weights without autocast and hands back float32
    bf16 = bf16_model.encode(PASSAGES, batch_size=2, bf16="true")
    cos = (fp32 * bf16).sum(1) / np.linalg.norm(fp32, axis=1) / np.linalg.norm(bf16, axis=1)
    assert bf16.dtype == np.float32 and cos.min() > 0.99
