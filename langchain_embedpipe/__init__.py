"""embedpipe for LangChain: one changed line gives a RAG app caching, dedupe, batching, rate limits, retries and cost.

>>> from langchain_core.embeddings import DeterministicFakeEmbedding
>>> from langchain_embedpipe import EmbedPipeEmbeddings
>>> embeddings = EmbedPipeEmbeddings(DeterministicFakeEmbedding(size=8), cache="memory://", namespace="fake-8")
>>> len(embeddings.embed_documents(["hello", "hello"])), embeddings.stats.deduped
(2, 1)

* :class:`EmbedPipeEmbeddings` wraps any LangChain ``Embeddings`` (or names a core model);
  :meth:`EmbedPipeEmbeddings.from_bytes_store` reads and writes a store that
  ``CacheBackedEmbeddings`` filled.
* :class:`EmbedPipeByteStore` lends embedpipe's memory, SQLite and Redis caches to
  LangChain's own classes as a ``ByteStore``.
* :class:`StableTextSplitter` cuts text where edits leave the boundaries alone, so an edit
  re-embeds one chunk rather than the rest of the document.

All behaviour lives in :mod:`embedpipe`; this package only translates.
"""

from __future__ import annotations

from langchain_embedpipe.byte_store import EmbedPipeByteStore
from langchain_embedpipe.embeddings import EmbedPipeEmbeddings
from langchain_embedpipe.sinks import LangChainSink
from langchain_embedpipe.store_cache import ByteStoreCache, langchain_key_encoder
from langchain_embedpipe.text_splitter import StableTextSplitter

__all__ = ["ByteStoreCache", "EmbedPipeByteStore", "EmbedPipeEmbeddings", "LangChainSink", "StableTextSplitter",
           "langchain_key_encoder"]
