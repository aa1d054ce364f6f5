"""A provider over another framework's embedding object (LangChain ``Embeddings``, LlamaIndex ``BaseEmbedding``).

The adapters hand over four callables; everything else (identity, error rule, retry
settings) is decided here, once, for both frameworks.
"""

from __future__ import annotations

import asyncio
import json
import logging
import warnings
from collections.abc import Awaitable, Callable, Collection, Sequence
from dataclasses import replace
from typing import Any
from urllib.parse import urlsplit

import numpy as np

from embedpipe._urls import register_secret
from embedpipe.errors import ProviderError
from embedpipe.providers.base import BatchResult, Provider, ProviderInfo, Role, Tokenizer
from embedpipe.providers.known_models import KnownModel, adopt, api_hosts_of

log = logging.getLogger("embedpipe")

_RETRYABLE_STATUS = {408, 409, 429}
_RETRYABLE_NAMES = ("timeout", "timedout", "connection", "ratelimit", "serviceunavailable",
                    "internalserver", "apiconnection", "remoteprotocol", "readerror")


def _request_host(exc: BaseException) -> str | None:
    """The host a failed HTTP request went to (requests' and httpx's errors carry the request)."""
    seen: BaseException | None = exc
    for _ in range(3):  # the exception, then what it was raised from
        if seen is None:
            break
        try:
            url = seen.request.url  # type: ignore[attr-defined]  # httpx raises if unset
        except Exception:
            url = None
        if url:
            try:
                host = urlsplit(str(url)).hostname
            except ValueError:
                host = None
            if host:
                return host
        seen = seen.__cause__ or seen.__context__
    return None


def classify_exception(exc: BaseException, *, api_hosts: Collection[str] | None = None) -> ProviderError:
    """The one rule for a wrapped model's exceptions.

    1. openai SDK errors go through :func:`embedpipe.providers.openai.map_openai_error`,
       and so does a ``JSONDecodeError`` (a 200 whose body is not JSON).
    2. A failure that is not the provider's answer fails fast, and for the whole request
       (no input is to blame): an ``ImportError``, or an HTTP error from a host that is
       not one of ``api_hosts`` (tiktoken's or Hugging Face's downloads).
    3. An exception carrying an HTTP status (``status_code``, ``status``, ``http_status``
       or ``response.status_code``) is retryable for 408, 409, 429 and 5xx, else not.
    4. Otherwise, timeouts and connection errors (``TimeoutError``, ``ConnectionError``,
       httpx/requests transport errors: matched by class name) are retryable.
    5. Anything else fails fast: retrying a bug only burns time.
    """
    if isinstance(exc, ProviderError):
        return exc
    if isinstance(exc, json.JSONDecodeError):
        from embedpipe.providers.openai import malformed_response

        return malformed_response(exc)
    try:
        import openai

        if isinstance(exc, openai.OpenAIError):
            from embedpipe.providers.openai import map_openai_error

            return map_openai_error(exc)
    except ImportError:
        pass
    if isinstance(exc, ImportError):
        return ProviderError(f"the wrapped model cannot import what it needs ({type(exc).__name__}: {exc}); "
                             "not retried", retryable=False, request_level=True)
    host = _request_host(exc)
    if host is not None and api_hosts and host not in api_hosts:
        from embedpipe.providers.openai import safe_url

        url = safe_url(getattr(getattr(exc, "request", None), "url", "") or host)
        return ProviderError(
            f"the wrapped model failed reaching {url}, which is not its API ({', '.join(sorted(api_hosts))}), "
            f"so this is no answer of the provider's; not retried: {type(exc).__name__}: {exc}",
            retryable=False, request_level=True)
    status = None
    for attr in ("status_code", "status", "http_status"):
        value = getattr(exc, attr, None)
        if isinstance(value, int):
            status = value
            break
    if status is None:
        resp = getattr(exc, "response", None)
        value = getattr(resp, "status_code", None)
        status = value if isinstance(value, int) else None
    text = f"{type(exc).__name__}: {exc}"
    if status is not None:
        retryable = status in _RETRYABLE_STATUS or status >= 500
        return ProviderError(text, status=status, retryable=retryable,
                             request_level=status in (401, 403, 404))
    names = " ".join(c.__name__.lower() for c in type(exc).__mro__)
    retryable = isinstance(exc, (TimeoutError, ConnectionError, asyncio.TimeoutError)) or any(
        n in names for n in _RETRYABLE_NAMES)
    return ProviderError(text, retryable=retryable)


def disable_retries(obj: Any) -> None:
    """Set a wrapped model's own retry setting to 0 where it has one, so retries never stack."""
    for attr in ("max_retries",):
        if isinstance(getattr(obj, attr, None), int) and getattr(obj, attr) != 0:
            try:
                setattr(obj, attr, 0)
            except Exception:  # frozen models: embedpipe's retries then stack on theirs
                log.warning("embedpipe: could not set %s.%s = 0; its retries add to embedpipe's",
                            type(obj).__name__, attr)
    # SDK clients already built with retries. LangChain's OpenAIEmbeddings keeps openai's
    # ``client.embeddings`` resources here, which hold their client in ``_client``.
    for attr in ("client", "async_client", "_client", "_aclient"):
        target: Any = getattr(obj, attr, None)
        owner: Any = getattr(target, "_client", None)
        try:
            if callable(getattr(target, "with_options", None)):
                setattr(obj, attr, target.with_options(max_retries=0))
            elif callable(getattr(owner, "with_options", None)) and getattr(owner, "max_retries", 0) != 0:
                setattr(obj, attr, type(target)(owner.with_options(max_retries=0)))
        except Exception:  # an object we cannot rebuild keeps its retries; nothing else breaks
            pass


def register_secrets_of(obj: Any) -> None:
    """Register the API key a wrapped model holds (LangChain's ``openai_api_key`` is a pydantic
    ``SecretStr``; LlamaIndex keeps ``api_key`` as a plain string), so no message can leak it."""
    for attr in ("openai_api_key", "api_key", "azure_ad_token", "cohere_api_key", "voyage_api_key"):
        value = getattr(obj, attr, None)
        reveal = getattr(value, "get_secret_value", None)
        if callable(reveal):
            value = reveal()
        if isinstance(value, str):
            register_secret(value)


_warned: set[str] = set()


class FrameworkProvider(Provider):
    """Wraps a framework's embedding object given its document and query callables.

    The role enters the cache key: a wrapped model must be assumed to embed queries and
    documents differently.
    """

    info = ProviderInfo(batch_size=512, default_concurrency=4, role_sensitive=True)

    def __init__(self, obj: Any, *, framework: str,
                 embed_documents: Callable[[list[str]], Sequence[Sequence[float]]],
                 embed_query: Callable[[str], Sequence[float]],
                 aembed_documents: Callable[[list[str]], Awaitable[Sequence[Sequence[float]]]] | None = None,
                 aembed_query: Callable[[str], Awaitable[Sequence[float]]] | None = None,
                 max_input_tokens: int | None = None, price_per_1m_tokens: float | None = None,
                 warn_unnamed: bool = True) -> None:
        self.obj = obj
        #: what embedpipe knows of ``obj`` (OpenAI's classes in both frameworks), before it is changed
        self.known: KnownModel | None = adopt(obj)
        self.name = framework
        self.class_path = f"{type(obj).__module__}.{type(obj).__qualname__}"
        model = getattr(obj, "model", None) or getattr(obj, "model_name", None)
        if not isinstance(model, str) or not model:
            # warn_unnamed=False: the caller names the vector space (a namespace, or keys of its own).
            if warn_unnamed and self.class_path not in _warned:
                _warned.add(self.class_path)
                warnings.warn(
                    f"embedpipe: {self.class_path} has no `model` or `model_name`, so the cache key cannot tell "
                    "two configurations of it apart; pass namespace='...' naming the model", stacklevel=4)
            model = self.class_path
        dims = getattr(obj, "dimensions", None)
        self._declared_dims = dims if isinstance(dims, int) else None
        known = self.known
        super().__init__(model, info=replace(
            self.info, dimensions=self._declared_dims or (known.dimensions if known else None),
            max_input_tokens=max_input_tokens or (known.max_input_tokens if known else None),
            price_per_1m_units=price_per_1m_tokens if price_per_1m_tokens is not None else (
                known.price_per_1m_tokens if known else None)))
        self._embed_documents = embed_documents
        self._embed_query = embed_query
        self._aembed_documents = aembed_documents
        self._aembed_query = aembed_query
        self.encoding = known.encoding if known else "cl100k_base"
        self.api_hosts = known.api_hosts if known else api_hosts_of(
            obj, "base_url", "api_base", "openai_api_base", "azure_endpoint", "endpoint", "endpoint_url", "api_url")
        disable_retries(obj)
        register_secrets_of(obj)

    @property
    def tokenizer(self) -> Tokenizer:
        from embedpipe.tokens import TiktokenTokenizer

        return TiktokenTokenizer.for_encoding(self.encoding)

    def identity(self) -> dict[str, Any]:
        # Native dims as the wrapped object declares them (OpenAIEmbeddings(dimensions=256)).
        return {"class": self.class_path, "native_dimensions": self._declared_dims}

    async def aembed_batch(self, texts: list[str], role: Role) -> BatchResult:
        try:
            if role == "query":
                if self._aembed_query is not None:
                    rows = [await self._aembed_query(t) for t in texts]
                else:
                    rows = await asyncio.to_thread(lambda: [self._embed_query(t) for t in texts])
            elif self._aembed_documents is not None:
                rows = list(await self._aembed_documents(texts))
            else:
                rows = list(await asyncio.to_thread(self._embed_documents, texts))
        except Exception as exc:
            raise classify_exception(exc, api_hosts=self.api_hosts) from exc
        return BatchResult(_to_array(rows, len(texts)))


def _to_array(rows: Sequence[Sequence[float]], n: int) -> np.ndarray:
    from embedpipe.errors import InvalidResponseError

    if len(rows) != n:
        raise InvalidResponseError(f"wrapped model returned {len(rows)} vectors for {n} inputs")
    try:
        return np.asarray(rows, dtype=np.float32).reshape(n, -1)
    except ValueError as exc:
        raise InvalidResponseError(f"wrapped model returned vectors of differing lengths: {exc}") from None
