"""The corpus's BM25 statistics counted by Ray Data (`retrieval.bm25_stats` is the Ray-free core): each batch of the
corpus store is tokenized and counted where it is read, a groupby sums the counts per term across the cluster, and
the driver streams the summed table into one Parquet file. The driver never holds passages; it holds one batch of
terms at a time while writing (the service later loads the vocabulary, which grows with the language, not with the
corpus)."""

from __future__ import annotations

import logging
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from rocketqa_ray.config import RayConfig
from rocketqa_ray.data import corpus_store
from rocketqa_ray.data.beir import passage_text
from rocketqa_ray.errors import DataError
from rocketqa_ray.io import atomic_path, write_json
from rocketqa_ray.retrieval.bm25_stats import META, TERMS, CorpusStats, PairScorer, Tokenizer

log = logging.getLogger(__name__)

# The row that carries a batch's passage and token counts through the same groupby as the terms: the tokenizer never
# yields an empty term (words of 2+ characters), so it cannot collide with one.
TOTALS = ""


def count_terms(batch: dict[str, np.ndarray], stem: bool) -> dict[str, np.ndarray]:
    """A batch of passages {title, text} -> one row per term {term, df, docs, tokens}, plus the TOTALS row (Ray Data
    tasks: the tokenizer is cheap to make, so no actor pool is needed to keep one)."""
    texts = [passage_text(t, x) for t, x in zip(batch["title"], batch["text"])]
    tokens = Tokenizer(stem)(texts)
    df: Counter = Counter()
    for toks in tokens:
        df.update(set(toks))
    return {"term": np.array([TOTALS, *df], dtype=object),
            "df": np.array([0, *df.values()], dtype=np.int64),
            "docs": np.array([len(texts)] + [0] * len(df), dtype=np.int64),
            "tokens": np.array([sum(map(len, tokens))] + [0] * len(df), dtype=np.int64)}


def count_corpus_stats(store_dir: str | Path, stem: bool, out_dir: str | Path, ray_cfg: RayConfig | None = None,
                       batch_size: int = 4096) -> CorpusStats:
    """Count the corpus store's BM25 statistics with Ray Data into `out_dir` (the files `CorpusStats.save` writes,
    the same numbers as `CorpusStats.from_texts` over the same passages); returns them loaded."""
    import ray
    from ray.data.aggregate import Sum

    from rocketqa_ray.ray_utils import ensure_ray

    rec = corpus_store.require_record(store_dir)
    ensure_ray(ray_cfg)
    t0 = time.perf_counter()
    files = corpus_store.part_files(store_dir)
    ds = ray.data.read_parquet(files, columns=["title", "text"])
    counts = ds.map_batches(count_terms, fn_kwargs={"stem": stem}, batch_size=batch_size, batch_format="numpy",
                            num_cpus=0.5)
    summed = counts.groupby("term").aggregate(Sum("df", alias_name="df"), Sum("docs", alias_name="docs"),
                                              Sum("tokens", alias_name="tokens"))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    n_docs = total_len = n_terms = 0
    schema = pa.schema([("term", pa.string()), ("df", pa.int64())])
    with atomic_path(out / TERMS, suffix=".parquet") as tmp:
        with pq.ParquetWriter(tmp, schema) as writer:
            for batch in summed.iter_batches(batch_format="pyarrow", batch_size=65536):
                terms = batch.column("term")
                is_total = pc.equal(terms, TOTALS)
                totals = batch.filter(is_total)
                if totals.num_rows:
                    n_docs += int(pc.sum(totals.column("docs")).as_py())
                    total_len += int(pc.sum(totals.column("tokens")).as_py())
                rows = batch.filter(pc.invert(is_total)).select(["term", "df"]).cast(schema)
                n_terms += rows.num_rows
                writer.write_table(rows)
    if n_docs != rec["n_rows"]:
        raise DataError(f"{store_dir}: counted {n_docs} passages, the store holds {rec['n_rows']}; count again")
    write_json(out / META, {"stem": stem, "n_docs": n_docs, "total_len": total_len, "terms": n_terms})
    log.info("bm25 statistics: %d passages, %d terms in %.1f s -> %s", n_docs, n_terms, time.perf_counter() - t0, out)
    return CorpusStats.load(out)


@dataclass(frozen=True)
class BM25Feature:
    """Where a flow finds the corpus's BM25 statistics (`count_corpus_stats`' folder) and the BM25 parameters."""

    stats_dir: str
    k1: float
    b: float


class PairBM25:
    """map_batches over joined pairs {query, passage, ...} -> the same rows plus `bm25` (float32): each pair's BM25
    from the corpus statistics, loaded once per actor (`retrieval.bm25_stats.PairScorer`, O(pair) each)."""

    def __init__(self, feature: BM25Feature):
        self.scorer = PairScorer(CorpusStats.load(feature.stats_dir), feature.k1, feature.b)

    def __call__(self, batch: pa.Table) -> pa.Table:
        queries = batch.column("query").to_pylist()
        passages = batch.column("passage").to_pylist()
        rows: dict[str, list[int]] = {}
        for i, q in enumerate(queries):
            rows.setdefault(q, []).append(i)
        out = np.zeros(len(queries), dtype=np.float32)
        for q, idx in rows.items():  # a question's passages scored together, as PairScorer.score_pairs does
            out[idx] = self.scorer.score(q, [passages[i] for i in idx])
        return batch.append_column("bm25", pa.array(out, pa.float32()))
