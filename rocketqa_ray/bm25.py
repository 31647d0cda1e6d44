"""BM25 baseline with bm25s (Lucene scoring, k1 0.9, b 0.4, English stopwords, optional Snowball stemming)."""

from __future__ import annotations

import numpy as np

from rocketqa_ray.data import passage_text


class BM25Retriever:
    def __init__(self, ids: list[str], texts: list[str], k1: float = 0.9, b: float = 0.4, stem: bool = False):
        import bm25s

        self.ids = list(ids)
        self.stemmer = None
        if stem:
            import Stemmer

            self.stemmer = Stemmer.Stemmer("english")
        tokens = bm25s.tokenize(texts, stopwords="en", stemmer=self.stemmer, show_progress=False)
        self.model = bm25s.BM25(method="lucene", k1=k1, b=b)
        self.model.index(tokens, show_progress=False)

    @classmethod
    def from_corpus(cls, corpus: dict[str, dict], **kw) -> BM25Retriever:
        ids = list(corpus)
        return cls(ids, [passage_text(corpus[i]["title"], corpus[i]["text"]) for i in ids], **kw)

    def search(self, queries: list[str], k: int = 100) -> tuple[np.ndarray, np.ndarray]:
        """-> ([Q, k] row indices into `ids`, [Q, k] scores)."""
        import bm25s

        k = min(k, len(self.ids))
        tokens = bm25s.tokenize(queries, stopwords="en", stemmer=self.stemmer, show_progress=False)
        idx, scores = self.model.retrieve(tokens, k=k, show_progress=False, n_threads=1)
        return np.asarray(idx), np.asarray(scores)
