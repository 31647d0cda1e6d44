"""The HTTP API's request and response: validation of a /search body into 4xx errors, and the response builder
shared by the in-process service and the Serve ingress (Ray-free)."""

from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError, ValidationInfo, field_validator

from rocketqa_ray.config import ServeConfig
from rocketqa_ray.serving.components import combine

MAX_TOP_K = 100
MAX_BODY_BYTES = 64 * 1024  # a query is at most max_query_chars; anything far larger is not a search request


class SearchRequest(BaseModel):
    """POST /search body. Limits that depend on the deployment come in the validation context:
    {"max_query_chars": int, "max_top_k": int}."""

    model_config = ConfigDict(extra="forbid", strict=True)

    query: str
    top_k: int = 10
    rerank: bool | None = None  # None: what held-out dev chose for the served retriever (`wants_rerank`)

    @field_validator("query")
    @classmethod
    def _query(cls, v: str, info: ValidationInfo) -> str:
        limit = (info.context or {}).get("max_query_chars", ServeConfig.max_query_chars)
        v = v.strip()
        if not v:
            raise ValueError("query is empty; send a question, e.g. {\"query\": \"who founded the Internet Archive?\"}")
        try:
            v.encode("utf-8")
        except UnicodeEncodeError as e:
            # JSON's \ud800 escapes decode to lone surrogates, which no tokenizer can read
            raise ValueError(f"query has a character that is not valid Unicode text at position {e.start} "
                             f"(U+{ord(v[e.start]):04X}, a lone surrogate); send UTF-8 text") from None
        if len(v) > limit:
            raise ValueError(f"query is {len(v)} characters long; the limit is {limit}")
        return v

    @field_validator("top_k")
    @classmethod
    def _top_k(cls, v: int, info: ValidationInfo) -> int:
        limit = (info.context or {}).get("max_top_k", MAX_TOP_K)
        if not 1 <= v <= limit:
            raise ValueError(f"top_k must be between 1 and {limit} (got {show(v)})")
        return v


def rerank_decision(requested: bool | None, default: bool, unavailable: str | None) -> tuple[bool, str | None]:
    """(rerank this request?, a message for the response). A request that does not say `rerank` gets the run's
    recorded choice (`RunArtifacts.rerank_default`: reranking only where it beat the retriever alone on held-out
    dev); `unavailable` is why the service cannot rerank at all (None when it can), told unless the request
    asked for no rerank."""
    if unavailable is not None:
        return False, None if requested is False else unavailable
    return (default if requested is None else requested), None


class BadRequest(Exception):
    """A client error: HTTP status and a readable message (plus per-field details)."""

    def __init__(self, status: int, error: str, message: str, detail: list[dict] | None = None):
        super().__init__(message)
        self.status, self.error, self.message, self.detail = status, error, message, detail or []

    def body(self) -> dict[str, Any]:
        return {"error": self.error, "message": self.message, "detail": self.detail}


def show(value: Any, limit: int = 80) -> str:
    """A short JSON rendering of what a client sent, for an error message; never raises."""
    try:
        text = json.dumps(value)
    except (ValueError, TypeError, RecursionError):  # huge ints, unserialisable or deeply nested values
        text = type(value).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def check_content_type(content_type: str | None) -> None:
    """A body sent as another media type (a form, plain text) is refused rather than guessed at; none is fine."""
    media = (content_type or "").split(";")[0].strip().lower()
    if media and media != "application/json" and not media.endswith("+json"):
        raise BadRequest(415, "unsupported media type",
                         f"Content-Type is {media}; send the body as JSON with 'Content-Type: application/json'")


def parse_search_request(body: bytes, max_query_chars: int, max_top_k: int,
                         content_type: str | None = None) -> SearchRequest:
    """Raw request body -> SearchRequest, or BadRequest (400 malformed JSON / 413 too large / 415 not JSON /
    422 invalid)."""
    check_content_type(content_type)
    if len(body) > MAX_BODY_BYTES:
        raise BadRequest(413, "request too large", f"request body is {len(body)} bytes; the limit is {MAX_BODY_BYTES}")
    try:
        obj = json.loads(body) if body.strip() else None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BadRequest(400, "malformed JSON", f"request body is not valid JSON: {e}") from None
    except RecursionError:
        raise BadRequest(400, "malformed JSON", "request body is not valid JSON: it is nested too deeply") from None
    except ValueError as e:  # e.g. an integer beyond Python's digit limit
        raise BadRequest(400, "malformed JSON", f"request body is not valid JSON: {show(str(e), 120)}") from None
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
                msg = f"{msg} (got {show(err.get('input'))})"
            detail.append({"field": field, "message": msg, "type": err["type"]})
        message = "; ".join(f"{d['field']}: {d['message']}" for d in detail)
        raise BadRequest(422, "invalid request", message, detail) from None


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
