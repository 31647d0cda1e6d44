"""Losses and gradient caching, in one process (no Ray): exact values, masking, cached == uncached."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from rocketqa_ray.config import Config, ModelConfig
from rocketqa_ray.losses import (
    PAD_KEY,
    bce_loss,
    contrastive_loss,
    distillation_loss,
    listwise_loss,
    passage_key,
    teacher_logits,
)
from rocketqa_ray.modeling.dual_encoder import DualEncoder
from rocketqa_ray.train.gradcache import cached_backward, split_features
from rocketqa_ray.train.tasks import DualTask


def _emb(n: int, h: int = 8, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n, h, generator=g), dim=-1)


def test_contrastive_loss_matches_manual_softmax_with_groups():
    b, g, t = 3, 3, 0.1
    q, p = _emb(b, seed=1), _emb(b * g, seed=2)
    loss = contrastive_loss(q, p, t)
    manual = 0.0
    for i in range(b):
        scores = [float(q[i] @ p[j]) / t for j in range(b * g)]
        lse = math.log(sum(math.exp(s) for s in scores))
        manual += lse - scores[i * g]  # query i's positive is the first of its group
    assert loss.item() == pytest.approx(manual / b, rel=1e-5)


def test_duplicate_passages_are_not_negatives_and_padding_is_ignored():
    b, g, t = 3, 2, 0.05
    q, p = _emb(b, seed=3), _emb(b * g, seed=4)
    keys = torch.arange(b * g, dtype=torch.long) + 100
    # Query 0 and query 1 share a gold passage (rows 0 and 2): for query 0, row 2 is the same passage.
    p[2] = p[0]
    keys[2] = keys[0]
    keys[5] = PAD_KEY  # query 2 has no hard negative: a padding slot
    masked = contrastive_loss(q, p, t, p_keys=keys)
    # Reference: drop the duplicate column for queries 0 and 1 and the padding column for everyone.
    scores = q @ p.T / t
    ref = 0.0
    for i, pos in enumerate([0, 2, 4]):
        cols = [j for j in range(b * g) if j != 5 and not (keys[j] == keys[pos] and j != pos)]
        ref += -torch.log_softmax(scores[i, cols], 0)[cols.index(pos)]
    assert masked.item() == pytest.approx(ref.item() / b, rel=1e-5)
    assert contrastive_loss(q, p, t).item() > masked.item()  # unmasked, the duplicate hurts


def test_contrastive_loss_rejects_bad_shapes():
    with pytest.raises(ValueError, match="groups"):
        contrastive_loss(_emb(3), _emb(4), 0.05)
    with pytest.raises(ValueError, match="expected q"):
        contrastive_loss(_emb(3), torch.zeros(3, 5), 0.05)


def test_passage_key_is_stable_and_non_negative():
    assert passage_key("doc1") == passage_key("doc1") != passage_key("doc2")
    assert 0 <= passage_key("x") < 2**63
    # A fixed value: the key must not depend on the process (Python's hash() would).
    assert passage_key("doc1") == int.from_bytes(__import__("hashlib").blake2b(b"doc1", digest_size=8).digest(),
                                                 "little") >> 1


def test_bce_loss_matches_formula():
    logits = torch.tensor([2.0, -1.0, 0.5])
    labels = torch.tensor([1.0, 0.0, 1.0])
    manual = -sum(y * math.log(1 / (1 + math.exp(-x))) + (1 - y) * math.log(1 - 1 / (1 + math.exp(-x)))
                  for x, y in zip(logits.tolist(), labels.tolist())) / 3
    assert bce_loss(logits, labels).item() == pytest.approx(manual, rel=1e-6)
    with pytest.raises(ValueError, match="shape"):
        bce_loss(logits, labels[:2])


def test_listwise_loss_is_softmax_cross_entropy_per_group_with_padding_masked():
    logits = torch.tensor([[2.0, 0.5, -1.0], [0.1, 3.0, 9.0]], requires_grad=True)
    labels = torch.tensor([[1.0, 0.0, 0.0], [1.0, 0.0, 0.0]])
    mask = torch.tensor([[True, True, True], [True, True, False]])  # group 2 has one negative; slot 3 is padding
    loss = listwise_loss(logits, labels, mask)
    g1 = -math.log(math.exp(2.0) / (math.exp(2.0) + math.exp(0.5) + math.exp(-1.0)))
    g2 = -math.log(math.exp(0.1) / (math.exp(0.1) + math.exp(3.0)))  # the padded 9.0 must not count
    assert loss.item() == pytest.approx((g1 + g2) / 2, rel=1e-6)
    loss.backward()
    assert logits.grad[1, 2].item() == 0.0 and torch.isfinite(logits.grad).all()
    # a better-ranked positive lowers the loss
    assert listwise_loss(torch.tensor([[5.0, 0.5, -1.0]]), labels[:1]).item() < listwise_loss(logits[:1].detach(), labels[:1]).item()
    with pytest.raises(ValueError, match="positive"):
        listwise_loss(logits.detach(), torch.zeros(2, 3))


# ----------------------------------------------------------------------------------- gradient caching
def _rows(n: int, with_neg: bool = True) -> list[dict]:
    words = ["river", "city", "music", "history", "church", "war", "school", "language", "king", "film"]
    rows = []
    for i in range(n):
        w = words[i % len(words)]
        rows.append({
            "qid": f"q{i}", "query": f"what {w} is number {i}", "positive": f"the {w} {i} was important in history " * (1 + i % 3),
            "positive_id": f"p{i}",
            "negatives": [f"another {words[(i + 3) % len(words)]} text"] if with_neg else [],
            "negative_ids": [f"n{i}"] if with_neg else [],
        })
    return rows


def _grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def _step(model: DualEncoder, rows: list[dict], grad_cache: bool, chunk: int, buckets: int = 1) -> tuple[float, dict]:
    cfg = Config()
    cfg.dual.grad_cache, cfg.dual.grad_cache_chunk, cfg.dual.length_buckets = grad_cache, chunk, buckets
    model.zero_grad(set_to_none=True)
    loss = DualTask(cfg, num_negatives=1).loss_backward(model, rows, torch.device("cpu"), bf16=False)
    return float(loss), _grads(model)


def _assert_same(a: tuple[float, dict], b: tuple[float, dict], tol: float = 1e-5) -> None:
    assert a[0] == pytest.approx(b[0], rel=tol, abs=tol)
    assert a[1].keys() == b[1].keys() and len(a[1]) > 10
    for name in a[1]:
        torch.testing.assert_close(a[1][name], b[1][name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.fixture(scope="module")
def tiny_dual(tiny_model_dir):
    return DualEncoder.from_base(ModelConfig(base=str(tiny_model_dir), query_max_len=16, passage_max_len=48))


@pytest.mark.parametrize("chunk", [1, 3, 64])
def test_grad_cache_equals_plain_step_without_dropout(tiny_dual, chunk):
    tiny_dual.eval()
    rows = _rows(6)
    _assert_same(_step(tiny_dual, rows, grad_cache=False, chunk=chunk), _step(tiny_dual, rows, True, chunk))


def test_grad_cache_replays_dropout_masks(tiny_dual):
    """With dropout on and one chunk per tower the cached step draws the same masks as the plain step;
    this only holds because each chunk's RNG state is restored for the re-run."""
    tiny_dual.train()
    rows = _rows(6)
    torch.manual_seed(7)
    plain = _step(tiny_dual, rows, grad_cache=False, chunk=64)
    torch.manual_seed(7)
    cached = _step(tiny_dual, rows, grad_cache=True, chunk=64)
    torch.manual_seed(8)
    other = _step(tiny_dual, rows, grad_cache=False, chunk=64)
    _assert_same(plain, cached)
    assert abs(plain[0] - other[0]) > 1e-6  # dropout is really on: another seed gives another loss
    tiny_dual.eval()


def test_length_buckets_give_the_loss_and_gradients_of_one_batch(tiny_dual):
    """Passages forwarded in length-sorted chunks (less padding) and put back in order: same loss, same gradients."""
    rows = _rows(8)
    rows[2]["positive"] = " ".join(["long"] * 40)  # lengths differ, so the chunks really reorder
    one = _step(tiny_dual, rows, grad_cache=False, chunk=64, buckets=1)
    bucketed = _step(tiny_dual, rows, grad_cache=False, chunk=64, buckets=3)
    _assert_same(one, bucketed)


def test_length_buckets_restore_input_order():
    from rocketqa_ray.train.tasks import bucket_chunks, in_order, input_order

    lengths = [5, 1, 9, 3, 7, 2, 8]
    seen = bucket_chunks(lengths, 3)
    out = in_order([torch.tensor([float(lengths[i]) for i in idx]) for idx in seen], input_order(seen))
    assert out.tolist() == [float(x) for x in lengths]
    assert len(seen) == 3 and all(max(lengths[i] for i in a) <= min(lengths[i] for i in b) for a, b in zip(seen, seen[1:]))


def test_split_features_trims_padding_per_chunk(tiny_dual):
    feats = tiny_dual.tokenize(["a b", "a b c d e f g h", "a"], "passage")
    chunks = split_features(feats, 2)
    assert [c["input_ids"].shape[0] for c in chunks] == [2, 1]
    assert chunks[0]["input_ids"].shape[1] == feats["input_ids"].shape[1]
    assert chunks[1]["input_ids"].shape[1] < feats["input_ids"].shape[1]
    assert int(chunks[1]["attention_mask"].min()) == 1


def test_cached_backward_rejects_bad_chunk(tiny_dual):
    with pytest.raises(ValueError, match="chunk"):
        cached_backward([(lambda f: f, {})], lambda x: x.sum(), 0)


# ------------------------------------------------------------------------------------------ distillation
def test_teacher_logits_invert_the_sigmoid_and_keep_nan():
    p = torch.tensor([0.1, 0.5, 0.9, float("nan"), 0.0])
    t = teacher_logits(p, temperature=2.0)
    assert torch.allclose(torch.sigmoid(t[:3] * 2.0), p[:3], atol=1e-6)
    assert math.isnan(t[3]) and math.isfinite(t[4])  # 0 is clamped, not -inf


def test_kl_distillation_matches_the_formula_and_skips_unscored_passages():
    s = torch.tensor([[2.0, 1.0, 0.5], [0.3, 0.2, 0.1], [1.0, 0.0, 0.0], [0.5, 0.4, 0.0]])
    t = torch.tensor([[1.0, 0.0, -1.0], [0.5, float("nan"), 2.0], [float("nan"), 1.0, 1.0],
                      [1.0, float("nan"), float("nan")]])
    got = distillation_loss(s, t, "kl")

    def kl(si, ti):
        pt = torch.softmax(ti, 0)
        return float((pt * (torch.log(pt) - torch.log_softmax(si, 0))).sum())

    # row 1 loses its unscored slot; rows 2 (unscored positive) and 3 (no scored negative) add nothing
    expect = (kl(s[0], t[0]) + kl(s[1, [0, 2]], t[1, [0, 2]])) / 2
    assert float(got) == pytest.approx(expect, rel=1e-6)
    assert float(distillation_loss(t[:1], t[:1], "kl")) == pytest.approx(0.0, abs=1e-7)


def test_margin_mse_matches_the_formula():
    s = torch.tensor([[2.0, 1.0, 0.5], [0.3, 0.2, 0.1]])
    t = torch.tensor([[1.0, 0.0, -1.0], [0.5, float("nan"), 2.0]])
    sq = [((2 - 1) - (1 - 0)) ** 2, ((2 - 0.5) - (1 + 1)) ** 2, ((0.3 - 0.1) - (0.5 - 2)) ** 2]
    assert float(distillation_loss(s, t, "margin_mse")) == pytest.approx(sum(sq) / 3, rel=1e-6)


@pytest.mark.parametrize("kind", ["kl", "margin_mse"])
def test_distillation_pulls_the_student_towards_the_teacher(kind):
    t = torch.tensor([[2.0, 1.5, -1.0], [0.0, 1.0, -2.0]])
    s = torch.zeros(2, 3, requires_grad=True)
    before = float(distillation_loss(s.detach(), t, kind))
    distillation_loss(s, t, kind).backward()
    with torch.no_grad():
        s -= 0.5 * s.grad
    assert float(distillation_loss(s, t, kind)) < before
    # the negative the teacher finds nearly as good as the positive moves up against the one it finds poor
    assert float(s[0, 1] - s[0, 2]) > 0


def test_distillation_without_scores_is_zero_and_keeps_the_graph():
    s = torch.ones(2, 2, requires_grad=True)
    out = distillation_loss(s, torch.full((2, 2), float("nan")), "kl")
    assert float(out) == 0.0 and out.requires_grad
    with pytest.raises(ValueError, match="expected student and teacher"):
        distillation_loss(s, torch.zeros(2, 3), "kl")


def test_dual_task_adds_weighted_distillation_of_each_rows_own_group(tiny_dual):
    rows = [{"qid": f"q{i}", "query": f"question {i}", "positive": f"answer {i} text", "positive_id": f"p{i}",
             "negatives": [f"other {i}"], "negative_ids": [f"n{i}"], "teacher_scores": [0.9, 0.2 + 0.3 * i]}
            for i in range(3)]
    losses = {}
    for kind, weight in (("none", 1.0), ("kl", 0.0), ("kl", 1.0), ("kl", 2.0)):
        cfg = Config()
        cfg.distill.kind, cfg.distill.weight = kind, weight
        torch.manual_seed(0)
        tiny_dual.zero_grad()
        losses[kind, weight] = float(DualTask(cfg, 1).loss_backward(tiny_dual.eval(), rows, torch.device("cpu"), False))
    assert losses["kl", 0.0] == pytest.approx(losses["none", 1.0])
    extra = losses["kl", 1.0] - losses["none", 1.0]
    assert extra > 0 and losses["kl", 2.0] - losses["none", 1.0] == pytest.approx(2 * extra, rel=1e-4)


# ------------------------------------------------------------------ no host syncs (issue 18: the GPU path)
# The losses read nothing back from the device, so on CUDA a step never waits for the GPU's queued work. Without
# a GPU the meta device stands in: it holds no data, so every value read back to the host (`bool`, `int`,
# `.item()`, `.cpu()`, a boolean index's `nonzero`) raises there, and a loss that runs on meta tensors reads none.
def _reference_distillation(student, teacher, kind):
    """The loss as it was (boolean indexing and Python counts): the values the sync-free one must keep."""
    s, t = student.float(), teacher.float()
    scored = ~torch.isnan(t)
    rows = scored[:, 0] & scored[:, 1:].any(1)
    total, count = s.sum() * 0.0, 0
    if kind != "none" and bool(rows.any()):
        s, t, scored = s[rows], t[rows], scored[rows]
        if kind == "kl":
            neg_inf = torch.tensor(float("-inf"))
            log_pt = torch.log_softmax(torch.where(scored, t, neg_inf), dim=1)
            log_ps = torch.log_softmax(torch.where(scored, s, neg_inf), dim=1)
            total = torch.where(scored, log_pt.exp() * (log_pt - log_ps), torch.zeros_like(s)).sum()
            count = int(rows.sum())
        else:
            mask = scored[:, 1:]
            total = (((s[:, :1] - s[:, 1:] - torch.nan_to_num(t[:, :1] - t[:, 1:])) ** 2) * mask).sum()
            count = int(mask.sum())
    return total * (1.0 / count) if count else total


def _reference_listwise(logits, labels, mask=None):
    logits, labels = logits.float(), labels.float()
    if mask is not None:
        logits, labels = logits.masked_fill(~mask, float("-inf")), labels * mask
    pos = labels.sum(1, keepdim=True)
    logp = torch.log_softmax(logits, dim=1).masked_fill(labels == 0, 0.0)
    return -(logp * labels / pos).sum(1).mean()


def _value_and_grad(fn, x, *args):
    x = x.clone().requires_grad_(True)
    out = fn(x, *args)
    out.backward()
    return out.detach(), x.grad


@pytest.mark.parametrize("kind", ["none", "kl", "margin_mse"])
@pytest.mark.parametrize("shape", [(0, 3), (1, 1), (1, 2), (5, 4), (16, 8)])
@pytest.mark.parametrize("unscored", [0.0, 0.3, 0.7, 1.0])
def test_sync_free_distillation_equals_the_indexed_one(kind, shape, unscored):
    g = torch.Generator().manual_seed(hash((kind, shape, unscored)) % 2**31)
    s = torch.randn(*shape, generator=g) * 3
    t = teacher_logits(torch.rand(*shape, generator=g))
    t[torch.rand(*shape, generator=g) < unscored] = float("nan")  # unscored positives, rows without a negative
    got, got_grad = _value_and_grad(lambda x: distillation_loss(x, t, kind), s)
    ref, ref_grad = _value_and_grad(lambda x: _reference_distillation(x, t, kind), s)
    assert got.dtype == torch.float32 and got.shape == ()
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(got_grad, ref_grad, rtol=1e-6, atol=1e-7)
    assert torch.isfinite(got_grad).all()


@pytest.mark.parametrize("kind", ["kl", "margin_mse"])
def test_distillation_left_out_rows_get_no_gradient_and_nothing_scored_is_a_zero_tensor(kind):
    s = torch.randn(4, 3, requires_grad=True)
    t = torch.tensor([[1.0, 0.0, -1.0], [float("nan"), 1.0, 0.0], [2.0, float("nan"), float("nan")],
                      [0.5, float("nan"), -0.5]])
    distillation_loss(s, t, kind).backward()
    assert (s.grad[1:3] == 0).all() and (s.grad[0] != 0).all() and s.grad[3, 1] == 0 and s.grad[3, 0] != 0
    none = distillation_loss(s, torch.full_like(t, float("nan")), kind)
    assert isinstance(none, torch.Tensor) and none.shape == () and none.requires_grad and float(none.detach()) == 0.0
    s.grad = None
    none.backward()
    assert (s.grad == 0).all()


@pytest.mark.parametrize("kind", ["none", "kl", "margin_mse"])
def test_distillation_reads_nothing_back_from_the_device(kind):
    s = torch.empty(6, 4, device="meta", requires_grad=True)
    out = distillation_loss(s, torch.empty(6, 4, device="meta"), kind, over_workers=True)
    assert out.device.type == "meta" and out.shape == ()
    out.backward()  # the backward too
    assert s.grad is not None and s.grad.device.type == "meta"
    with pytest.raises(RuntimeError, match="meta"):  # the stand-in is strict: the old loss's read fails here
        _reference_distillation(s, torch.empty(6, 4, device="meta"), kind if kind != "none" else "kl")


def test_listwise_loss_reads_nothing_back_from_the_device():
    logits = torch.empty(3, 4, device="meta", requires_grad=True)
    out = listwise_loss(logits, torch.empty(3, 4, device="meta"), torch.empty(3, 4, dtype=torch.bool, device="meta"))
    assert out.device.type == "meta" and out.shape == ()
    out.backward()
    assert logits.grad is not None


@pytest.mark.parametrize("masked", [False, True])
def test_listwise_loss_equals_the_old_one_on_random_groups(masked):
    g = torch.Generator().manual_seed(int(masked))
    logits = torch.randn(12, 6, generator=g) * 4
    labels = (torch.rand(12, 6, generator=g) < 0.3).float()
    labels[:, 0] = 1.0  # every group has a positive; some have several
    labels[3] = torch.rand(6, generator=g)  # soft labels
    mask = None
    if masked:
        mask = torch.arange(6)[None, :] < torch.randint(1, 7, (12, 1), generator=g)
    got, got_grad = _value_and_grad(lambda x: listwise_loss(x, labels, mask), logits)
    ref, ref_grad = _value_and_grad(lambda x: _reference_listwise(x, labels, mask), logits)
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(got_grad, ref_grad, rtol=1e-6, atol=1e-7)
    if masked:
        assert (got_grad[~mask] == 0).all()


def test_check_groups_needs_a_positive_outside_the_padding():
    from rocketqa_ray.losses import check_groups

    labels = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    check_groups(labels)
    check_groups(labels, torch.tensor([[True, True, False], [True, True, True]]))
    with pytest.raises(ValueError, match="positive"):  # group 2's only positive sits in a padding slot
        check_groups(labels, torch.tensor([[True, True, True], [True, True, False]]))
    with pytest.raises(ValueError, match="positive"):
        check_groups(torch.tensor([[1.0, 0.0], [0.0, 0.0]]))


@pytest.mark.parametrize("loss", ["listwise", "listwise+bce", "bce"])
def test_a_group_without_a_positive_fails_at_collate_time_with_the_listwise_loss(tiny_model_dir, loss):
    from rocketqa_ray.modeling.cross_encoder import CrossEncoder
    from rocketqa_ray.train.tasks import CrossTask

    cfg = Config()
    cfg.cross.loss = loss
    task, model = CrossTask(cfg, 2), CrossEncoder.from_base(str(tiny_model_dir), 64)
    good = {"qid": "1", "query": "q one", "passages": ["p", "n1", "n2"], "labels": [1.0, 0.0, 0.0]}
    bad = {"qid": "2", "query": "q two", "passages": ["n3", "n4"], "labels": [0.0, 0.0]}
    batch = task.collate(model, [good, good])
    assert batch.grid_labels.device.type == "cpu"
    if "listwise" in loss:
        with pytest.raises(ValueError, match="every group needs a positive"):
            task.collate(model, [good, bad])
    else:  # pointwise only: a group of negatives is fine
        assert task.collate(model, [good, bad]).grid_mask.tolist() == [[True] * 3, [True, True, False]]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (CPU-only here)")
@pytest.mark.parametrize("kind", ["kl", "margin_mse"])
def test_losses_make_no_host_sync_on_cuda(kind):
    dev = torch.device("cuda")
    s = torch.randn(8, 4, device=dev, requires_grad=True)
    t = torch.randn(8, 4, device=dev).masked_fill(torch.rand(8, 4, device=dev) < 0.3, float("nan"))
    logits = torch.randn(8, 4, device=dev, requires_grad=True)
    labels, mask = torch.zeros(8, 4, device=dev), torch.rand(8, 4, device=dev) < 0.8
    labels[:, 0], mask[:, 0] = 1.0, True
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # any synchronising call raises
    try:
        (distillation_loss(s, t, kind, over_workers=True) + listwise_loss(logits, labels, mask)).backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(s.grad).all() and torch.isfinite(logits.grad).all()
