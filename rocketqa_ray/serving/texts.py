"""The text store of one Retriever replica: the title and text of the passages in *its* index shards only, row-aligned
with the shards' ids (Ray-free).

The index keeps the corpus store's order (encoding reads the store in order, the index build fills rows in that
order), so a replica holding global rows [first, first + n) reads exactly rows [first, first + n) of the store's
Parquet parts, as Arrow columns: memory follows the shard, not the corpus, and a hit's text is a row lookup, not a
dict. A RUN_DIR without a store (written before it existed), or one whose order does not match, is served by
scanning the corpus file once for the shard's ids.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pyarrow as pa

from rocketqa_ray.data import corpus_store
from rocketqa_ray.data.beir import iter_corpus
from rocketqa_ray.errors import ServiceError

log = logging.getLogger(__name__)


class ShardTexts:
    """(title, text) by position in a replica's shards: `get(i)` for the shard row `i` (global row - first row)."""

    def __init__(self, titles: pa.Array, texts: pa.Array):
        self.titles, self.texts = titles, texts

    def __len__(self) -> int:
        return len(self.texts)

    @property
    def nbytes(self) -> int:
        return int(self.titles.nbytes + self.texts.nbytes)

    def get(self, i: int) -> tuple[str, str]:
        return self.titles[i].as_py(), self.texts[i].as_py()

    @classmethod
    def load(cls, ids: pa.Array, first_row: int, store_dir: str | Path | None, corpus_path: str | Path) -> ShardTexts:
        """The texts of `ids` (the shards' ids, global rows from `first_row`): from the corpus store's matching
        rows when it has them in the same order, else from one scan of the corpus file."""
        if store_dir is not None and corpus_store.record(store_dir) is not None:
            table = corpus_store.read_rows(store_dir, first_row, first_row + len(ids), ["id", "title", "text"])
            if table.column("id").combine_chunks().equals(ids):
                return cls(table.column("title").combine_chunks(), table.column("text").combine_chunks())
            log.warning("%s: rows %d.. are not the index's passages (another corpus?); scanning %s instead",
                        store_dir, first_row, corpus_path)
        return cls.scan(ids, corpus_path)

    @classmethod
    def scan(cls, ids: pa.Array, corpus_path: str | Path) -> ShardTexts:
        """One pass over the corpus file, keeping only `ids`' rows (memory follows len(ids))."""
        where = {pid: i for i, pid in enumerate(ids.to_pylist())}
        titles: list[str | None] = [None] * len(where)
        texts: list[str | None] = [None] * len(where)
        for p in iter_corpus(corpus_path):
            i = where.get(p["_id"])
            if i is not None:
                titles[i], texts[i] = p["title"], p["text"]
        missing = [pid for pid, i in where.items() if texts[i] is None]
        if missing:
            raise ServiceError(
                f"{corpus_path}: {len(missing)} passage id(s) of the index are not in the corpus (e.g. {missing[:3]}); "
                "the index was built from another corpus than config data.path")
        return cls(pa.array(titles, pa.string()), pa.array(texts, pa.string()))
