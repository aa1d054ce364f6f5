"""Keyword checks that name the close match: ``rate_limit=`` gets "did you mean rpm=, rate_limiter=?"."""

from __future__ import annotations

import difflib
import functools
import inspect
from collections.abc import Callable
from typing import Any, TypeVar

F = TypeVar("F", bound=Callable[..., Any])

#: what other libraries call our options: a name difflib would not find on its own
ALIASES: dict[str, tuple[str, ...]] = {
    "rate_limit": ("rpm", "tpm", "rate_limiter"),
    "requests_per_minute": ("rpm",),
    "tokens_per_minute": ("tpm",),
    "concurrency": ("max_concurrency",),
    "max_workers": ("max_concurrency",),
    "cache_url": ("cache",),
    "model_name": ("model",),
    "dims": ("dimensions",),
    "dimension": ("dimensions",),
    "budget": ("budget_usd",),
    "retries": ("max_retries",),
    "api_base": ("base_url",),
}


def check_keywords(func: F) -> F:
    """Wrap ``func`` so an unknown keyword raises a ``TypeError`` that suggests the nearest ones.

    Python's own message names only the bad keyword; difflib's matcher is the well-kept way
    to find what was meant. The check runs only when the call would fail anyway.
    """
    sig = inspect.signature(func)
    names = [p.name for p in sig.parameters.values()
             if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD) and p.name != "self"]
    takes_kwargs = any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values())

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if not takes_kwargs:
            unknown = [k for k in kwargs if k not in names]
            if unknown:
                raise TypeError(unknown_keywords_message(func.__qualname__.split(".")[0], unknown, names))
        return func(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


def unknown_keywords_message(owner: str, unknown: list[str], known: list[str]) -> str:
    """``owner() got unexpected keyword(s) ...; did you mean ...?`` for ``unknown`` among ``known``."""
    parts = []
    for name in unknown:
        close = [a for a in ALIASES.get(name, ()) if a in known]
        close += [c for c in difflib.get_close_matches(name, known, n=3, cutoff=0.5) if c not in close]
        # Also names that contain the misspelt word's stem (rate_limit -> rate_limiter) or share a part.
        stem = name.rstrip("s_")
        close += [k for k in known if (stem and stem in k) and k not in close][:3]
        hint = f" (did you mean {', '.join(c + '=' for c in close)}?)" if close else ""
        parts.append(f"{name}={hint}")
    return f"{owner}() got unexpected keyword argument(s) {', '.join(parts)}; it takes {', '.join(known)}"


__all__ = ["check_keywords", "unknown_keywords_message"]
