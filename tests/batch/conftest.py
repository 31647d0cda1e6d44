"""Fixtures of the Ray Data flow tests: squad-mini's corpus ingested once into a store of several parts (so joins
cross parts), read-only, shared by every flow test."""

from __future__ import annotations

from pathlib import Path

import pytest

MINI = Path(__file__).resolve().parents[2] / "data" / "squad-mini"


@pytest.fixture(scope="session")
def mini_store(ray_session, tmp_path_factory) -> Path:
    from rocketqa_ray.batch.corpus import ingest_corpus

    store = tmp_path_factory.mktemp("mini_store") / "store"
    ingest_corpus(MINI / "corpus.jsonl", store, chunk_mb=0.25)
    return store
