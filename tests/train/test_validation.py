"""Validation inside training: held-out group ranks, early stopping with patience, the best weights exported,
and N workers' figure equal to one process's."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rocketqa_ray.config import load_config
from rocketqa_ray.data.beir import load_beir, load_corpus, passage_text
from rocketqa_ray.data.examples import build_cross_examples, build_dual_examples, write_examples
from rocketqa_ray.train.tasks import CrossTask, DualTask
from rocketqa_ray.train.validation import EarlyStopping, group_ranks, rank_sums, worker_slice


# ----------------------------------------------------------------------------------------- Ray-free parts
def test_group_ranks_count_ties_against_the_positive_and_ignore_padding():
    scores = torch.tensor([[0.9, 0.1, 0.5, 0.0], [0.2, 0.7, 0.2, 0.0], [0.3, 0.3, 0.1, 9.0]])
    labels = torch.tensor([[1.0, 0, 0, 0], [1.0, 0, 0, 0], [1.0, 0, 0, 0]])
    mask = torch.tensor([[True, True, True, False], [True, True, True, False], [True, True, True, False]])
    # group 0 first; group 1 behind one and tied with one (ties rank ahead); group 2 tied, the padded 9.0 ignored
    assert group_ranks(scores, labels, mask).tolist() == [1, 3, 2]
    s = rank_sums(torch.tensor([1, 3, 2, 11]), k=10)
    assert s.tolist() == pytest.approx([1 + 1 / 3 + 1 / 2 + 0, 1, 4])


def test_early_stopping_keeps_the_best_weights_and_stops_after_patience():
    model = torch.nn.Linear(2, 1)
    es = EarlyStopping(patience=2, min_delta=0.01)
    with torch.no_grad():
        model.weight.fill_(1.0)
    assert not es.update(0, {"val_mrr@10": 0.5}, model)
    with torch.no_grad():
        model.weight.fill_(2.0)
    assert not es.update(10, {"val_mrr@10": 0.505}, model)  # within min_delta: no gain for patience, but the best
    with torch.no_grad():
        model.weight.fill_(3.0)
    assert es.update(20, {"val_mrr@10": 0.4}, model)  # second evaluation without gain: stop
    assert es.best_step == 10 and es.best == 0.505
    assert es.restore_best(model)
    assert float(model.weight.detach().mean()) == 2.0
    never = EarlyStopping(patience=0)
    assert not any(never.update(s, {"val_mrr@10": 1.0 - s}, None) for s in range(5))
    assert never.best_step == 0
    # the state survives a checkpoint round trip (a resumed run goes on counting)
    again = EarlyStopping()
    again.load_state_dict(es.state_dict())
    assert (again.best_step, again.bad_evals, len(again.history)) == (10, 2, 3)


@pytest.fixture(scope="module")
def data(mini_data_dir):
    d = load_beir(mini_data_dir)
    corpus = load_corpus(d.corpus_path)
    return d, corpus


def _cross_rows(data, n: int, offset: int = 0) -> list[dict]:
    d, corpus = data
    pids = sorted(corpus)
    qids = sorted(d.split("train"))[offset : offset + n]
    pos = {q: next(iter(d.split("train")[q])) for q in qids}
    negs = {q: [pids[(g * 13 + j) % len(pids)] for j in range(2 + g % 3)] for g, q in enumerate(qids)}
    return build_cross_examples({q: d.queries[q]["text"] for q in qids}, pos, negs,
                                lambda p: passage_text(corpus[p]["title"], corpus[p]["text"]))


def _reference_mrr(groups: list[np.ndarray]) -> float:
    """MRR@10 of the first entry of each score array, ties counted against it (numpy, not the code under test)."""
    rr = []
    for g in groups:
        rank = 1 + int((g[1:] >= g[0]).sum())
        rr.append(1 / rank if rank <= 10 else 0.0)
    return float(np.mean(rr))


def test_cross_validation_equals_scoring_each_pair_and_slices_add_up(data):
    from rocketqa_ray.modeling.cross_encoder import CrossEncoder

    cfg = load_config("tiny")
    torch.manual_seed(0)
    model = CrossEncoder.from_base("tiny", cfg.cross.max_len).eval()
    rows = _cross_rows(data, 24)
    task = CrossTask(cfg)
    whole = task.validate(model, rows, torch.device("cpu"), bf16=False)
    groups = [model.score([r["query"]] * len(r["passages"]), r["passages"], bf16="false") for r in rows]
    assert float(whole[0] / whole[2]) == pytest.approx(_reference_mrr(groups), abs=1e-6)
    assert int(whole[2]) == 24
    # what two workers each compute on their slice sums to the whole (the all-reduce's input)
    parts = sum(task.validate(model, worker_slice(rows, r, 2), torch.device("cpu"), bf16=False) for r in range(2))
    torch.testing.assert_close(parts, whole)


def test_dual_validation_equals_encoding_each_text(data):
    from rocketqa_ray.config import ModelConfig
    from rocketqa_ray.modeling.dual_encoder import DualEncoder

    d, corpus = data
    qids = sorted(d.split("train"))[:20]
    pids = sorted(corpus)
    rows = build_dual_examples(d, corpus, qids, {q: pids[i * 5 : i * 5 + 4] for i, q in enumerate(qids)}, 4, seed=0)
    model = DualEncoder.from_base(ModelConfig(base="tiny", query_max_len=16, passage_max_len=48)).eval()
    got = DualTask(load_config("tiny"), 1).validate(model, rows, torch.device("cpu"), bf16=False)
    groups = []
    with torch.no_grad():
        for r in rows:
            q = model.encode_queries(model.tokenize([r["query"]], "query"))
            p = model.encode_passages(model.tokenize([r["positive"], *r["negatives"]], "passage"))
            groups.append((p @ q[0]).numpy())
    assert all(len(r["negatives"]) == 4 for r in rows)  # all listed negatives are ranked, not a sample of one
    assert float(got[0] / got[2]) == pytest.approx(_reference_mrr(groups), abs=1e-5)


# ------------------------------------------------------------------------------------- in Ray Train
@pytest.mark.slow
def test_training_stops_early_and_exports_the_best_evaluated_model(ray_session, data, tmp_path):
    """Two workers continue a saved cross-encoder on held-out groups it ranks perfectly (each group's positive
    is the passage it scores highest); an improvement must exceed 1.0 (never), patience 1: training stops at the
    first evaluation after the start, and the exported model is the starting one (the best evaluated), not the
    last. The step-0 figure of two workers equals one process's validation of that model."""
    from rocketqa_ray.modeling.cross_encoder import CrossEncoder
    from rocketqa_ray.train.launch import read_history, read_validation, train_cross

    write_examples(_cross_rows(data, 64), tmp_path / "cross.parquet")
    cfg = load_config("tiny", overrides=["cross.max_steps=20", "cross.batch_size=4", "cross.eval_every=3",
                                         "cross.patience=1", "cross.min_delta=1.0", "cross.log_every=1",
                                         "cross.lr=5e-3", "cross.head_lr_scale=10"])
    torch.manual_seed(0)
    CrossTask(cfg).build(None).save(tmp_path / "start")
    start = CrossEncoder.load(tmp_path / "start").eval()
    val = []
    for r in _cross_rows(data, 30, offset=200):  # relabel: the start model's favourite is the positive
        s = start.score([r["query"]] * len(r["passages"]), r["passages"], bf16="false")
        val.append({**r, "labels": [1.0 if i == int(np.argmax(s)) else 0.0 for i in range(len(s))]})
    model_dir = train_cross(cfg, str(tmp_path / "cross.parquet"), str(tmp_path / "mc"), val_rows=val,
                            init_model=str(tmp_path / "start"))
    v = read_validation(tmp_path / "mc")
    assert v["stopped_early"] and v["best_step"] == 0
    assert [h["step"] for h in v["history"]] == [0, 3]
    assert read_history(tmp_path / "mc")[-1]["step"] == 3  # stopped, not the 20 steps asked for
    exported = CrossEncoder.load(model_dir)
    for name, t in start.model.state_dict().items():
        torch.testing.assert_close(exported.model.state_dict()[name], t, msg=name)
    one = CrossTask(cfg).validate(start, val, torch.device("cpu"), bf16=False)
    assert v["history"][0]["val_mrr@10"] == pytest.approx(round(float(one[0] / one[2]), 4), abs=1e-4)
    assert v["history"][0]["val_groups"] == 30 and v["history"][0]["val_mrr@10"] == 1.0
    assert v["history"][1]["val_mrr@10"] < 1.0  # training on other questions moved the model


def test_a_tie_within_tolerance_keeps_the_more_trained_model():
    model = torch.nn.Linear(1, 1)
    es = EarlyStopping(patience=0, tolerance=0.005)
    for step, value in ((10, 0.8437), (20, 0.8430), (30, 0.8431), (40, 0.80)):
        with torch.no_grad():
            model.weight.fill_(float(step))
        es.update(step, {"val_mrr@10": value}, model)
    assert es.best_step == 30 and es.best == 0.8431 and es.top == 0.8437  # 40 is below the tolerance
    es.restore_best(model)
    assert float(model.weight.detach().mean()) == 30.0
    strict = EarlyStopping()
    for step, value in ((10, 0.8437), (20, 0.8430)):
        strict.update(step, {"val_mrr@10": value}, None)
    assert strict.best_step == 10
