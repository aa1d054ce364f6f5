"""In-process LRU cache, bounded by entry count and/or bytes."""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Iterator, Sequence

from embedpipe._urls import URL
from embedpipe.cache.base import CacheBackend, CacheStats, url_options


class MemoryCache(CacheBackend):
    """LRU ``str -> bytes`` store in this process (``memory://?max_entries=100000&max_bytes=1GB&ttl=1h``)."""

    scheme = "memory"
    non_blocking = True

    def __init__(self, *, max_entries: int | None = None, max_bytes: int | None = None,
                 ttl: float | None = None, namespace: str | None = None,
                 clock: object = time.monotonic) -> None:
        super().__init__()
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.ttl = ttl
        self.namespace = namespace
        self._clock = clock
        # value, expiry (or None)
        self._data: OrderedDict[str, tuple[bytes, float | None]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    @classmethod
    def from_url(cls, url: URL) -> MemoryCache:
        """The cache ``memory://?max_entries=&max_bytes=&ttl=&namespace=`` names."""
        return cls(**url_options(url, ("ttl", "max_bytes", "max_entries", "namespace")))

    def _now(self) -> float:
        return self._clock()  # type: ignore[operator,no-any-return]

    def get_many(self, keys: Sequence[str]) -> list[bytes | None]:
        out: list[bytes | None] = []
        now = self._now() if self.ttl else 0.0
        with self._lock:
            data = self._data
            for key in keys:
                entry = data.get(key)
                if entry is None:
                    out.append(None)
                    continue
                if entry[1] is not None and entry[1] <= now:
                    self._remove(key)
                    out.append(None)
                    continue
                data.move_to_end(key)
                out.append(entry[0])
            self._count(out)
        return out

    def _remove(self, key: str) -> None:
        value, _ = self._data.pop(key)
        self._bytes -= len(value) + len(key)

    def set_many(self, items: Sequence[tuple[str, bytes]]) -> None:
        expiry = self._now() + self.ttl if self.ttl else None
        with self._lock:
            for key, value in items:
                if key in self._data:
                    self._remove(key)
                self._data[key] = (bytes(value), expiry)
                self._bytes += len(value) + len(key)
            self._evict()

    def _evict(self) -> None:
        while self._data and (
            (self.max_entries is not None and len(self._data) > self.max_entries)
            or (self.max_bytes is not None and self._bytes > self.max_bytes)
        ):
            self._remove(next(iter(self._data)))

    def delete(self, keys: Sequence[str]) -> None:
        with self._lock:
            for key in keys:
                if key in self._data:
                    self._remove(key)

    def yield_keys(self, prefix: str | None = None) -> Iterator[str]:
        with self._lock:
            keys = list(self._data)
        for key in keys:
            if prefix is None or key.startswith(prefix):
                yield key

    def clear(self) -> None:
        with self._lock:
            self._data.clear()
            self._bytes = 0

    def prune(self) -> int:
        if not self.ttl:
            return 0
        now = self._now()
        with self._lock:
            dead = [k for k, (_, exp) in self._data.items() if exp is not None and exp <= now]
            for key in dead:
                self._remove(key)
        return len(dead)

    def stats(self) -> CacheStats:
        with self._lock:
            return CacheStats("memory", len(self._data), self._bytes, self._hits, self._misses, self._errors)

    def __getstate__(self) -> dict[str, object]:
        state = self.__dict__.copy()
        del state["_lock"]
        return state

    def __setstate__(self, state: dict[str, object]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()
