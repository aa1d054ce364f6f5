"""A LlamaIndex vector store as a job's sink: nodes with their embeddings, upserted by id.

``jobs.run(..., out=<a LlamaIndex vector store>)`` finds this sink through
:data:`embedpipe.registry.store_sinks`: the job's vectors go in as batched ``add`` calls of
``TextNode(id_=record id, embedding=...)``. Before the first write the store's dimensions
are checked where it can tell (a clear error, nothing written); after a run a sample of
ids is read back where the store has ``get_nodes``, with a warning when it cannot.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from embedpipe.jobs import Entry, Receipt, Sink, SinkVerificationError
from embedpipe.jobs.stores import STORE_LOC, batches, check_dimensions

if TYPE_CHECKING:
    pass


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
            check_dimensions(self.store, int(vectors.shape[1]), type(self.store).__name__)
            self._checked = True
        nodes = [TextNode(id_=e.record.id, text=e.record.text, metadata=dict(e.record.metadata), embedding=v,
                          # The record is its own source document, so delete(ref_doc_id=id) works in every store.
                          relationships={NodeRelationship.SOURCE: RelatedNodeInfo(node_id=e.record.id)})
                 for e, v in zip(entries, vectors.tolist(), strict=True)]
        for batch in batches(nodes, self.batch_size):
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


__all__ = ["LlamaIndexSink"]
