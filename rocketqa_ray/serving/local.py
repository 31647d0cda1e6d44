"""The whole search in one process, without Ray: the reference the Serve app is tested and benchmarked
against, and what a notebook uses:

    from rocketqa_ray.serving.local import SearchService
    svc = SearchService.from_run_dir("runs/squad-mini")
    svc.search("who founded the Internet Archive?", top_k=5)
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from rocketqa_ray.config import ServeConfig
from rocketqa_ray.serving.api import rerank_decision, search_response
from rocketqa_ray.serving.artifacts import RunArtifacts, find_artifacts
from rocketqa_ray.serving.components import (
    QueryEncoderCore,
    RerankerCore,
    RetrieverCore,
    candidate_depth,
    merge_hits,
    rerank_texts,
)


class SearchService:
    """The whole search in one process: the reference the Serve app is tested and benchmarked against."""

    def __init__(self, arts: RunArtifacts, serve_cfg: ServeConfig | None = None, device: str | None = None):
        self.arts = arts
        self.serve_cfg = serve_cfg or arts.cfg.serve
        bf16 = arts.cfg.encode.bf16
        self.encoder = QueryEncoderCore(arts.model_dir, bf16=bf16, device=device)
        # the shard groups the Serve app gives its Retriever deployments (`serve.shards_per_retriever`)
        self.retrievers = [
            RetrieverCore(arts.index_dir, arts.corpus_path, expect_dim=self.encoder.dim,
                          expect_fingerprint=self.encoder.fingerprint, index_cfg=arts.cfg.index, bm25=arts.lexical,
                          bm25_stats=arts.bm25_stats, shards=group, store_dir=arts.store_dir)
            for group in arts.shard_groups(self.serve_cfg.shards_per_retriever)]
        self.reranker = RerankerCore(arts.cross_dir, bf16=bf16, device=device) if arts.cross_dir else None
        self.fusion = arts.fusion  # read once: the property reads the cross-encoder's meta file

    @classmethod
    def from_run_dir(cls, run_dir: str | Path, **kw: Any) -> SearchService:
        return cls(find_artifacts(run_dir), **kw)

    def search(self, query: str, top_k: int = 10, rerank: bool | None = None) -> dict[str, Any]:
        """Top `top_k` passages for `query`; `rerank` None follows the run's recorded choice."""
        do_rerank, message = rerank_decision(rerank, self.arts.rerank_default,
                                             self.arts.rerank_message if self.reranker is None else None)
        t0 = time.perf_counter()
        emb = self.encoder.encode([query])
        t1 = time.perf_counter()
        first = self.retrievers[0]
        k = candidate_depth(top_k, do_rerank, self.serve_cfg.rerank_top_k, first.size)
        hits = merge_hits([r.answer(emb, k, [query]) for r in self.retrievers], k, first.metric)[0]
        t2 = time.perf_counter()
        scores = self.reranker.score_many([(query, rerank_texts(hits))])[0] if do_rerank else None
        t3 = time.perf_counter()
        return search_response(hits, top_k, scores, do_rerank, (t0, t1, t2, t3), message, self.fusion)
