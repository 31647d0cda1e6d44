"""BM25 with bm25s (Lucene scoring, English stopwords, optional Snowball stemming): the lexical reference row
and the per-pair lexical feature of the reranker's fusion."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from rocketqa_ray.data.beir import passage_text
from rocketqa_ray.errors import DataError

if TYPE_CHECKING:
    from rocketqa_ray.config import BM25Config


class BM25Retriever:
    def __init__(self, ids: list[str], texts: list[str], k1: float = 0.9, b: float = 0.4, stem: bool = False):
        import bm25s

        self.ids = list(ids)
        self.row = {pid: i for i, pid in enumerate(self.ids)}
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

    @classmethod
    def from_config(cls, ids: list[str], texts: list[str], cfg: BM25Config) -> BM25Retriever:
        return cls(ids, texts, k1=cfg.k1, b=cfg.b, stem=cfg.stem)

    def _tokens(self, queries: list[str]) -> list[list[str]]:
        import bm25s

        return bm25s.tokenize(queries, stopwords="en", stemmer=self.stemmer, return_ids=False, show_progress=False)

    def search(self, queries: list[str], k: int = 100) -> tuple[np.ndarray, np.ndarray]:
        """-> ([Q, k] row indices into `ids`, [Q, k] scores)."""
        import bm25s

        k = min(k, len(self.ids))
        tokens = bm25s.tokenize(queries, stopwords="en", stemmer=self.stemmer, show_progress=False)
        idx, scores = self.model.retrieve(tokens, k=k, show_progress=False, n_threads=1)
        return np.asarray(idx), np.asarray(scores)

    def score(self, query: str, pids: Sequence[str]) -> np.ndarray:
        """float32 [n]: the BM25 score of each passage in `pids` for `query` (0 for a query of only stopwords)."""
        missing = [p for p in pids if p not in self.row]
        if missing:
            raise DataError(f"BM25: {len(missing)} passage id(s) are not in the indexed corpus (e.g. {missing[0]!r})")
        tokens = self._tokens([query])[0]
        if not tokens:
            return np.zeros(len(pids), dtype=np.float32)
        # bm25s scores the whole corpus for one query: a sparse sum over the query terms' postings
        return self.model.get_scores(tokens)[[self.row[p] for p in pids]].astype(np.float32)

    def score_pairs(self, pairs: Sequence[tuple[str, str]], query_text: dict[str, str]) -> np.ndarray:
        """float32 [N] BM25 scores for (qid, pid) pairs, each question tokenized and scored once."""
        by_q: dict[str, list[int]] = {}
        for i, (q, _) in enumerate(pairs):
            by_q.setdefault(q, []).append(i)
        out = np.zeros(len(pairs), dtype=np.float32)
        for q, rows in by_q.items():
            out[rows] = self.score(query_text[q], [pairs[i][1] for i in rows])
        return out
