"""Vector stores as sinks: what the LlamaIndex and LangChain sinks share, and how a store object finds its sink.

The sinks themselves live in the adapters (``llamaindex_embedpipe.LlamaIndexSink``,
``langchain_embedpipe.LangChainSink``), since the core never imports a framework.
:func:`store_sink` finds the one for a store by the framework its class comes from,
through :data:`embedpipe.registry.store_sinks` (plugins add frameworks there, or through
the ``embedpipe.store_sinks`` entry-point group).

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

from collections.abc import Sequence
from typing import Any

from embedpipe import registry
from embedpipe.errors import ConfigurationError, DimensionMismatchError
from embedpipe.jobs.sinks import Sink

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


def check_dimensions(store: Any, dims: int, what: str) -> None:
    have = reported_dimensions(store)
    if have is not None and have != dims:
        raise DimensionMismatchError(
            f"{what} holds {have}-dimensional vectors but this job makes {dims}-dimensional ones; nothing was "
            "written. Use a store for this model, or the model the store was built with")


def batches(items: Sequence[Any], size: int) -> list[Sequence[Any]]:
    return [items[i:i + size] for i in range(0, len(items), size)]


def store_sink(store: Any) -> Sink:
    """The sink for a vector-store object, by the framework (top-level package) its class comes from."""
    for cls in type(store).__mro__:
        framework = cls.__module__.partition(".")[0]
        if framework in registry.store_sinks.schemes():
            sink = registry.store_sinks.factory(framework)(store)
            if not isinstance(sink, Sink):
                raise ConfigurationError(f"the sink factory for {framework} stores returned {type(sink).__name__}, "
                                         "not a Sink")
            return sink
    known = ", ".join(registry.store_sinks.schemes())
    raise ConfigurationError(f"out={store!r} is neither a path, a sink URL nor a vector store of a known framework "
                             f"({known})")


__all__ = ["STORE_LOC", "batches", "check_dimensions", "reported_dimensions", "store_sink"]
