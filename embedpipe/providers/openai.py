"""OpenAI and OpenAI-compatible servers (vLLM, TEI, Infinity, Ollama, LiteLLM) through the official SDK."""

from __future__ import annotations

import base64
import json
import os
from collections.abc import Mapping
from dataclasses import replace
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import numpy as np

from embedpipe._urls import register_secret
from embedpipe.cost import OPENAI_MODELS
from embedpipe.errors import ConfigurationError, InvalidResponseError, ProviderError, RateLimitedError
from embedpipe.providers.base import BatchResult, Provider, ProviderInfo, Role

OPENAI_BASE_URL = "https://api.openai.com/v1"


def normalize_base_url(url: str) -> str:
    """Lower-case scheme and host, no trailing slash: one server, one cache identity."""
    parts = urlsplit(url.strip())
    return urlunsplit((parts.scheme.lower(), parts.netloc.lower(), parts.path.rstrip("/"), "", ""))


def retry_after_seconds(headers: Mapping[str, str]) -> float | None:
    """The wait a 429 asks for: ``retry-after-ms`` first, then ``retry-after`` in seconds."""
    for name, scale in (("retry-after-ms", 0.001), ("retry-after", 1.0)):
        value = headers.get(name)
        if value is None:
            continue
        try:
            return max(0.0, float(value) * scale)
        except ValueError:
            continue  # an HTTP date; the backoff applies instead
    return None


def safe_url(url: object) -> str:
    """``url`` without credentials, query or fragment: safe to put in an error message."""
    parts = urlsplit(str(url))
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"  # an IPv6 literal
    netloc = f"{host}:{parts.port}" if parts.port is not None else host
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def _request_url(exc: BaseException) -> str:
    """The URL the failed request went to (credentials removed), or ``"the server"``."""
    try:
        return safe_url(exc.request.url)  # type: ignore[attr-defined]
    except Exception:  # an SDK error built without a request
        return "the server"


def _body_excerpt(response: Any) -> str:
    """What a 200 that is not an embeddings list held: its content type and first characters."""
    try:
        content_type = str(response.headers.get("content-type") or "no content type").split(";")[0]
        text = str(response.text)
    except Exception:  # a body that cannot even be read back
        return ""
    shown = text[:60] + ("..." if len(text) > 60 else "")
    return f"; {content_type}, {len(text)} characters: {shown!r}"


def malformed_response(exc: BaseException, response: Any = None) -> InvalidResponseError:
    """The one mapping of an unusable 200 to embedpipe's error, whatever parsing it raised.

    An HTML page, a body that is not JSON or is cut off, items without ``embedding``:
    the answer is broken, not any input, so the error is retryable and request-level
    (splitting the batch to find a bad input cannot help).
    """
    where = f" from {safe_url(response.url)}" if response is not None and hasattr(response, "url") else ""
    if isinstance(exc, InvalidResponseError):  # _decode's own findings say what is wrong already
        what = str(exc)
    else:
        detail = _body_excerpt(response) if response is not None else ""
        what = f"the HTTP 200 is not an embeddings list ({type(exc).__name__}: {exc}{detail})"
    return InvalidResponseError(f"invalid response{where}: {what}", retryable=True, request_level=True)


def _dimensions_error(message: str) -> bool:
    m = message.lower()
    return "dimension" in m and ("support" in m or "invalid" in m or "not" in m)


def map_openai_error(exc: BaseException) -> ProviderError:
    """Classify an openai SDK exception: the one place where its errors become embedpipe's.

    The SDK's own decode errors (a 200 whose body is not JSON) are invalid responses,
    through :func:`malformed_response`, like everything that reading a 200 can raise.
    """
    import openai

    if isinstance(exc, ProviderError):
        return exc
    if isinstance(exc, (openai.APIResponseValidationError, json.JSONDecodeError)):
        return malformed_response(exc, getattr(exc, "response", None))
    if isinstance(exc, openai.APITimeoutError):
        return ProviderError(f"request to {_request_url(exc)} timed out: {exc}", retryable=True)
    if isinstance(exc, openai.APIConnectionError):
        cause = f" ({type(exc.__cause__).__name__}: {exc.__cause__})" if exc.__cause__ is not None else ""
        return ProviderError(f"connection to {_request_url(exc)} failed: {exc}{cause}", retryable=True)
    if isinstance(exc, openai.APIStatusError):
        status = exc.status_code
        headers = {k.lower(): v for k, v in exc.response.headers.items()}
        body = exc.body if isinstance(exc.body, dict) else {}
        err = body.get("error", body) if isinstance(body.get("error", body), dict) else body
        message = str(err.get("message") or exc.message)
        code = err.get("code") or exc.code
        text = f"HTTP {status}: {message}"
        should_retry = headers.get("x-should-retry")
        if status == 429 and code == "insufficient_quota":
            # No money left: waiting cannot help.
            return ProviderError(text, status=status, retryable=False, request_level=True, headers=headers)
        retryable = status in (408, 409, 429) or status >= 500
        if should_retry == "false":
            retryable = False
        elif should_retry == "true":
            retryable = True
        if status == 429 and retryable:
            return RateLimitedError(text, status=status, retryable=True,
                                    retry_after=retry_after_seconds(headers), headers=headers)
        request_level = status in (401, 403, 404) or (status == 400 and _dimensions_error(message))
        if status == 400 and _dimensions_error(message):
            text += " (this server does not support the dimensions parameter; drop dimensions=)"
        return ProviderError(text, status=status, retryable=retryable, request_level=request_level,
                             retry_after=retry_after_seconds(headers) if retryable else None, headers=headers)
    if isinstance(exc, openai.APIError):
        return ProviderError(str(exc), retryable=True)
    return ProviderError(f"{type(exc).__name__}: {exc}", retryable=False)


class OpenAIProvider(Provider):
    """``openai:<model>``: OpenAI's embeddings API, or any server that speaks it (``base_url``)."""

    name = "openai"
    # OpenAI's documented request limits: 2048 inputs and 300,000 tokens per request
    # (https://platform.openai.com/docs/api-reference/embeddings/create, as of 2026-11-23).
    # The server reduces dimensions itself (Matryoshka via the ``dimensions`` parameter).
    info = ProviderInfo(batch_size=2048, max_batch_size=2048,
                        max_batch_tokens=300_000, default_concurrency=8, handles_dimensions=True)

    def __init__(self, model: str, *, dimensions: int | None = None, api_key: str | None = None,
                 base_url: str | None = None, timeout: float | None = 60.0,
                 max_input_tokens: int | None = None, encoding: str | None = None,
                 organization: str | None = None, default_headers: Mapping[str, str] | None = None) -> None:
        try:
            import openai  # noqa: F401
        except ImportError:
            raise ConfigurationError("the OpenAI provider needs the openai SDK: pip install 'embedpipe[openai]'") \
                from None
        info = OPENAI_MODELS.get(model)
        #: what the price table knows of this model (``None`` for a self-hosted one)
        self.model_info = info
        self.base_url = normalize_base_url(base_url or os.environ.get("OPENAI_BASE_URL") or OPENAI_BASE_URL)
        self.official = self.base_url == OPENAI_BASE_URL
        key = api_key or os.environ.get("OPENAI_API_KEY")
        if not key:
            if self.official:
                raise ConfigurationError(
                    "no OpenAI API key: pass api_key= or set OPENAI_API_KEY (or set base_url for a "
                    "self-hosted OpenAI-compatible server)")
            key = "no-key"  # self-hosted servers often need none; the SDK insists on a value
        self._api_key = key
        register_secret(key)  # from now on no message embedpipe builds can carry it
        if dimensions is not None:
            if info is not None and not info.matryoshka:
                raise ConfigurationError(f"{model} does not support dimensions=; only text-embedding-3 models do")
            if info is not None and dimensions > info.dimensions:
                raise ConfigurationError(f"dimensions={dimensions} exceeds {model}'s {info.dimensions}")
        # A model no table knows (a self-hosted server's) has an unknown price, never $0.
        super().__init__(model, info=replace(
            self.info, dimensions=dimensions if dimensions is not None else (info.dimensions if info else None),
            max_input_tokens=max_input_tokens or (info.max_input_tokens if info else None),
            price_per_1m_units=info.price_per_1m_tokens if info else None))
        self.requested_dimensions = dimensions
        self.encoding = encoding or (info.encoding if info else "cl100k_base")
        self.timeout = timeout
        self.organization = organization
        self.default_headers = dict(default_headers or {})
        self._client: Any = None

    @property
    def tokenizer(self) -> Any:
        from embedpipe.tokens import TiktokenTokenizer

        return TiktokenTokenizer.for_encoding(self.encoding)

    def identity(self) -> dict[str, Any]:
        return {"base_url": self.base_url}

    def _get_client(self) -> Any:
        if self._client is None:
            import openai

            # max_retries=0: embedpipe retries (tenacity); two layers would multiply the waits.
            self._client = openai.AsyncOpenAI(api_key=self._api_key, base_url=self.base_url, max_retries=0,
                                              timeout=self.timeout, organization=self.organization,
                                              default_headers=self.default_headers or None)
        return self._client

    async def aembed_batch(self, texts: list[str], role: Role) -> BatchResult:
        client = self._get_client()
        kwargs: dict[str, Any] = {"model": self.model, "input": texts, "encoding_format": "base64"}
        if self.requested_dimensions is not None:
            kwargs["dimensions"] = self.requested_dimensions
        try:
            raw = await client.embeddings.with_raw_response.create(**kwargs)
        except Exception as exc:
            raise map_openai_error(exc) from exc
        try:
            response = raw.parse()
            vectors = self._decode(response, len(texts))
            tokens = _usage(response)
        except Exception as exc:  # whatever a broken 200 makes the SDK or _decode raise
            raise malformed_response(exc, raw) from exc
        headers = {k.lower(): v for k, v in raw.headers.items()}
        return BatchResult(vectors, tokens=tokens, headers=headers,
                           status=getattr(raw, "status_code", 200))

    @staticmethod
    def _decode(response: Any, n: int) -> np.ndarray:
        """The (n, d) vectors of a parsed response; raises on anything that is not ``n`` embeddings."""
        items = getattr(response, "data", None)
        if not isinstance(items, list):
            # Not an InvalidResponseError: malformed_response then shows what the body held instead.
            raise TypeError(f"the SDK read it as {type(response).__name__}, without a data list")
        for k, d in enumerate(items):
            # The SDK builds its models without validation: a missing field is simply absent.
            if not isinstance(getattr(d, "index", None), int) or getattr(d, "embedding", None) is None:
                raise InvalidResponseError(f"item {k} of the response has no index or no embedding")
        data = sorted(items, key=lambda d: d.index)
        if len(data) != n or [d.index for d in data] != list(range(n)):
            raise InvalidResponseError(f"server returned {len(data)} embeddings (indices "
                                       f"{[d.index for d in data][:10]}) for {n} inputs")
        rows = []
        for d in data:
            emb = d.embedding
            # Servers that ignore encoding_format send float arrays: accept both.
            if isinstance(emb, str):
                try:
                    rows.append(np.frombuffer(base64.b64decode(emb), dtype="<f4"))
                except ValueError as exc:
                    raise InvalidResponseError(f"undecodable base64 embedding at index {d.index}: {exc}") from None
            else:
                rows.append(np.asarray(emb, dtype=np.float32))
            if rows[-1].ndim != 1:
                raise InvalidResponseError(f"the embedding at index {d.index} is not a flat list of numbers")
        lengths = {r.shape[0] for r in rows}
        if len(lengths) != 1:
            raise InvalidResponseError(f"server returned vectors of differing lengths {sorted(lengths)}")
        return np.stack(rows).astype(np.float32, copy=False)

    # ------------------------------------------------------------------ the Batch API (embedpipe.jobs.batch_api)
    #: where a batch's lines go (``batches.create(endpoint=...)`` and each line's ``url``)
    batch_endpoint = "/v1/embeddings"

    def batch_client(self) -> Any:
        """A sync SDK client for the Batch API's files and batches calls.

        The SDK retries these few control calls itself (``max_retries=3``): they are not
        embeddings requests, so embedpipe's retry policy and limiter do not apply to them.
        """
        import openai

        return openai.OpenAI(api_key=self._api_key, base_url=self.base_url, max_retries=3, timeout=self.timeout,
                             organization=self.organization, default_headers=self.default_headers or None)

    def batch_body(self, texts: list[str]) -> dict[str, Any]:
        """The body of one batch line: the embeddings request :meth:`aembed_batch` would send."""
        body: dict[str, Any] = {"model": self.model, "input": texts, "encoding_format": "base64"}
        if self.requested_dimensions is not None:
            body["dimensions"] = self.requested_dimensions
        return body

    def parse_batch_body(self, body: Any, n: int) -> tuple[np.ndarray, int | None]:
        """The (n, d) vectors and billed tokens of one output line's body; raises InvalidResponseError."""
        from types import SimpleNamespace

        try:
            if not isinstance(body, dict) or not isinstance(body.get("data"), list):
                raise TypeError("the body has no data list")
            items = [SimpleNamespace(**d) if isinstance(d, dict) else d for d in body["data"]]
            usage = body.get("usage")
            response = SimpleNamespace(data=items, usage=SimpleNamespace(**usage) if isinstance(usage, dict) else None)
            return self._decode(response, n), _usage(response)
        except Exception as exc:  # whatever a broken line makes parsing raise
            raise malformed_response(exc) from exc

    def close(self) -> None:
        client, self._client = self._client, None
        if client is None:
            return
        # The async client was made on embedpipe's runner loop and must close there.
        import asyncio

        from embedpipe import _runner

        try:
            if _runner.in_runner():
                _runner.get_loop().create_task(client.close())
            else:
                asyncio.run_coroutine_threadsafe(client.close(), _runner.get_loop()).result(timeout=10)
        except Exception:  # closing at interpreter exit or after a fork: nothing left to release
            pass

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_client"] = None
        return state


def _usage(response: Any) -> int | None:
    usage = getattr(response, "usage", None)
    total = getattr(usage, "total_tokens", None) if usage is not None else None
    if total is None and usage is not None:
        total = getattr(usage, "prompt_tokens", None)
    return int(total) if total is not None else None
