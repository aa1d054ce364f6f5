"""The provider seam: one small class per embedding backend.

A provider is shaped like an httpx transport: it knows how to send *one batch* and
nothing else. Dedupe, caching, batch planning, rate limits, retries, validation and
cost live in the engine (:mod:`embedpipe.pipeline`).

To add a provider, subclass :class:`Provider`, declare its limits in a
:class:`ProviderInfo` (``info = ProviderInfo(...)``), and override either ``embed_batch``
(blocking: the engine runs it in a worker thread) or ``aembed_batch`` (native async).
Map your library's exceptions into :class:`embedpipe.errors.ProviderError` there, or in
:meth:`Provider.map_error`, which the engine applies to anything else a provider raises.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar, Literal, Protocol

import numpy as np

from embedpipe.errors import EmbedPipeError, ProviderError

Role = Literal["document", "query"]

#: exceptions that mean a bug in embedpipe or the provider's own code, never the model's
#: answer: they propagate instead of becoming a Failure
BUG_EXCEPTIONS: tuple[type[BaseException], ...] = (AssertionError, TypeError, NameError, AttributeError,
                                                   ImportError, NotImplementedError, RecursionError)


@dataclass(frozen=True)
class ProviderInfo:
    """Everything the engine reads about a provider, declared once.

    ``batch_size``: most inputs in one request. ``max_batch_tokens``: most tokens in one
    request (``None``: no limit). ``max_input_tokens``: most tokens in one input, beyond
    which ``on_long_input`` applies (``None``: unknown). ``default_concurrency``: requests in
    flight at once by default. ``role_sensitive``: queries and documents embed differently
    (the role enters the cache key). ``handles_dimensions``: the provider reduces dimensions
    itself (Matryoshka through an API parameter). ``modalities``: the input kinds it embeds
    (``"text"``, ``"image"``, …). ``price_per_1m_units``: USD per million units (tokens for
    text; 0.0 free, ``None`` unknown). ``dimensions``: native output dimensions, ``None``
    until the first response shows them (the pipeline keeps what it learns, never the provider).
    """

    batch_size: int = 256
    max_batch_tokens: int | None = None
    max_input_tokens: int | None = None
    default_concurrency: int = 4
    role_sensitive: bool = False
    handles_dimensions: bool = False
    modalities: frozenset[str] = frozenset({"text"})
    price_per_1m_units: float | None = None
    dimensions: int | None = None
    #: inputs the API refuses to take in one request (``None``: no such limit); ``batch_size=`` is capped there
    max_batch_size: int | None = None


class Tokenizer(Protocol):
    """Counts and cuts text the way the provider's model sees it."""

    def count(self, texts: Sequence[str]) -> list[int]:
        """Token count of each text (no special tokens).

        A tokenizer may also take ``cap=``: then a text over ``cap`` tokens may report any count
        above ``cap`` (counting its prefix alone). The engine passes it when it only needs to know
        "over the limit" (``on_long_input`` "truncate" or "error"), never for "split".
        """
        ...

    def split(self, text: str, max_tokens: int) -> list[tuple[str, int]]:
        """Cut ``text`` into consecutive windows of at most ``max_tokens`` tokens that cover all of it.

        Returns ``(window_text, window_tokens)`` pairs.
        """
        ...

    def truncate(self, text: str, max_tokens: int) -> tuple[str, int]:
        """The longest prefix of ``text`` with at most ``max_tokens`` tokens, and its token count."""
        ...


@dataclass
class BatchResult:
    """What one provider call returns.

    ``vectors``: (n, d) array in input order. ``tokens``: tokens the provider billed
    (``usage.total_tokens``), or ``None`` if it did not say. ``headers``: response
    headers, for the rate limiter. ``status``: the HTTP status of the answer, ``None``
    for a provider without one (a local model).
    """

    vectors: np.ndarray
    tokens: int | None = None
    headers: Mapping[str, str] = field(default_factory=dict)
    status: int | None = None


#: ProviderInfo fields that older providers declared as class attributes, and their field names
_LEGACY_ATTRS = {"default_batch_size": "batch_size", "max_batch_tokens": "max_batch_tokens",
                 "max_input_tokens": "max_input_tokens", "default_concurrency": "default_concurrency",
                 "role_sensitive": "role_sensitive", "handles_dimensions": "handles_dimensions"}


class Provider:
    """Base class of embedding providers. Declare ``info``; override ``embed_batch`` or ``aembed_batch``.

    ``info`` is a frozen :class:`ProviderInfo`; an instance that learns its limits when it loads
    (a local model) replaces its own ``info`` with :func:`dataclasses.replace`, never a shared one.
    The attribute names of older providers (``default_batch_size``, ``max_input_tokens``, …) still
    read and write the instance's ``info``.
    """

    #: short provider name used in specs and cache keys ("openai", "local", "fake")
    name: str = "provider"
    #: what the engine reads: limits, concurrency, roles, modalities, price, native dimensions
    info: ProviderInfo = ProviderInfo()

    _legacy: ClassVar[dict[str, str]] = _LEGACY_ATTRS

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        # A subclass written against the old class attributes gets them folded into its info.
        legacy = {field_: cls.__dict__[attr] for attr, field_ in _LEGACY_ATTRS.items()
                  if attr in cls.__dict__ and not isinstance(cls.__dict__[attr], property)}
        if legacy:
            for attr in [a for a in _LEGACY_ATTRS if a in cls.__dict__]:
                delattr(cls, attr)
            cls.info = replace(cls.info, **legacy)

    def __init__(self, model: str, dimensions: int | None = None, *, info: ProviderInfo | None = None) -> None:
        self.model = model
        if info is not None:
            self.info = info
        if dimensions is not None:
            self.info = replace(self.info, dimensions=dimensions)

    # -- the old attribute names, as views of ``info`` -----------------------------------
    def _set_info(self, **changes: Any) -> None:
        self.info = replace(self.info, **changes)

    @property
    def dimensions(self) -> int | None:
        """Native output dimensions (``info.dimensions``)."""
        return self.info.dimensions

    @dimensions.setter
    def dimensions(self, value: int | None) -> None:
        self._set_info(dimensions=value)

    @property
    def default_batch_size(self) -> int:
        return self.info.batch_size

    @default_batch_size.setter
    def default_batch_size(self, value: int) -> None:
        self._set_info(batch_size=value)

    @property
    def max_batch_tokens(self) -> int | None:
        return self.info.max_batch_tokens

    @max_batch_tokens.setter
    def max_batch_tokens(self, value: int | None) -> None:
        self._set_info(max_batch_tokens=value)

    @property
    def max_input_tokens(self) -> int | None:
        return self.info.max_input_tokens

    @max_input_tokens.setter
    def max_input_tokens(self, value: int | None) -> None:
        self._set_info(max_input_tokens=value)

    @property
    def default_concurrency(self) -> int:
        return self.info.default_concurrency

    @default_concurrency.setter
    def default_concurrency(self, value: int) -> None:
        self._set_info(default_concurrency=value)

    @property
    def role_sensitive(self) -> bool:
        return self.info.role_sensitive

    @role_sensitive.setter
    def role_sensitive(self, value: bool) -> None:
        self._set_info(role_sensitive=value)

    @property
    def handles_dimensions(self) -> bool:
        return self.info.handles_dimensions

    # -- identity -------------------------------------------------------------------
    def identity(self) -> dict[str, Any]:
        """Everything besides provider, model and dimensions that changes the vectors.

        It enters the cache key. Override to add server URLs or model options.
        """
        return {}

    @property
    def spec(self) -> str:
        """The ``provider:model`` spec string."""
        return f"{self.name}:{self.model}"

    # -- pricing --------------------------------------------------------------------
    @property
    def price_per_1m_tokens(self) -> float | None:
        """USD per million input tokens (``info.price_per_1m_units``); 0.0 when free, ``None`` when unknown."""
        return self.info.price_per_1m_units

    # -- tokens ---------------------------------------------------------------------
    @property
    def tokenizer(self) -> Tokenizer:
        """The tokenizer used to count, split and truncate. Defaults to tiktoken's cl100k_base."""
        from embedpipe.tokens import TiktokenTokenizer

        return TiktokenTokenizer.for_encoding("cl100k_base")

    def item_tokens(self, item: Any) -> int:
        """What one non-text input weighs in batch planning, in the units of ``max_batch_tokens``.

        0 by default. A vision model returns the patches an image becomes, so that requests are
        planned by pixels as texts are by tokens.
        """
        return 0

    # -- the batch method -------------------------------------------------------------
    # ``list[Any]``: inputs are strings, or Items of a kind in ``info.modalities``; a text-only
    # provider may annotate ``list[str]``, since the engine never hands it anything else.
    def embed_batch(self, texts: list[Any], role: Role) -> BatchResult:
        """Embed ``texts`` in one call (blocking). Override this or :meth:`aembed_batch`.

        Inputs are strings, or :class:`~embedpipe.inputs.Item` of a kind in ``info.modalities``.
        """
        raise NotImplementedError(f"{type(self).__name__} must override embed_batch or aembed_batch")  # abstract

    async def aembed_batch(self, texts: list[Any], role: Role) -> BatchResult:
        """Embed ``texts`` in one call (async). The default runs :meth:`embed_batch` in a thread."""
        import asyncio

        return await asyncio.to_thread(self.embed_batch, texts, role)

    def map_error(self, exc: Exception) -> EmbedPipeError:
        """Turn a library exception that escaped the batch method into embedpipe's error.

        The engine calls this for any ``Exception`` other than embedpipe's own and
        :data:`BUG_EXCEPTIONS`, which propagate. The default: a non-retryable
        :class:`~embedpipe.errors.ProviderError` without a status (a local model's
        ``RuntimeError``, CUDA out of memory…), which the engine isolates by splitting the
        batch. Override to classify your library's errors (retryable, status, retry-after).
        """
        if isinstance(exc, EmbedPipeError):
            return exc
        return ProviderError(f"{type(exc).__name__}: {exc}", retryable=False)

    @property
    def is_async_native(self) -> bool:
        """Whether the subclass overrides :meth:`aembed_batch` itself."""
        return type(self).aembed_batch is not Provider.aembed_batch

    # -- lifecycle ------------------------------------------------------------------
    def close(self) -> None:
        """Release clients and models. Idempotent."""

    async def aclose(self) -> None:
        """Async twin of :meth:`close`."""
        self.close()
