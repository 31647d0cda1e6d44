"""The corpus's BM25 statistics counted by Ray Data (batch.bm25_stats) equal the in-process count over the same
passages, term by term, so the fusion's BM25 feature per pair equals bm25s's (tests/retrieval/test_bm25_stats.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from rocketqa_ray.batch.bm25_stats import count_corpus_stats
from rocketqa_ray.batch.corpus import ingest_corpus
from rocketqa_ray.data.beir import iter_corpus, passage_text
from rocketqa_ray.errors import DataError
from rocketqa_ray.retrieval.bm25_stats import CorpusStats, PairScorer

MINI = Path(__file__).resolve().parents[2] / "data" / "squad-mini" / "corpus.jsonl"


@pytest.mark.parametrize("stem", [False, True])
def test_ray_data_counts_equal_the_in_process_count(ray_session, tmp_path, stem):
    ingest_corpus(MINI, tmp_path / "c", chunk_mb=0.25)  # several parts, several batches per part
    got = count_corpus_stats(tmp_path / "c", stem, tmp_path / "stats", batch_size=300)
    texts = [passage_text(p["title"], p["text"]) for p in iter_corpus(MINI)]
    ref = CorpusStats.from_texts(texts, stem=stem)
    assert (got.n_docs, got.total_len, got.stem) == (ref.n_docs, ref.total_len, stem)
    assert got.df == ref.df and len(got.df) > 1000
    assert CorpusStats.load(tmp_path / "stats").df == ref.df  # what the service loads
    q = "who designed the first telescope"
    assert PairScorer(got, 0.9, 0.4).score(q, texts[:50]).tolist() == PairScorer(ref, 0.9, 0.4).score(q, texts[:50]).tolist()


def test_an_incomplete_store_is_refused(ray_session, tmp_path):
    (tmp_path / "c").mkdir()
    with pytest.raises(DataError, match="not a complete corpus store"):
        count_corpus_stats(tmp_path / "c", False, tmp_path / "stats")
