"""embedpipe for LlamaIndex: one line gives LlamaIndex embeddings embedpipe's cache, batching, limits and retries.

>>> from llama_index.core import Settings
>>> from llamaindex_embedpipe import EmbedPipeEmbedding
>>> Settings.embed_model = EmbedPipeEmbedding(model="fake:8", cache="memory://")
>>> len(Settings.embed_model.get_query_embedding("hello"))
8

:class:`StableNodeParser` cuts documents into nodes whose boundaries and ids survive edits.

All behaviour lives in :mod:`embedpipe`; this package only translates.
"""

from __future__ import annotations

from llamaindex_embedpipe.embedding import EmbedPipeEmbedding
from llamaindex_embedpipe.multimodal import EmbedPipeMultiModalEmbedding
from llamaindex_embedpipe.node_parser import StableNodeParser
from llamaindex_embedpipe.sinks import LlamaIndexSink
from llamaindex_embedpipe.transform import EMBEDDING_MODEL_KEY, EmbedPipeTransform, TransformCounts

__all__ = ["EMBEDDING_MODEL_KEY", "EmbedPipeEmbedding", "EmbedPipeMultiModalEmbedding", "EmbedPipeTransform",
           "LlamaIndexSink", "StableNodeParser", "TransformCounts"]
