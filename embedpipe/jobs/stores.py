"""Vector stores as sinks: a LlamaIndex vector store, or a LangChain ``VectorStore``.

* LlamaIndex stores take nodes with their embeddings: the job's vectors go in as
  batched ``add`` calls of ``TextNode(id_=record id, embedding=...)``, an upsert by id.
* A LangChain ``VectorStore`` embeds texts itself and cannot take vectors. The store must
  be built with an :class:`langchain_embedpipe.EmbedPipeEmbeddings` of the job's model;
  the job embeds (and caches) first, then calls ``add_documents(ids=...)``, whose
  embedding call is served from the same cache, so no text is embedded twice.

Before the first write each sink checks the store's dimensions where the store can tell
(a clear error, nothing written); after a run it reads back a sample of ids where the
store has ``get_nodes``/``get_by_ids``, and warns when it cannot.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from embedpipe.errors import ConfigurationError, DimensionMismatchError
from embedpipe.events import CallDone, Event
from embedpipe.jobs.errors import SinkVerificationError
from embedpipe.jobs.records import Entry
from embedpipe.jobs.sinks import Receipt, Sink

if TYPE_CHECKING:
    from embedpipe.cache import CacheBackend
    from embedpipe.pipeline import EmbeddingPipeline

#: the loc a store's rows have in the job state: the store itself
STORE_LOC = "store"
_DIM_ATTRS = ("embedding_dimension", "embed_dim", "dimensions", "dimension", "dim", "vector_size")


def reported_dimensions(store: Any) -> int | None:
    """The vector length a store states without being written to, where it does; else ``None``."""
    for attr in _DIM_ATTRS:
        value = getattr(store, attr, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    for attr in ("index", "_faiss_index", "faiss_index"):  # FAISS in LangChain and LlamaIndex
        d = getattr(getattr(store, attr, None), "d", None)
        if isinstance(d, int) and d > 0:
            return d
    data = getattr(getattr(store, "data", None), "embedding_dict", None)  # LlamaIndex's SimpleVectorStore
    if isinstance(data, dict) and data:
        return len(next(iter(data.values())))
    return None


def _check_dimensions(store: Any, dims: int, what: str) -> None:
    have = reported_dimensions(store)
    if have is not None and have != dims:
        raise DimensionMismatchError(
            f"{what} holds {have}-dimensional vectors but this job makes {dims}-dimensional ones; nothing was "
            "written. Use a store for this model, or the model the store was built with")


def _batches(items: Sequence[Any], size: int) -> list[Sequence[Any]]:
    return [items[i:i + size] for i in range(0, len(items), size)]


class LlamaIndexSink(Sink):
    """Write into a LlamaIndex vector store (``BasePydanticVectorStore``): nodes with their embeddings."""

    updates_metadata = False
    verify_sample = 16

    def __init__(self, vector_store: Any, *, batch_size: int = 256) -> None:
        self.store = vector_store
        self.batch_size = batch_size
        self._checked = False

    def write(self, entries: Sequence[Entry], vectors: np.ndarray, model: str) -> Receipt:
        from llama_index.core.schema import NodeRelationship, RelatedNodeInfo, TextNode

        if not self._checked:
            _check_dimensions(self.store, int(vectors.shape[1]), type(self.store).__name__)
            self._checked = True
        nodes = [TextNode(id_=e.record.id, text=e.record.text, metadata=dict(e.record.metadata), embedding=v,
                          # The record is its own source document, so delete(ref_doc_id=id) works in every store.
                          relationships={NodeRelationship.SOURCE: RelatedNodeInfo(node_id=e.record.id)})
                 for e, v in zip(entries, vectors.tolist(), strict=True)]
        for batch in _batches(nodes, self.batch_size):
            self.store.add(batch)
        return Receipt([STORE_LOC] * len(entries))

    def delete(self, ids: Sequence[str]) -> None:
        try:
            self.store.delete_nodes(node_ids=list(ids))
        except NotImplementedError:
            for i in ids:
                self.store.delete(ref_doc_id=i)

    def verify(self, sample: Sequence[tuple[Entry, np.ndarray]]) -> None:
        ids = [e.record.id for e, _ in sample]
        try:
            nodes = self.store.get_nodes(node_ids=ids)
        except NotImplementedError:
            warnings.warn(f"embedpipe: {type(self.store).__name__} cannot return nodes by id (get_nodes); "
                          "the read-back check after the run was skipped", stacklevel=4)
            return
        found = {n.node_id: n for n in nodes}
        bad = []
        for entry, vector in sample:
            node = found.get(entry.record.id)
            emb = None if node is None else node.get_embedding() if node.embedding is not None else None
            if node is None or (emb is not None and not np.allclose(emb, vector, rtol=1e-5, atol=1e-6)):
                bad.append(entry.record.id)
        if bad:
            raise SinkVerificationError(f"{len(bad)} of {len(sample)} ids read back from {type(self.store).__name__} "
                                        f"are missing or hold other vectors: {bad[:5]}")

    def __repr__(self) -> str:
        return f"LlamaIndexSink({type(self.store).__name__})"


class LangChainSink(Sink):
    """Write into a LangChain ``VectorStore`` built with an ``EmbedPipeEmbeddings`` of the job's model."""

    updates_metadata = False
    verify_sample = 16

    def __init__(self, vector_store: Any, *, batch_size: int = 256) -> None:
        try:
            from langchain_embedpipe import EmbedPipeEmbeddings
        except ImportError as exc:
            raise ConfigurationError("writing to a LangChain VectorStore needs langchain_embedpipe "
                                     "(pip install 'embedpipe[langchain]')") from exc
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
            _check_dimensions(self.store, dims, type(self.store).__name__)
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
            for batch in _batches(docs, self.batch_size):
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


def store_sink(store: Any) -> Sink:
    """The sink for a LlamaIndex or LangChain vector store object."""
    for cls in type(store).__mro__:
        module = cls.__module__
        if module.startswith("llama_index."):
            return LlamaIndexSink(store)
        if module.startswith("langchain_core.vectorstores"):
            return LangChainSink(store)
    raise ConfigurationError(f"out={store!r} is neither a path nor a LlamaIndex or LangChain vector store")


__all__ = ["LangChainSink", "LlamaIndexSink", "reported_dimensions", "store_sink"]
