"""Hard-negative candidates from a retriever's ranking (steps 2 and 3; Ray-free)."""

from __future__ import annotations

from rocketqa_ray.types import Qrels, RankedIds


def exclude_gold(ranked: RankedIds, qrels: Qrels, top_k: int) -> RankedIds:
    """Top-k candidates per question with its labelled positives removed (the raw, undenoised hard negatives)."""
    return {q: [p for p in ps if p not in qrels.get(q, {})][:top_k] for q, ps in ranked.items()}
