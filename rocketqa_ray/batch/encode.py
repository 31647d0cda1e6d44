"""Corpus and query encoding with Ray Data: an actor pool with one dual encoder per actor.

`encode_corpus` streams a corpus of any size into resumable Parquet shards (`row`, `id`, `emb`) via the
shard machinery in `rocketqa_ray.batch.shards`: the driver holds one shard of text at a time, each actor one
shard of text and embeddings, so memory stays flat as the corpus grows. `encode_texts` runs the same
actor class under a plain `map_batches` for query sets that are already in memory.
`DualEncoder.encode` (in-process) is the reference both are tested against.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from rocketqa_ray.batch.shards import iter_parts, matrix, part_name, run_job, source_stat, success_record
from rocketqa_ray.config import EncodeConfig, RayConfig
from rocketqa_ray.errors import ConfigError, DataError

log = logging.getLogger(__name__)

KINDS = ("passage", "query")


def resolve_model_dir(model: str | Path) -> Path:
    """A saved model folder, or a base name ('minilm', 'tiny') for zero-shot encoding."""
    from rocketqa_ray.modeling.base import resolve_base

    if str(model) in ("minilm", "tiny"):
        return resolve_base(str(model))
    path = Path(model)
    if not (path / "config.json").exists():
        raise ConfigError(f"model {model}: not a saved model folder (no config.json); pass a stage's model/ directory "
                          "or 'minilm'")
    return path


class EncoderActor:
    """Row batches {row, id, text, ...} -> {row, id, emb [B, H] float32, ...}; the model is loaded once per actor.

    Inside a batch, texts are sorted by length and encoded `batch_size` at a time (`DualEncoder.encode`),
    so padding stays small; bf16 autocast per the `bf16` setting (auto: CUDA or a CPU with native bf16).
    """

    def __init__(self, model_dir: str, kind: str, batch_size: int, bf16: str, cpus: float, gpus: float,
                 sort_by_length: bool = True):
        from rocketqa_ray.modeling.dual_encoder import DualEncoder
        from rocketqa_ray.ray_utils import model_in_actor

        self.model, self.device = model_in_actor(DualEncoder, model_dir, cpus, gpus, bf16)
        self.kind, self.batch_size, self.bf16, self.sort = kind, batch_size, bf16, sort_by_length

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        texts = [str(t) for t in batch["text"]]
        emb = self.model.encode(texts, self.kind, self.batch_size, self.bf16, self.device, self.sort)
        # other columns ride along (a retrieval flow's excluded ids), the text does not
        rest = {k: v for k, v in batch.items() if k not in ("text", "row", "id")}
        return {"row": np.asarray(batch["row"], dtype=np.int64), "id": batch["id"], "emb": emb, **rest}


def actor_kwargs(model_dir: Path, kind: str, cfg: EncodeConfig) -> dict:
    if kind not in KINDS:
        raise ConfigError(f"encoding kind {kind!r} is not one of: {', '.join(KINDS)}")
    return {"model_dir": str(model_dir), "kind": kind, "batch_size": cfg.batch_size, "bf16": cfg.bf16,
            "cpus": cfg.cpus_per_actor, "gpus": cfg.gpus_per_actor, "sort_by_length": cfg.sort_by_length}


def encode_corpus(corpus_path: str | Path, model_dir: str | Path, out_dir: str | Path, cfg: EncodeConfig,
                  kind: str = "passage", overwrite: bool = False, ray_cfg: RayConfig | None = None) -> Path:
    """Encode every passage of a corpus (a BEIR folder, JSONL, JSONL.gz, Parquet or a corpus store) into `out_dir`.

    Output: `part-XXXXX.parquet` shards of `cfg.rows_per_shard` rows (`row` int64 in corpus order, `id` str,
    `emb` fixed_size_list<float32>[H]) and, last, `_SUCCESS.json` (n_rows, dim, model_fingerprint).
    Rerunning after a crash computes only the missing shards; rerunning a finished job on an unchanged
    corpus does nothing. A passage without text or an empty corpus is a `DataError`.
    """
    from rocketqa_ray.data import corpus_store
    from rocketqa_ray.data.beir import find_corpus, iter_corpus, passage_text
    from rocketqa_ray.modeling.base import model_fingerprint

    model_dir = resolve_model_dir(model_dir)
    corpus = Path(corpus_path)
    stored = corpus_store.record(corpus) if corpus.is_dir() else None
    if corpus.is_dir() and stored is None:
        corpus = find_corpus(corpus)
    elif not corpus.exists():
        raise DataError(f"corpus {corpus} does not exist")
    fp = model_fingerprint(model_dir)
    job = {"task": "encode", "kind": kind, "model_fingerprint": fp, "rows_per_shard": cfg.rows_per_shard}

    def rows() -> Iterator[dict]:
        if stored is not None:  # a corpus store (`batch.corpus`): validated and free of duplicates when read in
            for t in corpus_store.iter_parts(corpus, ["id", "title", "text"]):
                for pid, title, text in zip(*(t.column(c).to_pylist() for c in ("id", "title", "text"))):
                    yield {"id": pid, "text": passage_text(title, text)}
            return
        # A plain file: its ids (not texts) are held, as load_beir does, since an index with a duplicate id would
        # return one passage under two rows. A corpus store checks them with a distributed aggregation instead.
        seen: set[str] = set()
        for i, p in enumerate(iter_corpus(corpus)):
            if p["_id"] in seen:
                raise DataError(f"{corpus}: duplicate passage id {p['_id']!r} (passage #{i + 1}); ids must be unique")
            seen.add(p["_id"])
            yield {"id": p["_id"], "text": passage_text(p["title"], p["text"])}

    def extra(plan) -> dict:
        import pyarrow.parquet as pq

        dim = pq.read_schema(plan.out_dir / part_name(0)).field("emb").type.list_size
        return {"dim": int(dim), "model_fingerprint": fp, "kind": kind, "model_dir": str(model_dir)}

    source = stored["source"] if stored is not None else source_stat(corpus)
    return run_job(rows, out_dir, job, ["id", "text"], EncoderActor, actor_kwargs(model_dir, kind, cfg), cfg,
                   source=source, extra=extra, overwrite=overwrite, ray_cfg=ray_cfg)


def write_embeddings(out_dir: str | Path, ids: list[str], emb: np.ndarray, rows_per_shard: int = 4096,
                     model_fingerprint: str | None = None) -> Path:
    """Vectors you already have, in an encoding job's layout (parts, `_job.json`, `_SUCCESS.json` last), so the
    index builders and benchmarks read them as they read `encode_corpus`'s output."""
    from rocketqa_ray.batch.shards import JOB_FILE, SUCCESS_FILE, to_table
    from rocketqa_ray.io import atomic_path, write_json

    emb = np.ascontiguousarray(emb, dtype=np.float32)
    if emb.ndim != 2 or len(ids) != len(emb):
        raise DataError(f"write_embeddings: {len(ids)} ids for embeddings of shape {emb.shape}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / JOB_FILE, {"task": "encode", "kind": "passage", "model_fingerprint": model_fingerprint,
                                "rows_per_shard": rows_per_shard})
    n_shards = 0
    for n_shards, start in enumerate(range(0, len(ids), rows_per_shard), 1):
        stop = min(start + rows_per_shard, len(ids))
        table = to_table({"row": np.arange(start, stop, dtype=np.int64), "id": list(ids[start:stop]),
                          "emb": emb[start:stop]})
        with atomic_path(out / part_name(n_shards - 1)) as tmp:
            pq.write_table(table, tmp)
    write_json(out / SUCCESS_FILE, {"n_rows": len(ids), "n_shards": n_shards, "source": None, "dim": int(emb.shape[1]),
                                    "model_fingerprint": model_fingerprint, "kind": "passage"})
    return out


def embeddings_info(out_dir: str | Path) -> dict:
    """The `_SUCCESS.json` record of a finished encoding (n_rows, dim, model_fingerprint, ...)."""
    return success_record(out_dir)


def iter_embeddings(out_dir: str | Path) -> Iterator[tuple[list[str], np.ndarray]]:
    """(ids, float32 [n, H]) shard by shard, in corpus order: for building indexes without one big array."""
    for table in iter_parts(out_dir, ["id", "emb"]):
        yield table.column("id").to_pylist(), matrix(table, "emb")


def lookup_embeddings(out_dir: str | Path, ids: set[str]) -> dict[str, np.ndarray]:
    """{id: float32 [H]} for the given ids only, streamed part by part: memory follows len(ids), not the corpus.
    An id the encoding does not hold is a DataError."""
    import pyarrow as pa
    import pyarrow.compute as pc

    want = pa.array(sorted(ids), pa.string())
    out: dict[str, np.ndarray] = {}
    for table in iter_parts(out_dir, ["id", "emb"]):
        hit = table.filter(pc.is_in(table.column("id"), value_set=want))
        if hit.num_rows:
            out.update(zip(hit.column("id").to_pylist(), matrix(hit, "emb")))
    missing = ids - out.keys()
    if missing:
        raise DataError(f"{out_dir}: no embedding for {len(missing)} id(s), e.g. {sorted(missing)[0]!r}; rerun the "
                        "encoding")
    return out


def load_embeddings(out_dir: str | Path) -> tuple[list[str], np.ndarray]:
    """All ids and embeddings float32 [N, H] in corpus order; no row missing or duplicated (else DataError)."""
    info = success_record(out_dir)
    emb = np.empty((info["n_rows"], info["dim"]), dtype=np.float32)
    ids: list[str] = []
    for part_ids, part in iter_embeddings(out_dir):
        emb[len(ids) : len(ids) + len(part_ids)] = part
        ids.extend(part_ids)
    return ids, emb


def encode_texts(texts: list[str], ids: list[str], model_dir: str | Path, cfg: EncodeConfig, kind: str = "query",
                 ray_cfg: RayConfig | None = None) -> np.ndarray:
    """Texts -> float32 [N, H] in input order, through a Ray Data actor pool (for large query sets).

    The rows stream through `map_batches(EncoderActor, batch_size=cfg.batch_size)`; results are placed
    by row number, and a row that came back twice or never is an error.
    """
    import ray

    from rocketqa_ray.console import Progress
    from rocketqa_ray.ray_utils import ensure_ray

    if len(texts) != len(ids):
        raise DataError(f"encode_texts: {len(texts)} texts but {len(ids)} ids")
    if not texts:
        raise DataError("encode_texts: no texts to encode")
    for t, i in zip(texts, ids):
        if not isinstance(t, str) or not t.strip():
            raise DataError(f"text {i!r} is empty; every {kind} needs text")
    model_dir = resolve_model_dir(model_dir)
    kwargs = actor_kwargs(model_dir, kind, cfg)
    ensure_ray(ray_cfg)
    n = len(texts)
    actors = max(1, min(cfg.num_actors, math.ceil(n / cfg.batch_size)))
    items = [{"row": r, "id": str(i), "text": t} for r, (i, t) in enumerate(zip(ids, texts))]
    ds = ray.data.from_items(items, override_num_blocks=max(1, min(math.ceil(n / cfg.batch_size), 8 * actors)))
    ds = ds.map_batches(EncoderActor, fn_constructor_kwargs=kwargs, batch_size=cfg.batch_size,
                        compute=ray.data.ActorPoolStrategy(size=actors), num_cpus=cfg.cpus_per_actor,
                        num_gpus=cfg.gpus_per_actor or None)
    out: np.ndarray | None = None
    seen = np.zeros(n, dtype=np.int32)
    with Progress(f"encode {kind} texts", n, "rows") as progress:
        for batch in ds.iter_batches(batch_format="numpy", batch_size=None):
            rows = batch["row"]
            emb = np.asarray(batch["emb"], dtype=np.float32)
            if out is None:
                out = np.zeros((n, emb.shape[1]), dtype=np.float32)
            out[rows] = emb
            np.add.at(seen, rows, 1)
            progress.advance(len(rows))
    if out is None or not np.all(seen == 1):
        raise RuntimeError(f"encode_texts: {int(np.sum(seen == 0))} rows missing, {int(np.sum(seen > 1))} duplicated")
    return out
