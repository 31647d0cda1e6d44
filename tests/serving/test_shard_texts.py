"""A Retriever's share of the corpus, Ray-free: the text store of its shards, and the in-process service split into
shard groups (what the Serve app does with one deployment per group) answering as the whole index does."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pyarrow as pa
import pytest

from rocketqa_ray.data import corpus_store
from rocketqa_ray.data.beir import iter_corpus
from rocketqa_ray.errors import DataError, ServiceError
from rocketqa_ray.serving.artifacts import find_artifacts
from rocketqa_ray.serving.local import SearchService
from rocketqa_ray.serving.texts import ShardTexts
from rocketqa_ray.testing.demo import demo_queries, make_demo_run_dir, write_corpus_store


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    return make_demo_run_dir(tmp_path_factory.mktemp("shards") / "run", n_passages=120, shard_size=50)


def corpus(run: Path) -> list[dict]:
    return list(iter_corpus(find_artifacts(run).corpus_path))


def test_read_rows_spans_parts_and_refuses_rows_it_lacks(tmp_path):
    lines = [json.dumps({"_id": f"p{i}", "title": f"t{i}", "text": f"text {i}"}) + "\n" for i in range(10)]
    folder = tmp_path / "store"
    for part, (a, b) in enumerate([(0, 4), (4, 7), (7, 10)]):  # three parts of 4, 3 and 3 rows
        f = tmp_path / f"c{part}.jsonl"
        f.write_text("".join(lines[a:b]))
        corpus_store.write_part(folder, part, corpus_store.parse_chunk(f, 0, f.stat().st_size, a + 1))
    (folder / corpus_store.SUCCESS).write_text(json.dumps({"n_rows": 10, "part_rows": [4, 3, 3]}))
    t = corpus_store.read_rows(folder, 3, 8, ["id", "text"])
    assert t.column("id").to_pylist() == [f"p{i}" for i in range(3, 8)]
    assert corpus_store.read_rows(folder, 5, 5).num_rows == 0
    with pytest.raises(DataError, match=r"rows \[8, 12\) asked, the store holds 10"):
        corpus_store.read_rows(folder, 8, 12)


def test_shard_texts_from_the_store_equal_a_scan_of_the_corpus_file(run):
    arts = find_artifacts(run)
    rows = corpus(run)
    ids = pa.array([p["_id"] for p in rows[50:100]], pa.string())
    stored = ShardTexts.load(ids, 50, arts.store_dir, arts.corpus_path)
    scanned = ShardTexts.scan(ids, arts.corpus_path)
    assert arts.store_dir is not None and len(stored) == len(scanned) == 50
    assert [stored.get(i) for i in range(50)] == [scanned.get(i) for i in range(50)]
    assert stored.get(0) == (rows[50]["title"], rows[50]["text"])


def test_shard_texts_fall_back_to_a_scan_when_the_store_order_differs(run, tmp_path):
    arts = find_artifacts(run)
    rows = corpus(run)
    shuffled = tmp_path / "shuffled.jsonl"
    shuffled.write_text("".join(json.dumps(p) + "\n" for p in reversed(rows)))
    write_corpus_store(shuffled, tmp_path / "store")
    ids = pa.array([p["_id"] for p in rows[:50]], pa.string())
    texts = ShardTexts.load(ids, 0, tmp_path / "store", arts.corpus_path)
    assert [texts.get(i)[1] for i in range(50)] == [p["text"] for p in rows[:50]]


def test_an_id_missing_from_the_corpus_is_a_service_error(run):
    with pytest.raises(ServiceError, match="not in the corpus"):
        ShardTexts.scan(pa.array(["p-none"], pa.string()), find_artifacts(run).corpus_path)


def test_shard_groups_answer_as_the_whole_index(run):
    arts = find_artifacts(run)
    whole = SearchService(arts)
    split = SearchService(arts, dataclasses.replace(arts.cfg.serve, shards_per_retriever=1))
    assert [r.searcher.shards for r in split.retrievers] == [[0], [1], [2]]
    assert [r.searcher.ntotal for r in split.retrievers] == [50, 50, 20]
    assert [len(r.texts) for r in split.retrievers] == [50, 50, 20]  # each holds only its own passages' texts
    for q in demo_queries(run, 6):
        for rerank in (False, True):
            a, b = whole.search(q, 15, rerank)["results"], split.search(q, 15, rerank)["results"]
            assert [h["id"] for h in a] == [h["id"] for h in b]
            assert [h["score"] for h in a] == pytest.approx([h["score"] for h in b], abs=1e-6)
            assert [h.get("bm25") for h in a] == [h.get("bm25") for h in b]
