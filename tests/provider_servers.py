"""A test server speaking Cohere's, Voyage's, Azure OpenAI's, Gemini's and Bedrock's embedding APIs.

Each route takes the request its vendor's SDK really sends and answers in that vendor's shape, so
the official SDKs (cohere, voyageai, openai's AzureOpenAI, google-genai, boto3) can be pointed at
``127.0.0.1`` and their real request building and parsing run:

* ``POST /v2/embed``: Cohere v2 (``Authorization: Bearer``; ``input_type``, ``embedding_types``,
  ``truncate``, ``output_dimension``; at most 96 texts, ``meta.billed_units.input_tokens``);
* ``POST /v1/embeddings``: Voyage (``input_type``, ``output_dtype``, ``output_dimension``,
  ``truncation``; at most 1,000 inputs and the model's per-request token cap; ``usage.total_tokens``);
* ``POST /openai/deployments/{deployment}/embeddings?api-version=…``: Azure OpenAI (``api-key``
  header or an Entra bearer token; OpenAI's body, base64 or float);
* ``POST /v1beta/models/{model}:batchEmbedContents``: Gemini (``x-goog-api-key``; ``taskType``,
  ``outputDimensionality``; at most 100 requests; ``usageMetadata``);
* ``POST /model/{modelId}/invoke``: Bedrock InvokeModel for Titan text v2 (one ``inputText``,
  ``dimensions``, ``normalize``, ``embeddingTypes``) and Cohere (``texts``, 96 at most), billed in the
  ``x-amzn-bedrock-input-token-count`` header. SigV4 is required to be present, never verified.

Vectors are deterministic (:func:`expected_float`): a unit vector seeded by the route, model, the
input or task type the request carried and the text, so a test sees which type was sent. Native
int8/uint8/bits are the server's own quantization of that vector (:func:`server_int8`). A ledger
records what each route billed; ``fail_next`` scripts errors (429 with each vendor's retry hint).
"""

from __future__ import annotations

import asyncio
import base64
import json
import socket
import threading
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

import numpy as np
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from embedpipe.providers.fake import fake_vector
from tests.openai_server import cl100k_encoding

#: native dimensions the server answers per model
NATIVE_DIMS: dict[str, int] = {
    "embed-v4.0": 1536, "embed-english-v3.0": 1024, "embed-english-light-v3.0": 384,
    "voyage-3.5": 1024, "voyage-4-lite": 1024, "voyage-3-large": 1024, "voyage-law-2": 1024,
    "text-embedding-3-small": 1536, "text-embedding-3-large": 3072,
    "gemini-embedding-001": 3072,
    "amazon.titan-embed-text-v2:0": 1024, "cohere.embed-english-v3": 1024,
}
#: Voyage's per-request token caps (the server enforces them, counting with cl100k_base)
VOYAGE_TOKEN_CAPS = {"voyage-3.5": 320_000, "voyage-4-lite": 1_000_000, "voyage-3-large": 120_000,
                     "voyage-law-2": 120_000}
#: the most inputs each route takes per request
MAX_INPUTS = {"cohere": 96, "voyage": 1000, "azure": 2048, "gemini": 100, "bedrock-cohere": 96, "bedrock-titan": 1}
#: the server's int8 scale: a fixed calibration for every vector, as the vendors' quantizers use
INT8_SCALE = 127.0 / 0.25


def expected_float(route: str, model: str, kind: str | None, text: str, dims: int | None = None) -> np.ndarray:
    """The unit float32 vector the server answers for ``text`` (``kind``: the input/task type sent)."""
    full = fake_vector(f"{route}\x00{model}\x00{kind}\x00{text}", NATIVE_DIMS.get(model, 256))
    if dims is None or dims == full.shape[0]:
        return full
    cut = full[:dims]
    return (cut / np.linalg.norm(cut)).astype(np.float32)


def server_int8(vector: np.ndarray) -> np.ndarray:
    """The server's int8 quantization of a float vector."""
    return np.clip(np.rint(vector * INT8_SCALE), -128, 127).astype(np.int64)


def encode_as(vector: np.ndarray, kind: str) -> list[Any]:
    """``vector`` as the vendor sends it for an embedding type (float, int8, uint8, binary, ubinary)."""
    if kind in ("float", "float32", None):
        return [float(x) for x in vector]
    if kind == "int8":
        return server_int8(vector).tolist()  # type: ignore[no-any-return]
    if kind == "uint8":
        return (server_int8(vector) + 128).clip(0, 255).tolist()  # type: ignore[no-any-return]
    packed = np.packbits(vector > 0).astype(np.int64)
    return (packed - 128).tolist() if kind == "binary" else packed.tolist()  # type: ignore[no-any-return]


@dataclass
class Fault:
    """One scripted error answer."""

    status: int
    retry_after: float | None = None


@dataclass
class RouteLedger:
    """What one route was asked and billed."""

    requests: int = 0
    ok: int = 0
    rejected: int = 0
    rate_limited: int = 0
    billed_tokens: int = 0
    times_billed: Counter[str] = field(default_factory=Counter)
    batch_sizes: list[int] = field(default_factory=list)
    bodies: list[dict[str, Any]] = field(default_factory=list)
    headers: list[dict[str, str]] = field(default_factory=list)


class _APIError(Exception):
    def __init__(self, status: int, body: dict[str, Any], headers: dict[str, str] | None = None) -> None:
        super().__init__(status)
        self.status, self.body, self.headers = status, body, headers or {}


class ProviderControl:
    """Faults and ledger, shared by the routes; thread-safe (tests call it while the server runs)."""

    def __init__(self, *, gemini_usage: bool = True, azure_deployments: dict[str, str] | None = None) -> None:
        self._lock = threading.Lock()
        self.ledgers: dict[str, RouteLedger] = {}
        self._faults: dict[str, list[Fault]] = {}
        self.gemini_usage = gemini_usage
        self.azure_deployments = azure_deployments or {"emb-small": "text-embedding-3-small",
                                                       "text-embedding-3-small": "text-embedding-3-small"}

    def ledger(self, route: str) -> RouteLedger:
        """The ledger of ``route`` ("cohere", "voyage", "azure", "gemini", "bedrock")."""
        with self._lock:
            return self.ledgers.setdefault(route, RouteLedger())

    def fail_next(self, route: str, status: int = 429, *, times: int = 1, retry_after: float | None = None) -> None:
        """Answer the next ``times`` requests to ``route`` with ``status`` (429: with the vendor's retry hint)."""
        with self._lock:
            self._faults.setdefault(route, []).extend(Fault(status, retry_after) for _ in range(times))

    def _take_fault(self, route: str) -> Fault | None:
        with self._lock:
            queue = self._faults.get(route)
            return queue.pop(0) if queue else None

    def _bill(self, route: str, texts: list[str]) -> int:
        enc = cl100k_encoding()
        counts = [len(enc.encode(t, disallowed_special=())) for t in texts]
        with self._lock:
            led = self.ledgers.setdefault(route, RouteLedger())
            led.ok += 1
            led.billed_tokens += sum(counts)
            led.times_billed.update(texts)
            led.batch_sizes.append(len(texts))
        return sum(counts)


def _tokens(texts: list[str]) -> int:
    enc = cl100k_encoding()
    return sum(len(enc.encode(t, disallowed_special=())) for t in texts)


class _App:
    """The Starlette routes; each parses its vendor's body, enforces its limits and answers in its shape."""

    def __init__(self, control: ProviderControl) -> None:
        self.control = control
        self.app = Starlette(routes=[
            Route("/v2/embed", self._wrap("cohere", self.cohere), methods=["POST"]),
            Route("/v1/embeddings", self._wrap("voyage", self.voyage), methods=["POST"]),
            Route("/openai/deployments/{deployment}/embeddings", self._wrap("azure", self.azure), methods=["POST"]),
            Route("/{version}/models/{call}", self._wrap("gemini", self.gemini), methods=["POST"]),
            Route("/model/{model_id:path}/invoke", self._wrap("bedrock", self.bedrock), methods=["POST"]),
        ])

    def _wrap(self, route: str, handler: Callable[[Request, dict[str, Any]], Any]) -> Callable[[Request], Any]:
        async def endpoint(request: Request) -> Response:
            raw = await request.body()
            try:
                body = json.loads(raw or b"{}")
            except json.JSONDecodeError:
                body = {}
            led = self.control.ledger(route)
            with self.control._lock:
                led.requests += 1
                led.bodies.append(body)
                led.headers.append({k.lower(): v for k, v in request.headers.items()})
            try:
                self._auth(route, request)
                fault = self.control._take_fault(route)
                if fault is not None:
                    raise self._fault(route, fault)
                result = await handler(request, body)
            except _APIError as err:
                with self.control._lock:
                    if err.status == 429:
                        led.rate_limited += 1
                    else:
                        led.rejected += 1
                return JSONResponse(err.body, status_code=err.status, headers=err.headers)
            return result  # type: ignore[no-any-return]

        return endpoint

    # -- auth and faults, in each vendor's words ---------------------------------------
    @staticmethod
    def _auth(route: str, request: Request) -> None:
        h = request.headers
        if route in ("cohere", "voyage") and not h.get("authorization", "").startswith("Bearer "):
            raise _APIError(401, {"message": "no api key supplied"} if route == "cohere"
                            else {"detail": "No API key provided."})
        if route == "azure" and not (h.get("api-key") or h.get("authorization", "").startswith("Bearer ")):
            raise _APIError(401, {"error": {"code": "401", "message": "Access denied due to missing api-key."}})
        if route == "gemini" and not h.get("x-goog-api-key"):
            raise _APIError(403, {"error": {"code": 403, "message": "Method doesn't allow unregistered callers",
                                            "status": "PERMISSION_DENIED"}})
        if route == "bedrock":
            auth = h.get("authorization", "")
            # Relaxed sign-in: a SigV4 signature (never verified) or a Bedrock API key as a bearer token.
            if not (auth.startswith("AWS4-HMAC-SHA256 ") or auth.startswith("Bearer ")):
                raise _APIError(403, {"message": "Missing Authentication Token"},
                                {"x-amzn-ErrorType": "AccessDeniedException"})

    @staticmethod
    def _fault(route: str, fault: Fault) -> _APIError:
        s, wait = fault.status, fault.retry_after
        hint = {} if wait is None else {"retry-after": str(int(wait)) if float(wait).is_integer() else str(wait)}
        if route == "cohere":
            return _APIError(s, {"message": "You are using a Trial key, which is limited to 100 API calls / minute"
                                 if s == 429 else "internal server error"}, hint)
        if route == "voyage":
            return _APIError(s, {"detail": "You have exceeded your TPM rate limit" if s == 429
                                 else "Service unavailable"}, hint)
        if route == "azure":
            headers = {} if wait is None else {"retry-after-ms": str(int(wait * 1000)), "retry-after": str(int(wait))}
            return _APIError(s, {"error": {"code": "429" if s == 429 else str(s), "message":
                                           "Requests to the Embeddings_Create Operation have exceeded call rate "
                                           "limit" if s == 429 else "server error"}}, headers)
        if route == "gemini":
            status = "RESOURCE_EXHAUSTED" if s == 429 else "UNAVAILABLE"
            details = [] if wait is None else [{"@type": "type.googleapis.com/google.rpc.RetryInfo",
                                                "retryDelay": f"{wait:g}s"}]
            return _APIError(s, {"error": {"code": s, "message": "Resource has been exhausted (e.g. check quota)."
                                           if s == 429 else "The model is overloaded.", "status": status,
                                           "details": details}})
        code = "ThrottlingException" if s == 429 else "ServiceUnavailableException"
        return _APIError(s, {"message": "Too many requests, please wait before trying again." if s == 429
                             else "Service unavailable"}, {"x-amzn-ErrorType": code, **hint})

    # -- routes ------------------------------------------------------------------------
    async def cohere(self, request: Request, body: dict[str, Any]) -> Response:
        texts, model = body.get("texts") or [], str(body.get("model", ""))
        input_type = body.get("input_type")
        if not isinstance(texts, list) or not texts:
            raise _APIError(400, {"message": "invalid request: texts must be a non-empty list"})
        if len(texts) > MAX_INPUTS["cohere"]:
            raise _APIError(400, {"message": f"invalid request: total number of texts must be at most 96 - "
                                             f"received {len(texts)}"})
        if input_type not in ("search_document", "search_query", "classification", "clustering"):
            raise _APIError(400, {"message": "invalid request: input_type is required for v3 and newer models"})
        dims = body.get("output_dimension")
        if dims is not None and model != "embed-v4.0":
            raise _APIError(400, {"message": f"invalid request: output_dimension is not supported for {model}"})
        kinds = body.get("embedding_types") or ["float"]
        vectors = [expected_float("cohere", model, input_type, t, dims) for t in texts]
        tokens = self.control._bill("cohere", texts)
        return JSONResponse({"id": "test", "texts": texts, "response_type": "embeddings_by_type",
                             "embeddings": {k: [encode_as(v, k) for v in vectors] for k in kinds},
                             "meta": {"api_version": {"version": "2"}, "billed_units": {"input_tokens": tokens}}})

    async def voyage(self, request: Request, body: dict[str, Any]) -> Response:
        texts, model = body.get("input") or [], str(body.get("model", ""))
        if isinstance(texts, str):
            texts = [texts]
        if len(texts) > MAX_INPUTS["voyage"]:
            raise _APIError(400, {"detail": f"The batch size limit is 1000. Your batch size is {len(texts)}."})
        cap = VOYAGE_TOKEN_CAPS.get(model)
        if cap is not None and _tokens(texts) > cap:
            raise _APIError(400, {"detail": f"Request to model '{model}' failed. The max allowed tokens per "
                                            f"submitted batch is {cap}."})
        input_type = body.get("input_type")
        dtype = body.get("output_dtype") or "float"
        dims = body.get("output_dimension")
        vectors = [expected_float("voyage", model, input_type, t, dims) for t in texts]
        tokens = self.control._bill("voyage", texts)
        return JSONResponse({"object": "list", "model": model, "usage": {"total_tokens": tokens},
                             "data": [{"object": "embedding", "index": i, "embedding": encode_as(v, dtype)}
                                      for i, v in enumerate(vectors)]})

    async def azure(self, request: Request, body: dict[str, Any]) -> Response:
        if not request.query_params.get("api-version"):
            raise _APIError(404, {"error": {"code": "404", "message": "Resource not found"}})
        deployment = request.path_params["deployment"]
        model = self.control.azure_deployments.get(deployment)
        if model is None:
            raise _APIError(404, {"error": {"code": "DeploymentNotFound", "message":
                                            f"The API deployment {deployment} does not exist."}})
        texts = body.get("input") or []
        if isinstance(texts, str):
            texts = [texts]
        if len(texts) > MAX_INPUTS["azure"]:
            raise _APIError(400, {"error": {"code": "invalid_request_error", "message": "Too many inputs. The max "
                                            "number of inputs is 2048."}})
        dims = body.get("dimensions")
        vectors = [expected_float("azure", model, None, t, dims) for t in texts]
        tokens = self.control._bill("azure", texts)
        b64 = body.get("encoding_format") == "base64"
        data = [{"object": "embedding", "index": i, "embedding": base64.b64encode(v.astype("<f4").tobytes()).decode()
                 if b64 else [float(x) for x in v]} for i, v in enumerate(vectors)]
        return JSONResponse({"object": "list", "model": model, "data": data,
                             "usage": {"prompt_tokens": tokens, "total_tokens": tokens}},
                            headers={"x-ratelimit-remaining-requests": "99", "x-ratelimit-remaining-tokens": "99999"})

    async def gemini(self, request: Request, body: dict[str, Any]) -> Response:
        model, _, method = request.path_params["call"].partition(":")
        if method != "batchEmbedContents":
            raise _APIError(404, {"error": {"code": 404, "message": "not found", "status": "NOT_FOUND"}})
        reqs = body.get("requests") or []
        if len(reqs) > MAX_INPUTS["gemini"]:
            raise _APIError(400, {"error": {"code": 400, "message": "* BatchEmbedContentsRequest.requests: at most "
                                            "100 requests can be in one batch", "status": "INVALID_ARGUMENT"}})
        texts, vectors = [], []
        for r in reqs:
            text = "".join(p.get("text", "") for p in (r.get("content") or {}).get("parts", []))
            texts.append(text)
            full = expected_float("gemini", model, r.get("taskType"), text)
            d = r.get("outputDimensionality")
            # Gemini truncates Matryoshka vectors without renormalizing them (only 3072 dims are unit length).
            vectors.append(full[:d] * 1.0 if d else full)
        tokens = self.control._bill("gemini", texts)
        out: dict[str, Any] = {"embeddings": [{"values": [float(x) for x in v]} for v in vectors]}
        if self.control.gemini_usage:
            out["usageMetadata"] = {"promptTokenCount": tokens, "totalTokenCount": tokens}
        return JSONResponse(out)

    async def bedrock(self, request: Request, body: dict[str, Any]) -> Response:
        model_id = request.path_params["model_id"]
        if model_id.startswith("amazon.titan-embed-text"):
            text = body.get("inputText")
            if not isinstance(text, str) or "texts" in body:
                raise _APIError(400, {"message": "Malformed input request: #: extraneous key [texts] is not "
                                                 "permitted, expected inputText"},
                                {"x-amzn-ErrorType": "ValidationException"})
            dims = body.get("dimensions")
            if dims is not None and dims not in (256, 512, 1024):
                raise _APIError(400, {"message": "Malformed input request: dimensions must be 256, 512 or 1024"},
                                {"x-amzn-ErrorType": "ValidationException"})
            vector = expected_float("bedrock", model_id, None, text, dims)
            if body.get("normalize") is False:
                vector = vector * 3.0  # an unnormalized vector, so the option is observable
            tokens = self.control._bill("bedrock", [text])
            out: dict[str, Any] = {"embedding": [float(x) for x in vector], "inputTextTokenCount": tokens}
            types = body.get("embeddingTypes")
            if types:
                out["embeddingsByType"] = {t: ([int(x > 0) for x in vector] if t == "binary"
                                               else [float(x) for x in vector]) for t in types}
            return JSONResponse(out, headers={"x-amzn-bedrock-input-token-count": str(tokens)})
        if model_id.startswith("cohere.embed"):
            texts = body.get("texts") or []
            if len(texts) > MAX_INPUTS["bedrock-cohere"]:
                raise _APIError(400, {"message": "Malformed input request: expected maxLength: 96"},
                                {"x-amzn-ErrorType": "ValidationException"})
            input_type = body.get("input_type")
            if input_type is None:
                raise _APIError(400, {"message": "Malformed input request: required key [input_type] not found"},
                                {"x-amzn-ErrorType": "ValidationException"})
            kinds = body.get("embedding_types")
            vectors = [expected_float("bedrock", model_id, input_type, t) for t in texts]
            tokens = self.control._bill("bedrock", texts)
            emb: Any = ({k: [encode_as(v, k) for v in vectors] for k in kinds} if kinds
                        else [encode_as(v, "float") for v in vectors])
            return JSONResponse({"id": "test", "texts": texts, "embeddings": emb,
                                 "response_type": "embeddings_by_type" if kinds else "embeddings_floats"},
                                headers={"x-amzn-bedrock-input-token-count": str(tokens)})
        raise _APIError(404, {"message": f"Could not resolve the foundation model from model identifier {model_id}"},
                        {"x-amzn-ErrorType": "ResourceNotFoundException"})


class ProviderTestServer:
    """The vendors' routes, served by uvicorn on 127.0.0.1 in a background thread (a context manager)."""

    def __init__(self, **control: Any) -> None:
        self.control = ProviderControl(**control)
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self._port: int | None = None

    @property
    def url(self) -> str:
        """The server root, ``http://127.0.0.1:PORT``."""
        if self._port is None:
            raise RuntimeError("the server is not running")
        return f"http://127.0.0.1:{self._port}"

    def ledger(self, route: str) -> RouteLedger:
        """What ``route`` was asked and billed."""
        return self.control.ledger(route)

    def start(self) -> ProviderTestServer:
        """Serve, returning once connections are accepted."""
        cl100k_encoding()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.bind(("127.0.0.1", 0))
        config = uvicorn.Config(_App(self.control).app, http="h11", lifespan="off", log_config=None,
                                log_level="warning", access_log=False, server_header=False,
                                timeout_graceful_shutdown=2)
        server = uvicorn.Server(config)
        failure: list[BaseException] = []

        def serve() -> None:
            try:
                asyncio.run(server.serve(sockets=[sock]))
            except BaseException as exc:  # reported to the starting thread below
                failure.append(exc)
            finally:
                sock.close()

        thread = threading.Thread(target=serve, name=f"provider-test-server-{id(self):x}", daemon=True)
        thread.start()
        for _ in range(200):  # uvicorn sets started once it accepts; at most 10 s
            if server.started or failure or not thread.is_alive():
                break
            threading.Event().wait(0.05)
        if not server.started:
            server.should_exit = True
            thread.join(timeout=5)
            raise RuntimeError("the provider test server failed to start") from (failure[0] if failure else None)
        self._server, self._thread, self._port = server, thread, sock.getsockname()[1]
        return self

    def stop(self) -> None:
        """Stop serving and join the thread."""
        if self._server is None or self._thread is None:
            return
        self._server.should_exit = True
        self._thread.join(timeout=10)
        self._server = self._thread = None
        self._port = None

    def __enter__(self) -> ProviderTestServer:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()
