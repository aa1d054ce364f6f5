"""Google's Gemini API embeddings (``batchEmbedContents``) through the official ``google-genai`` SDK.

Only the Gemini API (an API key) is supported and tested. Vertex AI speaks other endpoints
(``predict``) and authenticates with Google Cloud credentials that cannot be exercised here;
it is left out rather than shipped untested.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from embedpipe.cost import price_of
from embedpipe.errors import ConfigurationError, EmbedPipeError, InvalidResponseError, ProviderError
from embedpipe.providers.base import BUG_EXCEPTIONS, BatchResult, Provider, ProviderInfo, Role
from embedpipe.providers.http_status import error_from_status, lower_headers, parse_duration
from embedpipe.providers.lifecycle import close_on_runner
from embedpipe.providers.openai import normalize_base_url

GEMINI_BASE_URL = "https://generativelanguage.googleapis.com"
#: the task_type each engine role maps to
ROLE_TASK_TYPES = {"document": "RETRIEVAL_DOCUMENT", "query": "RETRIEVAL_QUERY"}
TASK_TYPES = ("RETRIEVAL_DOCUMENT", "RETRIEVAL_QUERY", "SEMANTIC_SIMILARITY", "CLASSIFICATION", "CLUSTERING",
              "QUESTION_ANSWERING", "FACT_VERIFICATION", "CODE_RETRIEVAL_QUERY")


@dataclass(frozen=True)
class GeminiModel:
    """What embedpipe knows of one Gemini embedding model."""

    dimensions: int
    max_input_tokens: int
    min_dimensions: int


# 3072 dims (Matryoshka down to 128), 2,048 input tokens, from
# https://ai.google.dev/gemini-api/docs/embeddings, as of 2026-12-02.
GEMINI_MODELS: dict[str, GeminiModel] = {
    "gemini-embedding-001": GeminiModel(3072, 2048, 128),
}


def _retry_delay(details: Any) -> float | None:
    """The wait in a ``google.rpc.RetryInfo`` detail (``"retryDelay": "17s"``), if the error carries one."""
    err = details.get("error", details) if isinstance(details, dict) else None
    for d in (err or {}).get("details") or []:
        if isinstance(d, dict) and str(d.get("@type", "")).endswith("RetryInfo") and d.get("retryDelay"):
            return parse_duration(str(d["retryDelay"]))
    return None


def map_gemini_error(exc: BaseException) -> EmbedPipeError:
    """Classify a ``google-genai`` exception: the one place where its errors become embedpipe's."""
    import httpx
    from google.genai import errors

    if isinstance(exc, EmbedPipeError):
        return exc
    if isinstance(exc, errors.APIError):
        headers = lower_headers(getattr(exc.response, "headers", None))
        status = int(exc.code or 0)
        text = f"{exc.status}: {exc.message}" if exc.status else str(exc.message)
        if status:
            return error_from_status(status, text, headers, retry_after=_retry_delay(exc.details))
        return ProviderError(text, retryable=True, headers=headers)
    if isinstance(exc, (httpx.TimeoutException, TimeoutError)):
        return ProviderError(f"request timed out: {exc}", retryable=True)
    if isinstance(exc, (httpx.TransportError, ConnectionError)):
        return ProviderError(f"connection failed: {exc}", retryable=True)
    try:
        import aiohttp

        if isinstance(exc, aiohttp.ClientError):
            return ProviderError(f"connection failed: {exc}", retryable=True)
    except ImportError:  # aiohttp is optional for google-genai
        pass
    return ProviderError(f"{type(exc).__name__}: {exc}", retryable=False)


class GeminiProvider(Provider):
    """``gemini:<model>``: the Gemini API's ``batchEmbedContents`` with an API key.

    ``task_type`` follows the role (``RETRIEVAL_DOCUMENT``/``RETRIEVAL_QUERY``) unless fixed for both
    (``task_type="SEMANTIC_SIMILARITY"``, ``"CLASSIFICATION"``…) or for queries only
    (``query_task_type="QUESTION_ANSWERING"``, ``"CODE_RETRIEVAL_QUERY"``…). ``dimensions`` sets
    ``output_dimensionality``; those vectors come back unnormalized, so ``normalize=True`` (default)
    scales them to unit length as Google's guide advises. ``base_url`` is the API root
    (``/v1beta/models/…`` hangs from it).
    """

    name = "gemini"
    # At most 100 requests per batchEmbedContents call
    # (https://ai.google.dev/api/embeddings#method:-models.batchembedcontents, as of 2026-12-02).
    info = ProviderInfo(batch_size=100, max_batch_size=100,
                        default_concurrency=4, role_sensitive=True, handles_dimensions=True)

    def __init__(self, model: str, *, dimensions: int | None = None, api_key: str | None = None,
                 base_url: str | None = None, timeout: float | None = 60.0, task_type: str | None = None,
                 query_task_type: str | None = None, normalize: bool = True, api_version: str = "v1beta",
                 max_input_tokens: int | None = None) -> None:
        try:
            from google import genai  # noqa: F401
        except ImportError:
            raise ConfigurationError("the Gemini provider needs google-genai: pip install 'embedpipe[gemini]'") \
                from None
        for opt, value in (("task_type", task_type), ("query_task_type", query_task_type)):
            if value is not None and value not in TASK_TYPES:
                raise ConfigurationError(f"{opt}={value!r}: use one of {TASK_TYPES}")
        if task_type is not None and query_task_type is not None:
            raise ConfigurationError("pass task_type= (both roles) or query_task_type= (queries), not both")
        known = GEMINI_MODELS.get(model)
        if dimensions is not None and known is not None and not known.min_dimensions <= dimensions <= known.dimensions:
            raise ConfigurationError(f"dimensions={dimensions} for {model}: use {known.min_dimensions} to "
                                     f"{known.dimensions} (768, 1536 or 3072 recommended)")
        self.base_url = normalize_base_url(base_url or os.environ.get("GOOGLE_GEMINI_BASE_URL") or GEMINI_BASE_URL)
        key = api_key or os.environ.get("GEMINI_API_KEY") or os.environ.get("GOOGLE_API_KEY")
        if not key:
            if self.base_url == GEMINI_BASE_URL:
                raise ConfigurationError("no Gemini API key: pass api_key= or set GEMINI_API_KEY")
            key = "no-key"
        self._api_key = key
        self.task_type = task_type
        self.query_task_type = query_task_type
        self.normalize = bool(normalize)
        self.api_version = api_version
        self.requested_dimensions = dimensions
        self.timeout = timeout
        super().__init__(model, info=replace(
            self.info, role_sensitive=task_type is None,
            dimensions=dimensions or (known.dimensions if known else None),
            max_input_tokens=max_input_tokens or (known.max_input_tokens if known else None),
            price_per_1m_units=price_of("gemini", model)))
        self._client: Any = None
        self._http: Any = None

    def identity(self) -> dict[str, Any]:
        ident: dict[str, Any] = {"base_url": self.base_url, "normalize": self.normalize}
        if self.task_type is not None:
            ident["task_type"] = self.task_type
        if self.query_task_type is not None:
            ident["query_task_type"] = self.query_task_type
        return ident

    def task_type_for(self, role: Role) -> str:
        """The ``task_type`` sent for ``role``."""
        if self.task_type is not None:
            return self.task_type
        if role == "query" and self.query_task_type is not None:
            return self.query_task_type
        return ROLE_TASK_TYPES[role]

    def _get_client(self) -> Any:
        if self._client is None:
            import httpx
            from google import genai
            from google.genai import types

            # Our own httpx client: google-genai would otherwise pick aiohttp when it is installed
            # (voyageai pulls it in), whose session subclass warns on import; close() releases it.
            self._http = httpx.AsyncClient(timeout=self.timeout)
            # attempts=1: embedpipe retries (tenacity); two layers would multiply the waits.
            options = types.HttpOptions(base_url=self.base_url, api_version=self.api_version,
                                        timeout=int(self.timeout * 1000) if self.timeout else None,
                                        retry_options=types.HttpRetryOptions(attempts=1),
                                        httpx_async_client=self._http)
            self._client = genai.Client(api_key=self._api_key, http_options=options).aio
        return self._client

    def map_error(self, exc: Exception) -> EmbedPipeError:
        return map_gemini_error(exc)

    async def aembed_batch(self, texts: list[str], role: Role) -> BatchResult:
        from google.genai import types

        config = types.EmbedContentConfig(task_type=self.task_type_for(role),
                                          output_dimensionality=self.requested_dimensions)
        try:
            response = await self._get_client().models.embed_content(model=self.model, contents=texts,
                                                                     config=config)
        except BUG_EXCEPTIONS:
            raise
        except Exception as exc:
            raise map_gemini_error(exc) from exc
        embeddings = response.embeddings or []
        if len(embeddings) != len(texts):
            raise InvalidResponseError(f"Gemini returned {len(embeddings)} embeddings for {len(texts)} texts")
        try:
            vectors = np.asarray([e.values for e in embeddings], dtype=np.float32)
        except (ValueError, TypeError) as exc:
            raise InvalidResponseError(f"Gemini embeddings are ragged or missing values: {exc}") from None
        if self.normalize and self.requested_dimensions is not None:
            norms = np.linalg.norm(vectors, axis=1, keepdims=True)
            vectors = np.divide(vectors, norms, out=np.zeros_like(vectors), where=norms > 0)
        http = getattr(response, "sdk_http_response", None)
        return BatchResult(vectors, tokens=_usage(response), headers=lower_headers(getattr(http, "headers", None)))

    def close(self) -> None:
        client, http, self._client, self._http = self._client, self._http, None, None
        if client is not None:
            close_on_runner(client.aclose)
        if http is not None:
            close_on_runner(http.aclose)

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_client"] = state["_http"] = None
        return state


def _usage(response: Any) -> int | None:
    """Tokens the answer reports: ``usageMetadata.promptTokenCount``, else per-embedding token counts."""
    usage = getattr(response, "usage_metadata", None)
    for field in ("prompt_token_count", "total_token_count"):
        value = getattr(usage, field, None) if usage is not None else None
        if value is not None:
            return int(value)
    counts = [getattr(getattr(e, "statistics", None), "token_count", None) for e in response.embeddings or []]
    if counts and all(c is not None for c in counts):
        return int(sum(counts))  # type: ignore[arg-type]
    return None  # the Gemini API often reports none: the engine then bills its own count
