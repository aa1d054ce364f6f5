"""The provider seam: one small class per embedding backend.

A provider is shaped like an httpx transport: it knows how to send *one batch* and
nothing else. Dedupe, caching, batch planning, rate limits, retries, validation and
cost live in the engine (:mod:`embedpipe.pipeline`).

To add a provider, subclass :class:`Provider` and override either ``embed_batch``
(blocking: the engine runs it in a worker thread) or ``aembed_batch`` (native async).
Map your library's exceptions into :class:`embedpipe.errors.ProviderError` there.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import numpy as np

Role = Literal["document", "query"]


class Tokenizer(Protocol):
    """Counts and cuts text the way the provider's model sees it."""

    def count(self, texts: Sequence[str]) -> list[int]:
        """Token count of each text (no special tokens)."""
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
    headers, for the rate limiter.
    """

    vectors: np.ndarray
    tokens: int | None = None
    headers: Mapping[str, str] = field(default_factory=dict)


class Provider:
    """Base class of embedding providers. Override ``embed_batch`` or ``aembed_batch``.

    Class attributes give the engine's defaults; instances may override them.
    """

    #: short provider name used in specs and cache keys ("openai", "local", "fake")
    name: str = "provider"
    #: most inputs in one request
    default_batch_size: int = 256
    #: most tokens in one request (None: no limit)
    max_batch_tokens: int | None = None
    #: most tokens in one input, beyond which ``on_long_input`` applies (None: unknown)
    max_input_tokens: int | None = None
    #: requests in flight at once by default
    default_concurrency: int = 4
    #: True when query and document embeddings differ (the role enters the cache key)
    role_sensitive: bool = False

    def __init__(self, model: str, dimensions: int | None = None) -> None:
        self.model = model
        #: output dimensions; ``None`` until learned from the first response
        self.dimensions = dimensions

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
        """USD per million input tokens; 0.0 when free, ``None`` when unknown."""
        return None

    # -- tokens ---------------------------------------------------------------------
    @property
    def tokenizer(self) -> Tokenizer:
        """The tokenizer used to count, split and truncate. Defaults to tiktoken's cl100k_base."""
        from embedpipe.tokens import TiktokenTokenizer

        return TiktokenTokenizer.for_encoding("cl100k_base")

    # -- the batch method -------------------------------------------------------------
    def embed_batch(self, texts: list[str], role: Role) -> BatchResult:
        """Embed ``texts`` in one call (blocking). Override this or :meth:`aembed_batch`."""
        raise NotImplementedError(f"{type(self).__name__} must override embed_batch or aembed_batch")

    async def aembed_batch(self, texts: list[str], role: Role) -> BatchResult:
        """Embed ``texts`` in one call (async). The default runs :meth:`embed_batch` in a thread."""
        import asyncio

        return await asyncio.to_thread(self.embed_batch, texts, role)

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
