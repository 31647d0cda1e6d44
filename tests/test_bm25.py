"""BM25 baseline on a hand-made corpus: the relevant passage ranks first; stemming matches word forms."""

from __future__ import annotations

import numpy as np

from rocketqa_ray.bm25 import BM25Retriever

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
