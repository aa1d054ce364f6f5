"""Retry policy: tenacity with full-jitter exponential backoff that honours ``retry-after``."""

from __future__ import annotations

import random
from collections.abc import Awaitable, Callable
from typing import Any

from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception,
    stop_after_attempt,
    wait_random_exponential,
)
from tenacity.wait import wait_base

from embedpipe.errors import ProviderError


def is_retryable(exc: BaseException) -> bool:
    """The one rule: a :class:`ProviderError` marked retryable (429 with quota left, 408/409, 5xx,
    timeouts, dropped connections, invalid responses). Everything else fails fast."""
    return isinstance(exc, ProviderError) and exc.retryable


class wait_retry_after(wait_base):
    """Wait what the server asked (``retry-after-ms``/``retry-after``) plus a little jitter,
    else fall back to ``fallback`` (full-jitter exponential by default)."""

    def __init__(self, fallback: wait_base | None = None, jitter: float = 0.05) -> None:
        self.fallback = fallback if fallback is not None else wait_random_exponential(multiplier=0.5, max=30)
        self.jitter = jitter

    def __call__(self, retry_state: RetryCallState) -> float:
        exc = retry_state.outcome.exception() if retry_state.outcome else None
        after = getattr(exc, "retry_after", None)
        backoff = float(self.fallback(retry_state))
        if after is not None:
            # Never sooner than the server asked; the jittered backoff on top keeps many
            # waiters told "3ms" from returning as one herd.
            return max(float(after) + random.uniform(0, self.jitter), backoff)
        return backoff


def make_retrying(max_retries: int, *, wait: wait_base | None = None,
                  sleep: Callable[[float], Awaitable[None]] | None = None,
                  before_sleep: Callable[[RetryCallState], Any] | None = None) -> AsyncRetrying:
    """The retry controller for one request: ``max_retries`` retries after the first try."""
    kwargs: dict[str, Any] = {}
    if sleep is not None:
        kwargs["sleep"] = sleep
    return AsyncRetrying(
        stop=stop_after_attempt(max_retries + 1),
        wait=wait_retry_after(wait),
        retry=retry_if_exception(is_retryable),
        before_sleep=before_sleep,
        reraise=True,
        **kwargs,
    )
