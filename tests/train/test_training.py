"""The Ray Train engine with real workers: cross-batch equivalence, gradient caching across workers,
recovery from a killed worker, and end-to-end dual/cross-encoder training with the tiny model."""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from rocketqa_ray.config import Config, ModelConfig, load_config
from rocketqa_ray.data.beir import load_beir, load_corpus
from rocketqa_ray.data.examples import build_cross_examples, build_dual_examples, write_examples
from rocketqa_ray.errors import ConfigError, DataError
from rocketqa_ray.losses import contrastive_loss
from rocketqa_ray.modeling.dual_encoder import DualEncoder
from rocketqa_ray.train.launch import read_history, train_cross, train_dual
from rocketqa_ray.train.tasks import DualTask

B = 4  # per-worker batch in the equivalence tests


def _rows(n: int) -> list[dict]:
    words = ["river", "city", "music", "history", "church", "war", "school", "language", "king", "film"]
    rows = []
    for i in range(n):
        w = words[i % len(words)]
        rows.append({"qid": f"q{i}", "query": f"which {w} is {i}",
                     "positive": f"the {w} {i} mattered " * (1 + i % 3), "positive_id": f"p{i}",
                     "negatives": [f"some other {words[(i + 4) % len(words)]} story {i}"], "negative_ids": [f"n{i}"],
                     # the cross-encoder's probabilities of [positive, negative]; row 3's negative is unscored
                     "teacher_scores": [0.55 + 0.05 * (i % 5), None if i == 3 else 0.1 + 0.2 * (i % 3)]})
    # Row 0 (worker 0) and row B (worker 1) share their gold passage: only the gathered keys can tell.
    rows[B]["positive"], rows[B]["positive_id"] = rows[0]["positive"], rows[0]["positive_id"]
    return rows


def _variant_cfg(cross_batch: bool, grad_cache: bool, distill: str = "none") -> Config:
    cfg = Config()
    cfg.dual.cross_batch, cfg.dual.grad_cache, cfg.dual.grad_cache_chunk = cross_batch, grad_cache, 3
    cfg.distill.kind = distill
    return cfg


def _loss_and_grads(model: DualEncoder, rows: list[dict], cfg: Config) -> tuple[float, dict[str, torch.Tensor]]:
    from rocketqa_ray.distributed import allreduce_grads, mean_over_workers

    model.zero_grad(set_to_none=True)
    loss = DualTask(cfg, num_negatives=1).loss_backward(model, rows, torch.device("cpu"), bf16=False)
    allreduce_grads([p for p in model.parameters() if p.requires_grad])
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return mean_over_workers(float(loss)), grads


VARIANTS = {"cross": (True, False, "none"), "in_batch": (False, False, "none"), "cross_cached": (True, True, "none"),
            "cross_kl": (True, False, "kl"), "cross_cached_margin": (True, True, "margin_mse")}


def _close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys() and len(a) > 10
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=2e-6, msg=name)


def test_two_workers_equal_one_big_batch_with_cross_batch(ray_session, tiny_model_dir, tmp_path):
    """2 Ray Train workers x batch 4 == 1 process x batch 8 (loss and gradients) with cross-batch
    negatives, with and without gradient caching, with and without distillation; in-batch only (cross-batch
    off) differs."""
    import sys

    import ray.cloudpickle
    import ray.train
    from ray.train.torch import TorchTrainer

    # The workers cannot import this test module: ship its helpers by value with the loop.
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    rows = _rows(2 * B)
    base = str(tiny_model_dir)

    def loop(config):
        import ray.train

        rank = ray.train.get_context().get_world_rank()
        torch.manual_seed(0)
        model = DualEncoder.from_base(ModelConfig(base=config["base"], query_max_len=16, passage_max_len=48)).eval()
        mine = config["rows"][rank * B:(rank + 1) * B]
        out = {}
        for name, (cross, cached, distill) in VARIANTS.items():
            out[name] = _loss_and_grads(model, mine, _variant_cfg(cross, cached, distill))
        torch.save(out, os.path.join(config["out"], f"rank{rank}.pt"))
        ray.train.report({"done": 1})

    trainer = TorchTrainer(
        loop, train_loop_config={"rows": rows, "base": base, "out": str(tmp_path)},
        scaling_config=ray.train.ScalingConfig(num_workers=2, resources_per_worker={"CPU": 0.5}),
        run_config=ray.train.RunConfig(storage_path=str(tmp_path / "ray"), name="equiv",
                                       failure_config=ray.train.FailureConfig(max_failures=0)),
    )
    trainer.fit()
    r0, r1 = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")

    model = DualEncoder.from_base(ModelConfig(base=base, query_max_len=16, passage_max_len=48)).eval()
    single = _loss_and_grads(model, rows, _variant_cfg(True, False))
    # Without a process group "cross-batch" is a no-op: the single-process reference is one batch of 8.
    for name in ("cross", "cross_cached"):
        assert r0[name][0] == pytest.approx(single[0], rel=1e-5), name
        _close(r0[name][1], single[1])
        _close(r1[name][1], single[1])  # every worker holds the same averaged gradient
    for name, kind in (("cross_kl", "kl"), ("cross_cached_margin", "margin_mse")):
        ref = _loss_and_grads(model, rows, _variant_cfg(True, False, kind))
        assert ref[0] > single[0] + 1e-3, name  # the distillation term adds to the contrastive loss
        assert r0[name][0] == pytest.approx(ref[0], rel=1e-5), name
        _close(r0[name][1], ref[1])
        _close(r1[name][1], ref[1])
    # In-batch only: each query sees 2*B passages instead of 4*B, so the loss is lower and grads differ.
    assert r0["in_batch"][0] < single[0] - 0.05
    diff = max(float((r0["in_batch"][1][n] - single[1][n]).abs().max()) for n in single[1])
    assert diff > 1e-4

    # The duplicate gold passage across workers is masked: the unmasked loss would be higher.
    q = model.encode_queries(model.tokenize([r["query"] for r in rows], "query")).detach()
    texts = [t for r in rows for t in (r["positive"], r["negatives"][0])]
    p = model.encode_passages(model.tokenize(texts, "passage")).detach()
    assert contrastive_loss(q, p, model.cfg.temperature).item() > single[0] + 1e-4


# ------------------------------------------------------------------------------------- the real engine
@pytest.fixture(scope="module")
def dual_examples(tmp_path_factory, mini_data_dir):
    data = load_beir(mini_data_dir)
    corpus = load_corpus(data.corpus_path)
    qids = sorted(data.split("train"))[:320]
    path = tmp_path_factory.mktemp("examples") / "dual.parquet"
    write_examples(build_dual_examples(data, corpus, qids, None, 0, seed=0), path)
    return path


def _tiny_cfg(*overrides: str) -> Config:
    return load_config("tiny", overrides=list(overrides))


@pytest.fixture(scope="module")
def trained_dual(ray_session, dual_examples, tmp_path_factory):
    out = tmp_path_factory.mktemp("md0")
    cfg = _tiny_cfg("dual.batch_size=16", "dual.max_steps=30", "dual.lr=2e-3", "dual.log_every=5",
                    "dual.warmup_ratio=0.1")
    model_dir = train_dual(cfg, str(dual_examples), str(out))
    return cfg, out, model_dir


def _fixed_batch_loss(model: DualEncoder, rows: list[dict]) -> float:
    model.eval()
    with torch.no_grad():
        q = model.encode_queries(model.tokenize([r["query"] for r in rows], "query"))
        p = model.encode_passages(model.tokenize([r["positive"] for r in rows], "passage"))
        return contrastive_loss(q, p, model.cfg.temperature).item()


@pytest.mark.slow
def test_train_dual_lowers_loss_and_exports_a_sentence_transformer(trained_dual, dual_examples, tiny_model_dir):
    import pyarrow.parquet as pq
    from sentence_transformers import SentenceTransformer

    cfg, out, model_dir = trained_dual
    assert model_dir == out / "model"
    rows = pq.read_table(dual_examples).slice(0, 64).to_pylist()
    before = _fixed_batch_loss(DualEncoder.from_base(cfg.model), rows)
    trained = DualEncoder.load(model_dir)
    after = _fixed_batch_loss(trained, rows)
    assert after < before - 0.2, (before, after)

    history = read_history(out)
    assert [h["step"] for h in history][-1] == 30 and all(h["seq_per_s"] > 0 for h in history)
    assert history[-1]["loss"] < history[0]["loss"]

    st = SentenceTransformer(str(model_dir), device="cpu")
    texts = [r["positive"] for r in rows[:5]]
    ours = trained.encode(texts, "passage", bf16="false", device="cpu")
    np.testing.assert_allclose(st.encode(texts, normalize_embeddings=False), ours, atol=1e-4)


@pytest.mark.slow
def test_rerun_returns_the_model_and_refuses_changed_settings(trained_dual, dual_examples):
    cfg, out, model_dir = trained_dual
    mtime = (model_dir / "config.json").stat().st_mtime
    assert train_dual(cfg, str(dual_examples), str(out)) == model_dir  # no new training run
    assert (model_dir / "config.json").stat().st_mtime == mtime
    cfg2 = _tiny_cfg("dual.batch_size=16", "dual.max_steps=30", "dual.lr=1e-4")
    with pytest.raises(ConfigError, match="other settings"):
        train_dual(cfg2, str(dual_examples), str(out))


def test_bad_examples_fail_with_a_clear_message(tmp_path):
    cfg = _tiny_cfg()
    with pytest.raises(DataError, match="not found"):
        train_dual(cfg, str(tmp_path / "missing.parquet"), str(tmp_path / "out"))
    write_examples([{"qid": "1", "query": "q", "passages": ["p", "n"], "labels": [1.0, 0.0]}], tmp_path / "cross.parquet")
    with pytest.raises(DataError, match="lack column"):
        train_dual(cfg, str(tmp_path / "cross.parquet"), str(tmp_path / "out"))
    write_examples(_rows(2 * B)[:3], tmp_path / "few.parquet")
    with pytest.raises(DataError, match="fewer than one global batch"):
        train_dual(cfg, str(tmp_path / "few.parquet"), str(tmp_path / "out"))


@pytest.mark.slow
def test_killed_worker_resumes_from_checkpoint(ray_session, dual_examples, tmp_path):
    """Rank 1 dies (os._exit) after step 5 on the first attempt; checkpoints every 2 steps. The run
    recovers from its latest registered checkpoint (step 4, or step 2 if Ray had not yet collected the
    step-4 report when it saw the worker die - registration is asynchronous), not from step 0, finishes,
    and ends with the same weights as an uninterrupted run (same data order, dropout seeds, optimizer and
    schedule state)."""
    overrides = ("dual.batch_size=8", "dual.max_steps=8", "dual.checkpoint_every=2", "dual.log_every=2",
                 "ray.max_failures=1")
    marker, steps_log = tmp_path / "killed", tmp_path / "steps.log"

    def hook(rank: int, step: int) -> None:
        # Attempts are told apart by worker process: the retry runs in new processes. (Classifying by the
        # marker raced: rank 0 could finish step 5 of the first attempt after rank 1 had created it.)
        with open(steps_log, "a") as f:
            f.write(f"{os.getpid()} {rank} {step}\n")
        if rank == 1 and step == 5 and not marker.exists():
            marker.touch()
            time.sleep(2)  # usually lets the controller collect the step-4 checkpoint first
            os._exit(1)

    faulty = train_dual(_tiny_cfg(*overrides), str(dual_examples), str(tmp_path / "faulty"), step_hook=hook)
    lines = [line.split() for line in steps_log.read_text().splitlines()]
    pids = list(dict.fromkeys(pid for pid, r, _ in lines if r == "0"))  # rank 0's processes, in order
    assert len(pids) == 2, f"expected one retry, rank 0 ran in {len(pids)} processes"
    first = [int(st) for pid, r, st in lines if pid == pids[0]]
    retry = [int(st) for pid, r, st in lines if pid == pids[1]]
    assert marker.exists() and max(first) >= 4
    assert retry[0] in (3, 5) and retry == list(range(retry[0], 9)), retry  # resumed after a checkpoint, not 0
    assert [h["step"] for h in read_history(tmp_path / "faulty")] == [2, 4, 6, 8]

    clean = train_dual(_tiny_cfg(*overrides), str(dual_examples), str(tmp_path / "clean"))
    a, b = DualEncoder.load(faulty).state_dict(), DualEncoder.load(clean).state_dict()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.slow
def test_train_cross_exports_a_sentence_transformers_cross_encoder(ray_session, mini_data_dir, tmp_path):
    from sentence_transformers import CrossEncoder as STCrossEncoder

    from rocketqa_ray.data.beir import passage_text
    from rocketqa_ray.modeling.cross_encoder import CrossEncoder

    data = load_beir(mini_data_dir)
    corpus = load_corpus(data.corpus_path)
    pids = sorted(corpus)
    qids = sorted(data.split("train"))[:64]
    pos = {q: next(iter(data.split("train")[q])) for q in qids}
    # groups of different sizes (1-2 negatives): the listwise loss pads and masks the short ones
    negs = {q: [pids[(g * 7 + j) % len(pids)] for j in range(1 + g % 2)] for g, q in enumerate(qids)}
    rows = build_cross_examples({q: data.queries[q]["text"] for q in qids}, pos, negs,
                                lambda p: passage_text(corpus[p]["title"], corpus[p]["text"]))
    write_examples(rows, tmp_path / "cross.parquet")
    cfg = _tiny_cfg("cross.max_steps=12", "cross.batch_size=4", "ray.num_workers=1", "cross.loss=listwise+bce")
    model_dir = train_cross(cfg, str(tmp_path / "cross.parquet"), str(tmp_path / "mc"))
    history = read_history(tmp_path / "mc")
    assert history[-1]["step"] == 12
    assert history[-1]["seq_per_s"] > 0
    qs = [r["query"] for r in rows[:3] for _ in r["passages"]]
    ps = [p for r in rows[:3] for p in r["passages"]]
    ours = CrossEncoder.load(model_dir).score(qs, ps, bf16="false")
    st = STCrossEncoder(str(model_dir), device="cpu").predict(list(zip(qs, ps)))
    np.testing.assert_allclose(st, ours, atol=1e-4)


def test_build_dual_examples_samples_hard_negatives(mini_data_dir):
    data = load_beir(mini_data_dir)
    corpus = load_corpus(data.corpus_path)
    qrels = data.split("train")
    qids = sorted(qrels)[:20]
    pos0 = next(iter(qrels[qids[0]]))
    hard = {q: [pos0, *sorted(corpus)[:5]] for q in qids}  # includes a positive: must never be a negative
    hard[qids[1]] = []  # nothing mined: topped up with random passages
    rows = build_dual_examples(data, corpus, qids, hard, num_negatives=3, seed=1)
    assert rows == build_dual_examples(data, corpus, qids, hard, num_negatives=3, seed=1)
    assert sorted(r["qid"] for r in rows) == sorted(qids)
    for r in rows:
        assert len(r["negative_ids"]) == 3 == len(set(r["negative_ids"]))
        assert not set(r["negative_ids"]) & set(qrels[r["qid"]])
        assert r["positive_id"] in qrels[r["qid"]]
        if r["qid"] != qids[1]:
            assert set(r["negative_ids"]) <= set(sorted(corpus)[:5])
    in_batch = build_dual_examples(data, corpus, qids, None, num_negatives=3, seed=1)
    assert all(r["negatives"] == [] and r["teacher_scores"] == [] for r in in_batch)
    # a question's draws and place do not depend on the other questions built with it (per-question seeds, a
    # hashed order): what lets a Ray Data step build rows group by group and sort them into the driver's order
    part = build_dual_examples(data, corpus, qids[::-1][:7], hard, num_negatives=3, seed=1)
    assert part == [r for r in rows if r["qid"] in set(qids[::-1][:7])]
    assert build_dual_examples(data, corpus, qids, hard, num_negatives=3, seed=2) != rows


def test_dual_examples_carry_the_teachers_scores_through_parquet(mini_data_dir, tmp_path):
    """Distillation's soft targets: each row's teacher_scores line up with [positive, *negatives], None where
    the passage was not scored (a random top-up); they survive the Parquet file the workers read."""
    import pyarrow.parquet as pq

    from rocketqa_ray.data.examples import check_examples

    data = load_beir(mini_data_dir)
    corpus = load_corpus(data.corpus_path)
    qids = sorted(data.split("train"))[:10]
    hard = {q: sorted(corpus)[i: i + 3] for i, q in enumerate(qids)}
    scores = {(q, p): round(0.1 * (i % 9) + 0.05, 2) for i, (q, ps) in enumerate(hard.items()) for p in ps}
    scores.update({(q, next(iter(data.split("train")[q]))): 0.9 for q in qids})
    rows = build_dual_examples(data, corpus, qids, hard, num_negatives=4, seed=0, scores=scores)
    for r in rows:
        assert r["teacher_scores"] == [scores.get((r["qid"], p)) for p in [r["positive_id"], *r["negative_ids"]]]
        assert r["teacher_scores"][0] == 0.9
        for pid, v in zip(r["negative_ids"], r["teacher_scores"][1:]):
            assert (v is None) == (pid not in hard[r["qid"]])  # the random top-ups are unscored
    assert any(None in r["teacher_scores"] for r in rows)
    write_examples(rows, tmp_path / "ex.parquet")
    back = pq.read_table(tmp_path / "ex.parquet").to_pylist()
    assert [[None if v is None else round(v, 2) for v in r["teacher_scores"]] for r in back] == [
        r["teacher_scores"] for r in rows]
    # a user's own examples file without the column is still valid
    pq.write_table(pq.read_table(tmp_path / "ex.parquet").drop(["teacher_scores"]), tmp_path / "own.parquet")
    assert check_examples(tmp_path / "own.parquet", "dual")["rows"] == len(rows)


def test_dual_task_starts_from_a_saved_model_with_this_runs_lengths(tiny_model_dir, tmp_path):
    saved = DualEncoder.from_base(ModelConfig(base=str(tiny_model_dir), pooling="cls", query_max_len=8))
    saved.save(tmp_path / "prev")
    cfg = _tiny_cfg("model.pooling=mean", "model.query_max_len=12", "dual.gradient_checkpointing=true")
    model = DualTask(cfg, num_negatives=0).build(str(tmp_path / "prev"))
    assert model.cfg.pooling == "cls"  # the saved weights were trained with CLS pooling
    assert model.cfg.query_max_len == 12 and model.cfg.passage_max_len == cfg.model.passage_max_len
    torch.testing.assert_close(model.state_dict(), saved.state_dict())
    # Gradient checkpointing is on and the step still runs and produces gradients.
    model.train()
    loss = DualTask(cfg, num_negatives=0).loss_backward(model, _rows(2 * B)[:4], torch.device("cpu"), bf16=False)
    assert loss > 0 and any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


def test_train_dual_job_reports_bad_input_in_one_line(tmp_path):
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[2]
    job = [sys.executable, str(root / "jobs" / "train_dual.py"), "--out", str(tmp_path / "out"), "--preset", "tiny"]
    r = subprocess.run([*job, "--data", str(tmp_path / "nope")], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and r.stderr.strip().startswith("error:") and "does not exist" in r.stderr
    assert "Traceback" not in r.stderr
    r = subprocess.run([*job, "--data", str(root / "data" / "squad-mini"), "--examples", str(tmp_path / "x.parquet")],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "not found" in r.stderr and "Traceback" not in r.stderr


def test_a_user_error_in_a_worker_reaches_the_driver_as_one_line():
    from rocketqa_ray.errors import user_error

    wrapped = RuntimeError("Training failed due to worker errors:\n[Rank 0 Error Snippet]:\nTraceback (most recent call last):\n"
                           '  File "training.py", line 1, in _worker_loop\n'
                           "rocketqa_ray.errors.DataError: x.parquet: no training examples\n")
    err = user_error(wrapped)
    assert isinstance(err, DataError) and str(err) == "x.parquet: no training examples"
    chained = RuntimeError("a Ray Data task failed")
    chained.__cause__ = DataError("corpus.jsonl:3: malformed JSON")
    assert user_error(chained) is chained.__cause__  # Ray Data keeps the worker's exception as the cause
    assert user_error(RuntimeError("CUDA out of memory")) is None  # not ours: keeps its traceback


@pytest.mark.parametrize("epochs, per_epoch, min_steps, max_steps, expect", [
    (0.6, 236, 140, None, 142),  # squad-mini's cross-encoder: epochs decide, above the floor
    (0.6, 56, 140, None, 140),  # 500 questions: the floor, 2.5 epochs instead of 34 steps
    (1.0, 7, 0, None, 7),
    (0.01, 7, 0, None, 1),  # always at least one step
    (5.0, 7, 140, 4, 4),  # max_steps wins (tests, smoke runs)
])
def test_training_steps_have_a_floor_for_small_data(epochs, per_epoch, min_steps, max_steps, expect):
    from rocketqa_ray.train.launch import training_steps

    assert training_steps(epochs, per_epoch, min_steps, max_steps) == expect


def test_min_steps_trains_more_epochs_on_small_data(ray_session, dual_examples, tmp_path):
    """A real run: 1 epoch of the examples is a handful of steps; min_steps makes it run that many."""
    import pyarrow.parquet as pq

    rows = pq.read_metadata(dual_examples).num_rows
    cfg = _tiny_cfg("dual.max_steps=null", "dual.batch_size=64", "dual.epochs=1", "dual.min_steps=9",
                    "dual.log_every=1", "ray.num_workers=1")
    per_epoch = rows // 64
    assert per_epoch < 9
    train_dual(cfg, dual_examples, tmp_path / "md", name="min_steps")
    history = read_history(tmp_path / "md")
    assert history[-1]["step"] == 9 and history[-1]["epoch"] == pytest.approx(9 / per_epoch, abs=1e-3)


def test_the_cross_encoders_head_learns_at_its_own_rate():
    """cross.head_lr_scale: the pooler and classifier (fresh on a pretrained encoder) get lr x scale, the encoder
    lr; biases and LayerNorm weights never decay."""
    from rocketqa_ray.modeling.cross_encoder import CrossEncoder
    from rocketqa_ray.train.loop import make_optimizer
    from rocketqa_ray.train.tasks import CrossTask

    model = CrossEncoder.from_base("tiny", 64)
    opt = make_optimizer(model, 1e-4, 0.01, CrossTask.head, 20.0)
    by_param = {id(p): g for g in opt.param_groups for p in g["params"]}
    for name, p in model.named_parameters():
        g = by_param[id(p)]
        is_head = ".pooler." in name or "classifier." in name
        assert g["lr"] == pytest.approx(2e-3 if is_head else 1e-4), name
        assert g["weight_decay"] == (0.0 if p.dim() < 2 or "LayerNorm" in name else 0.01), name
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(model.parameters()))


def test_the_maxsim_head_trains_through_the_cross_task():
    """cross.head=maxsim: the listwise loss reaches both the encoder and the 1 -> 1 layer, and fits a few groups."""
    from rocketqa_ray.config import load_config
    from rocketqa_ray.train.loop import make_optimizer
    from rocketqa_ray.train.tasks import CrossTask

    cfg = load_config("tiny", overrides=["cross.head=maxsim"])
    task = CrossTask(cfg, num_negatives=2)
    model = task.build(None).train()
    assert model.head == "maxsim"
    rows = [{"query": f"question {w} about {w}", "passages": [f"{w} answer {w}", f"other {i}", f"unrelated text {i}"],
             "labels": [1, 0, 0]} for i, w in enumerate(["darwin", "paris", "war", "species"])]
    opt = make_optimizer(model, 1e-3, 0.0, CrossTask.head, 1.0)
    losses = []
    for _ in range(15):
        opt.zero_grad()
        losses.append(float(task.loss_backward(model, rows, torch.device("cpu"), bf16=False)))
        assert model.model.classifier.weight.grad is not None
        assert model.model.encoder.embeddings.word_embeddings.weight.grad.abs().sum() > 0
        opt.step()
    assert losses[-1] < 0.5 * losses[0], losses


def test_an_out_of_memory_kill_is_one_line_that_says_what_to_change():
    """Ray Train's error when the node's memory monitor kills the workers (text as Ray 2.60 words it) becomes a
    ResourceError naming the stage, the memory figures and the knobs; any other failure is left alone."""
    from rocketqa_ray.errors import ResourceError, resource_error

    ray_text = ("Training failed due to controller error:\n6 worker(s) were killed due to the node running low on "
                "memory. Memory on the node (IP: 10.0.0.1, ID: abc) was 22.61GB used / 23.54GB limit (0.96)\n"
                "OOM kill reason: Memory usage 24188149760B exceeded threshold")
    err = resource_error(RuntimeError(ray_text), "md1 training")
    assert isinstance(err, ResourceError) and "\n" not in str(err)
    assert str(err).startswith("md1 training: ") and "22.61GB used / 23.54GB limit" in str(err)
    assert "dual.batch_size" in str(err) and "resume" in str(err)
    assert resource_error(RuntimeError("worker raised ValueError: shapes differ"), "md1 training") is None
