"""Fixtures shared by the FAISS tests."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module", autouse=True)
def one_faiss_thread():
    """On a shared 2-core box faiss's OpenMP threads spin-wait on each other (10x slower under load)."""
    import faiss

    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield
    faiss.omp_set_num_threads(before)
