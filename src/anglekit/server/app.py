"""The FastAPI application of ``anglekit serve``.

Endpoints:

- ``POST /v1/embeddings``: the OpenAI embeddings API (``input``, ``model``,
  ``encoding_format``, ``dimensions``, ``user``) plus ``prompt_name``, a template saved with
  the model (e.g. ``query``). Embeddings are unit vectors; ``dimensions`` keeps the first
  ``k`` components and renormalises them (Matryoshka truncation), as OpenAI does.
- ``POST /v1/similarity``: cosine similarity of text pairs.
- ``GET /health``: liveness and the served model; never needs the API key.
- ``GET /metrics``: Prometheus text format: requests by endpoint and status, latency,
  texts and requests per forward pass, queued texts.

Errors are JSON, ``{"error": {"message", "type", "param", "code"}}``, as OpenAI sends them:
400 for bad values and malformed JSON, 401 for a missing or wrong key, 404 for another
``model``, 413 for a body over the limit, 422 for wrong types or fields, 503 with
``Retry-After`` when the queue is full. The ``model`` field is only compared with the served
name: no request can make the server load a file or a model.
"""

from __future__ import annotations

import base64
import hmac
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

try:
    from fastapi import APIRouter, Depends, FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, Response
    from prometheus_client import (
        CONTENT_TYPE_LATEST,
        CollectorRegistry,
        Counter,
        Gauge,
        Histogram,
        generate_latest,
    )
    from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr, field_validator
    from starlette.exceptions import HTTPException
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError(
        f'the embedding server needs its extra ({e}): pip install "anglekit[serve]"'
    ) from e

from anglekit import __version__
from anglekit.model import AnglE
from anglekit.prompts import apply_prompt
from anglekit.server import ServeOptions
from anglekit.server.batcher import EncodeResult, MicroBatcher, QueueFullError

__all__ = ["build_app"]

logger = logging.getLogger(__name__)

ENDPOINTS = ("/v1/embeddings", "/v1/similarity", "/health", "/metrics")
RETRY_AFTER_S = 1
Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


# --------------------------------------------------------------------------- request bodies


def _check_texts(value: Any) -> Any:
    """Refuse token-id input (which OpenAI accepts) with a message saying what to send."""
    if (
        isinstance(value, list)
        and value
        and all(
            isinstance(v, int) or (isinstance(v, list) and all(isinstance(t, int) for t in v))
            for v in value
        )
    ):
        raise ValueError(
            "token-id arrays are not supported; send text: a string or a list of strings"
        )
    return value


class EmbeddingsRequest(BaseModel):
    """Body of ``POST /v1/embeddings``."""

    model_config = ConfigDict(extra="forbid")

    input: StrictStr | list[StrictStr]
    model: StrictStr | None = None
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: StrictInt | None = Field(default=None, ge=1)
    user: StrictStr | None = None
    prompt_name: StrictStr | None = None

    _no_token_ids = field_validator("input", mode="before")(_check_texts)


class SimilarityRequest(BaseModel):
    """Body of ``POST /v1/similarity``: ``pairs`` of texts, scored by cosine."""

    model_config = ConfigDict(extra="forbid")

    pairs: list[tuple[StrictStr, StrictStr]] = Field(min_length=1)
    model: StrictStr | None = None
    prompt_name: StrictStr | None = None


# --------------------------------------------------------------------------- errors


class APIError(HTTPException):
    """An HTTP error with the OpenAI error fields."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        kind: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(status, message, headers)
        self.kind, self.param, self.code = kind, param, code


def error_body(
    message: str, kind: str, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    """The JSON of an error response."""
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    kind = getattr(exc, "kind", "invalid_request_error" if exc.status_code < 500 else "server")
    body = error_body(
        str(exc.detail), kind, getattr(exc, "param", None), getattr(exc, "code", None)
    )
    return JSONResponse(body, status_code=exc.status_code, headers=exc.headers)


async def _validation_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestValidationError)
    errors = exc.errors()
    if any(e.get("type") == "json_invalid" for e in errors):
        detail = next(e for e in errors if e.get("type") == "json_invalid").get("ctx", {})
        reason = detail.get("error", "cannot be parsed")
        return JSONResponse(
            error_body(f"the request body is not valid JSON: {reason}", "invalid_request_error"),
            status_code=400,
        )
    problems = []
    for e in errors:
        loc = [str(part) for part in e.get("loc", ()) if part != "body"]
        # pydantic names the union branch it tried (``str``, ``list[str]``); drop it
        loc = [part for part in loc if part not in ("str", "list[str]")]
        where = ".".join(loc) or "body"
        problems.append(f"{where}: {e.get('msg', 'invalid')}")
    first = [str(p) for p in errors[0].get("loc", ()) if p != "body"][:1] if errors else []
    return JSONResponse(
        error_body("; ".join(dict.fromkeys(problems)), "invalid_request_error", *first),
        status_code=422,
    )


async def _queue_full(request: Request, exc: Exception) -> Response:
    return JSONResponse(
        error_body(f"the server is busy ({exc}); retry later", "server_busy", code="queue_full"),
        status_code=503,
        headers={"Retry-After": str(RETRY_AFTER_S)},
    )


async def _unexpected(request: Request, exc: Exception) -> Response:
    logger.exception("unexpected error on %s", request.url.path, exc_info=exc)
    return JSONResponse(error_body("internal server error", "server_error"), status_code=500)


# --------------------------------------------------------------------------- metrics


class Metrics:
    """The Prometheus series of one app, in a registry of their own."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "anglekit_requests",
            "HTTP requests by endpoint and status code.",
            ["endpoint", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "anglekit_request_duration_seconds",
            "Time from request to response, by endpoint.",
            ["endpoint"],
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0),
            registry=self.registry,
        )
        powers = tuple(float(2**i) for i in range(11))  # 1 .. 1024
        self.batch_texts = Histogram(
            "anglekit_batch_texts",
            "Texts per forward pass.",
            buckets=powers,
            registry=self.registry,
        )
        self.batch_requests = Histogram(
            "anglekit_batch_requests",
            "Requests merged into one forward pass.",
            buckets=powers,
            registry=self.registry,
        )
        self.texts = Counter("anglekit_texts", "Texts embedded.", registry=self.registry)
        self.tokens = Counter("anglekit_tokens", "Tokens embedded.", registry=self.registry)
        self.queued = Gauge(
            "anglekit_queued_texts", "Texts waiting for the model.", registry=self.registry
        )

    def observe_batch(self, texts: int, requests: int) -> None:
        """Record one forward pass."""
        self.batch_texts.observe(texts)
        self.batch_requests.observe(requests)


class MetricsMiddleware:
    """Count every response by endpoint and status, and time it (outermost middleware)."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        endpoint = scope["path"] if scope["path"] in ENDPOINTS else "other"
        status = 500
        start = time.perf_counter()

        async def record_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, record_status)
        finally:
            self.metrics.requests.labels(endpoint, str(status)).inc()
            self.metrics.latency.labels(endpoint).observe(time.perf_counter() - start)


class BodyLimitMiddleware:
    """Answer 413 to bodies over ``limit`` bytes before any of it is parsed.

    A declared ``Content-Length`` over the limit is refused at once; otherwise the body is
    read up to the limit (it is small then) and handed on.
    """

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app, self.limit = app, limit

    async def _refuse(self, send: Send, status: int, message: str) -> None:
        response = JSONResponse(error_body(message, "invalid_request_error"), status_code=status)
        await response({"type": "http"}, _no_receive, send)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length")
        too_big = f"the request body exceeds the limit of {self.limit} bytes"
        if declared is not None:
            if not declared.isdigit():
                await self._refuse(send, 400, "the Content-Length header is not a number")
                return
            if int(declared) > self.limit:
                await self._refuse(send, 413, too_big)
                return
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client went away
                return
            size += len(message.get("body", b""))
            if size > self.limit:
                await self._refuse(send, 413, too_big)
                return
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                break
        body, replayed = b"".join(chunks), False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


async def _no_receive() -> Message:
    return {"type": "http.disconnect"}


# --------------------------------------------------------------------------- the model side


@dataclass
class ServerState:
    """What the endpoints share: the model, its batcher, the options and the metrics."""

    model: AnglE
    options: ServeOptions
    batcher: MicroBatcher
    metrics: Metrics
    model_name: str


def make_encoder(model: AnglE, batch_size: int) -> Callable[[list[str]], EncodeResult]:
    """Embed texts whose prompt is already applied: full-size, unnormalised, float32.

    Runs on the batcher's worker thread. Token counts (for ``usage``) come from a separate,
    cheap tokenizer call.
    """

    def encode(texts: list[str]) -> EncodeResult:
        vectors = model.encode(
            texts,
            batch_size=batch_size,
            prompt="{text}",  # texts arrive with their own prompt applied
            normalize=False,
            show_progress=False,
        )
        counts = [len(ids) for ids in model.tokenize(texts)]
        return EncodeResult(np.asarray(vectors, dtype=np.float32), counts)

    return encode


def _state(request: Request) -> ServerState:
    return request.app.state.anglekit


async def _authorize(request: Request) -> None:
    """Check ``Authorization: Bearer <key>`` in constant time when a key is set."""
    key = _state(request).options.api_key
    if key is None:
        return
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(
        given.strip().encode("utf-8"), key.encode("utf-8")
    ):
        raise APIError(
            401,
            "missing or wrong API key; send 'Authorization: Bearer <key>'",
            code="invalid_api_key",
            headers={"WWW-Authenticate": "Bearer"},
        )


def _check_model(state: ServerState, model: str | None) -> None:
    if model is not None and model != state.model_name:
        raise APIError(
            404,
            f"model {model!r} is not served here; this server serves {state.model_name!r}",
            param="model",
            code="model_not_found",
        )


def _check_texts_limits(state: ServerState, texts: list[str], param: str) -> None:
    options = state.options
    for i, text in enumerate(texts):
        if not text.strip():
            raise APIError(400, f"{param}[{i}] is empty", param=param)
        if len(text) > options.max_chars:
            raise APIError(
                400,
                f"{param}[{i}] has {len(text)} characters; the limit is {options.max_chars}",
                param=param,
                code="text_too_long",
            )


def _template(state: ServerState, prompt_name: str | None) -> str | None:
    try:
        return state.model.template(prompt_name=prompt_name)
    except ValueError as e:
        raise APIError(400, str(e), param="prompt_name") from None


async def _embed(state: ServerState, texts: list[str], prompt_name: str | None) -> EncodeResult:
    result = await state.batcher.submit(apply_prompt(_template(state, prompt_name), texts))
    state.metrics.texts.inc(len(texts))
    state.metrics.tokens.inc(sum(result.token_counts))
    return result


def unit_rows(vectors: np.ndarray, dimensions: int | None = None) -> np.ndarray:
    """Keep the first ``dimensions`` columns, then scale every row to length 1."""
    if dimensions is not None:
        vectors = vectors[:, :dimensions]
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return (vectors / np.maximum(norms, 1e-12)).astype(np.float32)


def _usage(result: EncodeResult) -> dict[str, int]:
    tokens = int(sum(result.token_counts))
    return {"prompt_tokens": tokens, "total_tokens": tokens}


router = APIRouter(dependencies=[Depends(_authorize)])


@router.post("/v1/embeddings")
async def embeddings(body: EmbeddingsRequest, request: Request) -> Response:
    """Embed a string or a list of strings (the OpenAI embeddings API)."""
    state = _state(request)
    _check_model(state, body.model)
    texts = [body.input] if isinstance(body.input, str) else body.input
    if not texts:
        raise APIError(400, "input is an empty list", param="input")
    if len(texts) > state.options.max_items:
        raise APIError(
            400,
            f"input has {len(texts)} texts; the limit is {state.options.max_items} per request",
            param="input",
            code="too_many_inputs",
        )
    _check_texts_limits(state, texts, "input")
    if body.dimensions is not None and body.dimensions > state.model.embedding_dim:
        raise APIError(
            400,
            f"dimensions must be in 1..{state.model.embedding_dim}, got {body.dimensions}",
            param="dimensions",
        )
    result = await _embed(state, texts, body.prompt_name)
    vectors = unit_rows(result.embeddings, body.dimensions)
    if body.encoding_format == "base64":
        encoded: list[Any] = [base64.b64encode(v.astype("<f4").tobytes()).decode() for v in vectors]
    else:
        encoded = vectors.tolist()
    data = [{"object": "embedding", "index": i, "embedding": e} for i, e in enumerate(encoded)]
    return JSONResponse(
        {"object": "list", "data": data, "model": state.model_name, "usage": _usage(result)}
    )


@router.post("/v1/similarity")
async def similarity(body: SimilarityRequest, request: Request) -> Response:
    """Cosine similarity of each pair of texts."""
    state = _state(request)
    _check_model(state, body.model)
    if len(body.pairs) > state.options.max_items:
        raise APIError(
            400,
            f"pairs has {len(body.pairs)} pairs; the limit is {state.options.max_items}",
            param="pairs",
            code="too_many_inputs",
        )
    texts = [text for pair in body.pairs for text in pair]  # a1, b1, a2, b2, ...
    _check_texts_limits(state, texts, "pairs")
    result = await _embed(state, texts, body.prompt_name)
    vectors = unit_rows(result.embeddings)
    scores = np.einsum("nd,nd->n", vectors[0::2], vectors[1::2])
    data = [
        {"object": "similarity", "index": i, "similarity": float(s)} for i, s in enumerate(scores)
    ]
    return JSONResponse(
        {"object": "list", "data": data, "model": state.model_name, "usage": _usage(result)}
    )


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    """Prometheus text format."""
    state = _state(request)
    state.metrics.queued.set(state.batcher.queued_texts)
    return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)


async def health(request: Request) -> dict[str, Any]:
    """Liveness: whether the model worker runs, the served model and its embedding size."""
    state = _state(request)
    return {
        "status": "ok" if state.batcher.running else "starting",
        "model": state.model_name,
        "dimensions": state.model.embedding_dim,
        "prompt_names": sorted(state.model.config.prompts),
        "queued_texts": state.batcher.queued_texts,
        "version": __version__,
    }


def build_app(model: AnglE, options: ServeOptions) -> FastAPI:
    """The FastAPI application serving ``model`` with ``options``."""
    metrics = Metrics()
    batcher = MicroBatcher(
        make_encoder(model, options.max_batch_size),
        max_batch_size=options.max_batch_size,
        max_wait_ms=options.max_wait_ms,
        max_queue=options.max_queue,
        merge=options.batching,
        on_batch=metrics.observe_batch,
    )
    name = options.model_name or model.name_or_path or "anglekit"
    state = ServerState(model, options, batcher, metrics, name)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await batcher.start()
        try:
            yield
        finally:
            await batcher.stop()

    app = FastAPI(
        title="anglekit",
        version=__version__,
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
    )
    app.state.anglekit = state
    app.include_router(router)
    app.add_api_route("/health", health, methods=["GET"])
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(QueueFullError, _queue_full)
    app.add_exception_handler(Exception, _unexpected)
    app.add_middleware(BodyLimitMiddleware, limit=options.max_body_bytes)
    app.add_middleware(MetricsMiddleware, metrics=metrics)  # added last: outermost
    return app
