"""A LangChain ``VectorStore`` as a job's sink.

A LangChain store embeds texts itself and cannot take vectors. The store must be built
with an :class:`~langchain_embedpipe.EmbedPipeEmbeddings` of the job's model: the job
embeds (and caches) first, then calls ``add_documents(ids=...)``, whose embedding call is
served from the same cache, so no text is embedded twice. ``jobs.run(..., out=<store>)``
finds this sink through :data:`embedpipe.registry.store_sinks`.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from embedpipe.errors import ConfigurationError, DimensionMismatchError
from embedpipe.events import CallDone, Event
from embedpipe.jobs import Entry, Receipt, Sink, SinkVerificationError
from embedpipe.jobs.stores import STORE_LOC, batches, check_dimensions

if TYPE_CHECKING:
    from embedpipe.cache import CacheBackend
    from embedpipe.pipeline import EmbeddingPipeline


class LangChainSink(Sink):
    """Write into a LangChain ``VectorStore`` built with an ``EmbedPipeEmbeddings`` of the job's model."""

    updates_metadata = False
    verify_sample = 16

    def __init__(self, vector_store: Any, *, batch_size: int = 256) -> None:
        from langchain_embedpipe.embeddings import EmbedPipeEmbeddings

        embeddings = getattr(vector_store, "embeddings", None)
        if not isinstance(embeddings, EmbedPipeEmbeddings):
            raise ConfigurationError(
                f"{type(vector_store).__name__} embeds texts itself and cannot take precomputed vectors; build it "
                "with EmbedPipeEmbeddings(model=<the job's model>, cache=<the job's cache>) so that its embedding "
                f"calls are served from the cache the job fills (it has {type(embeddings).__name__})")
        self.store = vector_store
        self.embeddings = embeddings
        self.batch_size = batch_size
        self._checked = False

    def preferred_cache(self) -> CacheBackend | None:
        return self.embeddings.pipeline.cache

    def bind(self, pipeline: EmbeddingPipeline) -> None:
        mine = self.embeddings.pipeline
        if mine.cache is None:
            raise ConfigurationError("the store's EmbedPipeEmbeddings has no cache, so it would embed every text "
                                     "again; give it the job's cache")
        # Same model, dimensions and namespace: the same cache keys, so add_documents only reads.
        if mine.key_material("document") != pipeline.key_material("document"):
            raise ConfigurationError(
                f"the store's EmbedPipeEmbeddings ({mine.provider.spec}, dimensions={mine.dimensions}) is not the "
                f"job's model ({pipeline.provider.spec}, dimensions={pipeline.dimensions}); its vectors would differ")

    def write(self, entries: Sequence[Entry], vectors: np.ndarray, model: str) -> Receipt:
        from langchain_core.documents import Document

        dims = int(vectors.shape[1])
        if not self._checked:
            theirs = self.embeddings.pipeline.expected_dims
            if theirs is not None and theirs != dims:
                raise DimensionMismatchError(f"the store's embeddings make {theirs}-dimensional vectors but this job "
                                             f"makes {dims}-dimensional ones; nothing was written")
            check_dimensions(self.store, dims, type(self.store).__name__)
            self._checked = True
        docs = [Document(page_content=e.record.text, metadata=dict(e.record.metadata), id=e.record.id)
                for e in entries]
        embedded: list[int] = []

        def count(event: Event) -> None:
            if isinstance(event, CallDone):
                embedded.append(event.stats.embedded)

        hooks = self.embeddings.pipeline.hooks
        hooks.add(count)
        try:
            for batch in batches(docs, self.batch_size):
                self.store.add_documents(list(batch), ids=[d.id for d in batch])
        finally:
            hooks.remove(count)
        again = sum(embedded)
        if again:
            warnings.warn(f"embedpipe: the store's EmbedPipeEmbeddings embedded {again} text(s) again: it does not "
                          "share the job's cache", stacklevel=4)
        return Receipt([STORE_LOC] * len(entries))

    def delete(self, ids: Sequence[str]) -> None:
        self.store.delete(ids=list(ids))

    def verify(self, sample: Sequence[tuple[Entry, np.ndarray]]) -> None:
        ids = [e.record.id for e, _ in sample]
        try:
            docs = self.store.get_by_ids(ids)
        except NotImplementedError:
            warnings.warn(f"embedpipe: {type(self.store).__name__} cannot return documents by id (get_by_ids); "
                          "the read-back check after the run was skipped", stacklevel=4)
            return
        found = {d.id: d.page_content for d in docs}
        bad = [e.record.id for e, _ in sample if found.get(e.record.id) != e.record.text]
        if bad:
            raise SinkVerificationError(f"{len(bad)} of {len(sample)} ids read back from {type(self.store).__name__} "
                                        f"are missing or hold other text: {bad[:5]}")

    def __repr__(self) -> str:
        return f"LangChainSink({type(self.store).__name__})"


__all__ = ["LangChainSink"]
