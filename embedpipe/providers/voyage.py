"""Voyage AI's embeddings API through the official ``voyageai`` SDK."""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from embedpipe.cost import price_of
from embedpipe.errors import ConfigurationError, EmbedPipeError, InvalidResponseError, ProviderError
from embedpipe.providers.base import BUG_EXCEPTIONS, BatchResult, Provider, ProviderInfo, Role
from embedpipe.providers.http_status import error_from_status, lower_headers
from embedpipe.providers.openai import normalize_base_url
from embedpipe.providers.quantized import QuantizedBatchResult
from embedpipe.quantize import OutputDtype, check_output_dtype, from_native

VOYAGE_BASE_URL = "https://api.voyageai.com/v1"
_MATRYOSHKA = (256, 512, 1024, 2048)


@dataclass(frozen=True)
class VoyageModel:
    """What embedpipe knows of one Voyage embedding model."""

    dimensions: int
    max_input_tokens: int
    max_batch_tokens: int
    output_dimensions: tuple[int, ...] = ()

    @property
    def quantized(self) -> bool:
        """Whether it takes ``output_dtype`` (the models trained for Matryoshka and quantization do)."""
        return bool(self.output_dimensions)


# Context length, dimensions and the per-request token cap ("the total number of tokens in the list is
# at most 1M for the lite models, 320K for voyage-3.5/voyage-4, 120K for the large, code and domain
# models") from https://docs.voyageai.com/reference/embeddings-api and
# https://docs.voyageai.com/docs/embeddings, as of 2026-12-02.
VOYAGE_MODELS: dict[str, VoyageModel] = {
    "voyage-4-large": VoyageModel(1024, 32_000, 120_000, _MATRYOSHKA),
    "voyage-4": VoyageModel(1024, 32_000, 320_000, _MATRYOSHKA),
    "voyage-4-lite": VoyageModel(1024, 32_000, 1_000_000, _MATRYOSHKA),
    "voyage-3.5": VoyageModel(1024, 32_000, 320_000, _MATRYOSHKA),
    "voyage-3.5-lite": VoyageModel(1024, 32_000, 1_000_000, _MATRYOSHKA),
    "voyage-3-large": VoyageModel(1024, 32_000, 120_000, _MATRYOSHKA),
    "voyage-code-3": VoyageModel(1024, 32_000, 120_000, _MATRYOSHKA),
    "voyage-finance-2": VoyageModel(1024, 32_000, 120_000),
    "voyage-law-2": VoyageModel(1024, 16_000, 120_000),
    "voyage-multilingual-2": VoyageModel(1024, 32_000, 120_000),
}


def map_voyage_error(exc: BaseException) -> EmbedPipeError:
    """Classify a ``voyageai`` SDK exception: the one place where its errors become embedpipe's."""
    import aiohttp
    from voyageai import error

    if isinstance(exc, EmbedPipeError):
        return exc
    if isinstance(exc, error.VoyageError) and exc.http_status:
        return error_from_status(int(exc.http_status), exc.user_message or str(exc), lower_headers(exc.headers))
    if isinstance(exc, (error.Timeout, TimeoutError)):
        return ProviderError(f"request timed out: {exc}", retryable=True)
    if isinstance(exc, (error.APIConnectionError, error.TryAgain, error.ServiceUnavailableError,
                        aiohttp.ClientError)):
        return ProviderError(f"connection failed: {exc}", retryable=True)
    return ProviderError(f"{type(exc).__name__}: {exc}", retryable=False)


class VoyageProvider(Provider):
    """``voyage:<model>``: Voyage AI's embeddings (``base_url`` for a proxy: the root of ``/embeddings``).

    ``input_type`` follows the role (``document``/``query``); ``input_type=False`` sends none.
    ``truncation`` (default True) cuts over-long inputs server-side; False makes them errors.
    ``dimensions`` sets ``output_dimension``; ``output_dtype`` asks for int8, uint8, binary or ubinary.
    """

    name = "voyage"
    # At most 1,000 inputs per request (https://docs.voyageai.com/reference/embeddings-api, as of 2026-12-02).
    info = ProviderInfo(batch_size=1000, max_batch_size=1000, default_concurrency=8, role_sensitive=True)
    #: output types Voyage returns itself (``output_dtype``)
    native_output_dtypes = frozenset({"int8", "uint8", "binary", "ubinary"})

    def __init__(self, model: str, *, dimensions: int | None = None, api_key: str | None = None,
                 base_url: str | None = None, timeout: float | None = 60.0, input_type: bool = True,
                 truncation: bool = True, output_dtype: OutputDtype = "float32",
                 max_input_tokens: int | None = None, max_batch_tokens: int | None = None) -> None:
        try:
            import voyageai  # noqa: F401
        except ImportError:
            raise ConfigurationError("the Voyage provider needs the voyageai SDK: pip install 'embedpipe[voyage]'") \
                from None
        known = VOYAGE_MODELS.get(model)
        self.output_dtype = check_output_dtype(output_dtype)
        if known is not None:
            if dimensions is not None and dimensions not in known.output_dimensions:
                raise ConfigurationError(f"dimensions={dimensions} for {model}: use one of "
                                         f"{known.output_dimensions or [known.dimensions]}")
            if self.output_dtype != "float32" and not known.quantized:
                raise ConfigurationError(f"{model} returns float embeddings only; output_dtype="
                                         f"{self.output_dtype!r} needs a voyage-3.5/3-large/code-3/4 model")
        self.base_url = normalize_base_url(base_url or os.environ.get("VOYAGE_BASE_URL") or VOYAGE_BASE_URL)
        key = api_key or os.environ.get("VOYAGE_API_KEY")
        if not key:
            if self.base_url == VOYAGE_BASE_URL:
                raise ConfigurationError("no Voyage API key: pass api_key= or set VOYAGE_API_KEY")
            key = "no-key"
        self._api_key = key
        self.send_input_type = bool(input_type)
        self.truncation = bool(truncation)
        self.requested_dimensions = dimensions
        self.timeout = timeout
        super().__init__(model, info=replace(
            self.info, role_sensitive=self.send_input_type, handles_dimensions=bool(known and known.quantized),
            dimensions=dimensions or (known.dimensions if known else None),
            max_input_tokens=max_input_tokens or (known.max_input_tokens if known else None),
            max_batch_tokens=max_batch_tokens or (known.max_batch_tokens if known else None),
            price_per_1m_units=price_of("voyage", model)))
        self._client: Any = None

    def identity(self) -> dict[str, Any]:
        ident: dict[str, Any] = {"base_url": self.base_url, "truncation": self.truncation}
        if not self.send_input_type:
            ident["input_type"] = None
        if self.output_dtype != "float32":
            ident["output_dtype"] = self.output_dtype
        return ident

    def input_type_for(self, role: Role) -> str | None:
        """The ``input_type`` sent for ``role`` (``None``: omitted)."""
        return role if self.send_input_type else None

    def _get_client(self) -> Any:
        if self._client is None:
            from voyageai.client_async import AsyncClient

            # max_retries=0: embedpipe retries (tenacity); two layers would multiply the waits.
            self._client = AsyncClient(api_key=self._api_key, max_retries=0, timeout=self.timeout,
                                                base_url=self.base_url)
        return self._client

    def map_error(self, exc: Exception) -> EmbedPipeError:
        return map_voyage_error(exc)

    async def aembed_batch(self, texts: list[str], role: Role) -> BatchResult:
        kwargs: dict[str, Any] = {"model": self.model, "input_type": self.input_type_for(role),
                                  "truncation": self.truncation}
        if self.output_dtype != "float32":
            kwargs["output_dtype"] = self.output_dtype
        if self.requested_dimensions is not None:
            kwargs["output_dimension"] = self.requested_dimensions
        try:
            response = await self._get_client().embed(texts, **kwargs)
        except BUG_EXCEPTIONS:
            raise
        except Exception as exc:
            raise map_voyage_error(exc) from exc
        rows = response.embeddings
        if len(rows) != len(texts):
            raise InvalidResponseError(f"Voyage returned {len(rows)} embeddings for {len(texts)} texts")
        tokens = int(response.total_tokens) if response.total_tokens is not None else None
        if self.output_dtype == "float32":
            try:
                return BatchResult(np.asarray(rows, dtype=np.float32), tokens=tokens)
            except ValueError as exc:
                raise InvalidResponseError(f"Voyage float embeddings are ragged: {exc}") from None
        q = from_native(self.output_dtype, rows, dimensions=self.requested_dimensions or self.info.dimensions)
        return QuantizedBatchResult.of(q, tokens, {})

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_client"] = None
        return state
