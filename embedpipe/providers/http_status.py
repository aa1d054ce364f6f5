"""HTTP status to embedpipe error: the rules every HTTP provider shares (retryable, request-level, retry-after)."""

from __future__ import annotations

import re
from collections.abc import Mapping

from embedpipe.errors import ProviderError, RateLimitedError
from embedpipe.providers.openai import retry_after_seconds

#: statuses where the same request may succeed later
RETRYABLE_STATUSES = frozenset({408, 409, 425, 429, 500, 502, 503, 504, 529})
#: statuses where the request itself is wrong whatever its inputs: splitting the batch cannot help
REQUEST_LEVEL_STATUSES = frozenset({401, 402, 403, 404, 405})


def lower_headers(headers: Mapping[str, str] | None) -> dict[str, str]:
    """Header names lower-cased (SDKs hand them back in every casing)."""
    return {str(k).lower(): str(v) for k, v in (headers or {}).items()}


def parse_duration(value: str) -> float | None:
    """Seconds in a protobuf duration (``"17s"``, ``"0.5s"``) or a bare number; ``None`` if neither."""
    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*s?\s*", value)
    return float(m.group(1)) if m else None


def error_from_status(status: int, message: str, headers: Mapping[str, str] | None = None, *,
                      retry_after: float | None = None, request_level: bool | None = None,
                      retryable: bool | None = None) -> ProviderError:
    """The :class:`ProviderError` for an HTTP error answer.

    429 becomes :class:`RateLimitedError` with the wait the server asked for (``retry_after``
    when the caller parsed one from the body, else ``retry-after-ms``/``retry-after`` headers).
    ``request_level``/``retryable`` override the status rules (a quota that waiting cannot cure).
    """
    hdrs = lower_headers(headers)
    wait = retry_after if retry_after is not None else retry_after_seconds(hdrs)
    text = f"HTTP {status}: {message}"
    can_retry = status in RETRYABLE_STATUSES if retryable is None else retryable
    if status == 429 and can_retry:
        return RateLimitedError(text, status=status, retryable=True, retry_after=wait, headers=hdrs)
    whole = status in REQUEST_LEVEL_STATUSES if request_level is None else request_level
    return ProviderError(text, status=status, retryable=can_retry, request_level=whole,
                         retry_after=wait if can_retry else None, headers=hdrs)
