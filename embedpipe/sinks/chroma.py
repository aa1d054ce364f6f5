"""Chroma: ``chroma:///path?collection=docs`` (a persistent client in process) or
``chroma://host:8000?collection=docs`` (a Chroma server).

Rows go in with ``collection.upsert`` in batches of at most the client's
``get_max_batch_size()``. The record's text is the Chroma document; ``content_hash``,
``model``, ``dimensions`` and ``metadata`` (JSON) are its metadata. The collection is
created with ``configuration={"hnsw": {"space": metric}}`` (cosine, l2, ip) and no
embedding function: embedpipe hands it the vectors.

Options: ``collection`` (required), ``metric``, ``batch_size`` (default 1000),
``store_text``, ``verify_sample``; for a server ``ssl`` (true/false).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from embedpipe._urls import URL
from embedpipe.errors import ConfigurationError
from embedpipe.sinks.base import COMMON_OPTIONS, DatabaseSink, Rows, Stored, flag, required


def _chromadb() -> Any:
    try:
        import chromadb
    except ImportError as exc:
        raise ConfigurationError(f"the chroma:// sink needs chromadb ({exc}); pip install 'embedpipe[chroma]'") from exc
    return chromadb


class ChromaSink(DatabaseSink):
    """Upsert vectors into a Chroma collection."""

    def __init__(self, *, collection: str, path: str | None = None, host: str | None = None, port: int = 8000,
                 ssl: bool = False, batch_size: int = 1000, metric: str = "cosine", store_text: bool = True,
                 verify_sample: int | None = None) -> None:
        super().__init__(collection=collection, batch_size=batch_size, metric=metric, store_text=store_text,
                         verify_sample=verify_sample)
        if (path is None) == (host is None):
            raise ConfigurationError("a Chroma sink takes a path or a host")
        chromadb = _chromadb()
        import httpx
        from chromadb.errors import ChromaError

        self.library_errors = (ChromaError, httpx.HTTPError)
        self.path, self.host, self.port, self.ssl = path, host, port, ssl
        if path is not None:
            self.client = chromadb.PersistentClient(path=path)
        else:
            self.client = chromadb.HttpClient(host=host, port=port, ssl=ssl)
        self.batch_size = min(self.batch_size, int(self.client.get_max_batch_size()))
        self._collection: Any = None

    @classmethod
    def from_url(cls, url: URL, **_: Any) -> ChromaSink:
        """The collection ``chroma:///path?collection=docs`` or ``chroma://host:8000?collection=docs`` names."""
        url.check_options((*COMMON_OPTIONS, "collection", "ssl"), "sink")
        common = cls.common_options(url)
        if url.host:
            return cls(collection=required(url, "collection"), host=url.host, port=url.port or 8000,
                       ssl=flag(url, "ssl", False), **common)
        return cls(collection=required(url, "collection"), path=url.file_path("sink"), **common)

    def location(self) -> str:
        where = f"chroma:///{self.path}" if self.path is not None else \
            f"chroma://{self.host}:{self.port}"
        return f"{where}?collection={self.collection}"

    def is_transient(self, exc: BaseException) -> bool:
        import httpx
        from chromadb.errors import InternalError, RateLimitError

        return isinstance(exc, (httpx.TransportError, InternalError, RateLimitError))

    def _get(self) -> Any:
        if self._collection is None:
            from chromadb.errors import NotFoundError

            try:
                self._collection = self.client.get_collection(self.collection, embedding_function=None)
            except (NotFoundError, ValueError):
                return None
        return self._collection

    # ------------------------------------------------------------------ adapter methods
    def existing_schema(self) -> tuple[int | None, str] | None:
        col = self._get()
        if col is None:
            return None
        space = (col.metadata or {}).get("embedpipe_metric")
        if space is None:  # a collection made elsewhere: its HNSW configuration says
            try:
                space = ((col.configuration or {}).get("hnsw") or {}).get("space")
            except ValueError:  # chromadb cannot load some stored configurations back
                space = None
            space = space or (col.metadata or {}).get("hnsw:space") or "l2"  # Chroma's own default
        peek = col.get(limit=1, include=["embeddings"])
        embeddings = peek.get("embeddings")
        dims = None if embeddings is None or len(embeddings) == 0 else len(embeddings[0])
        return dims, str(space)

    def create(self, dims: int) -> None:
        self._collection = self.client.get_or_create_collection(
            self.collection, configuration={"hnsw": {"space": self.metric}}, embedding_function=None,
            # Kept in metadata too: chromadb 1.x cannot always load a stored configuration back.
            metadata={"embedpipe_metric": self.metric})

    def upsert(self, rows: Rows) -> None:
        metadatas = [{"content_hash": h, "model": rows.model, "dimensions": rows.dimensions, "metadata": m}
                     for h, m in zip(rows.content_hashes, rows.metadata, strict=True)]
        self._get().upsert(ids=rows.ids, embeddings=rows.vectors, metadatas=metadatas, documents=rows.texts)

    def remove(self, ids: Sequence[str]) -> None:
        col = self._get()
        if col is not None:
            col.delete(ids=list(ids))

    def fetch(self, ids: Sequence[str]) -> dict[str, Stored]:
        col = self._get()
        if col is None:
            return {}
        got = col.get(ids=list(ids), include=["embeddings", "metadatas"])
        return {i: Stored(np.asarray(v, dtype=np.float32), str((m or {}).get("content_hash")))
                for i, v, m in zip(got["ids"], got["embeddings"], got["metadatas"], strict=True)}

    def pairs(self, text_field: str, batch_size: int) -> Iterator[tuple[list[str], np.ndarray]]:
        col = self._get()
        if col is None:
            raise ConfigurationError(f"{self.location()} does not exist")
        # The text is the Chroma document, unless text_field names a metadata key.
        in_doc = text_field in ("text", "document", "documents")
        offset = 0
        while True:
            got = col.get(limit=batch_size, offset=offset, include=["embeddings", "documents", "metadatas"])
            if not got["ids"]:
                return
            offset += len(got["ids"])
            texts: list[Any] = got["documents"] if in_doc else [(m or {}).get(text_field) for m in got["metadatas"]]
            keep = [i for i, t in enumerate(texts) if isinstance(t, str)]
            if keep:
                yield [texts[i] for i in keep], np.asarray(got["embeddings"], dtype=np.float32)[keep]

    def count_rows(self) -> int:
        col = self._get()
        return 0 if col is None else int(col.count())

    def drop(self) -> None:
        if self._get() is not None:
            self.client.delete_collection(self.collection)
        self._collection = None


__all__ = ["ChromaSink"]
