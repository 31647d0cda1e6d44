"""BM25 baseline on a hand-made corpus: the relevant passage ranks first; stemming matches word forms."""

from __future__ import annotations

import numpy as np
import pytest

from rocketqa_ray.errors import DataError
from rocketqa_ray.retrieval.bm25 import BM25Retriever

CORPUS = {
    "p_darwin": {"title": "Charles Darwin", "text": "Darwin wrote On the Origin of Species about natural selection."},
    "p_paris": {"title": "Paris", "text": "Paris is the capital of France and its largest city."},
    "p_volcano": {"title": "Volcanoes", "text": "Volcanoes erupt when magma rises through the crust."},
    "p_bees": {"title": "Honey bee", "text": "A bee colony produces honey from flower nectar."},
    "p_rivers": {"title": "Rhine", "text": "The Rhine river flows from the Alps to the North Sea."},
}


def test_relevant_passage_ranks_first():
    bm25 = BM25Retriever.from_corpus(CORPUS)
    queries = ["who wrote origin of species", "what is the capital of france", "where does the rhine flow"]
    idx, scores = bm25.search(queries, k=3)
    assert idx.shape == (3, 3) and scores.shape == (3, 3)
    assert [bm25.ids[i] for i in idx[:, 0]] == ["p_darwin", "p_paris", "p_rivers"]
    assert np.all(np.diff(scores, axis=1) <= 0)  # best first
    assert scores[0, 0] > scores[0, 1]


def test_title_is_searched():
    bm25 = BM25Retriever.from_corpus(CORPUS)
    idx, _ = bm25.search(["honey bee"], k=1)
    assert bm25.ids[idx[0, 0]] == "p_bees"


def test_k_capped_at_corpus_size():
    bm25 = BM25Retriever.from_corpus(CORPUS)
    idx, scores = bm25.search(["paris"], k=100)
    assert idx.shape == (1, len(CORPUS))
    assert sorted(idx[0].tolist()) == list(range(len(CORPUS)))


def test_stemming_matches_word_forms():
    # "erupting volcano" shares no exact token with the volcano passage ("erupt", "volcanoes") except via stems.
    plain = BM25Retriever.from_corpus(CORPUS)
    stemmed = BM25Retriever.from_corpus(CORPUS, stem=True)
    _, s_plain = plain.search(["erupting volcano"], k=1)
    idx, s_stem = stemmed.search(["erupting volcano"], k=1)
    assert s_plain[0, 0] == 0.0  # nothing matched without stemming
    assert stemmed.ids[idx[0, 0]] == "p_volcano" and s_stem[0, 0] > 0


def test_stopwords_ignored():
    bm25 = BM25Retriever.from_corpus(CORPUS)
    _, scores = bm25.search(["the of and is"], k=1)
    assert scores[0, 0] == 0.0


def test_pair_scores_equal_the_search_scores():
    bm25 = BM25Retriever.from_corpus(CORPUS, stem=True)
    queries = {"q1": "who wrote origin of species", "q2": "erupting volcano in the crust"}
    idx, scores = bm25.search(list(queries.values()), k=len(CORPUS))
    for row, q in enumerate(queries):
        pids = [bm25.ids[i] for i in idx[row]]
        np.testing.assert_allclose(bm25.score(queries[q], pids), scores[row], rtol=1e-6)
    pairs = [("q1", "p_darwin"), ("q2", "p_volcano"), ("q1", "p_paris")]
    got = bm25.score_pairs(pairs, queries)
    assert got[0] > 0 and got[1] > 0 and got[2] == 0.0
    assert got[0] == bm25.score(queries["q1"], ["p_darwin"])[0]


def test_pair_scores_of_stopword_queries_and_unknown_ids():
    bm25 = BM25Retriever.from_corpus(CORPUS)
    assert bm25.score("what is the", ["p_paris", "p_bees"]).tolist() == [0.0, 0.0]
    with pytest.raises(DataError, match="not in the indexed corpus"):
        bm25.score("paris", ["p_paris", "nope"])
