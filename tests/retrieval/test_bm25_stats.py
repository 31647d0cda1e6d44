"""BM25 per pair from corpus statistics equals bm25s's index (Lucene), on squad-mini; statistics of shards add up."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from rocketqa_ray.data.beir import iter_corpus, load_queries, passage_text
from rocketqa_ray.errors import DataError
from rocketqa_ray.retrieval.bm25 import BM25Retriever
from rocketqa_ray.retrieval.bm25_stats import CorpusStats, PairScorer, Tokenizer


@pytest.fixture(scope="module")
def mini(mini_data_dir):
    corpus = {p["_id"]: passage_text(p["title"], p["text"]) for p in iter_corpus(mini_data_dir)}
    queries = [v["text"] for v in load_queries(Path(mini_data_dir) / "queries.jsonl").values()][:40]
    return corpus, queries


@pytest.mark.parametrize("stem, k1, b", [(False, 0.9, 0.4), (True, 0.9, 0.4), (True, 1.5, 0.75)])
def test_pair_scores_equal_the_bm25s_index(mini, stem, k1, b):
    corpus, queries = mini
    ids = list(corpus)
    index = BM25Retriever(ids, [corpus[i] for i in ids], k1=k1, b=b, stem=stem)
    scorer = PairScorer(CorpusStats.from_texts((corpus[i] for i in ids), stem=stem, batch=500), k1, b)
    rng = np.random.default_rng(0)
    for q in queries:
        top, _ = index.search([q], k=10)
        pids = [ids[j] for j in top[0]] + [ids[j] for j in rng.choice(len(ids), 10, replace=False)]
        expect = index.score(q, pids)
        got = scorer.score(q, [corpus[p] for p in pids])
        np.testing.assert_allclose(got, expect, rtol=1e-5, atol=1e-6)
        assert got[0] > 0


def test_statistics_of_shards_add_up(mini):
    corpus, _ = mini
    texts = list(corpus.values())
    whole = CorpusStats.from_texts(texts)
    parts = [CorpusStats.from_texts(texts[i::3]) for i in range(3)]
    merged = parts[0].merge(parts[1]).merge(parts[2])
    assert (merged.n_docs, merged.total_len, merged.df) == (whole.n_docs, whole.total_len, whole.df)
    assert whole.n_docs == len(texts) and whole.avgdl == pytest.approx(
        np.mean([len(t) for t in Tokenizer()(texts)]))
    with pytest.raises(ValueError, match="stemmed and unstemmed"):
        CorpusStats(stem=True).merge(whole)


def test_save_and_load(mini, tmp_path):
    corpus, queries = mini
    stats = CorpusStats.from_texts(corpus.values(), stem=True)
    back = CorpusStats.load(stats.save(tmp_path / "stats"))
    assert (back.stem, back.n_docs, back.total_len, back.df) == (True, stats.n_docs, stats.total_len, stats.df)
    texts = list(corpus.values())[:5]
    np.testing.assert_array_equal(PairScorer(back, 0.9, 0.4).score(queries[0], texts),
                                  PairScorer(stats, 0.9, 0.4).score(queries[0], texts))
    (tmp_path / "stats" / "bm25_df.parquet").unlink()
    with pytest.raises(DataError, match="no BM25 corpus statistics"):
        CorpusStats.load(tmp_path / "stats")


def test_stopword_only_question_and_unknown_terms_score_zero(mini):
    corpus, _ = mini
    scorer = PairScorer(CorpusStats.from_texts(corpus.values()), 0.9, 0.4)
    texts = list(corpus.values())[:3]
    assert scorer.score("the of and", texts).tolist() == [0.0, 0.0, 0.0]
    assert scorer.score("qwxzzy", texts).tolist() == [0.0, 0.0, 0.0]
    assert scorer.score("", texts).tolist() == [0.0, 0.0, 0.0]
