"""``EmbedPipeByteStore``: any embedpipe cache as a LangChain ``ByteStore``."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator, Iterator, Sequence

from langchain_core.stores import ByteStore

from embedpipe.cache import CacheBackend, resolve_cache
from embedpipe.errors import ConfigurationError

_KEYS_PER_THREAD_HOP = 1000


class EmbedPipeByteStore(ByteStore):
    """An embedpipe cache as a LangChain ``ByteStore``: ``memory://``, ``sqlite:///p.db``, ``redis://...`` or a backend.

    Hand it to LangChain's own classes, e.g.
    ``CacheBackedEmbeddings.from_bytes_store(emb, EmbedPipeByteStore("redis://localhost:6379/0"))``,
    to keep their entries in embedpipe's Redis or SQLite backend (TTL, size limits,
    fail-open Redis). A backend built from a URL is closed by :meth:`close`; one passed
    in belongs to the caller.
    """

    def __init__(self, cache: str | CacheBackend) -> None:
        backend = resolve_cache(cache)
        if backend is None:
            raise ConfigurationError("EmbedPipeByteStore needs a cache: a URL or a CacheBackend, not None")
        self.cache = backend
        self._owned = backend is not cache

    def mget(self, keys: Sequence[str]) -> list[bytes | None]:
        return self.cache.get_many(list(keys))

    def mset(self, key_value_pairs: Sequence[tuple[str, bytes]]) -> None:
        self.cache.set_many(list(key_value_pairs))

    def mdelete(self, keys: Sequence[str]) -> None:
        self.cache.delete(list(keys))

    def yield_keys(self, *, prefix: str | None = None) -> Iterator[str]:
        yield from self.cache.yield_keys(prefix)

    async def amget(self, keys: Sequence[str]) -> list[bytes | None]:
        return await self.cache.aget_many(list(keys))

    async def amset(self, key_value_pairs: Sequence[tuple[str, bytes]]) -> None:
        await self.cache.aset_many(list(key_value_pairs))

    async def amdelete(self, keys: Sequence[str]) -> None:
        await self.cache.adelete(list(keys))

    async def ayield_keys(self, *, prefix: str | None = None) -> AsyncIterator[str]:
        keys = self.cache.yield_keys(prefix)
        while True:
            # A blocking backend is paged in a worker thread, so the event loop never waits on it.
            chunk = (list(itertools.islice(keys, _KEYS_PER_THREAD_HOP)) if self.cache.non_blocking else
                     await asyncio.to_thread(lambda: list(itertools.islice(keys, _KEYS_PER_THREAD_HOP))))
            for key in chunk:
                yield key
            if len(chunk) < _KEYS_PER_THREAD_HOP:
                return

    def close(self) -> None:
        """Close the backend if this store built it from a URL."""
        if self._owned:
            self.cache.close()

    def __repr__(self) -> str:
        return f"EmbedPipeByteStore({type(self.cache).__name__})"
