"""BM25 of a given (question, passage) pair from corpus statistics, without a BM25 index (Ray-free).

The reranker's fusion weighs each candidate's BM25 score. Scoring it with a bm25s index means holding the whole
corpus's postings in one process and scoring every passage for every question (`get_scores`), which no process
can do at a billion passages. Lucene's BM25 of one pair needs only the passage's own tokens and three corpus
statistics: the number of passages, their mean length and each term's document frequency. Those are what
`CorpusStats` holds; its size grows with the vocabulary, not with the corpus, and partial statistics of corpus
shards add up (`merge`), so they can be counted shard by shard in parallel. Scores equal bm25s's "lucene" method
(tested), with the same tokenizer (English stopwords, optional Snowball stemmer).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from rocketqa_ray.errors import DataError
from rocketqa_ray.io import atomic_path, read_json, write_json

STATS_DIR = "bm25_stats"  # in a RUN_DIR: the statistics of its corpus (the pipeline writes, the service reads)
META = "bm25_stats.json"
TERMS = "bm25_df.parquet"


class Tokenizer:
    """bm25s's tokenizer as the BM25 baseline uses it: lower case, words of 2+ characters, English stopwords
    removed, Snowball-stemmed when `stem`."""

    def __init__(self, stem: bool = False):
        self.stem = stem
        self.stemmer = None
        if stem:
            import Stemmer

            self.stemmer = Stemmer.Stemmer("english")

    def __call__(self, texts: Sequence[str]) -> list[list[str]]:
        import bm25s

        if not texts:
            return []
        return bm25s.tokenize(list(texts), stopwords="en", stemmer=self.stemmer, return_ids=False,
                              show_progress=False)


@dataclass
class CorpusStats:
    """What Lucene's BM25 needs of a corpus: passage count, total length (tokens) and document frequencies."""

    stem: bool = False
    n_docs: int = 0
    total_len: int = 0
    df: Counter = field(default_factory=Counter)

    @property
    def avgdl(self) -> float:
        return self.total_len / self.n_docs if self.n_docs else 0.0

    def add(self, tokens: Iterable[list[str]]) -> CorpusStats:
        """Count tokenized passages in (a shard's pass)."""
        for toks in tokens:
            self.n_docs += 1
            self.total_len += len(toks)
            self.df.update(set(toks))
        return self

    def merge(self, other: CorpusStats) -> CorpusStats:
        """The statistics of both corpora together (shards counted apart add up)."""
        if other.stem != self.stem:
            raise ValueError("cannot merge statistics of stemmed and unstemmed tokens")
        self.n_docs += other.n_docs
        self.total_len += other.total_len
        self.df.update(other.df)
        return self

    def idf(self, term: str) -> float:
        df = self.df.get(term, 0)
        return math.log(1 + (self.n_docs - df + 0.5) / (df + 0.5))

    def score(self, query: list[str], passage: list[str], k1: float, b: float) -> float:
        """Lucene BM25 of one tokenized passage for one tokenized question (a repeated question term counts each
        time, a term no passage has counts 0: as bm25s)."""
        if not query or not passage or not self.n_docs:
            return 0.0
        tf = Counter(passage)
        norm = k1 * ((1 - b) + b * len(passage) / self.avgdl)
        total = 0.0
        for t in query:
            f = tf.get(t, 0)
            if f and t in self.df:
                total += self.idf(t) * f / (norm + f)
        return total

    def save(self, out_dir: str | Path) -> Path:
        import pyarrow as pa
        import pyarrow.parquet as pq

        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        terms = sorted(self.df)
        table = pa.table({"term": terms, "df": pa.array([self.df[t] for t in terms], pa.int64())})
        with atomic_path(out / TERMS, suffix=".parquet") as tmp:
            pq.write_table(table, tmp)
        write_json(out / META, {"stem": self.stem, "n_docs": self.n_docs, "total_len": self.total_len,
                                "terms": len(terms)})
        return out

    @classmethod
    def load(cls, out_dir: str | Path) -> CorpusStats:
        import pyarrow.parquet as pq

        out = Path(out_dir)
        if not (out / META).exists() or not (out / TERMS).exists():
            raise DataError(f"{out}: no BM25 corpus statistics ({META} and {TERMS}); build them with "
                            "CorpusStats.from_texts(...).save(dir)")
        meta = read_json(out / META)
        t = pq.read_table(out / TERMS)
        df = Counter(dict(zip(t.column("term").to_pylist(), t.column("df").to_pylist())))
        if len(df) != meta["terms"]:
            raise DataError(f"{out / TERMS}: {len(df)} terms, {meta['terms']} expected; rebuild the statistics")
        return cls(bool(meta["stem"]), int(meta["n_docs"]), int(meta["total_len"]), df)

    @classmethod
    def from_texts(cls, texts: Iterable[str], stem: bool = False, batch: int = 4096) -> CorpusStats:
        """Count a corpus streamed in batches (memory: the vocabulary and one batch)."""
        tok = Tokenizer(stem)
        stats = cls(stem)
        chunk: list[str] = []
        for text in texts:
            chunk.append(text)
            if len(chunk) >= batch:
                stats.add(tok(chunk))
                chunk = []
        if chunk:
            stats.add(tok(chunk))
        return stats


class PairScorer:
    """BM25 of (question, passage text) pairs from `CorpusStats`: the fusion's lexical feature, per candidate."""

    def __init__(self, stats: CorpusStats, k1: float, b: float):
        self.stats, self.k1, self.b = stats, k1, b
        self.tokenize = Tokenizer(stats.stem)

    def score(self, query: str, passages: Sequence[str]) -> np.ndarray:
        """float32 [n]: each passage's BM25 for `query`."""
        q = self.tokenize([query])[0] if query else []
        docs = self.tokenize(passages)
        return np.array([self.stats.score(q, d, self.k1, self.b) for d in docs], dtype=np.float32)

    def score_pairs(self, pairs: Sequence[tuple[str, str]], query_text: dict[str, str],
                    passage_text) -> np.ndarray:
        """float32 [N] for (qid, pid) pairs; `passage_text(pid)` gives a passage's text (title and text)."""
        by_q: dict[str, list[int]] = {}
        for i, (q, _) in enumerate(pairs):
            by_q.setdefault(q, []).append(i)
        out = np.zeros(len(pairs), dtype=np.float32)
        for q, rows in by_q.items():
            out[rows] = self.score(query_text[q], [passage_text(pairs[i][1]) for i in rows])
        return out
