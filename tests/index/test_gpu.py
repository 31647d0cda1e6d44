"""Placing an index on GPU (rocketqa_ray.index.gpu): the plan, faiss-GPU's k/nprobe limits, and a refine index's
base and re-rank store taken apart and put back together.

Real faiss, no mocks. The decisions and the refine split run on CPU; the tests that need faiss-gpu and a device
skip without them.
"""

from __future__ import annotations

import gc
import logging

import numpy as np
import pytest

from rocketqa_ray.config import IndexConfig
from rocketqa_ray.errors import ConfigError
from rocketqa_ray.index import factory
from rocketqa_ray.index.factory import gpu_count, want_gpu
from rocketqa_ray.index.gpu import (
    GPU_MAX_K,
    GpuPlan,
    PlacedIndex,
    for_actor_gpus,
    gpu_k_factor,
    gpu_nprobe,
    gpu_resources,
    has_gpu_support,
    is_refine,
    plan_gpu,
    rewrap,
    split_refine,
    to_gpu,
)
from rocketqa_ray.testing.vectors import mixture

N, DIM = 3000, 32

needs_gpu = pytest.mark.skipif(not has_gpu_support() or gpu_count() == 0,
                               reason="needs faiss-gpu and a visible CUDA device")


@pytest.fixture(scope="module")
def data():
    return mixture(N, DIM, seed=11), mixture(60, DIM, seed=12)


def refine_index(emb: np.ndarray, suffix: str, metric: str = "ip", k_factor: float = 4.0, nprobe: int = 8):
    """A filled IVF-PQ index with a re-rank store, as index.factory builds it (`suffix`: ",RFlat" or ",Refine(SQ8)")."""
    import faiss

    index = faiss.index_factory(DIM, f"IVF32,PQ8x6np{suffix}",
                                faiss.METRIC_INNER_PRODUCT if metric == "ip" else faiss.METRIC_L2)
    index.train(emb)
    index.add(emb)
    faiss.ParameterSpace().set_index_parameter(index, "nprobe", nprobe)
    faiss.downcast_index(index).k_factor = k_factor
    return index


# ------------------------------------------------------------------ the plan


def test_flat_goes_whole_in_fp32_so_it_stays_exact():
    one = plan_gpu("flat", refined=False, n_gpus=1, nprobe=32)
    assert one == GpuPlan("whole", n_gpus=1, fp16=False, shard=False)
    four = plan_gpu("flat", refined=False, n_gpus=4, nprobe=32)
    assert four.on_gpu and not four.fp16 and four.shard


def test_ivfpq_refine_puts_only_the_base_on_gpu_with_fp16_tables():
    refined = plan_gpu("ivfpq", refined=True, n_gpus=1, nprobe=32)
    assert (refined.place, refined.fp16, refined.nprobe) == ("base", True, 32)
    plain = plan_gpu("ivfpq", refined=False, n_gpus=2, nprobe=32)
    assert (plain.place, plain.fp16, plain.shard) == ("whole", True, True)


def test_hnsw_and_no_gpu_stay_on_cpu():
    hnsw = plan_gpu("hnsw", refined=False, n_gpus=2, nprobe=32)
    assert not hnsw.on_gpu and "HNSW" in hnsw.reason
    none = plan_gpu("ivfpq", refined=True, n_gpus=0, nprobe=32)
    assert not none.on_gpu and "no GPU" in none.reason
    with pytest.raises(ConfigError, match="unknown index kind"):
        plan_gpu("ivf-sq", refined=False, n_gpus=1, nprobe=32)


def test_nprobe_is_capped_at_the_gpu_limit():
    assert gpu_nprobe(64) == 64
    assert gpu_nprobe(GPU_MAX_K + 1) == GPU_MAX_K
    assert plan_gpu("ivfpq", refined=True, n_gpus=1, nprobe=5000).nprobe == GPU_MAX_K


def test_refine_factor_is_capped_so_the_base_k_fits(caplog):
    assert gpu_k_factor(100, 4.0) == 4.0  # 400 candidates
    assert gpu_k_factor(512, 4.0) == 4.0  # exactly 2048
    with caplog.at_level(logging.WARNING, logger="rocketqa_ray.index.gpu"):
        assert gpu_k_factor(1000, 4.0) == 2.0  # 4000 -> 2000
        assert gpu_k_factor(1000, 4.0) == 2.0
    assert sum("refine_k_factor" in r.getMessage() for r in caplog.records) == 1  # once, not per batch
    assert gpu_k_factor(1500, 4.0) == 1.0  # the factor never drops below 1 (IndexRefine needs k_base >= k)
    assert gpu_k_factor(GPU_MAX_K, 4.0) == 1.0


def test_k_above_the_gpu_limit_is_a_clear_error():
    with pytest.raises(ConfigError, match=r"at most 2048.*eval\.depth.*index\.use_gpu=false"):
        gpu_k_factor(GPU_MAX_K + 1, 1.0)


def test_actors_without_reserved_gpus_search_on_cpu():
    auto = IndexConfig(use_gpu="auto")
    assert for_actor_gpus(auto, 0, "index.searcher_gpus").use_gpu == "false"
    assert auto.use_gpu == "auto"  # a copy: the caller's config is not edited
    assert for_actor_gpus(auto, 1, "index.searcher_gpus") is auto
    with pytest.raises(ConfigError, match="index.searcher_gpus"):
        for_actor_gpus(IndexConfig(use_gpu="true"), 0, "index.searcher_gpus")


# ------------------------------------------------------------------ the refine split, on CPU


@pytest.mark.parametrize("suffix,metric", [(",RFlat", "ip"), (",Refine(SQ8)", "ip"), (",RFlat", "l2")])
def test_split_and_rewrap_search_like_the_original(data, suffix, metric):
    emb, q = data
    original = refine_index(emb, suffix, metric)
    want_d, want_i = original.search(q, 20)
    base, store = split_refine(original)
    assert is_refine(original) and not is_refine(base)
    assert base.ntotal == store.ntotal == N
    wrapped = rewrap(base, store, 4.0)
    del original, base, store  # the parts must keep the index that owns them alive
    gc.collect()
    got_d, got_i = wrapped.search(q, 20)
    np.testing.assert_array_equal(got_i, want_i)
    np.testing.assert_array_equal(got_d, want_d)


def test_rewrap_searches_k_factor_candidates(data):
    emb, q = data
    original = refine_index(emb, ",RFlat", k_factor=1.0)
    one_d, one_i = original.search(q, 20)
    base, store = split_refine(original)
    wide_i = rewrap(base, store, 8.0).search(q, 20)[1]
    assert (wide_i != one_i).any()  # more candidates re-scored: a different (better) top 20
    np.testing.assert_array_equal(rewrap(base, store, 1.0).search(q, 20)[1], one_i)


def test_placed_refine_search_caps_the_factor_per_call(data):
    """PlacedIndex over a CPU base (the GPU part's stand-in): a deep search re-scores 2048 // k * k candidates."""
    emb, q = data
    original = refine_index(emb, ",RFlat", k_factor=4.0, nprobe=32)  # every list: more candidates than asked
    base, store = split_refine(original)
    placed = PlacedIndex(rewrap(base, store, 4.0), base, plan_gpu("ivfpq", True, 1, 32), "ivfpq")
    assert placed.ntotal == N and placed.refined
    np.testing.assert_array_equal(placed.search(q, 100)[1], original.search(q, 100)[1])
    deep = 600  # 2400 candidates asked, 3 x 600 = 1800 searched
    capped = refine_index(emb, ",RFlat", k_factor=3.0, nprobe=32).search(q, deep)[1]
    got = placed.search(q, deep)[1]
    np.testing.assert_array_equal(got, capped)
    assert (got != original.search(q, deep)[1]).any()
    with pytest.raises(ConfigError, match="at most 2048"):
        placed.search(q, GPU_MAX_K + 1)


def test_split_refuses_an_index_without_a_store(data):
    import faiss

    with pytest.raises(TypeError, match="not a refine index"):
        split_refine(faiss.IndexFlatIP(DIM))


# ------------------------------------------------------------------ this machine's GPUs


@pytest.mark.skipif(gpu_count() > 0, reason="checks the machine without a GPU")
def test_without_a_gpu_true_is_an_error_and_auto_stays_on_cpu(data):
    import faiss

    with pytest.raises(ConfigError, match="index.use_gpu=true but faiss sees no GPU"):
        want_gpu(IndexConfig(use_gpu="true"))
    assert not want_gpu(IndexConfig(use_gpu="auto"))
    flat = faiss.IndexFlatIP(DIM)
    flat.add(data[0])
    assert to_gpu(flat, "flat", IndexConfig()) is None
    assert factory.to_gpu(flat, "flat") is None  # the name bench scripts call


@pytest.mark.skipif(has_gpu_support(), reason="checks faiss-cpu")
def test_resources_without_gpu_support_are_a_clear_error():
    with pytest.raises(ConfigError, match="faiss-gpu.*index.use_gpu=false"):
        gpu_resources(0)


@needs_gpu
def test_resources_are_made_once_per_device():
    assert gpu_resources(0) is gpu_resources(0)


@needs_gpu
def test_flat_on_gpu_equals_cpu(data):
    import faiss

    emb, q = data
    cpu = faiss.IndexFlatIP(DIM)
    cpu.add(emb)
    placed = to_gpu(cpu, "flat", IndexConfig(use_gpu="true"))
    assert placed is not None and not placed.plan.fp16
    want_d, want_i = cpu.search(q, 50)
    got_d, got_i = placed.search(q, 50)
    np.testing.assert_array_equal(got_i, want_i)
    np.testing.assert_allclose(got_d, want_d, rtol=1e-5, atol=1e-5)


@needs_gpu
def test_ivfpq_refine_on_gpu_keeps_the_store_on_cpu(data):
    import faiss

    emb, q = data
    original = refine_index(emb, ",RFlat", k_factor=4.0)
    placed = to_gpu(original, "ivfpq", IndexConfig(use_gpu="true", nprobe=8, refine_k_factor=4.0))
    assert placed is not None and placed.refined
    assert type(faiss.downcast_index(placed.index.refine_index)).__name__ == "IndexFlat"
    assert "Gpu" in type(faiss.downcast_index(placed.gpu_part)).__name__
    got_d, got_i = placed.search(q, 100)
    want_d, want_i = original.search(q, 100)
    # the re-rank is exact on both; fp16 tables may change a few PQ candidates at the edge
    assert np.mean([len(set(a) & set(b)) / 100 for a, b in zip(got_i, want_i)]) > 0.95
    assert placed.search(q, 1000)[1].shape == (len(q), 1000)  # 4000 candidates capped to 2048
