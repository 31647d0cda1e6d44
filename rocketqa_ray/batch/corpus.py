"""Reading the corpus once into Parquet parts with Ray (`data.corpus_store` is the Ray-free core): tasks count the
newlines before each byte range, parse and validate the ranges in parallel and write one part each, then a Ray
Data aggregation finds duplicate ids. The driver holds byte offsets and counts, never passages or ids."""

from __future__ import annotations

import logging
import resource
import time
from pathlib import Path

from rocketqa_ray.config import RayConfig
from rocketqa_ray.console import Progress
from rocketqa_ray.data import corpus_store as store
from rocketqa_ray.errors import DataError
from rocketqa_ray.io import atomic_dir, write_json

log = logging.getLogger(__name__)

DUPLICATES_SHOWN = 3


def parse_and_write(path: str, start: int, end: int, first_line: int, folder: str, i: int) -> dict:
    t0 = time.perf_counter()
    table = store.parse_chunk(path, start, end, first_line)
    store.write_part(folder, i, table)
    return {"part": i, "rows": table.num_rows, "bytes": end - start, "seconds": time.perf_counter() - t0,
            "max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def found_ids(path: str, ids: list[str]) -> list[str]:
    """Which of `ids` one part holds."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    col = pq.read_table(path, columns=["id"]).column("id")
    return col.filter(pc.is_in(col, value_set=pa.array(ids, pa.string()))).to_pylist()


def duplicates(files: list[str]) -> list[dict]:
    """Up to DUPLICATES_SHOWN ids that occur more than once, with their first and last line (Ray Data groupby)."""
    import ray
    from ray.data.aggregate import Count, Max, Min

    ds = ray.data.read_parquet(files, columns=["id", "line"])
    dup = ds.groupby("id").aggregate(Count(alias_name="n"), Min("line", alias_name="first"),
                                     Max("line", alias_name="last"))
    return dup.filter(expr="n > 1").take(DUPLICATES_SHOWN)


def ingest_corpus(corpus_path: str | Path, out_dir: str | Path, chunk_mb: float = 64.0,
                  ray_cfg: RayConfig | None = None) -> dict:
    """The corpus file (a BEIR folder, JSONL, JSONL.gz or Parquet) as a validated corpus store in `out_dir`
    (replaced atomically); skipped when the store was made from the same file. Returns its record."""
    import ray

    from rocketqa_ray.batch.shards import source_stat
    from rocketqa_ray.data.beir import find_corpus
    from rocketqa_ray.ray_utils import as_completed, ensure_ray

    corpus = Path(corpus_path)
    corpus = find_corpus(corpus) if corpus.is_dir() else corpus
    if not corpus.exists():
        raise DataError(f"corpus {corpus} does not exist")
    out = Path(out_dir)
    source = source_stat(corpus)
    rec = store.record(out)
    if rec is not None and rec.get("source") == source:
        log.info("%s: already holds %s; nothing to do", out, corpus)
        return rec
    ensure_ray(ray_cfg)
    t0 = time.perf_counter()
    chunks = store.line_chunks(corpus, max(1, int(chunk_mb * (1 << 20))))
    first = [1]
    if len(chunks) > 1:
        count = ray.remote(store.count_newlines).options(num_cpus=0.5)
        newlines = ray.get([count.remote(str(corpus), s, e) for s, e in chunks[:-1]])
        for n in newlines:
            first.append(first[-1] + n)
    parse = ray.remote(parse_and_write).options(num_cpus=0.5, max_retries=2, scheduling_strategy="SPREAD")
    rows = [0] * len(chunks)
    peak = 0.0
    with atomic_dir(out) as tmp:
        pending = [parse.remote(str(corpus), s, e, first[i], str(tmp), i) for i, (s, e) in enumerate(chunks)]
        with Progress(f"read corpus {corpus.name}", source["size"], "bytes") as progress:
            for r in as_completed(pending):
                rows[r["part"]], peak = r["rows"], max(peak, r["max_rss_mb"])
                progress.advance(r["bytes"])
        if sum(rows) == 0:
            raise DataError(f"{corpus}: the corpus is empty; it needs at least one passage")
        dup = duplicates([str(store.part_path(tmp, i)) for i in range(len(chunks))])
        if dup:
            shown = "; ".join(f"{d['id']!r} at lines {d['first']} and {d['last']}"
                              + (f" ({d['n']} times)" if d["n"] > 2 else "") for d in dup)
            raise DataError(f"{corpus}: duplicate passage ids ({shown}); ids must be unique")
        rec = {"n_rows": sum(rows), "part_rows": rows, "source": source, "chunk_mb": chunk_mb,
               "seconds": round(time.perf_counter() - t0, 3), "task_peak_rss_mb": round(peak, 1)}
        write_json(tmp / store.SUCCESS, rec)
    log.info("corpus: %d passages in %d parts -> %s", rec["n_rows"], len(rows), out)
    return rec


def missing_ids(folder: str | Path, ids: set[str]) -> set[str]:
    """The ids (a bounded set: qrels' passages) the corpus store does not hold, checked by one task per part."""
    import ray

    files = store.part_files(folder)
    want = sorted(ids)
    find = ray.remote(found_ids).options(num_cpus=0.25)
    ref = ray.put(want)
    seen: set[str] = set()
    for part in ray.get([find.remote(f, ref) for f in files]):
        seen.update(part)
    return ids - seen
