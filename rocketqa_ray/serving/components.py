"""The service's Ray-free components, one per Serve deployment (serve/app.py wraps each one):

    QueryEncoderCore.encode(queries)            -> [B, H] float32 query embeddings
    RetrieverCore.search(emb, k, queries)        -> per query, k hits {id, title, text, score[, bm25]}
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
        from rocketqa_ray.modeling.base import model_fingerprint
        from rocketqa_ray.modeling.dual_encoder import DualEncoder

        self.model_dir = Path(model_dir)
        self.model = DualEncoder.load(self.model_dir)
        self.model.eval()
        self.bf16 = bf16
        self.device = device
        self.fingerprint = model_fingerprint(self.model_dir)

    @property
    def dim(self) -> int:
        return self.model.dim

    def encode(self, queries: list[str]) -> np.ndarray:
        """list of B query strings -> float32 [B, H] (same call as the offline pipeline's query encoding)."""
        return self.model.encode(queries, kind="query", batch_size=max(1, len(queries)), bf16=self.bf16,
                                 device=self.device)


class PassageStore:
    """id -> (title, text) for the passages in the index, read once from the corpus."""

    def __init__(self, corpus_path: str | Path, ids: list[str]):
        wanted = set(ids)
        self._rows: dict[str, tuple[str, str]] = {}
        for p in iter_corpus(corpus_path):
            if p["_id"] in wanted:
                self._rows[p["_id"]] = (p["title"], p["text"])
        missing = wanted.difference(self._rows)
        if missing:
            example = sorted(missing)[:3]
            raise ServiceError(
                f"{corpus_path}: {len(missing)} passage id(s) of the index are not in the corpus (e.g. {example}); "
                "the index was built from another corpus than config data.path")

    def __len__(self) -> int:
        return len(self._rows)

    def get(self, pid: str) -> tuple[str, str]:
        return self._rows[pid]


class RetrieverCore:
    """A saved DenseIndex plus the passage texts; refuses an index built with another model. With `bm25`, each
    hit also carries its BM25 score for the question (a feature of the reranker's fusion), from corpus statistics
    (`retrieval.bm25_stats`)."""

    def __init__(self, index_dir: str | Path, corpus_path: str | Path, expect_dim: int | None = None,
                 expect_fingerprint: str | None = None, index_cfg: IndexConfig | None = None,
                 bm25: BM25Config | None = None, bm25_stats: str | Path | None = None):
        from rocketqa_ray.index import DenseIndex

        # index_cfg: the run's search-time knobs (nprobe, ef_search, use_gpu); the structure is the saved one.
        self.index = DenseIndex.load(index_dir, expect_dim=expect_dim, expect_fingerprint=expect_fingerprint,
                                     cfg=index_cfg)
        self.store = PassageStore(corpus_path, list(self.index.ids))
        self.lexical = None
        if bm25 is not None:
            # BM25 per hit from corpus statistics (bm25_stats: the run's, else counted here): no BM25 index
            from rocketqa_ray.retrieval.bm25_stats import CorpusStats, PairScorer

            stats = None
            if bm25_stats is not None and (Path(bm25_stats) / "bm25_stats.json").exists():
                stats = CorpusStats.load(bm25_stats)
            if stats is None or stats.stem != bm25.stem:
                stats = CorpusStats.from_texts((passage_text(*self.store.get(p)) for p in self.index.ids), bm25.stem)
            self.lexical = PairScorer(stats, bm25.k1, bm25.b)

    @property
    def size(self) -> int:
        return len(self.index.ids)

    def info(self) -> dict[str, Any]:
        return {"kind": self.index.kind, "size": self.size, "dim": int(self.index.dim)}

    def search(self, emb: np.ndarray, k: int, queries: list[str] | None = None) -> list[list[dict]]:
        """[B, H] query embeddings -> B lists of up to k hits {id, title, text, score}, best first; with a BM25
        index and the B query strings, each hit also has its `bm25` score."""
        emb = np.ascontiguousarray(np.atleast_2d(emb), dtype=np.float32)
        scores, rows = self.index.search(emb, min(k, self.size))
        out = []
        for srow, rrow in zip(scores, rows):
            hits = []
            for s, r in zip(srow, rrow):
                if r < 0:
                    continue
                pid = self.index.ids[int(r)]
                title, text = self.store.get(pid)
                hits.append({"id": pid, "title": title, "text": text, "score": float(s)})
            out.append(hits)
        if self.lexical is not None and queries is not None:
            for q, hits in zip(queries, out):
                for h, v in zip(hits, self.lexical.score(q, [passage_text(h["title"], h["text"]) for h in hits])):
                    h["bm25"] = float(v)
        return out


class RerankerCore:
    """The cross-encoder M_C: probability that a passage answers the question."""

    def __init__(self, model_dir: str | Path, bf16: str = "auto", device: str | None = None, batch_size: int = 64):
        from rocketqa_ray.modeling.cross_encoder import CrossEncoder

        self.model_dir = Path(model_dir)
        self.model = CrossEncoder.load(self.model_dir)
        self.model.eval()
        self.bf16 = bf16
        self.device = device
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
