"""Redis cache: MGET and pipelined SET with TTL, one key prefix per namespace, fail-open by default."""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Iterator, Sequence
from typing import Any

from embedpipe._urls import URL, redact_url
from embedpipe.cache.base import CacheBackend, CacheStats, url_options
from embedpipe.errors import CacheUnavailableError, ConfigurationError
from embedpipe.owners import dead_here

log = logging.getLogger("embedpipe.cache")

_CHUNK = 1000  # keys per MGET / pipeline: bounded request size
# KEYS: a claim. ARGV: the dead holder, the new owner, ttl ms. Take it only from that holder.
_TAKE_LUA = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
    redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
    return 1
end
return 0
"""

_RELEASE_LUA = """
for i, key in ipairs(KEYS) do
    if redis.call('GET', key) == ARGV[1] then redis.call('DEL', key) end
end
return 0
"""


class RedisCache(CacheBackend):
    """A cache in Redis (``redis://host:port/db?ttl=7d&namespace=prod&on_error=raise``).

    When Redis is unreachable the default (``on_error=warn``) is fail-open: reads miss,
    writes are skipped, one warning is logged and ``errors`` counts it. ``on_error=raise``
    raises :class:`~embedpipe.errors.CacheUnavailableError` instead.
    """

    scheme = "redis"

    def __init__(self, url: str = "redis://127.0.0.1:6379/0", *, ttl: float | None = None,
                 namespace: str | None = None, on_error: str = "warn",
                 socket_timeout: float = 5.0, client: Any = None) -> None:
        super().__init__()
        try:
            import redis
        except ImportError as exc:  # pragma: no cover - depends on extras
            raise ConfigurationError("the Redis cache needs redis-py: pip install 'embedpipe[redis]'") from exc
        self.url = url
        self.ttl = ttl
        self.namespace = namespace
        self.on_error = on_error
        self.socket_timeout = socket_timeout
        self.prefix = f"embedpipe:{namespace or 'default'}:"
        # Claims live beside the values under their own prefix, so yield_keys never lists them.
        self._claim_prefix = f"embedpipe-claim:{namespace or 'default'}:"
        self._redis_errors: tuple[type[BaseException], ...] = (redis.ConnectionError, redis.TimeoutError)
        self.library_errors = (redis.RedisError, OSError)
        self._client = client if client is not None else redis.Redis.from_url(
            url, socket_timeout=socket_timeout, socket_connect_timeout=socket_timeout)
        self._warned = False
        self._warn_lock = threading.Lock()
        # Delete a claim only if this owner still holds it (one script: compare and delete atomically).
        self._release = self._client.register_script(_RELEASE_LUA)
        self._take = self._client.register_script(_TAKE_LUA)

    @classmethod
    def from_url(cls, url: URL) -> RedisCache:
        """The cache ``redis://[:password@]host:port/db`` names (also ``rediss://``, ``unix://``).

        Options: ``ttl``, ``namespace``, ``on_error`` (``warn`` or ``raise``), ``socket_timeout``.
        """
        opts = url_options(url, ("ttl", "namespace", "on_error", "socket_timeout"))
        return cls(url.without_options(), **opts)

    def _fail(self, exc: BaseException, what: str) -> None:
        self._errors += 1
        if self.on_error == "raise":
            raise CacheUnavailableError(f"Redis cache at {self._safe_url()} is unavailable ({what}): {exc}") from exc
        with self._warn_lock:
            if not self._warned:
                self._warned = True
                log.warning("Redis cache at %s is unavailable (%s: %s); embedding continues uncached",
                            self._safe_url(), what, exc)

    def _safe_url(self) -> str:
        return redact_url(self.url)  # never log a password embedded in the URL

    def get_many(self, keys: Sequence[str]) -> list[bytes | None]:
        out: list[bytes | None] = []
        try:
            for start in range(0, len(keys), _CHUNK):
                chunk = [self.prefix + k for k in keys[start:start + _CHUNK]]
                out.extend(self._client.mget(chunk))  # type: ignore[arg-type]  # bytes: no decode_responses
        except self._redis_errors as exc:
            self._fail(exc, "read")
            return [None] * len(keys)
        self._count(out)
        return out

    def set_many(self, items: Sequence[tuple[str, bytes]]) -> None:
        ttl_ms = int(self.ttl * 1000) if self.ttl else None
        try:
            for start in range(0, len(items), _CHUNK):
                pipe = self._client.pipeline(transaction=False)
                for key, value in items[start:start + _CHUNK]:
                    pipe.set(self.prefix + key, value, px=ttl_ms)
                pipe.execute()
        except self._redis_errors as exc:
            self._fail(exc, "write")

    def delete(self, keys: Sequence[str]) -> None:
        try:
            for start in range(0, len(keys), _CHUNK):
                self._client.unlink(*[self.prefix + k for k in keys[start:start + _CHUNK]])
        except self._redis_errors as exc:
            self._fail(exc, "delete")

    supports_claims = True

    def claim(self, keys: Sequence[str], owner: str, ttl: float) -> list[bool]:
        # SET NX PX per key: atomic per key, and the expiry frees a dead process's claims.
        # An unreachable Redis claims everything: the cache is down, so there is nothing to share.
        out: list[bool] = []
        try:
            for start in range(0, len(keys), _CHUNK):
                pipe = self._client.pipeline(transaction=False)
                part = keys[start:start + _CHUNK]
                for key in part:
                    pipe.set(self._claim_prefix + key, owner, nx=True, px=int(ttl * 1000))
                for key in part:
                    pipe.get(self._claim_prefix + key)
                replies = pipe.execute()
                holders = [h.decode() if isinstance(h, bytes) else h for h in replies[len(part):]]
                for i, (key, holder) in enumerate(zip(part, holders, strict=True)):
                    # A holder on this host whose process is gone embeds nothing: take its claim now.
                    if holder is not None and holder != owner and dead_here(holder) and \
                            self._take(keys=[self._claim_prefix + key], args=[holder, owner, int(ttl * 1000)]):
                        holders[i] = owner
                out.extend(h == owner for h in holders)
        except self._redis_errors as exc:
            self._fail(exc, "claim")
            return [True] * len(keys)
        return out

    def release(self, keys: Sequence[str], owner: str) -> None:
        try:
            for start in range(0, len(keys), _CHUNK):
                part = [self._claim_prefix + k for k in keys[start:start + _CHUNK]]
                self._release(keys=part, args=[owner])
        except self._redis_errors as exc:
            self._fail(exc, "release")

    def yield_keys(self, prefix: str | None = None) -> Iterator[str]:
        n = len(self.prefix)
        pattern = self.prefix + _escape_glob(prefix or "") + "*"
        for key in self._client.scan_iter(match=pattern, count=1000):
            yield key.decode()[n:] if isinstance(key, bytes) else key[n:]

    def clear(self) -> None:
        batch: list[str] = []
        for key in self.yield_keys():
            batch.append(key)
            if len(batch) >= _CHUNK:
                self.delete(batch)
                batch = []
        if batch:
            self.delete(batch)

    def stats(self) -> CacheStats:
        entries: int | None
        used: int | None
        try:
            entries = sum(1 for _ in self.yield_keys())
            used = int(self._client.info("memory").get("used_memory", 0))
        except self._redis_errors:
            entries = used = None
        return CacheStats("redis", entries, used, self._hits, self._misses, self._errors)

    def close(self) -> None:
        with contextlib.suppress(Exception):  # closing a pool to a dead server must not raise
            self._client.close()

    def __getstate__(self) -> dict[str, object]:
        return {"url": self.url, "ttl": self.ttl, "namespace": self.namespace,
                "on_error": self.on_error, "socket_timeout": self.socket_timeout}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(**state)  # type: ignore[misc]


def _escape_glob(s: str) -> str:
    return "".join("\\" + ch if ch in "*?[]\\" else ch for ch in s)
