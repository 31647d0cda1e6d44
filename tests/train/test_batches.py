"""The training step's host side, without Ray: which rows each step gets (worker slices, resume), batches
collated ahead in a background thread (same tensors, same order), pinned memory, and GradCache's RNG replay."""

from __future__ import annotations

import copy
import random

import pyarrow as pa
import pytest
import torch

from rocketqa_ray.config import Config, ModelConfig
from rocketqa_ray.modeling.cross_encoder import CrossEncoder
from rocketqa_ray.modeling.dual_encoder import DualEncoder
from rocketqa_ray.modeling.prefetch import Prefetcher, map_tensors, to_device
from rocketqa_ray.train.batches import StepRows, worker_batches
from rocketqa_ray.train.gradcache import RandState
from rocketqa_ray.train.tasks import CrossTask, DualTask

STEPS_PER_EPOCH, TOTAL = 3, 8  # 8 steps: two full epochs and two steps of a third


def _rows(n: int) -> list[dict]:
    words = ["river", "city", "music", "history", "church", "war", "school", "language", "king", "film"]
    return [{"qid": f"q{i}", "query": f"which {words[i % 10]} is {i}",
             "positive": f"the {words[i % 10]} {i} mattered " * (1 + i % 4), "positive_id": f"p{i}",
             "negatives": [f"another {words[(i + 3) % 10]} story {i}", "short"], "negative_ids": [f"n{i}", f"s{i}"],
             "teacher_scores": [0.7, 0.2, None],
             "passages": [f"the {words[i % 10]} {i}", f"a {words[(i + 5) % 10]} tale " * (1 + i % 3)],
             "labels": [1.0, 0.0]} for i in range(n)]


def _epoch_tables(rows: list[dict], global_batch: int, seed: int = 0):
    """Like the loop's `shard.iter_batches`: the epoch's seeded shuffle in global batches, the rest dropped; records
    which epochs were opened and how many tables were read."""
    opened: list[int] = []
    read: list[int] = []

    def tables(epoch: int):
        opened.append(epoch)
        order = list(range(len(rows)))
        random.Random(seed + epoch).shuffle(order)
        for start in range(0, len(rows) - global_batch + 1, global_batch):
            read.append(epoch)
            yield pa.Table.from_pylist([rows[i] for i in order[start : start + global_batch]])

    return tables, opened, read


def test_worker_batches_slice_each_global_batch_and_resume_where_they_stopped():
    rows = _rows(14)  # 3 global batches of 4 per epoch and 2 rows dropped
    tables, _, read = _epoch_tables(rows, 4)
    one = list(worker_batches(tables, 0, STEPS_PER_EPOCH, TOTAL, rank=0, batch_size=4))
    assert [(b.epoch, b.index) for b in one] == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2), (2, 0), (2, 1)]
    assert len(read) == TOTAL  # not one table read past the last step
    assert [r["qid"] for b in one[:3] for r in b.rows] != [r["qid"] for b in one[3:6] for r in b.rows]  # reshuffled
    # two workers of batch 2 see exactly the rows of one process of batch 4, in the same steps
    w0, w1 = (list(worker_batches(tables, 0, STEPS_PER_EPOCH, TOTAL, rank=r, batch_size=2)) for r in (0, 1))
    assert [a.rows + b.rows for a, b in zip(w0, w1)] == [b.rows for b in one]
    # a run resumed at step 4 reads and skips step 3 of epoch 1, then trains on what the whole run did
    for start in (3, 4, 7):
        assert list(worker_batches(tables, start, STEPS_PER_EPOCH, TOTAL, 0, 4)) == one[start:]
    assert list(worker_batches(tables, TOTAL, STEPS_PER_EPOCH, TOTAL, 0, 4)) == []


def _flat(batch) -> list[torch.Tensor]:
    out: list[torch.Tensor] = []
    map_tensors(batch, lambda t: out.append(t) or t)
    return out


def _equal(s: torch.Tensor, t: torch.Tensor) -> bool:
    if s.dtype != t.dtype or s.shape != t.shape:
        return False
    # NaN marks what the teacher did not score
    return torch.allclose(s, t, rtol=0, atol=0, equal_nan=True) if s.is_floating_point() else torch.equal(s, t)


def _same(x, y) -> bool:
    tx, ty = _flat(x), _flat(y)
    return len(tx) == len(ty) > 0 and all(_equal(s, t) for s, t in zip(tx, ty))


def _assert_same_batches(a: list, b: list) -> None:
    assert len(a) == len(b) > 0
    for (ia, x), (ib, y) in zip(a, b):
        assert ia == ib and _same(x, y), ia


@pytest.fixture(scope="module")
def tiny_dual(tiny_model_dir):
    return DualEncoder.from_base(ModelConfig(base=str(tiny_model_dir), query_max_len=16, passage_max_len=48))


@pytest.mark.parametrize("variant", ["buckets", "grad_cache", "cross"])
def test_prefetched_batches_are_the_synchronous_ones_in_order(variant, tiny_dual, tiny_model_dir):
    """The loop's prefetch (a background thread with its own tokenizer copy) yields the same tensors, step by step,
    as collating each step's rows in the step, from the start and after a resume skip."""
    cfg = Config()
    cfg.dual.grad_cache, cfg.dual.grad_cache_chunk, cfg.dual.length_buckets = variant == "grad_cache", 3, 3
    cfg.cross.length_buckets = 2
    cfg.distill.kind = "kl"
    if variant == "cross":
        task, model = CrossTask(cfg, 1), CrossEncoder.from_base(str(tiny_model_dir), 64)
    else:
        task, model = DualTask(cfg, num_negatives=2), tiny_dual
    tables, _, _ = _epoch_tables(_rows(14), 4)

    def collate(item: StepRows, tokenizer=None) -> tuple[int, object]:
        return item.index, task.collate(model, item.rows, item.epoch, tokenizer)

    sync = [collate(b) for b in worker_batches(tables, 0, STEPS_PER_EPOCH, TOTAL, 1, 2)]
    assert len(sync) == TOTAL
    assert not _same(sync[0][1], sync[3][1])  # a fresh shuffle: the comparison below is not of one repeated batch
    own = copy.deepcopy(model.tokenizer)
    for start in (0, 4):
        with Prefetcher(worker_batches(tables, start, STEPS_PER_EPOCH, TOTAL, 1, 2),
                        lambda item: collate(item, own)) as ahead:
            _assert_same_batches(list(ahead), sync[start:])


def test_batches_stay_in_pageable_memory_unless_asked_and_stay_put_on_the_cpu(tiny_dual):
    rows = _rows(4)
    with Prefetcher([rows], lambda r: DualTask(Config(), 2).collate(tiny_dual, r)) as ahead:
        batch = next(ahead)
    tensors = _flat(batch)
    assert len(tensors) >= 4 and not any(t.is_pinned() for t in tensors)
    assert to_device(batch, "cpu") is batch  # nothing copied on the CPU


@pytest.mark.skipif(not torch.cuda.is_available(), reason="pinned memory needs a CUDA device (CPU-only here)")
def test_batches_are_pinned_when_asked_and_copied_to_the_gpu(tiny_dual):
    rows = _rows(4)
    device = torch.device("cuda", torch.cuda.current_device())
    # 'cuda' without an index: the caller's current device (the thread's own would be GPU 0)
    with Prefetcher([rows], lambda r: DualTask(Config(), 2).collate(tiny_dual, r),
                    pin_device=torch.device("cuda")) as ahead:
        batch = next(ahead)
    tensors = _flat(batch)
    assert len(tensors) >= 4 and all(t.is_pinned() for t in tensors)
    on_gpu = _flat(to_device(batch, device))
    torch.cuda.synchronize()
    assert all(g.device == device and torch.equal(g.cpu(), t) for g, t in zip(on_gpu, tensors))


def test_rand_state_on_the_cpu_captures_no_cuda_state_and_replays_dropout():
    """GradCache's replay: the CPU state alone gives the re-run the dropout masks of the first run; a CPU encoder's
    state holds no CUDA state (not every visible GPU's, as before), and the replay does not move the RNG on."""
    torch.manual_seed(3)
    state = RandState(torch.device("cpu"))
    assert state.cuda is None and state.cuda_index is None
    x = torch.ones(64, 32)
    first = torch.nn.functional.dropout(x, 0.5)
    after_first = torch.get_rng_state()
    with state.restore():
        again = torch.nn.functional.dropout(x, 0.5)
    torch.testing.assert_close(again, first, rtol=0, atol=0)
    assert torch.equal(torch.get_rng_state(), after_first)  # forked: the run goes on where it was
    assert not torch.equal(torch.nn.functional.dropout(x, 0.5), first)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (CPU-only here)")
def test_rand_state_on_a_gpu_captures_that_device_only_and_replays_dropout():
    device = torch.device("cuda", torch.cuda.current_device())
    state = RandState(device)
    assert state.cuda_index == device.index
    assert state.cuda is not None and torch.equal(state.cuda, torch.cuda.get_rng_state(device.index))
    x = torch.ones(64, 32, device=device)
    first = torch.nn.functional.dropout(x, 0.5)
    with state.restore():
        again = torch.nn.functional.dropout(x, 0.5)
    torch.testing.assert_close(again, first, rtol=0, atol=0)
    assert not torch.equal(torch.nn.functional.dropout(x, 0.5), first)
