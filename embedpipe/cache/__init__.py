"""Cache backends, chosen by URL: ``memory://``, ``sqlite:///path.db``, ``redis://host:port/db``.

Options go in the query string: ``ttl`` (7d, 12h…), ``max_bytes`` (2GB…), ``max_entries``
(memory), ``namespace`` and ``on_error`` (redis: ``warn`` or ``raise``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit, urlunsplit

from embedpipe.cache.base import CacheBackend, CacheStats, parse_duration, parse_on_error, parse_size
from embedpipe.cache.memory import MemoryCache
from embedpipe.cache.sqlite import SQLiteCache
from embedpipe.errors import ConfigurationError

_OPTIONS = {
    "memory": {"ttl", "max_bytes", "max_entries", "namespace"},
    "sqlite": {"ttl", "max_bytes", "namespace", "timeout"},
    "redis": {"ttl", "namespace", "on_error", "socket_timeout"},
}


def default_cache_url() -> str:
    """``$EMBEDPIPE_CACHE``, else a SQLite file in the user's cache directory."""
    env = os.environ.get("EMBEDPIPE_CACHE")
    if env is not None:
        return env
    import platformdirs

    path = Path(platformdirs.user_cache_dir("embedpipe")) / "cache.db"
    return "sqlite:///" + str(path)


def cache_from_url(url: str) -> CacheBackend:
    """Build the backend a cache URL names."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    family = "redis" if scheme in ("redis", "rediss", "unix") else scheme
    if family not in _OPTIONS:
        raise ConfigurationError(
            f"unknown cache URL scheme {scheme!r} in {url!r}; use memory://, sqlite:///path.db or redis://host:port/db")
    raw = dict(parse_qsl(parts.query, keep_blank_values=True))
    unknown = set(raw) - _OPTIONS[family]
    if unknown:
        raise ConfigurationError(
            f"unknown option(s) {sorted(unknown)} in cache URL {url!r}; {family} takes {sorted(_OPTIONS[family])}")
    opts: dict[str, Any] = {}
    if "ttl" in raw:
        opts["ttl"] = parse_duration(raw["ttl"])
    if "max_bytes" in raw:
        opts["max_bytes"] = parse_size(raw["max_bytes"])
    if "max_entries" in raw:
        opts["max_entries"] = parse_size(raw["max_entries"], "max_entries")
    if raw.get("namespace"):
        opts["namespace"] = raw["namespace"]
    if family == "memory":
        return MemoryCache(**opts)
    if family == "sqlite":
        if "timeout" in raw:
            opts["timeout"] = parse_duration(raw["timeout"], "timeout")
        # SQLAlchemy's convention: sqlite:///rel.db is relative, sqlite:////abs.db absolute.
        path = parts.path[1:] if parts.path.startswith("/") else parts.path
        if parts.netloc:
            raise ConfigurationError(f"{url!r}: a SQLite URL has no host; use sqlite:///relative.db or sqlite:////abs.db")
        if not path:
            raise ConfigurationError(f"{url!r} names no file; use sqlite:///relative.db or sqlite:////abs.db")
        return SQLiteCache(path, **opts)
    from embedpipe.cache.redis import RedisCache

    if "on_error" in raw:
        opts["on_error"] = parse_on_error(raw["on_error"])
    if "socket_timeout" in raw:
        opts["socket_timeout"] = parse_duration(raw["socket_timeout"], "socket_timeout")
    clean = urlunsplit((parts.scheme, parts.netloc, parts.path, "", ""))
    return RedisCache(clean, **opts)


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
