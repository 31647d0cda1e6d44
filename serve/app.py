"""Ray Serve application: HTTP ingress -> query encoder -> FAISS retriever -> cross-encoder reranker.

    serve run serve.app:build_app run_dir=runs/cpu                  # one command, 127.0.0.1:8000
    serve run serve.app:build_app run_dir=runs/cpu batching=off reranker_replicas=2
    serve deploy serve/config.yaml                                  # autoscaling settings per deployment

Each model is its own deployment with its own replicas and resources; the encoder and the reranker
batch concurrent requests with `@serve.batch`. The computation is `rocketqa_ray.serving`'s Ray-free
components, so the service returns exactly what the in-process `SearchService` returns.
"""

# No `from __future__ import annotations`: FastAPI must see real types (e.g. Request) on the routes.
import asyncio
import dataclasses
import logging
import time
import typing
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, ReplicaUnavailableError
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException as StarletteHTTPException

from rocketqa_ray.config import BM25Config, IndexConfig, ServeConfig, coerce
from rocketqa_ray.errors import ConfigError, ServiceError
from rocketqa_ray.index.gpu import for_actor_gpus
from rocketqa_ray.serving.api import (
    MAX_BODY_BYTES,
    MAX_TOP_K,
    BadRequest,
    parse_search_request,
    rerank_decision,
    search_response,
)
from rocketqa_ray.serving.artifacts import find_artifacts
from rocketqa_ray.serving.components import (
    QueryEncoderCore,
    RerankerCore,
    RetrieverCore,
    ShardAnswer,
    candidate_depth,
    isolated,
    merge_hits,
    rerank_texts,
    set_torch_threads,
)

log = logging.getLogger("ray.serve")
PAGE = Path(__file__).resolve().parent / "static" / "index.html"
# A replica that died or is restarting: retry, then answer 503 (the client may retry), never 500.
UNAVAILABLE = (RayActorError, ReplicaUnavailableError, DeploymentUnavailableError, BackPressureError)
RETRIES = 3


# ------------------------------------------------------------------------------------------ deployments
def raise_if_failed(result: Any) -> Any:
    """A batched call's slot: the request's own result, or the exception only its request caused (`isolated`)."""
    if isinstance(result, Exception):
        raise result
    return result


@serve.deployment(ray_actor_options={"num_cpus": 0.1})
class QueryEncoder:
    """Query strings -> [H] embeddings; concurrent requests are encoded as one batch."""

    def __init__(self, model_dir: str, bf16: str, device: str, batching: bool, max_batch_size: int,
                 batch_wait_timeout_s: float, torch_threads: int):
        set_torch_threads(torch_threads)
        self.core = QueryEncoderCore(model_dir, bf16=bf16, device=device)
        self.batching = batching
        self._encode_batch.set_max_batch_size(max_batch_size)
        self._encode_batch.set_batch_wait_timeout_s(batch_wait_timeout_s)

    async def encode(self, query: str) -> np.ndarray:
        if self.batching:
            return raise_if_failed(await self._encode_batch(query))
        return self.core.encode([query])[0]

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.01)
    async def _encode_batch(self, queries: list[str]) -> list[np.ndarray | Exception]:
        return isolated(self.core.encode, queries)

    def info(self) -> dict[str, Any]:
        return {"model": str(self.core.model_dir), "fingerprint": self.core.fingerprint, "dim": self.core.dim}


@serve.deployment(ray_actor_options={"num_cpus": 0.1})
class Retriever:
    """FAISS search plus passage texts over consecutive index shards (all, or one group of a sharded service)."""

    def __init__(self, index_dir: str, corpus_path: str, expect_dim: int | None, expect_fingerprint: str | None,
                 index_cfg: IndexConfig | None = None, bm25: BM25Config | None = None, bm25_stats: str | None = None,
                 shards: list[int] | None = None, store_dir: str | None = None):
        self.core = RetrieverCore(index_dir, corpus_path, expect_dim=expect_dim, expect_fingerprint=expect_fingerprint,
                                  index_cfg=index_cfg, bm25=bm25, bm25_stats=bm25_stats, shards=shards,
                                  store_dir=store_dir)

    def search(self, emb: np.ndarray, k: int, query: str | None = None) -> ShardAnswer:
        """One query's (scores [1, k], global rows [1, k], [hits]) from this deployment's shards."""
        return self.core.answer(emb[None, :], k, [query] if query is not None else None)

    def info(self) -> dict[str, Any]:
        import psutil

        # what this replica holds, for /healthz and the serving benchmark's memory per replica
        return {**self.core.info(), "texts_mb": round(self.core.texts.nbytes / 2**20, 2),
                "rss_mb": round(psutil.Process().memory_info().rss / 2**20, 1)}


@serve.deployment(ray_actor_options={"num_cpus": 0.1})
class Reranker:
    """(query, candidate passages) -> cross-encoder probabilities; concurrent requests share one forward pass."""

    def __init__(self, model_dir: str | None, bf16: str, device: str, batching: bool, max_batch_size: int,
                 batch_wait_timeout_s: float, torch_threads: int):
        set_torch_threads(torch_threads)
        # A RUN_DIR without a cross-encoder still gets this (idle) deployment, so one `serve deploy`
        # config with a Reranker section fits every RUN_DIR; the ingress then never calls it.
        self.core = RerankerCore(model_dir, bf16=bf16, device=device) if model_dir else None
        self.batching = batching
        self._rerank_batch.set_max_batch_size(max_batch_size)
        self._rerank_batch.set_batch_wait_timeout_s(batch_wait_timeout_s)

    async def rerank(self, query: str, passages: list[str]) -> np.ndarray:
        if self.batching:
            return raise_if_failed(await self._rerank_batch((query, passages)))
        return self.core.score_many([(query, passages)])[0]

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.01)
    async def _rerank_batch(self, requests: list[tuple[str, list[str]]]) -> list[np.ndarray | Exception]:
        return isolated(self.core.score_many, requests)

    def info(self) -> dict[str, Any]:
        return {"model": str(self.core.model_dir) if self.core else None}


# ------------------------------------------------------------------------------------------ HTTP ingress
app = FastAPI(title="rocketqa-ray search", description="Dense retrieval (RocketQA dual encoder + FAISS), "
              "then cross-encoder reranking. POST /search {\"query\": str, \"top_k\": int, \"rerank\": bool}.")


class _Unavailable(Exception):
    pass


@app.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    # 404/405 etc. get the same {"error", "message"} body as the service's own 4xx answers.
    return JSONResponse({"error": str(exc.detail).lower(), "message": f"{request.method} {request.url.path}: {exc.detail}; "
                         "the API is POST /search, GET /healthz, GET / (search page)", "detail": []},
                        status_code=exc.status_code, headers=getattr(exc, "headers", None))


@serve.deployment(ray_actor_options={"num_cpus": 0.1}, max_ongoing_requests=256)
@serve.ingress(app)
class SearchIngress:
    def __init__(self, encoder: DeploymentHandle, retrievers: list[DeploymentHandle], reranker: DeploymentHandle | None,
                 info: dict[str, Any], max_query_chars: int, rerank_top_k: int):
        # one Retriever deployment per shard group, in shard order (merge_hits breaks ties by it)
        self.encoder, self.retrievers = encoder, list(retrievers)
        self.reranker = reranker if info.get("reranker") else None
        self.info = info
        self.max_query_chars = max_query_chars
        self.rerank_top_k = rerank_top_k
        self.page = PAGE.read_text(encoding="utf-8")
        self._index_info: dict[str, Any] | None = None

    async def _call(self, what: str, make_call) -> Any:
        """Await a handle call, retrying while a replica is being replaced."""
        for attempt in range(RETRIES):
            try:
                return await make_call()
            except UNAVAILABLE as e:
                log.warning("%s unavailable (attempt %d/%d): %s", what, attempt + 1, RETRIES, type(e).__name__)
                if attempt == RETRIES - 1:
                    raise _Unavailable(f"the {what} is restarting; retry in a few seconds") from None
                await asyncio.sleep(0.5 * (attempt + 1))

    async def index_info(self) -> dict[str, Any]:
        """The whole index (size, metric) and what each shard group's Retriever holds; asks every one of them."""
        if self._index_info is None:
            parts = await asyncio.gather(*[self._call(self._name(g), lambda h=h: h.info.remote())
                                           for g, h in enumerate(self.retrievers)])
            own = ("shards", "held", "texts_mb", "rss_mb")
            info = {k: v for k, v in parts[0].items() if k not in own}
            self._index_info = {**info, "retrievers": [{k: p[k] for k in own} for p in parts]}
        return self._index_info

    def _name(self, g: int) -> str:
        return "retriever" if len(self.retrievers) == 1 else f"retriever {g} (shards group {g})"

    @app.get("/", response_class=HTMLResponse)
    async def page(self) -> HTMLResponse:
        return HTMLResponse(self.page)

    @app.get("/healthz")
    async def healthz(self) -> JSONResponse:
        """Ok only when every deployment answers (so it doubles as a readiness check after start-up)."""
        calls = [self.index_info(), self._call("query encoder", lambda: self.encoder.info.remote())]
        if self.reranker is not None:
            calls.append(self._call("reranker", lambda: self.reranker.info.remote()))
        try:
            index, *_ = await asyncio.gather(*calls)
        except _Unavailable as e:
            return JSONResponse({"status": "unavailable", "message": str(e)}, status_code=503)
        return JSONResponse({"status": "ok", **self.info, "index": index})

    @app.post("/search")
    async def search(self, request: Request) -> JSONResponse:
        try:
            length = request.headers.get("content-length", "")
            if length.isdigit() and int(length) > MAX_BODY_BYTES:  # refuse before reading it
                raise BadRequest(413, "request too large", f"request body is {length} bytes; the limit is {MAX_BODY_BYTES}")
            # Validate before touching any other deployment: bad input is a 4xx even while a replica restarts.
            req = parse_search_request(await request.body(), self.max_query_chars, MAX_TOP_K,
                                       request.headers.get("content-type"))
            size = (await self.index_info())["size"]
            if req.top_k > size:
                msg = f"top_k must be between 1 and {size} (the index holds {size} passages; got {req.top_k})"
                raise BadRequest(422, "invalid request", f"top_k: {msg}", [{"field": "top_k", "message": msg,
                                                                             "type": "value_error"}])
            return JSONResponse(await self._search(req.query, req.top_k, req.rerank))
        except BadRequest as e:
            return JSONResponse(e.body(), status_code=e.status)
        except _Unavailable as e:
            return JSONResponse({"error": "service unavailable", "message": str(e)}, status_code=503,
                                headers={"Retry-After": "2"})

    async def _search(self, query: str, top_k: int, rerank: bool | None) -> dict[str, Any]:
        do_rerank, message = rerank_decision(rerank, self.info["rerank_default"],
                                             self.info["rerank_message"] if self.reranker is None else None)
        t0 = time.perf_counter()
        emb = await self._call("query encoder", lambda: self.encoder.encode.remote(query))
        t1 = time.perf_counter()
        k = candidate_depth(top_k, do_rerank, self.rerank_top_k, (await self.index_info())["size"])
        answers = await asyncio.gather(*[self._call(self._name(g), lambda h=h: h.search.remote(emb, k, query))
                                         for g, h in enumerate(self.retrievers)])
        hits = merge_hits(answers, k, (await self.index_info())["metric"])[0]
        t2 = time.perf_counter()
        scores = None
        if do_rerank:
            texts = rerank_texts(hits)
            scores = await self._call("reranker", lambda: self.reranker.rerank.remote(query, texts))
        t3 = time.perf_counter()
        return search_response(hits, top_k, scores, do_rerank, (t0, t1, t2, t3), message, self.info.get("fusion"))


# ------------------------------------------------------------------------------------------ application
@dataclasses.dataclass
class AppArgs:
    """`serve run serve.app:build_app key=value ...` arguments (ServeConfig fields override the run's config)."""

    run_dir: str = ""
    batching: bool = True
    autoscaling: bool = False  # replicas scale between 1 and <deployment>_replicas on ongoing requests
    num_gpus: float = 0.0  # per encoder/reranker replica; > 0 runs the models on CUDA
    retriever_gpus: float = 0.0  # per Retriever replica; > 0 searches its shards on the GPU (faiss-gpu, index.use_gpu); 0 = on CPU
    torch_threads: int = 1  # per model replica (replicas share the machine's cores)


def parse_args(args: dict[str, Any] | None) -> tuple[AppArgs, dict[str, Any]]:
    """Split and type-check arguments: (AppArgs, ServeConfig overrides). Unknown keys are a ConfigError."""
    own = typing.get_type_hints(AppArgs)
    serve_fields = typing.get_type_hints(ServeConfig)
    app_args, overrides = AppArgs(), {}
    for key, value in (args or {}).items():
        if isinstance(value, str) and value.lower() in ("on", "off"):
            value = value.lower() == "on"  # batching=off reads naturally on a command line
        if key in own:
            setattr(app_args, key, coerce(value, own[key], key))
        elif key in serve_fields:
            overrides[key] = coerce(value, serve_fields[key], key)
        else:
            raise ConfigError(f"unknown argument {key!r}; valid arguments: {', '.join([*own, *serve_fields])}")
    if not app_args.run_dir:
        raise ConfigError("missing run_dir: serve run serve.app:build_app run_dir=<the pipeline's RUN_DIR>")
    return app_args, overrides


def _replicas(n: int, autoscaling: bool, target: int) -> dict[str, Any]:
    if n < 1:
        raise ConfigError(f"replica counts must be at least 1 (got {n})")
    if autoscaling:
        return {"autoscaling_config": {"min_replicas": 1, "max_replicas": n, "target_ongoing_requests": target}}
    return {"num_replicas": n}


def build_app(args: dict[str, Any] | None = None) -> serve.Application:
    """The application graph for a RUN_DIR. `args` (strings from the command line, or typed from a
    config file): run_dir (required), batching, autoscaling, num_gpus, retriever_gpus, torch_threads, and any
    ServeConfig field (encoder_replicas, retriever_replicas, reranker_replicas, max_batch_size,
    batch_wait_timeout_s, max_query_chars, rerank_top_k, shards_per_retriever)."""
    app_args, overrides = parse_args(args)
    arts = find_artifacts(app_args.run_dir)
    scfg = dataclasses.replace(arts.cfg.serve, **overrides)
    if scfg.max_batch_size < 1 or scfg.batch_wait_timeout_s < 0 or scfg.max_query_chars < 1 or scfg.rerank_top_k < 1:
        raise ConfigError("max_batch_size, max_query_chars and rerank_top_k must be >= 1, batch_wait_timeout_s >= 0")
    from rocketqa_ray.modeling.base import model_fingerprint

    fp = model_fingerprint(arts.model_dir)
    dim = _model_dim(arts.model_dir)
    bf16 = arts.cfg.encode.bf16
    device = "cuda" if app_args.num_gpus > 0 else "cpu"
    model_actor = {"num_cpus": 0.1, **({"num_gpus": app_args.num_gpus} if app_args.num_gpus > 0 else {})}
    batch_kw = dict(bf16=bf16, device=device, batching=app_args.batching, max_batch_size=scfg.max_batch_size,
                    batch_wait_timeout_s=scfg.batch_wait_timeout_s, torch_threads=app_args.torch_threads)
    # A replica must accept at least a full batch of requests at once, or batches never fill.
    queue = max(2 * scfg.max_batch_size, 16)

    encoder = QueryEncoder.options(
        ray_actor_options=model_actor, max_ongoing_requests=queue,
        **_replicas(scfg.encoder_replicas, app_args.autoscaling, scfg.max_batch_size),
    ).bind(str(arts.model_dir), **batch_kw)
    groups = arts.shard_groups(scfg.shards_per_retriever)
    retrievers = [Retriever.options(
        name="Retriever" if len(groups) == 1 else f"Retriever{g}",
        ray_actor_options={"num_cpus": 0.1, **({"num_gpus": app_args.retriever_gpus} if app_args.retriever_gpus else {})},
        max_ongoing_requests=64,
        **_replicas(scfg.retriever_replicas, app_args.autoscaling, 8),
    ).bind(str(arts.index_dir), str(arts.corpus_path), dim, fp,
           for_actor_gpus(arts.cfg.index, app_args.retriever_gpus, "retriever_gpus"), arts.lexical,
           str(arts.bm25_stats) if arts.bm25_stats else None, shards, str(arts.store_dir) if arts.store_dir else None)
        for g, shards in enumerate(groups)]
    reranker = Reranker.options(
        ray_actor_options=model_actor if arts.cross_dir else {"num_cpus": 0.1}, max_ongoing_requests=queue,
        **_replicas(scfg.reranker_replicas if arts.cross_dir else 1, app_args.autoscaling and bool(arts.cross_dir),
                    scfg.max_batch_size),
    ).bind(str(arts.cross_dir) if arts.cross_dir else None, **batch_kw)
    if arts.cross_dir is None:
        log.warning("%s", arts.rerank_message)
    info = {
        "stage": arts.stage, "model": str(arts.model_dir), "model_fingerprint": fp,
        "reranker": str(arts.cross_dir) if arts.cross_dir else None, "rerank_message": arts.rerank_message,
        "fusion": arts.fusion, "rerank_default": arts.rerank_default, "rerank_reason": arts.rerank_reason,
        "batching": app_args.batching, "max_batch_size": scfg.max_batch_size, "rerank_top_k": scfg.rerank_top_k,
        "max_query_chars": scfg.max_query_chars, "max_top_k": MAX_TOP_K, "device": device,
    }
    return SearchIngress.bind(encoder, retrievers, reranker, info, scfg.max_query_chars, scfg.rerank_top_k)


def _model_dim(model_dir: Path) -> int:
    """Hidden size from the saved config, without loading the weights in the driver."""
    import json

    try:
        return int(json.loads((model_dir / "config.json").read_text())["hidden_size"])
    except (KeyError, ValueError, OSError) as e:
        raise ServiceError(f"{model_dir}/config.json has no readable hidden_size ({e})") from None
