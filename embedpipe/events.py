"""Events a pipeline emits, for hooks: ``EmbeddingPipeline(..., hooks=[callable, ...])``.

In the spirit of httpx's ``event_hooks``: logging, metrics, progress bars and tracing observe
a pipeline without reaching inside it. Every event is a small frozen dataclass carrying the
``model`` spec and the ``call_id`` of the embed call it belongs to (``0`` for events outside any
call). A hook is called synchronously with each event, in the thread that produced it (the
caller's, or embedpipe's loop thread), so it must be quick and thread-safe. A hook that raises
is logged once and removed: it never fails an embedding.

>>> from embedpipe import EmbeddingPipeline
>>> from embedpipe.events import CallDone
>>> seen = []
>>> with EmbeddingPipeline("fake:8", cache="memory://", hooks=[seen.append]) as pipe:
...     _ = pipe.embed(["a", "b", "a"])
>>> [e.stats.deduped for e in seen if isinstance(e, CallDone)]
[1]
"""

from __future__ import annotations

import itertools
import logging
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from embedpipe.errors import Failure
    from embedpipe.stats import Stats

log = logging.getLogger("embedpipe")

_call_ids = itertools.count(1)


def next_call_id() -> int:
    """A process-wide unique id for one embed call (thread-safe: ``itertools.count`` is atomic in CPython)."""
    return next(_call_ids)


@dataclass(frozen=True, slots=True)
class Event:
    """Base of every event: the model spec and the id of the call it belongs to."""

    model: str
    call_id: int


@dataclass(frozen=True, slots=True)
class CacheRead(Event):
    """The cache lookup of a call: unique inputs found and missing, and how long it took."""

    hits: int
    misses: int
    seconds: float
    #: tokens the hits would have cost (0 where unknown), and their price
    saved_tokens: int = 0
    saved_usd: float | None = None


@dataclass(frozen=True, slots=True)
class RequestSent(Event):
    """A request leaves for the provider (after the limiter admitted it); one per attempt."""

    inputs: int
    tokens_est: int


@dataclass(frozen=True, slots=True)
class RequestDone(Event):
    """A request came back. ``status`` is the HTTP status (200 on success; ``None`` when the
    provider has none, as a local model), ``tokens`` what was billed (0 for a failed request)."""

    inputs: int
    tokens: int
    cost_usd: float | None
    seconds: float
    status: int | None


@dataclass(frozen=True, slots=True)
class Retried(Event):
    """A request will be sent again after ``wait`` seconds; ``reason`` is a short slug
    (``rate_limited``, ``server_error``, ``timeout``, ``connection``, ``invalid_response``, ``other``)."""

    reason: str
    wait: float


@dataclass(frozen=True, slots=True)
class RateLimited(Event):
    """The provider answered 429; ``wait`` is what it asked for (0.0 when it did not say)."""

    wait: float


@dataclass(frozen=True, slots=True)
class LimiterWaited(Event):
    """embedpipe's own rate limiter held a request for ``wait`` seconds before sending it."""

    wait: float


@dataclass(frozen=True, slots=True)
class InputsFailed(Event):
    """Inputs of a call that could not be embedded: input index -> :class:`~embedpipe.errors.Failure`."""

    failures: Mapping[int, Failure]


@dataclass(frozen=True, slots=True)
class CallDone(Event):
    """A call finished (or raised): ``stats`` is what this call alone did."""

    stats: Stats


@dataclass(frozen=True, slots=True)
class LimitsObserved(Event):
    """The provider's ``x-ratelimit-remaining-*`` headers, where it sent them."""

    remaining_requests: float | None
    remaining_tokens: float | None


@dataclass(frozen=True, slots=True)
class BudgetChanged(Event):
    """Spend moved: what is spent and what is left of ``budget_usd`` (``None`` without a budget)."""

    spent_usd: float
    remaining_usd: float | None


Hook = Callable[[Event], object]

EVENT_TYPES: tuple[type[Event], ...] = (CacheRead, RequestSent, RequestDone, Retried, RateLimited, LimiterWaited,
                                        InputsFailed, CallDone, LimitsObserved, BudgetChanged)


class Hooks:
    """The subscribers of one pipeline. ``emit`` calls each; one that raises is logged once and removed."""

    __slots__ = ("_hooks", "_lock")

    def __init__(self, hooks: Iterable[Hook] = ()) -> None:
        hooks = list(hooks)
        for h in hooks:
            if not callable(h):
                from embedpipe.errors import ConfigurationError

                raise ConfigurationError(f"hooks must be callables taking an event, got {type(h).__name__}")
        # Copy-on-write tuple: emit reads it without a lock.
        self._hooks: tuple[Hook, ...] = tuple(hooks)
        self._lock = threading.Lock()

    def __bool__(self) -> bool:
        return bool(self._hooks)

    def __len__(self) -> int:
        return len(self._hooks)

    def __iter__(self) -> Iterator[Hook]:
        return iter(self._hooks)

    def add(self, hook: Hook) -> None:
        """Subscribe ``hook`` (idempotent)."""
        with self._lock:
            if hook not in self._hooks:
                self._hooks = (*self._hooks, hook)

    def remove(self, hook: Hook) -> None:
        """Unsubscribe ``hook`` if present."""
        with self._lock:
            self._hooks = tuple(h for h in self._hooks if h is not hook)

    def emit(self, event: Event) -> None:
        """Hand ``event`` to every hook; a hook that raises is removed, never failing the caller."""
        for hook in self._hooks:
            try:
                hook(event)
            except Exception:
                self.remove(hook)
                log.exception("embedpipe: hook %r raised on %s and was removed", hook, type(event).__name__)


__all__ = [
    "EVENT_TYPES",
    "BudgetChanged",
    "CacheRead",
    "CallDone",
    "Event",
    "Hook",
    "Hooks",
    "InputsFailed",
    "LimiterWaited",
    "LimitsObserved",
    "RateLimited",
    "RequestDone",
    "RequestSent",
    "Retried",
    "next_call_id",
]
