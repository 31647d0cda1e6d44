"""Retrieval over a sharded index with Ray.

`Searchers` are actors, one per group of `index.shards_per_searcher` consecutive shards, spread over the cluster's
nodes; a searcher that dies is restarted (it reloads its shards) and the calls it owed are retried. A query batch
goes to every searcher and their answers merge into one top-k (`retrieval.candidates.merge_answers`), equal to
one index over every shard.

`retrieve_to_parquet` is the flow for question sets of any size: a Ray Data pipeline encodes the questions
(`batch.encode.EncoderActor`), asks the searchers, drops each question's excluded ids and writes its part of
the candidates folder from the task itself. The driver holds the question list it was given and per-batch
counts, never the candidates.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from rocketqa_ray.config import EncodeConfig, IndexConfig, RayConfig
from rocketqa_ray.console import Progress
from rocketqa_ray.errors import DataError, as_user_error
from rocketqa_ray.index.gpu import for_actor_gpus
from rocketqa_ray.index.searcher import ShardSearcher, group_shards
from rocketqa_ray.index.store import read_meta
from rocketqa_ray.io import write_json
from rocketqa_ray.retrieval import candidates as cands

log = logging.getLogger(__name__)

# BEIR qrels are tab-separated, so no passage id contains a tab: the excluded ids of a question travel as one
# string column through the encoder (a list column would not survive its numpy batches)
EXCLUDE_SEP = "\t"


class Searchers:
    """Searcher actors over the saved index at `index_dir`; a context manager that kills them on exit."""

    def __init__(self, index_dir: str | Path, cfg: IndexConfig | None = None, expect_fingerprint: str | None = None,
                 ray_cfg: RayConfig | None = None):
        import ray

        from rocketqa_ray.ray_utils import ensure_ray, spread_over_nodes

        cfg = cfg or IndexConfig()
        cfg = for_actor_gpus(cfg, cfg.searcher_gpus, "index.searcher_gpus")
        ensure_ray(ray_cfg)
        meta = read_meta(index_dir, expect_fingerprint=expect_fingerprint)
        self.index_dir, self.metric = Path(index_dir), meta["metric"]
        self.model_fingerprint = meta.get("model_fingerprint")
        self.groups = group_shards(len(meta["files"]), cfg.shards_per_searcher)
        actor = ray.remote(ShardSearcher)
        threads = max(1, math.floor(cfg.searcher_cpus))
        where = spread_over_nodes(len(self.groups), cfg.searcher_cpus)
        self.handles = [actor.options(num_cpus=cfg.searcher_cpus, num_gpus=cfg.searcher_gpus or None, max_restarts=-1,
                                      max_task_retries=-1, scheduling_strategy=s)
                        .remote(str(index_dir), g, cfg, expect_fingerprint, threads)
                        for g, s in zip(self.groups, where)]
        try:  # surface a shard that cannot load now, as the one-line error it is
            self.ntotal = sum(ray.get([h.__ray_call__.remote(lambda s: s.ntotal) for h in self.handles]))
        except Exception as e:
            self.close()
            raise as_user_error(e) from None
        if self.ntotal != meta["ntotal"]:
            self.close()
            raise DataError(f"{index_dir}: the searchers hold {self.ntotal} vectors, meta.json says {meta['ntotal']}")

    def search(self, q_emb: np.ndarray, k: int,
               exclude: Sequence[Sequence[str]] | None = None) -> list[list[tuple[str, float]]]:
        """Top-k (pid, score) per query embedding, without each query's `exclude` ids."""
        return fan_out(self.handles, q_emb, k, self.metric, exclude)

    def close(self) -> None:
        import ray

        for h in self.handles:
            ray.kill(h)
        self.handles = []

    def __enter__(self) -> Searchers:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def fan_out(handles: list, q_emb: np.ndarray, k: int, metric: str,
            exclude: Sequence[Sequence[str]] | None = None) -> list[list[tuple[str, float]]]:
    import ray

    depth = cands.depth_for(k, exclude)
    ref = ray.put(np.ascontiguousarray(q_emb, dtype=np.float32))
    answers = ray.get([h.search.remote(ref, depth) for h in handles])
    return cands.merge_answers(answers, k, metric, len(q_emb), exclude)


class SearchWriter:
    """Ray Data callable: a batch of encoded questions -> its candidates part, written here; returns counts."""

    def __init__(self, handles: list, k: int, metric: str, folder: str):
        self.handles, self.k, self.metric, self.folder = handles, k, metric, folder

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        t0 = time.perf_counter()
        rows = np.asarray(batch["row"], dtype=np.int64)
        exclude = [str(e).split(EXCLUDE_SEP) if e else [] for e in batch["exclude"]]
        hits = fan_out(self.handles, np.asarray(batch["emb"], dtype=np.float32), self.k, self.metric, exclude)
        order = np.argsort(rows, kind="stable")
        qids = [str(batch["id"][i]) for i in order]
        cands.write_part(self.folder, int(rows[order[0]]), cands.to_table(qids, [hits[i] for i in order]))
        return {"rows": np.array([len(rows)]), "seconds": np.array([time.perf_counter() - t0])}


def retrieve_to_parquet(searchers: Searchers, model_dir: str | Path, qids: Sequence[str], texts: Sequence[str],
                        out_dir: str | Path, k: int, exclude: dict[str, Sequence[str]] | None = None,
                        cfg: EncodeConfig | None = None, ray_cfg: RayConfig | None = None) -> Path:
    """Every question's top-k into the candidates folder `out_dir` (`retrieval.candidates`), through Ray Data.

    Done again only when the questions, k, exclusions or index changed (the job record in `_SUCCESS.json`).
    """
    import ray

    from rocketqa_ray.batch.encode import EncoderActor, actor_kwargs, resolve_model_dir
    from rocketqa_ray.batch.shards import rows_digest
    from rocketqa_ray.ray_utils import ensure_ray
    from rocketqa_ray.retrieval.dense import check_questions

    cfg = cfg or EncodeConfig()
    check_questions(list(qids), list(texts), k)
    if not qids:
        raise DataError("no questions to retrieve for")
    exclude = exclude or {}
    items = [{"row": i, "id": str(q), "text": t, "exclude": EXCLUDE_SEP.join(sorted(exclude.get(q, ())))}
             for i, (q, t) in enumerate(zip(qids, texts))]
    out = Path(out_dir)
    job = {"task": "retrieve", "k": int(k), "n_questions": len(items), "index": str(searchers.index_dir.resolve()),
           "model_fingerprint": searchers.model_fingerprint, "questions": rows_digest(items, ["id", "text", "exclude"])}
    done = cands.success(out)
    if done is not None and done.get("job") == job and cands.count_rows(out) == len(items):
        log.info("%s: already complete; nothing to do", out)
        return out
    out.mkdir(parents=True, exist_ok=True)
    (out / cands.SUCCESS).unlink(missing_ok=True)
    for p in cands.parts(out):
        p.unlink()
    ensure_ray(ray_cfg)
    t0 = time.perf_counter()
    model_dir = resolve_model_dir(model_dir)
    actors = max(1, min(cfg.num_actors, math.ceil(len(items) / cfg.batch_size)))
    ds = ray.data.from_items(items, override_num_blocks=max(1, min(math.ceil(len(items) / cfg.batch_size),
                                                                   8 * actors)))
    ds = ds.map_batches(EncoderActor, fn_constructor_kwargs=actor_kwargs(model_dir, "query", cfg),
                        batch_size=cfg.batch_size, compute=ray.data.ActorPoolStrategy(size=actors),
                        num_cpus=cfg.cpus_per_actor, num_gpus=cfg.gpus_per_actor or None)
    ds = ds.map_batches(SearchWriter, fn_constructor_kwargs={"handles": searchers.handles, "k": int(k),
                                                             "metric": searchers.metric, "folder": str(out)},
                        batch_size=cfg.batch_size, compute=ray.data.ActorPoolStrategy(size=1), num_cpus=0.1)
    written = 0
    with Progress(f"retrieve {out.parent.name}/{out.name}", len(items), "questions") as progress:
        try:
            for rec in ds.iter_rows():
                written += int(rec["rows"])
                progress.advance(int(rec["rows"]))
        except Exception as e:
            raise as_user_error(e) from None
    n = cands.count_rows(out)
    if n != len(items) or written != len(items):
        raise RuntimeError(f"{out}: {n} questions written ({written} reported) for {len(items)} asked")
    write_json(out / cands.SUCCESS, {"job": job, "n_questions": n, "k": int(k),
                                     "seconds": round(time.perf_counter() - t0, 3), "searchers": len(searchers.handles)})
    return out
