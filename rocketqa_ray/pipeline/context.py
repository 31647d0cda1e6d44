"""What every stage reads: the dataset, the corpus, the question splits and BM25, each loaded once, when first
needed, and the RUN_DIR's stage folders."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from rocketqa_ray.config import Config
from rocketqa_ray.data.beir import (
    BeirData,
    check_qrels_passages,
    find_corpus,
    load_beir,
    load_qrels,
)
from rocketqa_ray.data.passages import Stored
from rocketqa_ray.data.splits import Splits, split_questions
from rocketqa_ray.errors import ConfigError
from rocketqa_ray.io import read_json_if_valid, write_json
from rocketqa_ray.types import PairScores, Qrels

if TYPE_CHECKING:
    from rocketqa_ray.batch.bm25_stats import BM25Feature
    from rocketqa_ray.batch.search import Searchers
    from rocketqa_ray.retrieval.bm25 import BM25Retriever
    from rocketqa_ray.retrieval.bm25_stats import PairScorer

log = logging.getLogger(__name__)


class Context:
    """Lazy access to one run's data; stages share it, so each piece is loaded at most once per driver."""

    def __init__(self, cfg: Config, run_dir: str | Path):
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self._data: BeirData | None = None
        self._passages: Stored | None = None
        self._said_bm25 = False
        self._splits: Splits | None = None
        self._bm25: BM25Retriever | None = None
        self._pairs: PairScorer | None = None
        self._known: Qrels | None = None
        self._searchers: Searchers | None = None
        self._store: Path | None = None

    @property
    def data(self) -> BeirData:
        """Queries and qrels, checked; the qrels' passage ids are looked up in the corpus store (no set of every
        passage id in the driver)."""
        if self._data is None:
            from rocketqa_ray.batch.corpus import missing_ids

            data = load_beir(self.cfg.data.path, splits=(self.cfg.data.train_split, self.cfg.data.test_split),
                             check_corpus=False)
            store = self.corpus_store
            check_qrels_passages(data, lambda ids: missing_ids(store, ids))
            self._data = data
        return self._data

    @property
    def corpus_store(self) -> Path:
        """RUN_DIR/corpus: the corpus read once by Ray tasks into validated Parquet parts (`batch.corpus`);
        malformed lines and duplicate ids stop the run here, named by file and line."""
        if self._store is None:
            from rocketqa_ray.batch.corpus import ingest_corpus
            from rocketqa_ray.data.corpus_store import STORE_DIR
            from rocketqa_ray.ray_utils import ensure_ray

            ensure_ray(self.cfg.ray)
            out = self.run_dir / STORE_DIR
            ingest_corpus(find_corpus(self.cfg.data.path), out, self.cfg.data.corpus_chunk_mb, self.cfg.ray)
            self._store = out
        return self._store

    @property
    def passages(self) -> Stored:
        """Passage texts from the corpus store, read for the ids asked (`ptexts`): no dict of the corpus."""
        if self._passages is None:
            self._passages = Stored(self.corpus_store)
        return self._passages

    @property
    def splits(self) -> Splits:
        if self._splits is None:
            self._splits = split_questions(self.data, self.cfg.data)
        return self._splits

    @property
    def train_qrels(self) -> dict[str, dict[str, int]]:
        return self.data.split(self.cfg.data.train_split)

    @property
    def test_qrels(self) -> dict[str, dict[str, int]]:
        return self.data.split(self.cfg.data.test_split)

    def ptexts(self, ids: Iterable[str]) -> dict[str, str]:
        """{pid: passage as the encoders see it (title and text)} for these ids, read at once."""
        return self.passages.texts(ids)

    def qtext(self, qid: str) -> str:
        if qid in self.data.queries:
            return self.data.queries[qid]["text"]
        return self.splits.unlabeled_texts[qid]

    @property
    def bm25_fits(self) -> bool:
        """Whether the corpus is small enough (`bm25.max_passages`) for an in-memory BM25 index; when it is not,
        the BM25 reference row, BM25 negatives and the dual encoders' held-out groups are skipped, said once."""
        cap = self.cfg.bm25.max_passages
        fits = cap is None or len(self.passages) <= cap
        if not fits and not self._said_bm25:
            from rocketqa_ray.console import say

            say("bm25: %d passages > bm25.max_passages (%d): no in-memory BM25 index, so no BM25 reference row, no "
                "BM25 negatives and no held-out groups for the dual encoders' early stopping", len(self.passages), cap)
            self._said_bm25 = True
        return fits

    @property
    def bm25(self) -> BM25Retriever:
        """The corpus's BM25 index (`bm25` config section), built once per run of the driver."""
        from rocketqa_ray.retrieval.bm25 import BM25Retriever

        if self._bm25 is None:  # a whole-corpus index in memory: the baseline and BM25 negatives, corpora that fit
            ids, texts = zip(*self.passages.iter_texts())
            self._bm25 = BM25Retriever.from_config(list(ids), list(texts), self.cfg.bm25)
        return self._bm25

    @property
    def bm25_pairs(self) -> PairScorer:
        """BM25 per (question, passage) pair from the corpus's statistics (`retrieval.bm25_stats`), counted once
        and kept in RUN_DIR/bm25_stats for the service (Ray Data, `batch.bm25_stats`); recounted when the corpus file or
        `bm25.stem` changed."""
        from rocketqa_ray.io import describe_file
        from rocketqa_ray.retrieval.bm25_stats import STATS_DIR, CorpusStats, PairScorer

        if self._pairs is None:
            d, b = self.run_dir / STATS_DIR, self.cfg.bm25
            corpus = describe_file(self.data.corpus_path)
            stats = None
            if read_json_if_valid(d / "corpus.json") == corpus:
                stats = CorpusStats.load(d)
            if stats is None or stats.stem != b.stem:  # counted by Ray Data where the store's parts are read
                from rocketqa_ray.batch.bm25_stats import count_corpus_stats

                stats = count_corpus_stats(self.corpus_store, b.stem, d, self.cfg.ray)
                write_json(d / "corpus.json", corpus)
            self._pairs = PairScorer(stats, b.k1, b.b)
        return self._pairs

    def bm25_stats_dir(self) -> Path:
        """RUN_DIR/bm25_stats with the corpus's statistics in it (counted there on first use, as `bm25_pairs` does):
        what the Ray Data flows that score BM25 per pair read."""
        from rocketqa_ray.retrieval.bm25_stats import STATS_DIR

        _ = self.bm25_pairs  # counts or checks the statistics
        return self.run_dir / STATS_DIR

    def bm25_feature(self) -> BM25Feature:
        """Where a flow that scores pairs finds BM25 (the corpus statistics, `bm25_stats_dir`) and its parameters."""
        from rocketqa_ray.batch.bm25_stats import BM25Feature

        return BM25Feature(str(self.bm25_stats_dir()), self.cfg.bm25.k1, self.cfg.bm25.b)

    def bm25_scores(self, pairs: list[tuple[str, str]]) -> PairScores:
        q = {qid: self.qtext(qid) for qid, _ in pairs}
        texts = self.ptexts(p for _, p in pairs)
        return dict(zip(pairs, self.bm25_pairs.score_pairs(pairs, q, texts.__getitem__).tolist()))

    def searchers(self, index_dir: Path, model_dir: Path) -> Searchers:
        """Searcher actors over `index_dir` (one set alive at a time; `close` stops them), checked against the
        query encoder `model_dir`."""
        from rocketqa_ray.batch.search import Searchers
        from rocketqa_ray.modeling.base import model_fingerprint

        fp = model_fingerprint(model_dir)
        if self._searchers is not None and self._searchers.index_dir == Path(index_dir):
            if self._searchers.model_fingerprint not in (None, fp):
                raise ConfigError(f"the index {index_dir} was built with another model than {model_dir}")
            return self._searchers
        self.close()
        self._searchers = Searchers(index_dir, self.cfg.index, expect_fingerprint=fp, ray_cfg=self.cfg.ray)
        return self._searchers

    def close(self) -> None:
        """Stop the searcher actors: between stages their CPUs go back to training and encoding."""
        if self._searchers is not None:
            self._searchers.close()
            self._searchers = None

    def stage_dir(self, name: str) -> Path:
        return self.run_dir / name

    @property
    def known_positives(self) -> Qrels | None:
        """The diagnostic qrels (`data.diagnostic_qrels`), for reports only; None when not configured."""
        if self._known is None and self.cfg.data.diagnostic_qrels:
            from rocketqa_ray.rocketqa.diagnostics import resolve_diagnostic_qrels

            self._known = load_qrels(resolve_diagnostic_qrels(self.cfg.data.diagnostic_qrels, self.cfg.data.path))
        return self._known
