"""Cache backends, chosen by URL: ``memory://``, ``sqlite:///path.db``, ``redis://host:port/db``.

Options go in the query string: ``ttl`` (7d, 12h…), ``max_bytes`` (2GB…), ``max_entries``
(memory), ``namespace``, ``timeout`` (sqlite) and ``on_error`` (redis: ``warn`` or ``raise``).
The schemes are :data:`embedpipe.registry.caches`; plugins add their own there.
"""

from __future__ import annotations

import os
from pathlib import Path

from embedpipe import registry
from embedpipe._urls import redact_url
from embedpipe.cache.base import CacheBackend, CacheStats
from embedpipe.cache.memory import MemoryCache
from embedpipe.cache.sqlite import SQLiteCache
from embedpipe.errors import ConfigurationError


def default_cache_url() -> str:
    """``$EMBEDPIPE_CACHE``, else a SQLite file in the user's cache directory."""
    env = os.environ.get("EMBEDPIPE_CACHE")
    if env is not None:
        return env
    import platformdirs

    path = Path(platformdirs.user_cache_dir("embedpipe")) / "cache.db"
    return "sqlite:///" + str(path)


def cache_from_url(url: str) -> CacheBackend:
    """Build the backend a cache URL names (its scheme looked up in :data:`embedpipe.registry.caches`)."""
    backend = registry.caches.from_url(url)
    if not isinstance(backend, CacheBackend):
        raise ConfigurationError(f"the cache factory for {redact_url(url)!r} returned {type(backend).__name__}, "
                                 "not a CacheBackend")
    return backend


def resolve_cache(cache: str | CacheBackend | object | None) -> CacheBackend | None:
    """A backend from a URL, a backend object, ``None`` (no cache), or the default."""
    if cache is None:
        return None
    if isinstance(cache, CacheBackend):
        return cache
    if isinstance(cache, str):
        return cache_from_url(cache)
    raise ConfigurationError(f"cache must be a URL, a CacheBackend or None, not {type(cache).__name__}")


__all__ = ["CacheBackend", "CacheStats", "MemoryCache", "SQLiteCache", "cache_from_url",
           "default_cache_url", "resolve_cache"]
