"""Synthetic sentence-embedding-like vectors for index tests and benchmarks."""

from __future__ import annotations

import numpy as np


def mixture(n: int, dim: int, seed: int, n_clusters: int = 50, rank: int = 8) -> np.ndarray:
    """[n, dim] float32 unit vectors from a mixture of low-rank Gaussians (fixed components, `seed` = draw):
    like sentence embeddings, topics with a few directions of variation each."""
    comp = np.random.default_rng(1234)
    centers = comp.standard_normal((n_clusters, dim))
    bases = comp.standard_normal((n_clusters, rank, dim)) * 0.35
    rng = np.random.default_rng(seed)
    c = rng.integers(0, n_clusters, size=n)
    z = rng.standard_normal((n, rank))
    x = centers[c] + np.einsum("nr,nrd->nd", z, bases[c]) + 0.25 * rng.standard_normal((n, dim))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x.astype(np.float32)
