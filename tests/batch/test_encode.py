"""Ray Data corpus encoding, resume, batch retrieval and their error messages (real Ray, tiny BERT)."""

from __future__ import annotations

import dataclasses
import itertools
import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from rocketqa_ray.batch.encode import encode_corpus, encode_texts, iter_embeddings, load_embeddings
from rocketqa_ray.config import EncodeConfig, IndexConfig, ModelConfig
from rocketqa_ray.data.beir import load_corpus, load_qrels, load_queries, passage_text
from rocketqa_ray.errors import ConfigError, DataError
from rocketqa_ray.modeling.base import model_fingerprint
from rocketqa_ray.modeling.dual_encoder import DualEncoder

N_ROWS = 200
CFG = EncodeConfig(batch_size=32, num_actors=2, cpus_per_actor=0.5, bf16="false", rows_per_shard=64)


@pytest.fixture(scope="module")
def corpus200(tmp_path_factory, mini_data_dir) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "corpus.jsonl"
    with open(Path(mini_data_dir) / "corpus.jsonl", encoding="utf-8") as f, open(path, "w", encoding="utf-8") as g:
        g.writelines(itertools.islice(f, N_ROWS))
    return path


def _save_dual(path: Path, seed: int) -> Path:
    import torch

    torch.manual_seed(seed)
    model = DualEncoder.from_base(ModelConfig(base="tiny", query_max_len=16, passage_max_len=48))
    if seed:  # a different model than seed 0: perturb the weights
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.01 * torch.randn_like(p))
    return model.save(path)


@pytest.fixture(scope="module")
def model_a(tmp_path_factory) -> Path:
    return _save_dual(tmp_path_factory.mktemp("model_a") / "model", 0)


@pytest.fixture(scope="module")
def model_b(tmp_path_factory) -> Path:
    return _save_dual(tmp_path_factory.mktemp("model_b") / "model", 1)


def _reference(model_dir: Path, corpus: Path) -> tuple[list[str], np.ndarray]:
    passages = load_corpus(corpus)
    texts = [passage_text(p["title"], p["text"]) for p in passages.values()]
    return list(passages), DualEncoder.load(model_dir).encode(texts, "passage", batch_size=16, bf16="false")


@pytest.fixture(scope="module")
def encoded(ray_session, corpus200, model_a, tmp_path_factory) -> Path:
    return encode_corpus(corpus200, model_a, tmp_path_factory.mktemp("emb") / "out", CFG)


def _mtimes(d: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in sorted(d.glob("part-*.parquet"))}


def test_ray_embeddings_equal_in_process(encoded, corpus200, model_a):
    ids, emb = load_embeddings(encoded)
    ref_ids, ref = _reference(model_a, corpus200)
    assert ids == ref_ids  # corpus order, nothing lost or duplicated
    assert emb.shape == (N_ROWS, 32) and emb.dtype == np.float32
    np.testing.assert_allclose(emb, ref, atol=1e-5)
    info = json.loads((encoded / "_SUCCESS.json").read_text())
    assert info["n_rows"] == N_ROWS and info["dim"] == 32 and info["n_shards"] == 4
    assert info["model_fingerprint"] == model_fingerprint(model_a)
    assert info["run"]["computed_shards"] == [0, 1, 2, 3]
    assert not (encoded / "_input").exists()
    schema = pq.read_schema(encoded / "part-00000.parquet")
    assert schema.field("row").type == pa.int64() and schema.field("id").type == pa.string()
    assert schema.field("emb").type == pa.list_(pa.float32(), 32)
    # the shard iterator gives the same rows, shard by shard
    assert [len(i) for i, _ in iter_embeddings(encoded)] == [64, 64, 64, 8]


def test_several_shards_per_call_give_the_same_parts(encoded, corpus200, model_a, tmp_path):
    # 4 shards, 3 per call: one actor reads, computes and writes three shards overlapped, the other one
    out = encode_corpus(corpus200, model_a, tmp_path / "overlap", dataclasses.replace(CFG, shards_per_call=3))
    info = json.loads((out / "_SUCCESS.json").read_text())
    assert info["run"]["computed_shards"] == [0, 1, 2, 3]
    for a, b in zip(iter_embeddings(encoded), iter_embeddings(out), strict=True):
        assert a[0] == b[0]
        np.testing.assert_array_equal(a[1], b[1])


def test_resume_recomputes_only_the_missing_shard(encoded, corpus200, model_a, tmp_path):
    out = tmp_path / "resume"
    shutil.copytree(encoded, out)
    ids0, emb0 = load_embeddings(out)
    # A crash after shards 0, 1, 3 were written: no part 2, no _SUCCESS, a temp file of a killed writer,
    # and leftover staged input.
    (out / "part-00002.parquet").unlink()
    (out / "_SUCCESS.json").unlink()
    (out / ".part-00002.parquet.x1y2.tmp").write_bytes(b"half a parquet file")
    (out / "_input").mkdir()
    (out / "_input" / "part-00002.parquet").write_bytes(b"garbage")
    with pytest.raises(DataError, match="no complete output"):
        load_embeddings(out)
    before = _mtimes(out)
    encode_corpus(corpus200, model_a, out, CFG)
    after = _mtimes(out)
    assert json.loads((out / "_SUCCESS.json").read_text())["run"]["computed_shards"] == [2]
    assert {k: after[k] for k in before} == before  # shards 0, 1, 3 untouched
    assert not list(out.glob(".*.tmp"))
    ids1, emb1 = load_embeddings(out)
    assert ids1 == ids0
    np.testing.assert_allclose(emb1, emb0, atol=1e-6)

    # A finished job on an unchanged corpus: nothing to do, nothing rewritten.
    encode_corpus(corpus200, model_a, out, CFG)
    assert _mtimes(out) == after

    # One passage edited: only its shard is recomputed, and it has the new text's embedding.
    lines = corpus200.read_text(encoding="utf-8").splitlines()
    row = json.loads(lines[100])
    row["text"] = "an entirely different passage about zebras and the river nile"
    lines[100] = json.dumps(row)
    edited = tmp_path / "edited.jsonl"
    edited.write_text("\n".join(lines) + "\n", encoding="utf-8")
    encode_corpus(edited, model_a, out, CFG)
    info = json.loads((out / "_SUCCESS.json").read_text())
    assert info["run"]["computed_shards"] == [1]
    ids2, emb2 = load_embeddings(out)
    ref = DualEncoder.load(model_a).encode([passage_text(row["title"], row["text"])], bf16="false")
    np.testing.assert_allclose(emb2[100], ref[0], atol=1e-5)
    assert not np.allclose(emb2[100], emb0[100], atol=1e-3)
    np.testing.assert_array_equal(np.delete(emb2, 100, 0), np.delete(emb0, 100, 0))


def test_parquet_corpus_and_damaged_output(ray_session, corpus200, model_a, encoded, tmp_path):
    rows = [json.loads(line) for line in corpus200.read_text(encoding="utf-8").splitlines()]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "corpus.parquet", row_group_size=50)
    out = encode_corpus(tmp_path / "corpus.parquet", model_a, tmp_path / "emb",
                        EncodeConfig(batch_size=16, num_actors=1, cpus_per_actor=0.5, bf16="false", rows_per_shard=90))
    ids, emb = load_embeddings(out)
    ids0, emb0 = load_embeddings(encoded)
    assert ids == ids0 and len(list(out.glob("part-*.parquet"))) == 3
    np.testing.assert_allclose(emb, emb0, atol=1e-5)
    # A part rewritten with rows of another shard is caught when reading, not silently used.
    shutil.copy(out / "part-00001.parquet", tmp_path / "part1.bak")
    shutil.copy(out / "part-00000.parquet", out / "part-00001.parquet")
    with pytest.raises(DataError, match="rows are not 90..179"):
        load_embeddings(out)
    # A part cut short (a disk filled up, a copy interrupted) is named, with what to do, not an ArrowInvalid.
    shutil.copy(tmp_path / "part1.bak", out / "part-00001.parquet")
    whole = (out / "part-00002.parquet").read_bytes()
    (out / "part-00002.parquet").write_bytes(whole[: len(whole) // 2])
    with pytest.raises(DataError, match=r"part-00002\.parquet is not a readable Parquet file .* delete it and rerun"):
        list(iter_embeddings(out))
    # An empty completion record means "not complete", for readers and for the job itself.
    (out / "_SUCCESS.json").write_text("")
    with pytest.raises(DataError, match="an empty or damaged _SUCCESS.json"):
        load_embeddings(out)


def test_encode_texts_equals_in_process(ray_session, model_a, mini_data_dir):
    queries = load_queries(Path(mini_data_dir) / "queries.jsonl")
    qids = sorted(queries)[:150]
    texts = [queries[q]["text"] for q in qids]
    emb = encode_texts(texts, qids, model_a, CFG, kind="query")
    ref = DualEncoder.load(model_a).encode(texts, "query", batch_size=64, bf16="false")
    np.testing.assert_allclose(emb, ref, atol=1e-5)


def test_retrieval_through_index_matches_exact_search(ray_session, encoded, model_a, mini_data_dir, tmp_path):
    from rocketqa_ray.index import DenseIndex
    from rocketqa_ray.index.build import build_index_from_embeddings
    from rocketqa_ray.retrieval.dense import (
        read_run_parquet,
        retrieve,
        write_run_parquet,
        write_trec,
    )

    index_dir = build_index_from_embeddings(encoded, IndexConfig(kind="flat"), tmp_path / "index")
    index = DenseIndex.load(index_dir, expect_fingerprint=model_fingerprint(model_a))
    ids, emb = load_embeddings(encoded)
    assert list(index.ids) == ids

    qrels = load_qrels(Path(mini_data_dir) / "qrels" / "test.tsv")
    queries = load_queries(Path(mini_data_dir) / "queries.jsonl")
    qids = sorted(qrels)[:40]
    texts = [queries[q]["text"] for q in qids]
    k = 10
    ranked = retrieve(model_a, index, qids, texts, k, cfg=CFG, use_ray=True)

    q_emb = DualEncoder.load(model_a).encode(texts, "query", bf16="false")
    exact = q_emb @ emb.T  # [Q, N] in-process scores
    row_of = {p: j for j, p in enumerate(ids)}
    for i, q in enumerate(qids):
        got = [p for p, _ in ranked[q]]
        assert len(set(got)) == k
        best = np.sort(exact[i])[::-1][:k]
        # Same top-k as exact search (compared by score: a random tiny model makes near-ties common).
        np.testing.assert_allclose([exact[i, row_of[p]] for p in got], best, atol=1e-4)
        np.testing.assert_allclose([s for _, s in ranked[q]], best, atol=1e-4)

    # Hard-negative mining: excluded passages (gold, here also the top two) never appear; k remain.
    exclude = {q: set(qrels[q]) | {p for p, _ in ranked[q][:2]} for q in qids}
    mined = retrieve(model_a, index, qids, texts, k, exclude=exclude, cfg=CFG, use_ray=False)
    for q in qids:
        got = [p for p, _ in mined[q]]
        assert len(got) == k and not set(got) & exclude[q]
        kept = [p for p, _ in ranked[q] if p not in exclude[q]]
        assert got[: len(kept)] == kept  # the same ranking, minus the excluded passages

    path = write_run_parquet(ranked, tmp_path / "run.parquet")
    back = read_run_parquet(path)
    assert list(back) == qids and [p for p, _ in back[qids[0]]] == [p for p, _ in ranked[qids[0]]]
    assert pq.read_table(path).column("rank").to_pylist()[:k] == list(range(1, k + 1))
    trec = write_trec(ranked, tmp_path / "run.trec").read_text().splitlines()
    assert len(trec) == k * len(qids) and trec[0].split()[3] == "1"


# ------------------------------------------------------------------------------------------- bad input
def test_passage_without_text_names_its_id(corpus200, model_a, tmp_path):
    lines = corpus200.read_text(encoding="utf-8").splitlines()[:20]
    bad = json.loads(lines[7])
    bad["text"] = "  "
    lines[7] = json.dumps(bad)
    (tmp_path / "bad.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(DataError, match=rf"passage '{bad['_id']}' has no 'text'"):
        encode_corpus(tmp_path / "bad.jsonl", model_a, tmp_path / "out", CFG)
    assert not (tmp_path / "out" / "_SUCCESS.json").exists()


def test_duplicate_passage_ids_are_refused(corpus200, model_a, tmp_path):
    lines = corpus200.read_text(encoding="utf-8").splitlines()[:20]
    lines.append(lines[3])
    (tmp_path / "dup.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    dup = json.loads(lines[3])["_id"]
    with pytest.raises(DataError, match=rf"duplicate passage id '{dup}' \(passage #21\)"):
        encode_corpus(tmp_path / "dup.jsonl", model_a, tmp_path / "out", CFG)


def test_empty_corpus(model_a, tmp_path):
    (tmp_path / "empty.jsonl").write_text("\n", encoding="utf-8")
    with pytest.raises(DataError, match="the corpus is empty"):
        encode_corpus(tmp_path / "empty.jsonl", model_a, tmp_path / "out", CFG)
    pq.write_table(pa.table({"_id": pa.array([], pa.string()), "text": pa.array([], pa.string())}),
                   tmp_path / "empty.parquet")
    with pytest.raises(DataError, match="the corpus is empty"):
        encode_corpus(tmp_path / "empty.parquet", model_a, tmp_path / "out", CFG)
    with pytest.raises(DataError, match="no texts to encode"):
        encode_texts([], [], model_a, CFG)


def test_missing_corpus_and_model(model_a, tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        encode_corpus(tmp_path / "nope.jsonl", model_a, tmp_path / "out", CFG)
    with pytest.raises(ConfigError, match="not a saved model folder"):
        encode_corpus(tmp_path / "nope.jsonl", tmp_path, tmp_path / "out", CFG)


def test_index_or_embeddings_from_another_model(encoded, corpus200, model_a, model_b, tmp_path):
    from rocketqa_ray.index import DenseIndex
    from rocketqa_ray.index.build import build_index_from_embeddings
    from rocketqa_ray.retrieval.dense import retrieve

    assert model_fingerprint(model_a) != model_fingerprint(model_b)
    index_dir = build_index_from_embeddings(encoded, IndexConfig(kind="flat"), tmp_path / "index")
    with pytest.raises(ConfigError, match="built with another model"):
        DenseIndex.load(index_dir, expect_fingerprint=model_fingerprint(model_b))
    index = DenseIndex.load(index_dir)
    with pytest.raises(ConfigError, match=r"the index was built with another model .* rebuild the index"):
        retrieve(model_b, index, ["q1"], ["who founded the archive"], 5, cfg=CFG, use_ray=False)
    # Resuming model A's encoding directory with model B would mix two models' vectors: refused.
    out = tmp_path / "emb"
    shutil.copytree(encoded, out)
    with pytest.raises(ConfigError, match=r"holds the output of a different job \(model_fingerprint"):
        encode_corpus(corpus200, model_b, out, CFG)
    with pytest.raises(ConfigError, match="rows_per_shard: 64 there, 50 now"):
        encode_corpus(corpus200, model_a, out, EncodeConfig(rows_per_shard=50, bf16="false"))
