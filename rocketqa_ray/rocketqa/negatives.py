"""Hard-negative candidates from a retriever's ranking (steps 2 and 3; Ray-free)."""

from __future__ import annotations

import random

from rocketqa_ray.types import Qrels, RankedIds


def exclude_gold(ranked: RankedIds, qrels: Qrels, top_k: int) -> RankedIds:
    """Top-k candidates per question with its labelled positives removed (the raw, undenoised hard negatives)."""
    return {q: [p for p in ps if p not in qrels.get(q, {})][:top_k] for q, ps in ranked.items()}


def sample_negatives(candidates: RankedIds, n: int, seed: int = 0) -> dict[str, list[str]]:
    """n negatives per question drawn uniformly from its candidates (fewer if it has fewer)."""
    rng = random.Random(seed)
    return {q: rng.sample(ps, min(n, len(ps))) for q, ps in sorted(candidates.items())}
