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
from tenacity.stop import stop_base
from tenacity.wait import wait_base

from embedpipe.errors import ProviderError, RateLimitedError


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


class stop_after_retries_or_rate_limit_wait(stop_base):
    """Stop after ``max_retries`` retries for errors, but let 429s retry until their waits add up to
    ``max_rate_limit_wait`` seconds: a long rate-limit storm is ridden out, not counted as failures.

    The waits are recorded by :meth:`record` (the controller's ``before_sleep``).
    """

    def __init__(self, max_retries: int, max_rate_limit_wait: float) -> None:
        self.max_retries = max_retries
        self.max_rate_limit_wait = max_rate_limit_wait
        self.errors = 0
        self.rate_limit_waited = 0.0

    def record(self, state: RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome else None
        wait = float(state.next_action.sleep) if state.next_action else 0.0
        if isinstance(exc, RateLimitedError):
            self.rate_limit_waited += wait
        else:
            self.errors += 1

    def __call__(self, state: RetryCallState) -> bool:
        exc = state.outcome.exception() if state.outcome else None
        if isinstance(exc, RateLimitedError):
            return self.rate_limit_waited >= self.max_rate_limit_wait
        return self.errors >= self.max_retries


def make_retrying(max_retries: int, *, wait: wait_base | None = None,
                  sleep: Callable[[float], Awaitable[None]] | None = None,
                  before_sleep: Callable[[RetryCallState], Any] | None = None,
                  max_rate_limit_wait: float | None = None) -> AsyncRetrying:
    """The retry controller for one request: ``max_retries`` retries after the first try; with
    ``max_rate_limit_wait``, 429s retry on a time budget instead of counting as retries."""
    kwargs: dict[str, Any] = {}
    if sleep is not None:
        kwargs["sleep"] = sleep
    stop: stop_base = stop_after_attempt(max_retries + 1)
    hook = before_sleep
    if max_rate_limit_wait is not None:
        budget = stop_after_retries_or_rate_limit_wait(max_retries, max_rate_limit_wait)
        stop = budget

        def hook(state: RetryCallState) -> None:
            budget.record(state)
            if before_sleep is not None:
                before_sleep(state)
    return AsyncRetrying(
        stop=stop,
        wait=wait_retry_after(wait),
        retry=retry_if_exception(is_retryable),
        before_sleep=hook,
        reraise=True,
        **kwargs,
    )
