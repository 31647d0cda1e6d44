"""Merging top-k lists from several index shards into one, as a single index over all rows would return them.

Ray-free and index-agnostic: `DenseIndex.search` merges its FAISS shards with it; a sharded searcher (one
process per shard) merges their answers the same way.
"""

from __future__ import annotations

import numpy as np


def worst_score(metric: str) -> np.float32:
    """The padding score of a missing hit: -inf for inner product (higher is better), +inf for L2."""
    return np.float32(-np.inf if metric == "ip" else np.inf)


def offset_rows(scores: np.ndarray, rows: np.ndarray, offset: int, metric: str) -> tuple[np.ndarray, np.ndarray]:
    """One shard's (scores [Q, k], local rows [Q, k]) -> global rows (local + `offset`); faiss's -1 padding stays -1
    with the worst score."""
    s = scores.astype(np.float32, copy=False)
    r = rows.astype(np.int64, copy=False)
    missing = r < 0
    return np.where(missing, worst_score(metric), s), np.where(missing, -1, r + offset)


def merge_topk(parts: list[tuple[np.ndarray, np.ndarray]], k: int, metric: str,
               n_queries: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """The best `k` of several (scores [Q, k_i], rows [Q, k_i]) results for the same Q queries, best first.

    Ties keep the parts' order (a stable sort), which is the order a single index over the concatenated rows
    gives. Fewer than k hits in all: the tail is row -1 with the worst score. `n_queries` sizes the output
    when there are no parts.
    """
    worst = worst_score(metric)
    if not parts:
        return np.full((n_queries, k), worst, np.float32), np.full((n_queries, k), -1, np.int64)
    scores = np.concatenate([s for s, _ in parts], axis=1)
    rows = np.concatenate([r for _, r in parts], axis=1)
    if len(parts) > 1 or scores.shape[1] != k:
        key = -scores if metric == "ip" else scores
        order = np.argsort(key, axis=1, kind="stable")[:, :k]
        scores = np.take_along_axis(scores, order, axis=1)
        rows = np.take_along_axis(rows, order, axis=1)
        if scores.shape[1] < k:
            pad = k - scores.shape[1]
            scores = np.pad(scores, ((0, 0), (0, pad)), constant_values=worst)
            rows = np.pad(rows, ((0, 0), (0, pad)), constant_values=-1)
    return np.ascontiguousarray(scores, np.float32), np.ascontiguousarray(rows, np.int64)
