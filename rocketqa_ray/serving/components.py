"""The service's Ray-free components, one per Serve deployment (serve/app.py wraps each one):

    QueryEncoderCore.encode(queries)            -> [B, H] float32 query embeddings
    RetrieverCore.answer(emb, k, queries)        -> its shards' (scores, global rows, per query k hits {id, title,
                                                    text, score[, bm25]}); merge_hits joins several shards' answers
    RerankerCore.score_many([(query, passages)]) -> per request, [n] cross-encoder probabilities
    combine(...)                                 -> the response's result list
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from rocketqa_ray.config import BM25Config, IndexConfig
from rocketqa_ray.data.beir import iter_corpus, passage_text
from rocketqa_ray.errors import ServiceError

T = TypeVar("T")
R = TypeVar("R")


def set_torch_threads(n: int | None) -> None:
    """Each Serve replica gets a fraction of a CPU; without a cap every replica's torch would use every core."""
    if n:
        import torch

        torch.set_num_threads(int(n))


# ------------------------------------------------------------------------------------------ components
class QueryEncoderCore:
    """The dual encoder's query tower."""

    def __init__(self, model_dir: str | Path, bf16: str = "auto", device: str | None = None):
        import torch

        from rocketqa_ray.modeling.base import default_device, for_inference, model_fingerprint
        from rocketqa_ray.modeling.dual_encoder import DualEncoder

        self.model_dir = Path(model_dir)
        self.device = torch.device(device) if device else default_device()
        self.model = for_inference(DualEncoder.load(self.model_dir), bf16, self.device)
        self.bf16 = bf16
        self.fingerprint = model_fingerprint(self.model_dir)

    @property
    def dim(self) -> int:
        return self.model.dim

    def encode(self, queries: list[str]) -> np.ndarray:
        """list of B query strings -> float32 [B, H] (same call as the offline pipeline's query encoding)."""
        return self.model.encode(queries, kind="query", batch_size=max(1, len(queries)), bf16=self.bf16,
                                 device=self.device)


class RetrieverCore:
    """Consecutive shards of a saved index (all of them by default) with their passages' texts: one Retriever
    replica's share of the corpus. Hits carry their global row, so several cores' answers merge (`merge_hits`) into
    what one core over every shard returns. Refuses an index built with another model. With `bm25`, each hit also
    carries its BM25 score for the question (a feature of the reranker's fusion), from corpus statistics
    (`retrieval.bm25_stats`): no BM25 index, O(hits) per request."""

    def __init__(self, index_dir: str | Path, corpus_path: str | Path, expect_dim: int | None = None,
                 expect_fingerprint: str | None = None, index_cfg: IndexConfig | None = None,
                 bm25: BM25Config | None = None, bm25_stats: str | Path | None = None,
                 shards: Sequence[int] | None = None, store_dir: str | Path | None = None, threads: int = 1):
        from rocketqa_ray.index.searcher import ShardSearcher
        from rocketqa_ray.index.store import read_meta
        from rocketqa_ray.serving.texts import ShardTexts

        # index_cfg: the run's search-time knobs (nprobe, ef_search, use_gpu); the structure is the saved one.
        meta = read_meta(index_dir, expect_dim=expect_dim, expect_fingerprint=expect_fingerprint)
        shards = list(shards) if shards is not None else list(range(len(meta["files"])))
        self.searcher = ShardSearcher(index_dir, shards, index_cfg, expect_fingerprint, threads)
        self.total, self.metric = int(meta["ntotal"]), self.searcher.metric
        self.texts = ShardTexts.load(self.searcher.ids, self.searcher.first_row, store_dir, corpus_path)
        self.lexical = None
        if bm25 is not None:
            from rocketqa_ray.retrieval.bm25_stats import PairScorer

            self.lexical = PairScorer(corpus_stats(bm25, bm25_stats, store_dir, corpus_path), bm25.k1, bm25.b)

    @property
    def size(self) -> int:
        """Passages in the whole index (every shard), which bounds a request's top_k."""
        return self.total

    def info(self) -> dict[str, Any]:
        s = self.searcher
        return {"kind": s.kind, "size": self.size, "dim": int(s.dim), "shards": s.shards, "held": s.ntotal,
                "metric": self.metric}

    def answer(self, emb: np.ndarray, k: int, queries: list[str] | None = None) -> ShardAnswer:
        """[B, H] query embeddings -> (scores [B, k], global rows [B, k], B lists of up to k hits {id, title, text,
        score[, bm25]}) from this core's shards, best first."""
        emb = np.ascontiguousarray(np.atleast_2d(emb), dtype=np.float32)
        scores, rows, ids = self.searcher.search(emb, min(k, self.searcher.ntotal))
        out = []
        for srow, rrow, names in zip(scores, rows, ids):
            hits = []
            for s, r, pid in zip(srow[rrow >= 0], rrow[rrow >= 0], names):
                title, text = self.texts.get(int(r) - self.searcher.first_row)
                hits.append({"id": pid, "title": title, "text": text, "score": float(s)})
            out.append(hits)
        if self.lexical is not None and queries is not None:
            for q, hits in zip(queries, out):
                for h, v in zip(hits, self.lexical.score(q, [passage_text(h["title"], h["text"]) for h in hits])):
                    h["bm25"] = float(v)
        return scores, rows, out

    def search(self, emb: np.ndarray, k: int, queries: list[str] | None = None) -> list[list[dict]]:
        """[B, H] query embeddings -> B lists of up to k hits {id, title, text, score[, bm25]}, best first."""
        return self.answer(emb, k, queries)[2]


ShardAnswer = tuple[np.ndarray, np.ndarray, list[list[dict]]]  # one core's (scores, global rows, hits) per query


def merge_hits(answers: Sequence[ShardAnswer], k: int, metric: str) -> list[list[dict]]:
    """Per query, the best `k` hits over several cores' answers (given in shard order): ties fall as one index over
    every shard breaks them, so a sharded service returns exactly what an unsharded one does."""
    from rocketqa_ray.index.search import merge_topk

    if len(answers) == 1:
        return [hits[:k] for hits in answers[0][2]]
    n = len(answers[0][2])
    scores, rows = merge_topk([(s, r) for s, r, _ in answers], k, metric, n_queries=n)
    out = []
    for i in range(n):
        by_row = {int(r): h for _, a_rows, a_hits in answers for r, h in zip(a_rows[i][a_rows[i] >= 0], a_hits[i])}
        out.append([by_row[int(r)] for r in rows[i] if r >= 0])
    return out


def corpus_stats(bm25: BM25Config, saved: str | Path | None, store_dir: str | Path | None,
                 corpus_path: str | Path) -> Any:
    """The corpus's BM25 statistics: the run's saved ones when they match `bm25.stem`, else counted here from one
    streamed pass over the whole corpus (memory: the vocabulary), so every shard scores with the same statistics."""
    from rocketqa_ray.data import corpus_store
    from rocketqa_ray.retrieval.bm25_stats import META, CorpusStats

    if saved is not None and (Path(saved) / META).exists():
        stats = CorpusStats.load(saved)
        if stats.stem == bm25.stem:
            return stats
    if store_dir is not None and corpus_store.record(store_dir) is not None:
        texts = (passage_text(t, x) for part in corpus_store.iter_parts(store_dir, ["title", "text"])
                 for t, x in zip(part.column("title").to_pylist(), part.column("text").to_pylist()))
    else:
        texts = (passage_text(p["title"], p["text"]) for p in iter_corpus(corpus_path))
    return CorpusStats.from_texts(texts, bm25.stem)


class RerankerCore:
    """The cross-encoder M_C: probability that a passage answers the question."""

    def __init__(self, model_dir: str | Path, bf16: str = "auto", device: str | None = None, batch_size: int = 64):
        import torch

        from rocketqa_ray.modeling.base import default_device, for_inference
        from rocketqa_ray.modeling.cross_encoder import CrossEncoder

        self.model_dir = Path(model_dir)
        self.device = torch.device(device) if device else default_device()
        self.model = for_inference(CrossEncoder.load(self.model_dir), bf16, self.device)
        self.bf16 = bf16
        self.batch_size = batch_size

    def score_many(self, requests: list[tuple[str, list[str]]]) -> list[np.ndarray]:
        """[(query, [n_i passage strings])] -> [n_i] probabilities per request, scored as one flat batch."""
        qs = [q for q, ps in requests for _ in ps]
        ps = [p for _, pl in requests for p in pl]
        if not qs:
            return [np.zeros(0, dtype=np.float32) for _ in requests]
        flat = self.model.score(qs, ps, batch_size=self.batch_size, bf16=self.bf16, device=self.device)
        out, start = [], 0
        for _, pl in requests:
            out.append(flat[start : start + len(pl)])
            start += len(pl)
        return out


def isolated(fn: Callable[[list[T]], Sequence[R]], items: list[T]) -> list[R | Exception]:
    """`fn` over a batch of requests; if the batch fails, over each request alone, so that a request that breaks
    the model fails only itself: its slot holds the exception (re-raised for that caller), the others their result."""
    try:
        return list(fn(items))
    except Exception:  # noqa: BLE001 - which request caused it is found below, one by one
        out: list[R | Exception] = []
        for item in items:
            try:
                out.append(fn([item])[0])
            except Exception as e:  # noqa: BLE001 - handed to the request that caused it
                out.append(e)
        return out


def candidate_depth(top_k: int, rerank: bool, rerank_top_k: int, index_size: int) -> int:
    """How many passages to retrieve: the reranker sees at least `rerank_top_k` of them."""
    k = max(top_k, rerank_top_k) if rerank else top_k
    return min(k, index_size)


def rerank_texts(hits: list[dict]) -> list[str]:
    """What the cross-encoder sees for each hit (the same text the pipeline scored)."""
    return [passage_text(h["title"], h["text"]) for h in hits]


def combine(hits: list[dict], top_k: int, ce_scores: np.ndarray | None = None, fusion: dict | None = None) -> list[dict]:
    """Final results, best first: reranked by cross-encoder probability when given, or by its fusion with
    the dense (and BM25) score (`retrieval.fusion`, as the pipeline's rerank stages) when `fusion` is given; the
    dense and cross-encoder scores are kept in each hit."""
    out = [dict(h, dense_score=h["score"]) for h in hits]
    if ce_scores is not None:
        final = np.asarray(ce_scores, dtype=np.float64)
        if fusion and len(out):
            from rocketqa_ray.retrieval.fusion import Fusion, fuse_hits

            try:
                final = fuse_hits(final, out, Fusion.from_dict(fusion))
            except ValueError as e:
                raise ServiceError(f"{e} (build RetrieverCore with the run's bm25 config)") from None
        for h, s, c in zip(out, final, ce_scores):
            h["score"] = float(s)
            h["ce_score"] = float(c)
        # Stable sort: equal cross-encoder scores keep the retriever's order.
        order = sorted(range(len(out)), key=lambda i: -out[i]["score"])
        out = [out[i] for i in order]
    return out[:top_k]
