"""Every error embedpipe raises derives from :class:`EmbedPipeError`.

Provider adapters map their library's exceptions into :class:`ProviderError` in one
place, so the engine's retry and isolation rules read a single shape.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

#: why an input could not be embedded; code branches on this, never on message text
FailureKind = Literal["invalid_input", "rejected", "invalid_response", "retries_exhausted", "budget", "provider"]
FAILURE_KINDS: tuple[str, ...] = ("invalid_input", "rejected", "invalid_response", "retries_exhausted", "budget",
                                  "provider")


@dataclass(frozen=True)
class Failure:
    """Why one input was not embedded.

    ``kind``: ``"invalid_input"`` (empty, not UTF-8, too long with on_long_input="error", a kind the
    provider cannot embed), ``"rejected"`` (the provider refused this input: a 400 isolated to it),
    ``"invalid_response"`` (the answers for it kept being unusable), ``"retries_exhausted"`` (a
    retryable error outlasted the retries), ``"budget"`` (not sent: the budget was reached) or
    ``"provider"`` (any other provider failure: auth, quota, a local model's error).
    ``str(failure)`` is the message.
    """

    kind: FailureKind
    status: int | None = None
    retryable: bool = False
    message: str = ""

    def __post_init__(self) -> None:
        if self.kind not in FAILURE_KINDS:
            raise ValueError(f"Failure kind {self.kind!r} is not one of {FAILURE_KINDS}")
        from embedpipe._urls import redact

        object.__setattr__(self, "message", redact(self.message))

    def __str__(self) -> str:
        return self.message

    @property
    def record_fault(self) -> bool:
        """Whether the input itself is at fault (retrying it unchanged cannot help)."""
        return self.kind in ("invalid_input", "rejected")


class EmbedPipeError(Exception):
    """Base class of every embedpipe error.

    Every message passes through the one redactor (:func:`embedpipe._urls.redact`): an API key a
    server echoed, a ``Bearer …`` token or a URL password never reaches a traceback or a log.
    """

    def __init__(self, *args: object) -> None:
        from embedpipe._urls import redact  # _urls imports this module: a lazy import breaks the cycle

        super().__init__(*(redact(a) if isinstance(a, str) else a for a in args))


class InvalidInputError(EmbedPipeError, ValueError):
    """An input text is unusable (empty, whitespace only, or over the limit with on_long_input="error").

    ``indices`` lists every offending position in the caller's list.
    """

    def __init__(self, message: str, indices: list[int] | None = None) -> None:
        super().__init__(message)
        self.indices: list[int] = list(indices or [])


class InputTypeError(EmbedPipeError, TypeError):
    """An input item is not a ``str`` (``None``, bytes, numbers...)."""

    def __init__(self, message: str, indices: list[int] | None = None) -> None:
        super().__init__(message)
        self.indices: list[int] = list(indices or [])


class EmbeddingFailedError(EmbedPipeError):
    """Some inputs could not be embedded; ``failures`` maps each input index to its :class:`Failure`.

    Everything that could be embedded was embedded and cached before this was raised.
    ``stats`` holds what the failed call did (requests, tokens billed...), when known.
    """

    def __init__(self, failures: Mapping[int, Failure], message: str | None = None, *,
                 stats: object | None = None) -> None:
        self.failures: dict[int, Failure] = dict(failures)
        self.stats = stats
        if message is None:
            shown = sorted(self.failures)[:10]
            more = "" if len(self.failures) <= 10 else f" (and {len(self.failures) - 10} more)"
            first = self.failures[shown[0]] if shown else ""
            message = (
                f"{len(self.failures)} input(s) failed to embed, at indices {shown}{more}; "
                f"first reason: {first}"
            )
        super().__init__(message)


class BudgetExceededError(EmbedPipeError):
    """The estimated or actual spend would cross ``budget_usd``; raised before money is spent."""

    def __init__(self, message: str, *, estimate_usd: float | None = None,
                 spent_usd: float = 0.0, budget_usd: float | None = None) -> None:
        super().__init__(message)
        self.estimate_usd = estimate_usd
        self.spent_usd = spent_usd
        self.budget_usd = budget_usd


class PipelineClosedError(EmbedPipeError, RuntimeError):
    """A call was made on a pipeline after :meth:`~embedpipe.EmbeddingPipeline.close`."""


class CacheError(EmbedPipeError):
    """A cache backend's read or write failed. Backends map their library's errors into this;
    the engine then carries on uncached (fail open)."""


class DimensionMismatchError(EmbedPipeError):
    """A vector's length differs from the dimensions the pipeline expects."""


class ConfigurationError(EmbedPipeError, ValueError):
    """An option, spec string or URL is invalid."""


class ModelNotFoundError(ConfigurationError):
    """A model spec names a model that cannot be loaded offline."""


class CacheUnavailableError(CacheError):
    """The cache backend cannot be reached and the cache was configured with ``on_error=raise``."""


class ProviderError(EmbedPipeError):
    """A provider call failed. Adapters raise this (or a subclass) for every failure.

    ``retryable``: waiting and sending the same request again may succeed (429, 5xx, timeouts).
    ``request_level``: the request itself is wrong whatever its inputs (bad ``dimensions``,
    auth): isolating inputs by splitting the batch cannot help.
    ``retry_after``: seconds the server asked us to wait, if it said.
    """

    def __init__(self, message: str, *, status: int | None = None, retryable: bool = False,
                 request_level: bool = False, retry_after: float | None = None,
                 headers: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.retryable = retryable
        self.request_level = request_level
        self.retry_after = retry_after
        self.headers: dict[str, str] = dict(headers or {})


class RateLimitedError(ProviderError):
    """HTTP 429 that waiting can cure."""


class InvalidResponseError(ProviderError):
    """The provider answered, but the answer is unusable (wrong count, NaN, wrong dims). Retried, never cached."""

    def __init__(self, message: str, **kw: object) -> None:
        kw.setdefault("retryable", True)
        super().__init__(message, **kw)  # type: ignore[arg-type]


__all__ = [
    "FAILURE_KINDS",
    "CacheError",
    "EmbedPipeError",
    "Failure",
    "FailureKind",
    "PipelineClosedError",
    "InvalidInputError",
    "InputTypeError",
    "EmbeddingFailedError",
    "BudgetExceededError",
    "DimensionMismatchError",
    "ConfigurationError",
    "ModelNotFoundError",
    "CacheUnavailableError",
    "ProviderError",
    "RateLimitedError",
    "InvalidResponseError",
]
