"""Vector-database sinks: pgvector, Qdrant, Chroma, LanceDB and Milvus, each selected by the ``--out`` URL.

=========================================================  ===============================
URL                                                        sink
=========================================================  ===============================
``postgresql://user@host/db?table=docs``                   :class:`~embedpipe.sinks.pgvector.PgVectorSink`
``qdrant://host:6333?collection=docs``,
``qdrant+local:///path?collection=docs``                   :class:`~embedpipe.sinks.qdrant.QdrantSink`
``chroma:///path?collection=docs``,
``chroma://host:8000?collection=docs``                     :class:`~embedpipe.sinks.chroma.ChromaSink`
``lancedb:///path?table=docs``                             :class:`~embedpipe.sinks.lancedb.LanceDBSink`
``milvus:///path.db?collection=docs``,
``milvus://host:19530?collection=docs``                    :class:`~embedpipe.sinks.milvus.MilvusSink`
=========================================================  ===============================

Each module imports its client library only when its scheme is used (``pip install
'embedpipe[pgvector]'``, ``[qdrant]``, ``[chroma]``, ``[lancedb]``, ``[milvus]``). What they
share (schema check, batching, retries, error mapping, read-back) is in :mod:`embedpipe.sinks.base`.
"""

from __future__ import annotations

from embedpipe.sinks.base import CollectionMismatchError, DatabaseSink, SinkError

__all__ = ["CollectionMismatchError", "DatabaseSink", "SinkError"]
