"""The cache backend seam: a plain ``str -> bytes`` store.

Backends know nothing of vectors: key derivation and the value codec sit above them
(:mod:`embedpipe.keys`, :mod:`embedpipe.codec`), so any backend can also serve as a
LangChain ``ByteStore``. Override the five blocking methods; the async twins run them
in a worker thread unless a backend says its calls never block.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from embedpipe._urls import URL
from embedpipe.errors import CacheError, ConfigurationError
from embedpipe.keys import text_keys

log = logging.getLogger("embedpipe.cache")


@dataclass
class CacheStats:
    """What a backend knows of itself."""

    backend: str
    entries: int | None
    bytes: int | None
    hits: int = 0
    misses: int = 0
    errors: int = 0

    @property
    def hit_rate(self) -> float | None:
        total = self.hits + self.misses
        return self.hits / total if total else None


#: the I/O methods whose library errors the base maps into CacheError
_MAPPED_METHODS = ("get_many", "set_many", "delete", "clear", "prune", "claim", "release")


def _mapped(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(fn)
    def method(self: CacheBackend, *args: Any, **kwargs: Any) -> Any:
        try:
            return fn(self, *args, **kwargs)
        except CacheError:
            raise
        except self.library_errors as exc:
            raise CacheError(f"{type(self).__name__} {name} failed: {type(exc).__name__}: {exc}") from exc
    return method


class CacheBackend:
    """Base class of cache backends. Override ``get_many``, ``set_many``, ``delete``, ``yield_keys`` and ``clear``.

    The errors of the library a backend uses are mapped in one place: list them in
    ``library_errors`` and the base turns them into :class:`~embedpipe.errors.CacheError`
    in every overridden I/O method, which the engine then treats as a cache miss or a
    skipped write (fail open). Bugs (``TypeError``…) propagate.
    """

    #: the library's exceptions that mean the store failed (not a bug): mapped into CacheError
    library_errors: tuple[type[BaseException], ...] = (OSError,)

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        for name in _MAPPED_METHODS:
            fn = cls.__dict__.get(name)
            if fn is not None and not getattr(fn, "_embedpipe_mapped", False):
                wrapped = _mapped(name, fn)
                wrapped._embedpipe_mapped = True  # type: ignore[attr-defined]
                setattr(cls, name, wrapped)

    #: URL scheme(s) this backend registers for
    scheme: str = ""
    #: True when calls never block on I/O (memory), so async twins call them directly
    non_blocking: bool = False
    #: namespace from the URL (``?namespace=``); it enters the cache key instead of a server URL
    namespace: str | None = None

    def __init__(self) -> None:
        self._hits = 0
        self._misses = 0
        self._errors = 0

    # -- blocking API -----------------------------------------------------------------
    def get_many(self, keys: Sequence[str]) -> list[bytes | None]:
        """Values for ``keys``, ``None`` where absent or expired."""
        raise NotImplementedError

    def set_many(self, items: Sequence[tuple[str, bytes]]) -> None:
        """Store every ``(key, value)`` pair."""
        raise NotImplementedError

    def delete(self, keys: Sequence[str]) -> None:
        """Remove ``keys``; absent keys are ignored."""
        raise NotImplementedError

    def yield_keys(self, prefix: str | None = None) -> Iterator[str]:
        """Every key, or every key starting with ``prefix``."""
        raise NotImplementedError

    def clear(self) -> None:
        """Remove every entry of this cache (its namespace only, where it has one)."""
        raise NotImplementedError

    def keys_for(self, material: bytes, texts: Sequence[str], role: str) -> list[str]:
        """The key of each text. ``material`` names the vector space (:func:`embedpipe.keys.key_material`).

        Override only for a store with its own key scheme (a LangChain ``ByteStore``).
        """
        return text_keys(material, texts)

    def items(self, prefix: str | None = None, batch: int = 1000) -> Iterator[tuple[str, bytes]]:
        """Every ``(key, value)`` pair, fetched in batches (for export)."""
        chunk: list[str] = []
        for key in self.yield_keys(prefix):
            chunk.append(key)
            if len(chunk) >= batch:
                yield from self._pairs(chunk)
                chunk = []
        if chunk:
            yield from self._pairs(chunk)

    def _pairs(self, keys: list[str]) -> Iterator[tuple[str, bytes]]:
        for key, value in zip(keys, self.get_many(keys), strict=True):
            if value is not None:
                yield key, value

    # -- claims: single-flight across processes ----------------------------------------
    #: True when :meth:`claim` coordinates processes (SQLite, Redis); the base claims everything
    supports_claims: bool = False

    def claim(self, keys: Sequence[str], owner: str, ttl: float) -> list[bool]:
        """Claim ``keys`` for ``owner`` for ``ttl`` seconds; ``True`` where this owner now holds the claim.

        A key another live owner claimed is ``False``: that owner is embedding it, and its vector
        will appear in the cache. A claim expires after ``ttl``, so a dead process never blocks a
        key for long. Override with :meth:`release` in a store shared by processes.
        """
        return [True] * len(keys)

    def release(self, keys: Sequence[str], owner: str) -> None:
        """Drop ``owner``'s claims on ``keys`` (absent or foreign claims are left alone)."""

    async def aclaim(self, keys: Sequence[str], owner: str, ttl: float) -> list[bool]:
        """Async twin of :meth:`claim`."""
        if not self.supports_claims:
            return [True] * len(keys)
        result: list[bool] = await self._run(self.claim, keys, owner, ttl)
        return result

    async def arelease(self, keys: Sequence[str], owner: str) -> None:
        """Async twin of :meth:`release`."""
        if self.supports_claims:
            await self._run(self.release, keys, owner)

    def stats(self) -> CacheStats:
        """Size, entries and this process's hit counts."""
        return CacheStats(type(self).__name__, None, None, self._hits, self._misses, self._errors)

    def prune(self) -> int:
        """Apply TTL and size limits now; return how many entries were removed."""
        return 0

    def close(self) -> None:
        """Release connections. Idempotent."""

    def _count(self, values: Sequence[bytes | None]) -> None:
        hits = sum(v is not None for v in values)
        self._hits += hits
        self._misses += len(values) - hits

    # -- async twins --------------------------------------------------------------------
    async def _run(self, fn: Any, *args: Any) -> Any:
        if self.non_blocking:
            return fn(*args)
        return await asyncio.to_thread(fn, *args)

    async def aget_many(self, keys: Sequence[str]) -> list[bytes | None]:
        """Async twin of :meth:`get_many`."""
        result: list[bytes | None] = await self._run(self.get_many, keys)
        return result

    async def aset_many(self, items: Sequence[tuple[str, bytes]]) -> None:
        """Async twin of :meth:`set_many`."""
        await self._run(self.set_many, items)

    async def adelete(self, keys: Sequence[str]) -> None:
        """Async twin of :meth:`delete`."""
        await self._run(self.delete, keys)

    async def aclear(self) -> None:
        """Async twin of :meth:`clear`."""
        await self._run(self.clear)

    async def aclose(self) -> None:
        """Async twin of :meth:`close`."""
        await self._run(self.close)

    def __enter__(self) -> CacheBackend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# -- option parsing shared by every backend's URL -------------------------------------------
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d|w)?\s*$", re.IGNORECASE)
_DURATION_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800, None: 1}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]i?b?|b)?\s*$", re.IGNORECASE)
_SIZE_UNITS = {"": 1, "b": 1, "k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12,
               "ki": 1024, "mi": 1024**2, "gi": 1024**3, "ti": 1024**4}


def parse_duration(value: str | float | int | None, option: str = "ttl") -> float | None:
    """Seconds from ``"7d"``, ``"12h"``, ``"30m"``, ``"10s"``, ``"500ms"`` or a number."""
    if value is None or value == "":
        return None
    if isinstance(value, (int, float)):
        seconds = float(value)
    else:
        m = _DURATION.match(value)
        if not m:
            raise ConfigurationError(f"{option}={value!r} is not a duration; use e.g. 7d, 12h, 30m, 10s or seconds")
        unit = m.group(2).lower() if m.group(2) else None
        seconds = float(m.group(1)) * _DURATION_UNITS[unit]
    if seconds <= 0:
        raise ConfigurationError(f"{option}={value!r} must be positive")
    return seconds


def parse_size(value: str | int | None, option: str = "max_bytes") -> int | None:
    """Bytes from ``"2GB"``, ``"500MB"``, ``"64KiB"`` or a number."""
    if value is None or value == "":
        return None
    if isinstance(value, int):
        n = value
    else:
        m = _SIZE.match(value)
        if not m:
            raise ConfigurationError(f"{option}={value!r} is not a size; use e.g. 2GB, 500MB, 64KiB or bytes")
        unit = (m.group(2) or "").lower().rstrip("b")
        n = int(float(m.group(1)) * _SIZE_UNITS[unit])
    if n <= 0:
        raise ConfigurationError(f"{option}={value!r} must be positive")
    return n


def parse_on_error(value: str | None) -> str:
    """``"warn"`` (fail open, the default) or ``"raise"`` (fail closed)."""
    v = (value or "warn").lower()
    aliases = {"warn": "warn", "ignore": "warn", "open": "warn", "fail-open": "warn",
               "raise": "raise", "closed": "raise", "fail-closed": "raise"}
    if v not in aliases:
        raise ConfigurationError(f"on_error={value!r}: use 'warn' (fail open) or 'raise' (fail closed)")
    return aliases[v]


#: how each option a cache URL may carry is read
_OPTION_PARSERS: dict[str, Any] = {
    "ttl": parse_duration,
    "max_bytes": parse_size,
    "max_entries": lambda v: parse_size(v, "max_entries"),
    "namespace": lambda v: v or None,
    "timeout": lambda v: parse_duration(v, "timeout"),
    "socket_timeout": lambda v: parse_duration(v, "socket_timeout"),
    "on_error": parse_on_error,
}


def url_options(url: URL, known: Sequence[str]) -> dict[str, Any]:
    """The constructor keywords a cache URL's query string gives; unknown options raise, listing ``known``."""
    url.check_options(known, "cache")
    opts = {name: _OPTION_PARSERS[name](value) for name, value in url.options.items()}
    return {name: value for name, value in opts.items() if value is not None}
