"""Cohere's v2 ``/embed`` through the official ``cohere`` SDK."""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from typing import Any, Literal

import numpy as np

from embedpipe.cost import price_of
from embedpipe.errors import ConfigurationError, EmbedPipeError, InvalidResponseError, ProviderError
from embedpipe.providers.base import BUG_EXCEPTIONS, BatchResult, Provider, ProviderInfo, Role
from embedpipe.providers.http_status import error_from_status, lower_headers
from embedpipe.providers.lifecycle import close_on_runner
from embedpipe.providers.openai import normalize_base_url
from embedpipe.providers.quantized import QuantizedBatchResult
from embedpipe.quantize import OutputDtype, check_output_dtype, from_native

COHERE_BASE_URL = "https://api.cohere.com"
CohereInputType = Literal["search_document", "search_query", "classification", "clustering"]
#: the input_type each engine role maps to
ROLE_INPUT_TYPES: dict[str, CohereInputType] = {"document": "search_document", "query": "search_query"}
TRUNCATE_MODES = ("NONE", "START", "END")


@dataclass(frozen=True)
class CohereModel:
    """What embedpipe knows of one Cohere embedding model."""

    dimensions: int
    max_input_tokens: int
    output_dimensions: tuple[int, ...] = ()


# Dimensions, context and Matryoshka sizes from https://docs.cohere.com/docs/cohere-embed, as of 2026-12-02.
COHERE_MODELS: dict[str, CohereModel] = {
    "embed-v4.0": CohereModel(1536, 128_000, (256, 512, 1024, 1536)),
    "embed-english-v3.0": CohereModel(1024, 512),
    "embed-multilingual-v3.0": CohereModel(1024, 512),
    "embed-english-light-v3.0": CohereModel(384, 512),
    "embed-multilingual-light-v3.0": CohereModel(384, 512),
}


def map_cohere_error(exc: BaseException) -> EmbedPipeError:
    """Classify a ``cohere`` SDK exception: the one place where its errors become embedpipe's."""
    import httpx
    from cohere.core.api_error import ApiError

    if isinstance(exc, EmbedPipeError):
        return exc
    if isinstance(exc, ApiError) and exc.status_code is not None:
        body = exc.body
        message = str(body.get("message") or body) if isinstance(body, dict) else str(body)
        return error_from_status(exc.status_code, message, lower_headers(exc.headers))
    if isinstance(exc, httpx.TimeoutException):
        return ProviderError(f"request timed out: {exc}", retryable=True)
    if isinstance(exc, httpx.TransportError):
        return ProviderError(f"connection failed: {exc}", retryable=True)
    return ProviderError(f"{type(exc).__name__}: {exc}", retryable=False)


class CohereProvider(Provider):
    """``cohere:<model>``: Cohere's embed v2 API (or a proxy of it: ``base_url`` is the root of ``/v2/embed``).

    ``input_type`` follows the role (``search_document``/``search_query``) unless fixed to
    ``"classification"`` or ``"clustering"``. ``truncate`` is ``"END"`` (Cohere's default), ``"START"``
    or ``"NONE"`` (too long an input is then rejected). ``dimensions`` sets ``output_dimension``
    (embed-v4.0 only). ``output_dtype`` asks for int8, uint8, binary or ubinary embeddings.
    """

    name = "cohere"
    # At most 96 texts per call (https://docs.cohere.com/reference/embed, as of 2026-12-02).
    info = ProviderInfo(batch_size=96, max_batch_size=96, default_concurrency=8, role_sensitive=True)
    #: output types Cohere returns itself (``embedding_types``)
    native_output_dtypes = frozenset({"int8", "uint8", "binary", "ubinary"})

    def __init__(self, model: str, *, dimensions: int | None = None, api_key: str | None = None,
                 base_url: str | None = None, timeout: float | None = 60.0,
                 input_type: CohereInputType | None = None, truncate: str = "END",
                 output_dtype: OutputDtype = "float32", max_input_tokens: int | None = None) -> None:
        try:
            import cohere  # noqa: F401
        except ImportError:
            raise ConfigurationError("the Cohere provider needs the cohere SDK: pip install 'embedpipe[cohere]'") \
                from None
        known = COHERE_MODELS.get(model)
        if input_type is not None and input_type not in ("search_document", "search_query", "classification",
                                                         "clustering"):
            raise ConfigurationError(f"input_type={input_type!r}: use search_document, search_query, "
                                     "classification or clustering (or leave it to the role)")
        if truncate not in TRUNCATE_MODES:
            raise ConfigurationError(f"truncate={truncate!r}: use one of {TRUNCATE_MODES}")
        self.output_dtype = check_output_dtype(output_dtype)
        if dimensions is not None and known is not None:
            if not known.output_dimensions:
                raise ConfigurationError(f"{model} does not support dimensions= (output_dimension); embed-v4.0 does")
            if dimensions not in known.output_dimensions:
                raise ConfigurationError(f"dimensions={dimensions} for {model}: use one of {known.output_dimensions}")
        self.base_url = normalize_base_url(base_url or os.environ.get("CO_API_URL") or COHERE_BASE_URL)
        key = api_key or os.environ.get("CO_API_KEY") or os.environ.get("COHERE_API_KEY")
        if not key:
            if self.base_url == COHERE_BASE_URL:
                raise ConfigurationError("no Cohere API key: pass api_key= or set CO_API_KEY")
            key = "no-key"
        self._api_key = key
        self.input_type = input_type
        self.truncate = truncate
        self.requested_dimensions = dimensions
        self.timeout = timeout
        # A fixed input_type embeds queries and documents alike: the role no longer matters.
        super().__init__(model, info=replace(
            self.info, role_sensitive=input_type is None,
            handles_dimensions=bool(known and known.output_dimensions),
            dimensions=dimensions or (known.dimensions if known else None),
            max_input_tokens=max_input_tokens or (known.max_input_tokens if known else None),
            price_per_1m_units=price_of("cohere", model)))
        self._client: Any = None
        self._http: Any = None

    def identity(self) -> dict[str, Any]:
        ident: dict[str, Any] = {"base_url": self.base_url, "truncate": self.truncate}
        if self.input_type is not None:
            ident["input_type"] = self.input_type
        if self.output_dtype != "float32":
            ident["embedding_type"] = self.output_dtype
        return ident

    def input_type_for(self, role: Role) -> CohereInputType:
        """The ``input_type`` sent for ``role``."""
        return self.input_type or ROLE_INPUT_TYPES[role]

    def _get_client(self) -> Any:
        if self._client is None:
            import cohere
            import httpx

            # Our own httpx client, so close() can release its connections.
            self._http = httpx.AsyncClient(timeout=self.timeout)
            # max_retries=0: embedpipe retries (tenacity); two layers would multiply the waits.
            self._client = cohere.AsyncClientV2(api_key=self._api_key, base_url=self.base_url,
                                                timeout=self.timeout, max_retries=0, httpx_client=self._http)
        return self._client

    def map_error(self, exc: Exception) -> EmbedPipeError:
        return map_cohere_error(exc)

    async def aembed_batch(self, texts: list[str], role: Role) -> BatchResult:
        if len(texts) > self.info.batch_size:  # the engine plans batches by info; this guards a direct caller
            raise ConfigurationError(f"Cohere embeds at most {self.info.batch_size} texts per call, got {len(texts)}")
        kind = "float" if self.output_dtype == "float32" else self.output_dtype
        kwargs: dict[str, Any] = {"model": self.model, "texts": texts, "input_type": self.input_type_for(role),
                                  "embedding_types": [kind], "truncate": self.truncate,
                                  "request_options": {"max_retries": 0}}
        if self.requested_dimensions is not None:
            kwargs["output_dimension"] = self.requested_dimensions
        try:
            raw = await self._get_client().with_raw_response.embed(**kwargs)
        except BUG_EXCEPTIONS:
            raise
        except Exception as exc:
            raise map_cohere_error(exc) from exc
        headers = lower_headers(dict(raw.headers))
        return self._decode(raw.data, len(texts), kind, headers)

    def _decode(self, response: Any, n: int, kind: str, headers: dict[str, str]) -> BatchResult:
        embeddings = getattr(response, "embeddings", None)
        rows = getattr(embeddings, "float_" if kind == "float" else kind, None) if embeddings is not None else None
        if rows is None or len(rows) != n:
            raise InvalidResponseError(f"Cohere returned {0 if rows is None else len(rows)} {kind} embeddings "
                                       f"for {n} texts")
        tokens = _billed_tokens(response)
        if kind == "float":
            try:
                return BatchResult(np.asarray(rows, dtype=np.float32), tokens=tokens, headers=headers)
            except ValueError as exc:
                raise InvalidResponseError(f"Cohere float embeddings are ragged: {exc}") from None
        dims = self.requested_dimensions or self.info.dimensions
        q = from_native(self.output_dtype, rows, dimensions=dims)
        return QuantizedBatchResult.of(q, tokens, headers)

    def close(self) -> None:
        http, self._http, self._client = self._http, None, None
        if http is not None:
            close_on_runner(http.aclose)

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_client"] = state["_http"] = None
        return state


def _billed_tokens(response: Any) -> int | None:
    """``meta.billed_units.input_tokens``: what Cohere bills for text."""
    meta = getattr(response, "meta", None)
    billed = getattr(meta, "billed_units", None) if meta is not None else None
    tokens = getattr(billed, "input_tokens", None) if billed is not None else None
    return int(tokens) if tokens is not None else None
