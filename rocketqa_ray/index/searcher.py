"""Searching some shards of a saved index, in the process that holds only them (a searcher actor, a replica).

A `ShardSearcher` loads consecutive shards [first, last] and answers with global rows (the row numbers the whole
index would give) and their passage ids, so answers from several searchers merge (`index.search.merge_topk`)
into what one index over every shard returns. Ray-free; `batch.search` puts one in each searcher actor.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa

from rocketqa_ray.config import IndexConfig
from rocketqa_ray.errors import DataError
from rocketqa_ray.index.dense import as_matrix
from rocketqa_ray.index.factory import apply_search_params, load_faiss, want_gpu
from rocketqa_ray.index.gpu import to_gpu
from rocketqa_ray.index.search import merge_topk, offset_rows
from rocketqa_ray.index.store import read_meta, read_shard, read_shard_ids, search_config


def group_shards(n_shards: int, per_group: int) -> list[list[int]]:
    """Consecutive shards, `per_group` to a searcher."""
    per_group = max(1, int(per_group))
    return [list(range(s, min(s + per_group, n_shards))) for s in range(0, n_shards, per_group)]


class ShardSearcher:
    """Consecutive shards `shards` of the index at `path`; `search` gives their top-k with global rows and ids."""

    def __init__(self, path: str | Path, shards: list[int], cfg: IndexConfig | None = None,
                 expect_fingerprint: str | None = None, threads: int | None = None):
        if not shards or list(shards) != list(range(shards[0], shards[0] + len(shards))):
            raise DataError(f"a searcher holds consecutive shards, got {shards}")
        if threads:
            load_faiss().omp_set_num_threads(int(threads))
        meta = read_meta(path, expect_fingerprint=expect_fingerprint)
        if shards[-1] >= len(meta["files"]):
            raise DataError(f"{path} has {len(meta['files'])} shards; there is no shard {shards[-1]}")
        sizes = meta["shard_sizes"]
        self.shards = list(shards)
        self.metric, self.kind, self.dim = meta["metric"], meta["kind"], meta["dim"]
        self.cfg = search_config(meta, cfg)
        self.first_row = int(sum(sizes[: shards[0]]))
        self._indexes, self._offsets, ids = [], [], []
        gpu = want_gpu(self.cfg)
        off = self.first_row
        for j in shards:
            index = read_shard(path, meta, j)
            part = read_shard_ids(path, meta, j)
            if len(part) != index.ntotal or index.ntotal != sizes[j]:
                raise DataError(f"{path}: shard {j} has {index.ntotal} vectors, {len(part)} ids and {sizes[j]} in "
                                "meta.json; the index is corrupt: rebuild it with jobs/index.py")
            apply_search_params(index, self.kind, self.cfg)
            placed = to_gpu(index, self.kind, self.cfg) if gpu else None
            if placed is not None:
                index = placed  # holds the CPU index too where its re-rank store stays on CPU
            self._indexes.append(index)
            self._offsets.append(off)
            off += index.ntotal
            ids.append(part)
        self.ids = pa.concat_arrays(ids) if len(ids) > 1 else ids[0]  # Arrow, not Python strings: ~14 B per id
        self.calls = 0

    @property
    def ntotal(self) -> int:
        return len(self.ids)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, list[list[str]]]:
        """(scores [Q, k], global rows [Q, k], ids per query) best first; missing hits are row -1 (no id)."""
        q = as_matrix(queries, "queries", self.dim)
        parts = []
        for off, index in zip(self._offsets, self._indexes):
            if index.ntotal and len(q):
                s, r = index.search(q, min(int(k), index.ntotal))
                parts.append(offset_rows(s, r, off, self.metric))
        scores, rows = merge_topk(parts, int(k), self.metric, n_queries=len(q))
        flat = rows.ravel()
        valid = flat >= 0
        names = self.ids.take(pa.array(flat[valid] - self.first_row)).to_pylist()
        out, it = [], iter(names)
        for row_valid in valid.reshape(rows.shape):
            out.append([next(it) for v in row_valid if v])
        self.calls += 1
        return scores, rows, out
