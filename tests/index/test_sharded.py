"""An index built and searched shard by shard (index.plan, index.searcher, retrieval.candidates), Ray-free:
equal to one DenseIndex over the same vectors, exclusions, the per-shard folder layout and older layouts."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from rocketqa_ray.batch.encode import write_embeddings
from rocketqa_ray.config import IndexConfig
from rocketqa_ray.errors import DataError
from rocketqa_ray.index import DenseIndex
from rocketqa_ray.index.build import build_index_from_embeddings
from rocketqa_ray.index.plan import plan_index, shard_ranges
from rocketqa_ray.index.searcher import ShardSearcher, group_shards
from rocketqa_ray.index.store import read_meta
from rocketqa_ray.io import read_json, write_json
from rocketqa_ray.retrieval import candidates as cands
from rocketqa_ray.testing.vectors import mixture

N, DIM = 3000, 32


@pytest.fixture(scope="module")
def vectors():
    return mixture(N, DIM, seed=5), [f"doc-{i}" for i in range(N)], mixture(40, DIM, seed=6)


@pytest.fixture(scope="module")
def emb_dir(tmp_path_factory, vectors):
    emb, ids, _ = vectors
    # parts of 700 rows and shards of 1100: shards start and stop inside parts
    return write_embeddings(tmp_path_factory.mktemp("emb") / "embeddings", ids, emb, rows_per_shard=700,
                            model_fingerprint="fp-x")


def searched(searchers: list[ShardSearcher], q: np.ndarray, k: int, exclude=None) -> list[list[tuple[str, float]]]:
    depth = cands.depth_for(k, exclude)
    return cands.merge_answers([s.search(q, depth) for s in searchers], k, searchers[0].metric, len(q), exclude)


@pytest.mark.parametrize("kind", ["flat", "ivfpq", "hnsw"])
def test_shard_searchers_equal_one_index(tmp_path, vectors, emb_dir, kind):
    emb, ids, q = vectors
    cfg = IndexConfig(kind=kind, shard_size=1100, use_gpu="false", train_sample=2000, hnsw_m=8, ef_construction=40)
    out = build_index_from_embeddings(emb_dir, cfg, tmp_path / "ix")
    meta = read_meta(out, expect_dim=DIM, expect_fingerprint="fp-x")
    assert meta["shard_sizes"] == [1100, 1100, 800] and meta["kind"] == kind
    assert sorted(p.name for p in out.iterdir()) == ["meta.json"] + [
        f"shard_0000{j}.{ext}" for j in range(3) for ext in ("faiss", "ids.parquet")]
    whole = DenseIndex.load(out)  # every shard in one process: the reference
    assert whole.ids == ids
    ref = whole.search_ids(q, 25)
    for groups in ([[0], [1], [2]], [[0, 1], [2]], [[0, 1, 2]]):
        got = searched([ShardSearcher(out, g) for g in groups], q, 25)
        assert [[p for p, _ in h] for h in got] == [[p for p, _ in h] for h in ref]
        np.testing.assert_allclose([[s for _, s in h] for h in got], [[s for _, s in h] for h in ref], rtol=0, atol=0)
    if kind == "flat":  # and exact: the same as one unsharded flat index built in memory
        one = DenseIndex.build(emb, ids, IndexConfig(kind="flat", use_gpu="false")).search_ids(q, 25)
        assert [[p for p, _ in h] for h in one] == [[p for p, _ in h] for h in ref]


def test_exclusions_still_give_k(tmp_path, vectors, emb_dir):
    _, _, q = vectors
    out = build_index_from_embeddings(emb_dir, IndexConfig(kind="flat", shard_size=1000, use_gpu="false"),
                                      tmp_path / "ix")
    searchers = [ShardSearcher(out, [j]) for j in range(3)]
    full = searched(searchers, q, 30)
    exclude = [[h[0][0], h[5][0], "not-a-passage"] for h in full]
    got = searched(searchers, q, 20, exclude)
    for h, e, f in zip(got, exclude, full):
        assert len(h) == 20 and not set(e) & {p for p, _ in h}
        assert h == [x for x in f if x[0] not in e][:20]


def test_plan_is_bounded_and_decided_once(emb_dir):
    plan = plan_index(emb_dir, IndexConfig(kind="auto", shard_size=None, use_gpu="false"))
    assert plan.kind == "flat" and plan.ranges == [(0, N)] and plan.rows_per_part == 700
    assert shard_ranges(10, 4) == [(0, 4), (4, 8), (8, 10)] and shard_ranges(3, None) == [(0, 3)]
    assert group_shards(5, 2) == [[0, 1], [2, 3], [4]]


def test_older_layout_and_damage_are_clear(tmp_path, vectors, emb_dir):
    emb, ids, q = vectors
    out = build_index_from_embeddings(emb_dir, IndexConfig(kind="flat", shard_size=1100, use_gpu="false"),
                                      tmp_path / "ix")
    ref = searched([ShardSearcher(out, [0, 1, 2])], q, 10)
    # format 2: one ids.parquet for every shard; a searcher of shard 1 takes its slice
    meta = read_json(out / "meta.json")
    pq.write_table(pa.table({"id": pa.array(ids)}), out / "ids.parquet")
    for j in range(3):
        (out / f"shard_0000{j}.ids.parquet").unlink()
    write_json(out / "meta.json", {k: v for k, v in {**meta, "format_version": 2}.items() if k != "id_files"})
    assert searched([ShardSearcher(out, [0]), ShardSearcher(out, [1, 2])], q, 10) == ref
    assert DenseIndex.load(out).ids == ids
    with pytest.raises(DataError, match="consecutive shards"):
        ShardSearcher(out, [0, 2])
    with pytest.raises(DataError, match="there is no shard 3"):
        ShardSearcher(out, [3])
    (out / "shard_00001.faiss").write_bytes(b"broken")
    with pytest.raises(DataError, match="shard_00001.faiss is not a readable faiss index"):
        ShardSearcher(out, [1])


def test_candidates_round_trip(tmp_path):
    hits = [[("a", 1.5), ("b", 0.5)], [], [("c", -1.0)]]
    cands.write_part(tmp_path, 3, cands.to_table(["q3", "q4", "q5"], hits))
    cands.write_part(tmp_path, 0, cands.to_table(["q0"], [[("z", 2.0)]]))
    with pytest.raises(DataError, match="no complete candidates"):
        cands.read_hits(tmp_path)
    write_json(tmp_path / cands.SUCCESS, {"n_questions": 4})
    assert cands.read_hits(tmp_path) == {"q0": [("z", 2.0)], "q3": hits[0], "q4": [], "q5": hits[2]}
    assert cands.count_rows(tmp_path) == 4
