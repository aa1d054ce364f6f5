"""Backends by URL: one scheme table per kind of backend, as ``limits`` keeps one for its storages.

Each kind (caches, rate limiters, dead-letter stores, sources, sinks, job stores) has a
:class:`Registry` mapping a URL scheme to a factory. Built-in factories are named by dotted
path (``"embedpipe.cache.redis:RedisCache.from_url"``) and imported on first use, so an
optional dependency (redis-py, pyarrow) is imported only by whoever asks for its scheme.
One scheme may serve several kinds: ``sqlite://`` names a cache, a dead-letter store and a
job store.

Plugins add schemes two ways:

- ``embedpipe.registry.caches.register("mydb", factory)`` at import time, or
- an entry point in the group ``embedpipe.<kind>`` (``embedpipe.caches``,
  ``embedpipe.rate_limiters``, ``embedpipe.dead_letter_stores``, ``embedpipe.sources``,
  ``embedpipe.sinks``, ``embedpipe.job_stores``) whose name is the scheme and whose value
  is the factory's dotted path. Entry points are read the first time a scheme is not
  found in the table, and their modules imported only when their scheme is used.

A factory is called as ``factory(url, **options)`` with the parsed :class:`~embedpipe._urls.URL`
and the caller's keyword options (a rate limiter's ``rpm``, a job store's ``readonly``).
"""

from __future__ import annotations

import importlib
import threading
from collections.abc import Callable, Mapping
from importlib.metadata import entry_points
from typing import Any

from embedpipe._urls import URL, parse_url, redact_url
from embedpipe.errors import ConfigurationError

__all__ = ["Registry", "caches", "dead_letter_stores", "job_stores", "key_stores", "rate_limiters", "sinks",
           "sources", "store_sinks"]

Factory = Callable[..., Any]

#: the extra that installs a module a built-in backend imports
_EXTRAS = {"redis": "redis", "pyarrow": "cli", "psycopg": "pgvector", "pgvector": "pgvector", "qdrant_client": "qdrant",
           "chromadb": "chroma", "lancedb": "lancedb", "pymilvus": "milvus", "pymysql": "mysql"}


class Registry:
    """The URL schemes of one kind of backend, each with the factory that builds it."""

    def __init__(self, kind: str, group: str, schemes: Mapping[str, str | Factory] | None = None) -> None:
        #: what the backends are, for messages ("cache", "rate limiter")
        self.kind = kind
        #: the entry-point group plugins register in
        self.group = group
        self._table: dict[str, str | Factory] = dict(schemes or {})
        self._lock = threading.Lock()
        self._entry_points_read = False

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, schemes={self.schemes()})"

    def register(self, scheme: str, factory: str | Factory) -> None:
        """Serve ``scheme://`` URLs with ``factory`` (a callable, or its ``"module:attr"`` path); replaces any."""
        scheme = scheme.lower().removesuffix("://")
        if not scheme or not scheme.replace("+", "").replace("-", "").replace(".", "").isalnum():
            raise ConfigurationError(f"invalid URL scheme {scheme!r} for a {self.kind}")
        with self._lock:
            self._table[scheme] = factory

    def unregister(self, scheme: str) -> None:
        """Stop serving ``scheme://`` (absent schemes are ignored)."""
        with self._lock:
            self._table.pop(scheme.lower(), None)

    def schemes(self) -> list[str]:
        """Every scheme this kind serves, built-in and plugin, sorted."""
        self._read_entry_points()
        with self._lock:
            return sorted(self._table)

    def __contains__(self, scheme: object) -> bool:
        return isinstance(scheme, str) and scheme.lower() in self.schemes()

    def factory(self, scheme: str, url: str | None = None) -> Factory:
        """The factory for ``scheme``; raises :class:`ConfigurationError` listing the known schemes."""
        scheme = scheme.lower()
        with self._lock:
            entry = self._table.get(scheme)
        if entry is None:
            self._read_entry_points()
            with self._lock:
                entry = self._table.get(scheme)
        if entry is None:
            where = f" in {redact_url(url)!r}" if url is not None else ""
            known = ", ".join(f"{s}://" for s in self.schemes())
            raise ConfigurationError(f"unknown {self.kind} URL scheme {scheme!r}{where}; known schemes: {known}")
        if isinstance(entry, str):
            loaded = self._load(scheme, entry)
            with self._lock:
                if self._table.get(scheme) == entry:
                    self._table[scheme] = loaded
            return loaded
        return entry

    def from_url(self, url: str | URL, **options: Any) -> Any:
        """The backend ``url`` names, built by its scheme's factory with ``options``."""
        parsed = url if isinstance(url, URL) else parse_url(url, self.kind)
        return self.factory(parsed.scheme, parsed.raw)(parsed, **options)

    def _load(self, scheme: str, path: str) -> Factory:
        module_name, _, attrs = path.partition(":")
        try:
            obj: Any = importlib.import_module(module_name)
        except ImportError as exc:
            missing = (exc.name or "").partition(".")[0]
            hint = f"; pip install 'embedpipe[{_EXTRAS[missing]}]'" if missing in _EXTRAS else ""
            raise ConfigurationError(
                f"the {self.kind} backend for {scheme}:// could not be imported ({exc}){hint}") from exc
        for attr in filter(None, attrs.split(".")):
            obj = getattr(obj, attr, None)
            if obj is None:
                raise ConfigurationError(f"the {self.kind} backend for {scheme}:// names {path!r}, which has no "
                                         f"attribute {attr!r}")
        if not callable(obj):
            raise ConfigurationError(f"the {self.kind} backend for {scheme}:// ({path!r}) is not callable")
        return obj  # type: ignore[no-any-return]  # checked callable just above

    def _read_entry_points(self) -> None:
        if self._entry_points_read:
            return
        found = entry_points(group=self.group)
        with self._lock:
            for ep in found:
                # Built-in and explicitly registered schemes win: an installed package cannot hijack sqlite://.
                self._table.setdefault(ep.name.lower(), ep.value)
            self._entry_points_read = True


caches = Registry("cache", "embedpipe.caches", {
    "memory": "embedpipe.cache.memory:MemoryCache.from_url",
    "sqlite": "embedpipe.cache.sqlite:SQLiteCache.from_url",
    "redis": "embedpipe.cache.redis:RedisCache.from_url",
    "rediss": "embedpipe.cache.redis:RedisCache.from_url",
    "unix": "embedpipe.cache.redis:RedisCache.from_url",
})

rate_limiters = Registry("rate limiter", "embedpipe.rate_limiters", {
    "memory": "embedpipe.limits:MemoryRateLimiter.from_url",
    "redis": "embedpipe.limits:RedisRateLimiter.from_url",
    "rediss": "embedpipe.limits:RedisRateLimiter.from_url",
    "unix": "embedpipe.limits:RedisRateLimiter.from_url",
})

dead_letter_stores = Registry("dead-letter store", "embedpipe.dead_letter_stores", {
    "memory": "embedpipe.deadletters.memory:MemoryDeadLetterStore.from_url",
    "sqlite": "embedpipe.deadletters.sqlite:SQLiteDeadLetterStore.from_url",
})

#: sources by format: ``jsonl:///corpus.jsonl.gz`` reads the file as JSONL whatever its suffix
sources = Registry("source", "embedpipe.sources", {
    "jsonl": "embedpipe.jobs.sources:JSONLSource.from_url",
    "csv": "embedpipe.jobs.sources:CSVSource.from_url",
    "parquet": "embedpipe.jobs.sources:ParquetSource.from_url",
    "dir": "embedpipe.jobs.sources:DirectorySource.from_url",
    "images": "embedpipe.jobs.media:ImageFolderSource.from_url",
    "audio": "embedpipe.jobs.media:AudioFolderSource.from_url",
    "postgresql": "embedpipe.sources.sql:PostgresSource.from_url",
    "postgres": "embedpipe.sources.sql:PostgresSource.from_url",
    "mysql": "embedpipe.sources.sql:MySQLSource.from_url",
    "mariadb": "embedpipe.sources.sql:MySQLSource.from_url",
    "sqlite": "embedpipe.sources.sql:SQLiteSource.from_url",
})

sinks = Registry("sink", "embedpipe.sinks", {
    "parquet": "embedpipe.jobs.sinks:ParquetSink.from_url",
    "jsonl": "embedpipe.jobs.sinks:JSONLSink.from_url",
    "postgresql": "embedpipe.sinks.pgvector:PgVectorSink.from_url",
    "postgres": "embedpipe.sinks.pgvector:PgVectorSink.from_url",
    "qdrant": "embedpipe.sinks.qdrant:QdrantSink.from_url",
    "qdrant+local": "embedpipe.sinks.qdrant:QdrantSink.from_url",
    "chroma": "embedpipe.sinks.chroma:ChromaSink.from_url",
    "lancedb": "embedpipe.sinks.lancedb:LanceDBSink.from_url",
    "milvus": "embedpipe.sinks.milvus:MilvusSink.from_url",
})

#: sinks for vector-store objects, by the top-level package of the store's class (``jobs.run(out=store)``)
store_sinks = Registry("vector-store sink", "embedpipe.store_sinks", {
    "llama_index": "llamaindex_embedpipe.sinks:LlamaIndexSink",
    "langchain_core": "langchain_embedpipe.sinks:LangChainSink",
})

job_stores = Registry("job store", "embedpipe.job_stores", {
    "sqlite": "embedpipe.jobs.state:SQLiteJobStore.from_url",
})

#: the API keys of ``embedpipe serve``
key_stores = Registry("key store", "embedpipe.key_stores", {
    "sqlite": "embedpipe.serve.keystore:SQLiteKeyStore.from_url",
    "redis": "embedpipe.serve.keystore:RedisKeyStore.from_url",
    "rediss": "embedpipe.serve.keystore:RedisKeyStore.from_url",
    "postgresql": "embedpipe.serve.keystore:PostgresKeyStore.from_url",
    "postgres": "embedpipe.serve.keystore:PostgresKeyStore.from_url",
})
