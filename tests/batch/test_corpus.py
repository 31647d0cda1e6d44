"""Reading the corpus into a store with Ray tasks (batch.corpus): the same passages in the same order as the file,
a malformed line or a duplicate id named by file and line, qrels ids checked against the store."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rocketqa_ray.batch.corpus import ingest_corpus, missing_ids
from rocketqa_ray.batch.encode import encode_corpus, load_embeddings
from rocketqa_ray.config import EncodeConfig
from rocketqa_ray.data import corpus_store as store
from rocketqa_ray.data.beir import iter_corpus
from rocketqa_ray.errors import DataError

MINI = Path(__file__).resolve().parents[2] / "data" / "squad-mini" / "corpus.jsonl"


def test_store_equals_the_file_and_resumes(ray_session, tmp_path):
    rec = ingest_corpus(MINI, tmp_path / "c", chunk_mb=0.25)
    assert len(rec["part_rows"]) > 3, "several parallel ranges"
    rows = [r for t in store.iter_parts(tmp_path / "c") for r in t.to_pylist()]
    ref = list(iter_corpus(MINI))
    assert [(r["id"], r["title"], r["text"]) for r in rows] == [(p["_id"], p["title"], p["text"]) for p in ref]
    assert rec["n_rows"] == len(ref)
    mtime = (tmp_path / "c" / store.SUCCESS).stat().st_mtime_ns
    assert ingest_corpus(MINI, tmp_path / "c", chunk_mb=0.25) == rec
    assert (tmp_path / "c" / store.SUCCESS).stat().st_mtime_ns == mtime, "an unchanged file is not read again"
    assert missing_ids(tmp_path / "c", {ref[0]["_id"], ref[-1]["_id"], "absent"}) == {"absent"}


def test_encoding_from_the_store_equals_encoding_the_file(ray_session, tmp_path, tiny_model_dir):
    ingest_corpus(MINI, tmp_path / "c", chunk_mb=0.25)
    cfg = EncodeConfig(batch_size=64, num_actors=1, cpus_per_actor=0.5, bf16="false", rows_per_shard=700)
    a_ids, a = load_embeddings(encode_corpus(tmp_path / "c", tiny_model_dir, tmp_path / "e1", cfg))
    b_ids, b = load_embeddings(encode_corpus(MINI, tiny_model_dir, tmp_path / "e2", cfg))
    assert a_ids == b_ids and abs(a - b).max() < 1e-5


def test_bad_corpus_is_named_by_file_and_line(ray_session, tmp_path):
    lines = MINI.read_text().splitlines()
    bad = tmp_path / "corpus.jsonl"
    broken = lines[:]
    broken[1234] = broken[1234][:40]
    bad.write_text("\n".join(broken) + "\n")
    with pytest.raises(DataError, match=rf"^{bad}:1235: malformed JSON"):
        ingest_corpus(bad, tmp_path / "c1", chunk_mb=0.25)
    dup = lines[:]
    dup[1900] = json.dumps({**json.loads(lines[7]), "text": "another text"})
    bad.write_text("\n".join(dup) + "\n")
    pid = json.loads(lines[7])["_id"]
    with pytest.raises(DataError, match=rf"duplicate passage ids \('{pid}' at lines 8 and 1901\)"):
        ingest_corpus(bad, tmp_path / "c2", chunk_mb=0.25)
    bad.write_text("\n\n")
    with pytest.raises(DataError, match="the corpus is empty"):
        ingest_corpus(bad, tmp_path / "c3")
    assert not (tmp_path / "c1").exists() and not (tmp_path / "c2").exists(), "no store from a bad corpus"
