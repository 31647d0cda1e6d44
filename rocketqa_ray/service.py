"""Retrieve-then-rerank search over a pipeline RUN_DIR, without Ray (Ray Serve wraps these in serve/app.py).

The pieces mirror the Serve deployments one to one, so the HTTP service and an in-process
`SearchService` compute exactly the same thing:

    QueryEncoderCore.encode(queries)            -> [B, H] float32 query embeddings
    RetrieverCore.search(emb, k, queries)        -> per query, k hits {id, title, text, score[, bm25]}
    RerankerCore.score_many([(query, passages)]) -> per request, [n] cross-encoder probabilities
    combine(...)                                 -> the response's result list

`find_artifacts(run_dir)` picks the newest dual encoder that has both a model and an index
(md2 > md1 > md0 > zero_shot) and the cross-encoder at `mc/model` when there is one.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, ValidationError, ValidationInfo, field_validator

from rocketqa_ray.config import BM25Config, Config, IndexConfig, ServeConfig, config_from_dict
from rocketqa_ray.data import find_corpus, iter_corpus, passage_text
from rocketqa_ray.errors import RocketQAError

log = logging.getLogger(__name__)

# Newest first: M_D2 is the paper's final retriever; zero_shot only if a run stopped before training.
DUAL_STAGES = ("md2", "md1", "md0", "zero_shot")
CROSS_STAGE = "mc"
MAX_TOP_K = 100
MAX_BODY_BYTES = 64 * 1024  # a query is at most max_query_chars; anything far larger is not a search request


class ServiceError(RocketQAError):
    """The RUN_DIR cannot be served (missing model/index, mismatched files, bad service arguments)."""


# ------------------------------------------------------------------------------------------ artifacts
@dataclass
class RunArtifacts:
    """What the service loads from a RUN_DIR."""

    run_dir: Path
    cfg: Config
    stage: str
    model_dir: Path
    index_dir: Path
    cross_dir: Path | None
    corpus_path: Path

    @property
    def fusion(self) -> dict | None:
        """The cross-encoder's fusion weights with the retriever score (`calibration.Fusion`), if it has them
        and the run's config uses them."""
        from rocketqa_ray.models import read_meta

        if self.cross_dir is None or not self.cfg.cross.fusion:
            return None
        return read_meta(self.cross_dir).get("fusion")

    @property
    def lexical(self) -> BM25Config | None:
        """The BM25 settings the retriever must score hits with, when the reranker's fusion weighs BM25."""
        from rocketqa_ray.calibration import Fusion

        fusion = Fusion.from_dict(self.fusion)
        return self.cfg.bm25 if fusion is not None and fusion.uses_bm25 else None

    @property
    def rerank_message(self) -> str | None:
        if self.cross_dir is not None:
            return None
        return (f"reranking is disabled: no cross-encoder at {self.run_dir / CROSS_STAGE / 'model'} "
                "(run the pipeline's 'mc' stage); results are dense-retrieval scores")


def _resolve_data_path(raw: str, run_dir: Path) -> Path:
    p = Path(raw).expanduser()
    if p.is_absolute():
        return p
    # Relative paths in a saved config were relative to where the pipeline ran; try the usual places.
    for base in (Path.cwd(), run_dir, run_dir.parent, Path(__file__).resolve().parent.parent):
        if (base / p).exists():
            return (base / p).resolve()
    return p


def find_artifacts(run_dir: str | Path) -> RunArtifacts:
    """Locate config, dual encoder + index, cross-encoder and corpus in a RUN_DIR (ServiceError if unusable)."""
    run_dir = Path(run_dir).expanduser().resolve()
    if not run_dir.is_dir():
        raise ServiceError(f"RUN_DIR {run_dir} does not exist; pass run_dir=<the pipeline's --out directory>")
    cfg_path = run_dir / "config.json"
    if not cfg_path.exists():
        raise ServiceError(f"{cfg_path} not found: {run_dir} is not a pipeline RUN_DIR (jobs/pipeline.py --out writes it)")
    try:
        cfg = config_from_dict(json.loads(cfg_path.read_text(encoding="utf-8")))
    except json.JSONDecodeError as e:
        raise ServiceError(f"{cfg_path} is not valid JSON ({e.msg}); rerun the pipeline to rewrite it") from None
    stage = next((s for s in DUAL_STAGES
                  if (run_dir / s / "model" / "config.json").exists() and (run_dir / s / "index").is_dir()), None)
    if stage is None:
        raise ServiceError(
            f"{run_dir}: no dual encoder with an index; the service needs <stage>/model and <stage>/index for one of "
            f"{', '.join(DUAL_STAGES)} (run the pipeline at least through md0)")
    cross = run_dir / CROSS_STAGE / "model"
    corpus_root = _resolve_data_path(cfg.data.path, run_dir)
    try:
        corpus_path = find_corpus(corpus_root)
    except RocketQAError as e:
        raise ServiceError(f"{cfg_path}: data.path points to an unusable dataset: {e}") from None
    return RunArtifacts(run_dir=run_dir, cfg=cfg, stage=stage, model_dir=run_dir / stage / "model",
                        index_dir=run_dir / stage / "index",
                        cross_dir=cross if (cross / "config.json").exists() else None, corpus_path=corpus_path)


def set_torch_threads(n: int | None) -> None:
    """Each Serve replica gets a fraction of a CPU; without a cap every replica's torch would use every core."""
    if n:
        import torch

        torch.set_num_threads(int(n))


# ------------------------------------------------------------------------------------------ components
class QueryEncoderCore:
    """The dual encoder's query tower."""

    def __init__(self, model_dir: str | Path, bf16: str = "auto", device: str | None = None):
        from rocketqa_ray.models import DualEncoder, fingerprint

        self.model_dir = Path(model_dir)
        self.model = DualEncoder.load(self.model_dir)
        self.model.eval()
        self.bf16 = bf16
        self.device = device
        self.fingerprint = fingerprint(self.model_dir)

    @property
    def dim(self) -> int:
        return self.model.dim

    def encode(self, queries: list[str]) -> np.ndarray:
        """list of B query strings -> float32 [B, H] (same call as the offline pipeline's query encoding)."""
        return self.model.encode(queries, kind="query", batch_size=max(1, len(queries)), bf16=self.bf16,
                                 device=self.device)


class PassageStore:
    """id -> (title, text) for the passages in the index, read once from the corpus."""

    def __init__(self, corpus_path: str | Path, ids: list[str]):
        wanted = set(ids)
        self._rows: dict[str, tuple[str, str]] = {}
        for p in iter_corpus(corpus_path):
            if p["_id"] in wanted:
                self._rows[p["_id"]] = (p["title"], p["text"])
        missing = wanted.difference(self._rows)
        if missing:
            example = sorted(missing)[:3]
            raise ServiceError(
                f"{corpus_path}: {len(missing)} passage id(s) of the index are not in the corpus (e.g. {example}); "
                "the index was built from another corpus than config data.path")

    def __len__(self) -> int:
        return len(self._rows)

    def get(self, pid: str) -> tuple[str, str]:
        return self._rows[pid]


class RetrieverCore:
    """A saved DenseIndex plus the passage texts; refuses an index built with another model. With `bm25`, each
    hit also carries its BM25 score for the question (a feature of the reranker's fusion)."""

    def __init__(self, index_dir: str | Path, corpus_path: str | Path, expect_dim: int | None = None,
                 expect_fingerprint: str | None = None, index_cfg: IndexConfig | None = None,
                 bm25: BM25Config | None = None):
        from rocketqa_ray.index import DenseIndex

        # index_cfg: the run's search-time knobs (nprobe, ef_search, use_gpu); the structure is the saved one.
        self.index = DenseIndex.load(index_dir, expect_dim=expect_dim, expect_fingerprint=expect_fingerprint,
                                     cfg=index_cfg)
        self.store = PassageStore(corpus_path, list(self.index.ids))
        self.lexical = None
        if bm25 is not None:
            from rocketqa_ray.bm25 import BM25Retriever

            ids = list(self.index.ids)
            self.lexical = BM25Retriever.from_config(ids, [passage_text(*self.store.get(p)) for p in ids], bm25)

    @property
    def size(self) -> int:
        return len(self.index.ids)

    def info(self) -> dict[str, Any]:
        return {"kind": self.index.kind, "size": self.size, "dim": int(self.index.dim)}

    def search(self, emb: np.ndarray, k: int, queries: list[str] | None = None) -> list[list[dict]]:
        """[B, H] query embeddings -> B lists of up to k hits {id, title, text, score}, best first; with a BM25
        index and the B query strings, each hit also has its `bm25` score."""
        emb = np.ascontiguousarray(np.atleast_2d(emb), dtype=np.float32)
        scores, rows = self.index.search(emb, min(k, self.size))
        out = []
        for srow, rrow in zip(scores, rows):
            hits = []
            for s, r in zip(srow, rrow):
                if r < 0:
                    continue
                pid = self.index.ids[int(r)]
                title, text = self.store.get(pid)
                hits.append({"id": pid, "title": title, "text": text, "score": float(s)})
            out.append(hits)
        if self.lexical is not None and queries is not None:
            for q, hits in zip(queries, out):
                for h, v in zip(hits, self.lexical.score(q, [h["id"] for h in hits])):
                    h["bm25"] = float(v)
        return out


class RerankerCore:
    """The cross-encoder M_C: probability that a passage answers the question."""

    def __init__(self, model_dir: str | Path, bf16: str = "auto", device: str | None = None, batch_size: int = 64):
        from rocketqa_ray.models import CrossEncoder

        self.model_dir = Path(model_dir)
        self.model = CrossEncoder.load(self.model_dir)
        self.model.eval()
        self.bf16 = bf16
        self.device = device
        self.batch_size = batch_size

    def score_many(self, requests: list[tuple[str, list[str]]]) -> list[np.ndarray]:
        """[(query, [n_i passage strings])] -> [n_i] probabilities per request, scored as one flat batch."""
        qs = [q for q, ps in requests for _ in ps]
        ps = [p for _, pl in requests for p in pl]
        if not qs:
            return [np.zeros(0, dtype=np.float32) for _ in requests]
        flat = self.model.score(qs, ps, batch_size=self.batch_size, bf16=self.bf16, device=self.device)
        out, start = [], 0
        for _, pl in requests:
            out.append(flat[start : start + len(pl)])
            start += len(pl)
        return out


def candidate_depth(top_k: int, rerank: bool, rerank_top_k: int, index_size: int) -> int:
    """How many passages to retrieve: the reranker sees at least `rerank_top_k` of them."""
    k = max(top_k, rerank_top_k) if rerank else top_k
    return min(k, index_size)


def rerank_texts(hits: list[dict]) -> list[str]:
    """What the cross-encoder sees for each hit (the same text the pipeline scored)."""
    return [passage_text(h["title"], h["text"]) for h in hits]


def combine(hits: list[dict], top_k: int, ce_scores: np.ndarray | None = None, fusion: dict | None = None) -> list[dict]:
    """Final results, best first: reranked by cross-encoder probability when given, or by its fusion with
    the dense score (`calibration.Fusion`, as the pipeline's rerank stages) when `fusion` is given; the
    dense and cross-encoder scores are kept in each hit."""
    out = [dict(h, dense_score=h["score"]) for h in hits]
    if ce_scores is not None:
        final = np.asarray(ce_scores, dtype=np.float64)
        if fusion and len(out):
            from rocketqa_ray.calibration import Fusion

            f = Fusion.from_dict(fusion)
            lexical = None
            if f.uses_bm25:
                if any("bm25" not in h for h in out):
                    raise ServiceError("the reranker's fusion weighs BM25 scores but the retriever returned none "
                                       "(build RetrieverCore with the run's bm25 config)")
                lexical = np.array([h["bm25"] for h in out])
            final = f(final, np.array([h["score"] for h in out]), lexical)
        for h, s, c in zip(out, final, ce_scores):
            h["score"] = float(s)
            h["ce_score"] = float(c)
        # Stable sort: equal cross-encoder scores keep the retriever's order.
        order = sorted(range(len(out)), key=lambda i: -out[i]["score"])
        out = [out[i] for i in order]
    return out[:top_k]


# ------------------------------------------------------------------------------------------ requests
class SearchRequest(BaseModel):
    """POST /search body. Limits that depend on the deployment come in the validation context:
    {"max_query_chars": int, "max_top_k": int}."""

    model_config = ConfigDict(extra="forbid", strict=True)

    query: str
    top_k: int = 10
    rerank: bool = True

    @field_validator("query")
    @classmethod
    def _query(cls, v: str, info: ValidationInfo) -> str:
        limit = (info.context or {}).get("max_query_chars", ServeConfig.max_query_chars)
        v = v.strip()
        if not v:
            raise ValueError("query is empty; send a question, e.g. {\"query\": \"who founded the Internet Archive?\"}")
        if len(v) > limit:
            raise ValueError(f"query is {len(v)} characters long; the limit is {limit}")
        return v

    @field_validator("top_k")
    @classmethod
    def _top_k(cls, v: int, info: ValidationInfo) -> int:
        limit = (info.context or {}).get("max_top_k", MAX_TOP_K)
        if not 1 <= v <= limit:
            raise ValueError(f"top_k must be between 1 and {limit} (got {v})")
        return v


class BadRequest(Exception):
    """A client error: HTTP status and a readable message (plus per-field details)."""

    def __init__(self, status: int, error: str, message: str, detail: list[dict] | None = None):
        super().__init__(message)
        self.status, self.error, self.message, self.detail = status, error, message, detail or []

    def body(self) -> dict[str, Any]:
        return {"error": self.error, "message": self.message, "detail": self.detail}


def parse_search_request(body: bytes, max_query_chars: int, max_top_k: int) -> SearchRequest:
    """Raw request body -> SearchRequest, or BadRequest (400 malformed JSON / 413 too large / 422 invalid)."""
    if len(body) > MAX_BODY_BYTES:
        raise BadRequest(413, "request too large", f"request body is {len(body)} bytes; the limit is {MAX_BODY_BYTES}")
    try:
        obj = json.loads(body) if body.strip() else None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BadRequest(400, "malformed JSON", f"request body is not valid JSON: {e}") from None
    if not isinstance(obj, dict):
        raise BadRequest(422, "invalid request",
                         'request body must be a JSON object like {"query": "...", "top_k": 10, "rerank": true}, '
                         f"got {'nothing' if obj is None else type(obj).__name__}")
    try:
        return SearchRequest.model_validate(obj, context={"max_query_chars": max_query_chars, "max_top_k": max_top_k})
    except ValidationError as e:
        detail = []
        for err in e.errors(include_url=False):
            field = ".".join(str(x) for x in err["loc"]) or "body"
            msg = err["msg"].removeprefix("Value error, ")
            if err["type"] == "extra_forbidden":
                msg = f"unknown field '{field}'; allowed fields: query, top_k, rerank"
            elif err["type"] == "missing":
                msg = f"field '{field}' is required"
            elif not err["type"].startswith("value_error"):  # a type error: show what was sent
                msg = f"{msg} (got {json.dumps(err.get('input'))[:80]})"
            detail.append({"field": field, "message": msg, "type": err["type"]})
        message = "; ".join(f"{d['field']}: {d['message']}" for d in detail)
        raise BadRequest(422, "invalid request", message, detail) from None


# ------------------------------------------------------------------------------------------ in process
class SearchService:
    """The whole search in one process: the reference the Serve app is tested and benchmarked against."""

    def __init__(self, arts: RunArtifacts, serve_cfg: ServeConfig | None = None, device: str | None = None):
        self.arts = arts
        self.serve_cfg = serve_cfg or arts.cfg.serve
        bf16 = arts.cfg.encode.bf16
        self.encoder = QueryEncoderCore(arts.model_dir, bf16=bf16, device=device)
        self.retriever = RetrieverCore(arts.index_dir, arts.corpus_path, expect_dim=self.encoder.dim,
                                       expect_fingerprint=self.encoder.fingerprint, index_cfg=arts.cfg.index,
                                       bm25=arts.lexical)
        self.reranker = RerankerCore(arts.cross_dir, bf16=bf16, device=device) if arts.cross_dir else None
        self.fusion = arts.fusion  # read once: the property reads the cross-encoder's meta file

    @classmethod
    def from_run_dir(cls, run_dir: str | Path, **kw: Any) -> SearchService:
        return cls(find_artifacts(run_dir), **kw)

    def search(self, query: str, top_k: int = 10, rerank: bool = True) -> dict[str, Any]:
        t0 = time.perf_counter()
        emb = self.encoder.encode([query])
        t1 = time.perf_counter()
        do_rerank = rerank and self.reranker is not None
        k = candidate_depth(top_k, do_rerank, self.serve_cfg.rerank_top_k, self.retriever.size)
        hits = self.retriever.search(emb, k, [query])[0]
        t2 = time.perf_counter()
        scores = self.reranker.score_many([(query, rerank_texts(hits))])[0] if do_rerank else None
        t3 = time.perf_counter()
        message = self.arts.rerank_message if rerank and self.reranker is None else None
        return search_response(hits, top_k, scores, do_rerank, (t0, t1, t2, t3), message, self.fusion)


def search_response(hits: Any, top_k: int, scores: Any, reranked: bool, times: tuple[float, float, float, float],
                    message: str | None = None, fusion: dict | None = None) -> dict[str, Any]:
    """The /search JSON body (shared by the in-process service and the Serve ingress): results plus
    per-step timings from the four perf_counter marks (start, encoded, retrieved, reranked)."""
    t0, t1, t2, t3 = times
    out: dict[str, Any] = {
        "results": combine(hits, top_k, scores, fusion),
        "reranked": reranked,
        "timings_ms": {"encode": 1e3 * (t1 - t0), "retrieve": 1e3 * (t2 - t1), "rerank": 1e3 * (t3 - t2),
                       "total": 1e3 * (t3 - t0)},
    }
    if message:
        out["message"] = message
    return out


# ------------------------------------------------------------------------------------------ demo RUN_DIR
def _demo_subset(data_dir: Path, n_passages: int) -> tuple[list[dict], dict[str, dict], dict[str, dict[str, int]]]:
    from rocketqa_ray.data import load_qrels, load_queries

    qrels = load_qrels(data_dir / "qrels" / "test.tsv")
    corpus = list(iter_corpus(data_dir))
    by_id = {p["_id"]: p for p in corpus}
    chosen: dict[str, dict] = {}
    # Gold passages of test questions first, so the demo's questions have their answers in the corpus.
    for rels in qrels.values():
        for pid in rels:
            if len(chosen) < n_passages // 2 and pid in by_id:
                chosen.setdefault(pid, by_id[pid])
    for p in corpus:
        if len(chosen) >= n_passages:
            break
        chosen.setdefault(p["_id"], p)
    queries = load_queries(data_dir / "queries.jsonl")
    sub_qrels = {q: rels for q, rels in qrels.items() if q in queries and set(rels) <= set(chosen)}
    return list(chosen.values()), {q: queries[q] for q in sub_qrels}, sub_qrels


def _spread_head(ce: Any, questions: list[str], passages: list[str], std: float = 2.0) -> None:
    """Rescale an untrained cross-encoder's 1-logit head so its logits spread (mean 0, `std`) on sample pairs.

    A random BERT's [CLS] pooler output hardly varies between inputs, so untrained probabilities all sit
    within 1e-6 of each other and every rerank would be a tie. Spreading them keeps the demo's order
    decided by the model (still random, not meaningful) rather than by float rounding.
    """
    import torch

    head = getattr(ce.model, "classifier", None)
    if head is None or not isinstance(head, torch.nn.Linear):
        return
    with torch.no_grad():
        logits = ce(ce.tokenize(questions, passages))
        scale = std / float(logits.std().clamp(min=1e-12))
        head.weight.mul_(scale)
        head.bias.copy_((head.bias - logits.mean()) * scale)


DEMO_FUSION = {"ce": 1.0, "dense": 2.0, "bm25": 0.2, "bias": -0.5}


def make_demo_run_dir(out: str | Path, n_passages: int = 200, data_dir: str | Path | None = None,
                      with_reranker: bool = True, preset: str = "tiny") -> Path:
    """A small servable RUN_DIR: an untrained dual encoder (stage md2) with a flat index over
    `n_passages` passages of squad-mini, a cross-encoder (mc) and config.json pointing at a copied
    BEIR subset (corpus.jsonl, queries.jsonl, qrels/test.tsv) inside `out/data`.

    preset "tiny": the random 32-d test BERT (seconds); "cpu": all-MiniLM-L6-v2 with the real
    sequence lengths (for realistic latencies; the reranker head is still untrained)."""
    from rocketqa_ray.config import IndexConfig, load_config
    from rocketqa_ray.index import DenseIndex
    from rocketqa_ray.io import write_json, write_text
    from rocketqa_ray.models import CrossEncoder, DualEncoder, fingerprint

    out = Path(out).resolve()
    data_dir = Path(data_dir) if data_dir else Path(__file__).resolve().parent.parent / "data" / "squad-mini"
    passages, queries, qrels = _demo_subset(data_dir, n_passages)
    ddir = out / "data"
    write_text(ddir / "corpus.jsonl", "".join(json.dumps(p) + "\n" for p in passages))
    write_text(ddir / "queries.jsonl", "".join(json.dumps({"_id": q, **v}) + "\n" for q, v in queries.items()))
    write_text(ddir / "qrels" / "test.tsv", "query-id\tcorpus-id\tscore\n"
               + "".join(f"{q}\t{p}\t{r}\n" for q, rels in qrels.items() for p, r in rels.items()))

    cfg = load_config(preset, overrides=[f"data.path={ddir}"])
    dual = DualEncoder.from_base(cfg.model)
    dual.save(out / "md2" / "model")
    emb = dual.encode([passage_text(p["title"], p["text"]) for p in passages], kind="passage",
                      bf16=cfg.encode.bf16, device="cpu")
    DenseIndex.build(emb, [p["_id"] for p in passages], IndexConfig(kind="flat"),
                     model_fingerprint=fingerprint(out / "md2" / "model")).save(out / "md2" / "index")
    write_json(out / "md2" / "_COMPLETE.json", {"stage": "md2", "demo": True})
    if with_reranker:
        ce = CrossEncoder.from_base(cfg.cross.base, max_len=cfg.cross.max_len)
        qtexts = [v["text"] for v in queries.values()][:32]
        _spread_head(ce, qtexts, [passage_text(p["title"], p["text"]) for p in passages[: len(qtexts)]])
        # Fusion weights as the pipeline's mc stage fits them, so a demo serves the fused rerank path too.
        ce.save(out / CROSS_STAGE / "model", extra_meta={"fusion": DEMO_FUSION})
        write_json(out / CROSS_STAGE / "_COMPLETE.json", {"stage": CROSS_STAGE, "demo": True})
    write_json(out / "config.json", cfg.to_dict())
    return out


def demo_queries(run_dir: str | Path, n: int | None = None) -> list[str]:
    """Test-split question texts of a RUN_DIR's dataset (for demos, tests and benchmarks)."""
    from rocketqa_ray.data import load_queries

    arts = find_artifacts(run_dir)
    qs = load_queries(arts.corpus_path.parent / "queries.jsonl")
    texts = [v["text"] for v in qs.values() if v.get("split") in (None, arts.cfg.data.test_split)]
    texts = texts or [v["text"] for v in qs.values()]
    return texts[:n] if n else texts
