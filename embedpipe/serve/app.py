"""The service: an OpenAI-compatible ``/v1/embeddings`` in front of embedpipe pipelines (FastAPI).

>>> from embedpipe.serve import ServeSettings, create_app
>>> from embedpipe.serve.settings import ModelSettings
>>> app = create_app(ServeSettings(models=(ModelSettings("tiny", "fake:8"),)))

The path of a request: authenticate (a bearer key, hashed), parse and validate (400 before
anything is spent), count tokens, charge the key's rpm/tpm (429 with ``Retry-After``, also
when the shared limiter's Redis is down: it fails closed), check the key's budget, then wait
in the model's :class:`~embedpipe.serve.batcher.MicroBatcher` for one shared pipeline call,
whose engine dedupes, reads the cache, awaits texts in flight and sends the rest upstream.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import contextvars
import ipaddress
import json
import logging
import math
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from embedpipe.cache import CacheBackend, resolve_cache
from embedpipe.engine.budget import Budget
from embedpipe.errors import BudgetExceededError, ConfigurationError, EmbedPipeError, Failure
from embedpipe.limits import MemoryRateLimiter, RateLimiter, RateLimiterUnavailableError, rate_limiter_from
from embedpipe.metrics import PrometheusMetrics
from embedpipe.pipeline import EmbeddingPipeline
from embedpipe.serve.batcher import Answer, MicroBatcher, QueueFullError
from embedpipe.serve.ingest import JobWorker, registry_path
from embedpipe.serve.jobs_api import INGEST_ROUTE, add_job_routes
from embedpipe.serve.jobstore import IngestRegistry
from embedpipe.serve.keystore import KeyRecord, KeyStore, KeyStoreError, key_store_from
from embedpipe.serve.schema import EmbeddingRequest, EmbeddingResponse, ErrorResponse
from embedpipe.serve.settings import ModelSettings, ServeSettings

__all__ = ["APIError", "Service", "create_app"]

log = logging.getLogger("embedpipe.serve")
request_id: contextvars.ContextVar[str] = contextvars.ContextVar("embedpipe_request_id", default="-")

EMBEDDING_ROUTES = ("/v1/embeddings", "/embeddings")
#: token-array inputs longer than this are refused before decoding
MAX_TOKEN_ARRAY = 8192
#: distinct ``dimensions`` one model serves at once (each is its own pipeline and vector space)
MAX_DIMENSIONS_PER_MODEL = 8
#: the cache entry /readyz writes and reads back
_READY_KEY = "embedpipe-serve-readyz"
#: text above this many characters is tokenized off the event loop
_TOKENIZE_INLINE_CHARS = 50_000


class APIError(Exception):
    """An answer in OpenAI's error envelope."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", code: str | None = None,
                 *, param: str | None = None, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = status, message, type_, code, param
        self.retry_after = retry_after

    def response(self) -> JSONResponse:
        headers = {}
        if self.retry_after is not None:
            headers["Retry-After"] = str(max(1, math.ceil(self.retry_after)))
        body = {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status, headers=headers)


class _Refused(Exception):
    """A per-key limiter would have to wait: the request is refused with ``Retry-After`` instead."""

    def __init__(self, wait: float) -> None:
        super().__init__(wait)
        self.wait = wait


async def _refuse(wait: float) -> None:
    # Injected as the per-key limiters' sleep: a service answers 429 where a client would wait.
    raise _Refused(wait)


@dataclass
class _Route:
    pipeline: EmbeddingPipeline
    batcher: MicroBatcher


class Service:
    """The models, cache, key store, per-key limiters and metrics behind the app; built by :func:`create_app`."""

    def __init__(self, settings: ServeSettings, *, metrics: PrometheusMetrics | None = None) -> None:
        if not settings.models:
            raise ConfigurationError("no model to serve: pass --model SPEC (e.g. openai:text-embedding-3-small) or "
                                     "a [models.NAME] table in --config")
        if settings.keys is None and not _loopback(settings.host):
            raise ConfigurationError(f"refusing to serve on {settings.host} without keys: an open service listens "
                                     "on 127.0.0.1 only; pass --keys URL (and add keys) to serve other hosts")
        self.settings = settings
        self.metrics = metrics or PrometheusMetrics()
        self.cache: CacheBackend | None = resolve_cache(settings.cache) if settings.cache else None
        self.store: KeyStore | None = key_store_from(settings.keys) if settings.keys else None
        self.models: dict[str, ModelSettings] = {m.name: m for m in settings.models}
        self._routes: dict[tuple[str, int | None], _Route] = {}
        self._upstream_limiters: dict[str, RateLimiter | None] = {}
        self._key_limiters: dict[str, tuple[int | None, int | None, RateLimiter]] = {}
        for model in settings.models:
            self.route(model.name, None)
        # Ingest jobs (embedpipe.serve.ingest): only with a [sinks.NAME] to write to.
        self.registry: IngestRegistry | None = None
        self.worker: JobWorker | None = None
        if settings.sinks:
            self.registry = IngestRegistry(registry_path(settings))
            celery = settings.job_workers.removeprefix("celery+") if settings.job_workers else None
            self.worker = JobWorker(self.registry, cache=self.cache, metrics=self.metrics,
                                    lease_seconds=settings.job_lease_s, celery_url=celery)

    def route(self, name: str, dimensions: int | None) -> _Route:
        """The pipeline and batcher serving ``name`` at ``dimensions`` (built on first use)."""
        model = self.models.get(name)
        if model is None:
            raise APIError(404, f"The model {name!r} does not exist on this service; it serves "
                           f"{sorted(self.models)}", "invalid_request_error", "model_not_found", param="model")
        dims = dimensions if dimensions is not None else model.options.get("dimensions")
        found = self._routes.get((name, dims))
        if found is not None:
            return found
        if sum(1 for (n, _) in self._routes if n == name) >= MAX_DIMENSIONS_PER_MODEL:
            raise APIError(400, f"{name!r} already serves {MAX_DIMENSIONS_PER_MODEL} distinct dimensions",
                           param="dimensions")
        options = dict(model.options)
        options["dimensions"] = dims
        if name not in self._upstream_limiters:
            self._upstream_limiters[name] = rate_limiter_from(options.pop("rate_limiter", None),
                                                              rpm=options.pop("rpm", None),
                                                              tpm=options.pop("tpm", None))
        else:
            for k in ("rate_limiter", "rpm", "tpm"):
                options.pop(k, None)
        try:
            pipe = EmbeddingPipeline(model.spec, cache=self.cache, hooks=[self.metrics],
                                     rate_limiter=self._upstream_limiters[name], **options)
        except ConfigurationError as exc:
            if dimensions is None:
                raise
            raise APIError(400, f"dimensions={dimensions}: {exc}", param="dimensions") from None
        s = self.settings
        batcher = MicroBatcher(pipe, max_wait=s.max_wait_ms / 1000, max_inputs=s.max_batch_inputs,
                               max_tokens=s.max_batch_tokens, max_queue=s.max_queue, partial_calls=s.partial_batches,
                               metrics=self.metrics)
        self.metrics.declare(pipe.provider.spec)
        route = self._routes[(name, dims)] = _Route(pipe, batcher)
        return route

    # ------------------------------------------------------------------ keys
    async def authenticate(self, request: Request) -> KeyRecord | None:
        """The caller's key record; ``None`` for an open service. Raises a 401 :class:`APIError`."""
        if self.store is None:
            return None
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise APIError(401, "Missing bearer key: send 'Authorization: Bearer YOUR_KEY'.", "invalid_request_error",
                           "invalid_api_key")
        try:
            record = await asyncio.to_thread(self.store.lookup, token.strip())
        except KeyStoreError as exc:
            log.error("key store failed: %s", exc)
            raise APIError(503, "The key store is unavailable.", "server_error", "key_store_unavailable",
                           retry_after=1) from None
        if record is None:
            raise APIError(401, "Incorrect API key provided.", "invalid_request_error", "invalid_api_key")
        return record

    def key_limiter(self, record: KeyRecord) -> RateLimiter | None:
        """The key's rpm/tpm limiter (in Redis when ``key_limits`` is a Redis URL), or ``None``."""
        if record.rpm is None and record.tpm is None:
            return None
        held = self._key_limiters.get(record.key_hash)
        if held is not None and held[:2] == (record.rpm, record.tpm):
            return held[2]
        url = self.settings.key_limits
        limiter: RateLimiter | None
        if url.startswith("memory:"):
            limiter = MemoryRateLimiter(rpm=record.rpm, tpm=record.tpm, sleep=_refuse)
        else:
            sep = "&" if "?" in url else "?"
            limiter = rate_limiter_from(f"{url}{sep}key=serve-{record.label}", rpm=record.rpm, tpm=record.tpm,
                                        sleep=_refuse)
        assert limiter is not None
        limiter.on_error = "raise"
        self._key_limiters[record.key_hash] = (record.rpm, record.tpm, limiter)
        return limiter

    async def admit(self, record: KeyRecord, tokens: int, billable: int, price: float | None, model: str) -> None:
        """Charge the key's rpm/tpm with the request's ``tokens`` and check that the ``billable`` ones (those
        the cache does not hold) fit its budget; raises a 429 (or 400) :class:`APIError`."""
        limiter = self.key_limiter(record)
        if limiter is not None:
            if limiter.tpm is not None and tokens > limiter.tpm:
                raise APIError(400, f"This request has {tokens} tokens, more than this key's limit of "
                               f"{limiter.tpm} tokens per minute.", param="input", code="tokens_over_limit")
            try:
                await limiter.acquire(tokens)
            except _Refused as exc:
                raise APIError(429, f"Rate limit reached for key {record.label}: rpm={record.rpm}, "
                               f"tpm={record.tpm}. Try again in {exc.wait:.2f}s.", "rate_limit_error",
                               "rate_limit_exceeded", retry_after=exc.wait) from None
            except RateLimiterUnavailableError as exc:
                log.error("per-key rate limiter unavailable: %s", exc)
                raise APIError(429, "The rate limiter is unavailable; refusing rather than exceeding limits.",
                               "rate_limit_error", "rate_limiter_unavailable", retry_after=1) from None
        if record.budget_usd is not None:
            if price is None:
                raise APIError(500, "This key has a budget but the model's price is unknown; set "
                               "price_per_1m_tokens for it.", "server_error", "price_unknown")
            remaining = record.remaining_usd
            assert remaining is not None
            self.metrics.key_budget(model, record.label, remaining, record.budget_usd)
            budget = Budget(record.budget_usd, price)
            budget.spend(record.spent_usd)
            try:
                budget.check(billable)
            except BudgetExceededError as exc:
                raise APIError(429, f"Key {record.label} has reached its budget: {exc}", "insufficient_quota",
                               "insufficient_quota") from None

    async def spend(self, record: KeyRecord, model: str, usd: float | None) -> None:
        if self.store is None or record.budget_usd is None or not usd:
            return
        try:
            spent = await asyncio.to_thread(self.store.spend, record.key_hash, usd)
        except KeyStoreError as exc:
            log.error("could not record spend of key %s: %s", record.label, exc)
            return
        self.metrics.key_budget(model, record.label, max(0.0, record.budget_usd - spent), record.budget_usd)

    # ------------------------------------------------------------------ health
    async def readiness(self) -> dict[str, str]:
        """What is not ready, by part (empty when all are)."""
        problems: dict[str, str] = {}
        if self.cache is not None:
            # A cache that fails open answers every read with "absent": only a value written and read
            # back shows that it works.
            try:
                await self.cache.aset_many([(_READY_KEY, b"ok")])
                if (await self.cache.aget_many([_READY_KEY]))[0] != b"ok":
                    problems["cache"] = "a value written to the cache could not be read back"
            except Exception as exc:
                problems["cache"] = f"{type(exc).__name__}: {exc}"
        if self.store is not None:
            try:
                await asyncio.to_thread(self.store.ping)
            except Exception as exc:
                problems["keys"] = f"{type(exc).__name__}: {exc}"
        if self.registry is not None:
            try:
                await asyncio.to_thread(self.registry.ping)
            except Exception as exc:
                problems["jobs"] = f"{type(exc).__name__}: {exc}"
        for (name, _), route in list(self._routes.items()):
            if route.batcher.room <= 0:
                problems[f"queue:{name}"] = "full"
        return problems

    async def aclose(self) -> None:
        if self.worker is not None:
            await asyncio.to_thread(self.worker.stop)
        if self.registry is not None:
            self.registry.close()
        for route in list(self._routes.values()):
            await route.batcher.aclose()
            route.pipeline.close()
        for limiter in [*self._upstream_limiters.values(), *(h[2] for h in self._key_limiters.values())]:
            if limiter is not None:
                with contextlib.suppress(Exception):
                    await limiter.aclose()
        if self.cache is not None:
            self.cache.close()
        if self.store is not None:
            self.store.close()


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


# ------------------------------------------------------------------ the request path
def _texts_of(body: EmbeddingRequest, pipeline: EmbeddingPipeline, max_inputs: int) -> list[str]:
    """The request's inputs as texts: token arrays decoded with the model's tokenizer; 400s name the input."""
    raw = body.input
    items: list[Any] = [raw] if isinstance(raw, str) or (raw and isinstance(raw[0], int)) else list(raw)
    if not items:
        raise APIError(400, "'input' must not be empty.", param="input")
    if len(items) > max_inputs:
        raise APIError(400, f"'input' has {len(items)} items; at most {max_inputs} are allowed per request.",
                       param="input")
    texts: list[str] = []
    encoding = None
    for i, item in enumerate(items):
        if isinstance(item, str):
            if not item:
                raise APIError(400, f"input[{i}] is an empty string.", param="input")
            texts.append(item)
            continue
        if not item:
            raise APIError(400, f"input[{i}] is an empty token array.", param="input")
        if len(item) > MAX_TOKEN_ARRAY:
            raise APIError(400, f"input[{i}] has {len(item)} tokens; at most {MAX_TOKEN_ARRAY} are allowed.",
                           param="input")
        if encoding is None:
            encoding = getattr(pipeline.provider.tokenizer, "encoding", None)
            if encoding is None:
                raise APIError(400, f"{body.model!r} takes text only: its tokenizer cannot read token arrays.",
                               param="input")
        try:
            text = encoding.decode(item)
        except Exception:
            raise APIError(400, f"input[{i}] holds token ids that {encoding.name} does not know.",
                           param="input") from None
        if not text:
            raise APIError(400, f"input[{i}] decodes to an empty string.", param="input")
        texts.append(text)
    return texts


async def _count(pipeline: EmbeddingPipeline, texts: list[str]) -> list[int]:
    tokenizer = pipeline.provider.tokenizer
    if sum(map(len, texts)) <= _TOKENIZE_INLINE_CHARS:
        return list(tokenizer.count(texts))
    return list(await asyncio.to_thread(tokenizer.count, texts))


def _failure_error(failures: dict[int, Failure]) -> APIError:
    index, failure = min(failures.items())
    if failure.kind == "invalid_input":
        return APIError(400, f"input[{index}]: {failure.message}", param="input")
    if failure.kind == "budget":
        return APIError(429, f"The service's budget for this model is spent: {failure.message}",
                        "insufficient_quota", "insufficient_quota")
    if failure.kind == "rejected":
        return APIError(400, f"input[{index}] was refused upstream: {failure.message}", param="input")
    if failure.status == 429:
        return APIError(429, f"Upstream rate limit: {failure.message}", "rate_limit_error", "rate_limit_exceeded",
                        retry_after=1)
    return APIError(502, f"The upstream provider failed for input[{index}] ({failure.kind}): {failure.message}",
                    "server_error", "upstream_error")


def _body(answer: Answer, body: EmbeddingRequest) -> bytes:
    vectors = answer.vectors
    if body.encoding_format == "base64":
        raw = np.ascontiguousarray(vectors, dtype="<f4")
        data: list[Any] = [base64.b64encode(row.tobytes()).decode("ascii") for row in raw]
    else:
        data = vectors.tolist()
    items = [{"object": "embedding", "index": i, "embedding": e} for i, e in enumerate(data)]
    usage = {"prompt_tokens": answer.tokens, "total_tokens": answer.tokens}
    return json.dumps({"object": "list", "data": items, "model": body.model, "usage": usage},
                      separators=(",", ":")).encode()


# ------------------------------------------------------------------ ASGI wrappers
class _Guard:
    """Request ids, the body size limit (413), and one metrics sample and log line per request.

    A plain ASGI wrapper rather than FastAPI middleware: it must refuse a large body before the
    app reads it, and see the status of every answer, errors included.
    """

    def __init__(self, app: ASGIApp, service: Service) -> None:
        self.app = app
        self.service = service

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        rid = headers.get(b"x-request-id", b"").decode("latin-1")[:64] or uuid.uuid4().hex
        token = request_id.set(rid)
        started = time.perf_counter()
        status = 500
        path = scope["path"]
        scope.setdefault("state", {})
        state = scope["state"]

        async def send_wrapped(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", []), (b"x-request-id", rid.encode("latin-1"))]
            await send(message)

        try:
            if path in _LIMITED and scope["method"] == "POST":
                receive = await self._limited(headers, receive, send_wrapped, path)
                if receive is None:  # refused with 413 already
                    return
            await self.app(scope, receive, send_wrapped)
        finally:
            seconds = time.perf_counter() - started
            if path != "/metrics":
                route = "/v1/embeddings" if path in EMBEDDING_ROUTES else path if path in _KNOWN else "other"
                model = state.get("model", "")
                key = state.get("key", "")
                self.service.metrics.observe_request(model, route, status, key, seconds)
                log.info("%s %s %d %.1fms", scope["method"], path, status, seconds * 1000,
                         extra={"route": route, "status": status, "model": model, "key": key,
                                "inputs": state.get("inputs"), "duration_ms": round(seconds * 1000, 3)})
            request_id.reset(token)

    async def _limited(self, headers: dict[bytes, bytes], receive: Receive, send: Send, path: str) -> Receive:
        s = self.service.settings
        limit = s.max_ingest_bytes if path == INGEST_ROUTE else s.max_body_bytes
        length = headers.get(b"content-length")
        too_large = APIError(413, f"The request body is larger than {limit} bytes.", code="request_too_large")
        if length is not None and length.isdigit() and int(length) > limit:
            await too_large.response()({"type": "http"}, receive, send)
            return None  # type: ignore[return-value]
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                break
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                await too_large.response()({"type": "http"}, receive, send)
                return None  # type: ignore[return-value]
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        sent = False

        async def replay() -> Message:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        return replay


_KNOWN = frozenset({"/healthz", "/readyz", "/metrics", "/v1/models", "/openapi.json", "/docs", INGEST_ROUTE,
                    "/v1/jobs"})
_LIMITED = frozenset({*EMBEDDING_ROUTES, INGEST_ROUTE})


# ------------------------------------------------------------------ the app
def create_app(settings: ServeSettings, *, metrics: PrometheusMetrics | None = None) -> Any:
    """The ASGI app serving ``settings`` (FastAPI inside the request-guarding wrapper)."""
    service = Service(settings, metrics=metrics)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if settings.keys is None:
            log.warning("embedpipe serve: no --keys given: the service is OPEN (no authentication) and listens on "
                        "%s only", settings.host)
        if service.worker is not None:
            service.worker.start()
        try:
            yield
        finally:
            await service.aclose()

    app = FastAPI(title="embedpipe serve", version="1", lifespan=lifespan,
                  description="An OpenAI-compatible embeddings service with a shared cache, dedupe, coalescing, "
                              "per-key limits and budgets.")
    app.state.service = service
    errors: dict[int | str, dict[str, Any]] = {
        code: {"model": ErrorResponse, "description": what} for code, what in (
            (400, "Invalid request"), (401, "Missing or wrong key"), (404, "Unknown model"),
            (413, "Body too large"), (429, "Rate limit, budget or queue full"), (502, "Upstream failed"),
            (503, "Key store unavailable"))}

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> Response:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> Response:
        parts = []
        for err in exc.errors()[:5]:
            loc = ".".join(str(p) for p in err.get("loc", ()) if p != "body")
            parts.append(f"{loc or 'body'}: {err.get('msg', 'invalid')}")
        first = next((e.get("loc") for e in exc.errors()), ())
        param = str(first[1]) if first and len(first) > 1 else None
        return APIError(400, "Invalid request: " + "; ".join(parts), param=param).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> Response:
        kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
        return APIError(exc.status_code, str(exc.detail), kind).response()

    async def embeddings(request: Request, body: EmbeddingRequest) -> Response:
        record = await service.authenticate(request)
        request.state.key = record.label if record else ""
        route = service.route(body.model, body.dimensions)
        pipe = route.pipeline
        spec = pipe.provider.spec
        request.state.model = spec
        texts = _texts_of(body, pipe, settings.max_inputs)
        request.state.inputs = len(texts)
        held = await route.batcher.probe(texts)
        limited = record is not None and (record.tpm is not None or record.budget_usd is not None)
        # A request the cache holds needs no token count unless its key counts tokens.
        tokens = await _count(pipe, texts) if limited or not all(held) else [0] * len(texts)
        if record is not None:
            new = {t: n for t, n, h in zip(texts, tokens, held, strict=True) if not h}
            await service.admit(record, sum(tokens), sum(new.values()), pipe.price_per_1m_tokens, spec)
        gauge = service.metrics.inflight.labels(spec)
        gauge.inc()
        try:
            answer = await route.batcher.embed(texts, tokens, held)
        except QueueFullError as exc:
            raise APIError(429, f"The service is busy: {exc}", "rate_limit_error", "queue_full",
                           retry_after=1) from None
        except EmbedPipeError as exc:
            log.error("embedding failed: %s", exc)
            raise APIError(502, f"Embedding failed: {exc}", "server_error", "upstream_error") from None
        finally:
            gauge.dec()
        if record is not None:
            await service.spend(record, spec, answer.cost_usd)
        if answer.failures:
            raise _failure_error(answer.failures)
        headers = {"x-embedpipe-cache-hits": str(answer.cache_hits),
                   "x-embedpipe-cost-usd": f"{answer.cost_usd or 0.0:.10f}"}
        return Response(_body(answer, body), media_type="application/json", headers=headers)

    for path, op in zip(EMBEDDING_ROUTES, ("create_embedding", "create_embedding_alias"), strict=True):
        app.add_api_route(path, embeddings, methods=["POST"], response_model=EmbeddingResponse,
                          responses=errors, operation_id=op, summary="Create embeddings (OpenAI's schema)")

    add_job_routes(app, service, errors)

    @app.get("/healthz", summary="Liveness: answers while the process runs")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz", summary="Readiness: cache, key store, job store, models and queue room",
             responses={503: {"description": "Not ready"}})
    async def readyz() -> Response:
        problems = await service.readiness()
        if problems:
            return JSONResponse({"status": "unavailable", "problems": problems}, status_code=503)
        return JSONResponse({"status": "ok", "models": sorted(service.models)})

    @app.get("/v1/models", summary="The models this service serves", responses={401: errors[401]})
    async def models(request: Request) -> dict[str, Any]:
        await service.authenticate(request)
        return {"object": "list", "data": [{"id": name, "object": "model", "owned_by": "embedpipe"}
                                           for name in sorted(service.models)]}

    @app.get("/metrics", summary="Prometheus metrics (needs a key unless --metrics-port serves them)",
             response_class=PlainTextResponse,
             responses={401: errors[401], 404: {"description": "Served on --metrics-port instead"}})
    async def metrics_route(request: Request) -> Response:
        if settings.metrics_port is not None:
            raise APIError(404, f"Metrics are served on port {settings.metrics_port}.")
        await service.authenticate(request)
        payload, content_type = service.metrics.exposition()
        return Response(payload, media_type=content_type)

    return _Guard(app, service)


def service_of(app: Any) -> Service:
    """The :class:`Service` behind an app :func:`create_app` returned."""
    guard: _Guard = app
    return guard.service



#: the environment variable that carries the settings to ``uvicorn --workers N`` worker processes
SETTINGS_ENV = "EMBEDPIPE_SERVE_SETTINGS"


def app_from_env() -> Any:
    """The app for ``$EMBEDPIPE_SERVE_SETTINGS`` (a uvicorn factory: ``embedpipe.serve.app:app_from_env``)."""
    import os

    from embedpipe.serve.settings import settings_from_json

    text = os.environ.get(SETTINGS_ENV)
    if not text:
        raise ConfigurationError(f"${SETTINGS_ENV} is not set; start the service with `embedpipe serve`")
    return create_app(settings_from_json(text))
