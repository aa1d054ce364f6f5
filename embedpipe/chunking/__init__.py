"""Chunking: edit-stable splitting (:class:`StableSplitter`) and content-derived chunk ids.

A base-layer package: it imports only :mod:`embedpipe.errors` and :mod:`embedpipe.tokens`.
"""

from __future__ import annotations

from embedpipe.chunking.ids import chunk_id, chunk_ids
from embedpipe.chunking.stable import Chunk, StableSplitter, TokenCounter

__all__ = ["Chunk", "StableSplitter", "TokenCounter", "chunk_id", "chunk_ids"]
