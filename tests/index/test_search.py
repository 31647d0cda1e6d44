"""Merging shards' top-k lists equals searching one index over all their rows."""

from __future__ import annotations

import numpy as np
import pytest

from rocketqa_ray.config import IndexConfig
from rocketqa_ray.index import DenseIndex
from rocketqa_ray.index.search import merge_topk, offset_rows


@pytest.mark.parametrize("metric", ["ip", "l2"])
def test_merge_of_separate_indexes_equals_one_flat_index(metric):
    rng = np.random.default_rng(0)
    emb = rng.standard_normal((900, 16)).astype(np.float32)
    q = rng.standard_normal((7, 16)).astype(np.float32)
    q[0] = emb[10]  # a query whose best hit is exact
    ids = [f"p{i}" for i in range(len(emb))]
    cfg = IndexConfig(kind="flat", use_gpu="false")
    whole = DenseIndex.build(emb, ids, cfg, metric=metric)
    cuts = [0, 300, 650, 900]
    parts = []
    for a, b in zip(cuts, cuts[1:]):
        shard = DenseIndex.build(emb[a:b], ids[a:b], cfg, metric=metric)
        s, r = shard.search(q, 20)
        parts.append(offset_rows(s, r, a, metric))
    scores, rows = merge_topk(parts, 20, metric)
    ref_s, ref_r = whole.search(q, 20)
    np.testing.assert_array_equal(rows, ref_r)
    np.testing.assert_allclose(scores, ref_s, rtol=1e-6)


def test_fewer_hits_than_k_pad_with_minus_one():
    s = np.array([[0.9, 0.5]], np.float32)
    r = np.array([[3, -1]], np.int64)  # faiss pads a short list with -1
    scores, rows = merge_topk([offset_rows(s, r, 10, "ip")], 4, "ip")
    assert rows.tolist() == [[13, -1, -1, -1]]
    assert scores[0, 0] == np.float32(0.9) and np.isneginf(scores[0, 1:]).all()
    empty_s, empty_r = merge_topk([], 3, "l2", n_queries=2)
    assert empty_r.shape == (2, 3) and (empty_r == -1).all() and np.isposinf(empty_s).all()
