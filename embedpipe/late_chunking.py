"""``embed_chunks``: a document's chunk vectors, embedded alone (naive) or from the whole document (late).

The lead attaches these as ``EmbeddingPipeline.embed_chunks`` / ``aembed_chunks``. Late
vectors go through the pipeline's cache under a key that names the chunking mode, the
window settings and the document's hash: a late chunk's vector depends on its context, so
the same chunk text in another document (or after an edit elsewhere) is a different entry.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import threading
import weakref
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from embedpipe.chunking.late import LateChunker
from embedpipe.codec import decode_many, encode_many
from embedpipe.errors import ConfigurationError
from embedpipe.keys import key_material

if TYPE_CHECKING:
    from embedpipe.pipeline import EmbeddingPipeline

__all__ = ["ChunkingMode", "aembed_chunks", "chunk_spans", "document_of_chunks", "embed_chunks", "late_vectors"]

ChunkingMode = Literal["late", "naive"]
Chunks = Sequence[str] | Sequence[tuple[int, int]]

# One chunker per loaded model, dropped with the model.
_chunkers: weakref.WeakKeyDictionary[Any, LateChunker] = weakref.WeakKeyDictionary()
_chunkers_lock = threading.Lock()
log = logging.getLogger("embedpipe")


def chunk_spans(document: str, chunks: Chunks) -> list[tuple[int, int]]:
    """``(start, end)`` spans of ``chunks``: given as spans, or as chunk texts found in order in ``document``."""
    if not isinstance(document, str) or not document:
        raise ValueError("the document must be a non-empty str")
    spans: list[tuple[int, int]] = []
    pos = 0
    for k, chunk in enumerate(chunks):
        if isinstance(chunk, str):
            if not chunk:
                raise ValueError(f"chunk {k} is empty")
            # Search from the previous chunk's start + 1: chunks may overlap but come in order.
            start = document.find(chunk, pos)
            if start < 0:
                raise ValueError(f"chunk {k} ({chunk[:40]!r}...) is not in the document after chunk {k - 1}")
            spans.append((start, start + len(chunk)))
            pos = start + 1
        elif (isinstance(chunk, tuple) and len(chunk) == 2 and isinstance(chunk[0], int)
              and isinstance(chunk[1], int) and 0 <= chunk[0] < chunk[1] <= len(document)):
            spans.append((chunk[0], chunk[1]))
        else:
            raise ValueError(f"chunk {k} must be a chunk text or a (start, end) span inside the "
                             f"{len(document)}-character document, got {chunk!r}")
    if not spans:
        raise ValueError("no chunks given")
    return spans


def document_of_chunks(chunks: Sequence[tuple[str, int | None, int | None]]) -> tuple[str, list[tuple[int, int]]]:
    """A document rebuilt from its chunks ``(text, start, end)``, in order, and each chunk's span in it.

    For callers that hold a document's chunks but not the document (a job's chunk rows, a
    LlamaIndex transform's nodes). With every span given, each chunk is placed at its span
    and the characters between chunks (the whitespace a splitter strips) become spaces;
    overlapping chunks must agree on what they share. Without spans (any ``None``), the
    chunks are joined with blank lines. Either way a chunk's span holds its text exactly.
    Raises ``ValueError`` naming the chunk whose span does not fit.
    """
    if not chunks:
        raise ValueError("no chunks given")
    if any(s is None or e is None for _, s, e in chunks):
        spans, pos = [], 0
        for text, _, _ in chunks:
            spans.append((pos, pos + len(text)))
            pos += len(text) + 2
        return "\n\n".join(text for text, _, _ in chunks), spans
    placed = [(int(s), int(e), k) for k, (_, s, e) in enumerate(chunks)]  # type: ignore[arg-type]  # None ruled out above
    parts: list[str] = []
    pos = 0
    for start, end, k in sorted(placed):
        text = chunks[k][0]
        if end - start != len(text) or start < 0:
            raise ValueError(f"chunk {k}: span {start}:{end} does not fit its {len(text)}-character text")
        if start >= pos:
            parts += [" " * (start - pos), text]
            pos = end
            continue
        shared = min(pos, end) - start
        if "".join(parts)[start:start + shared] != text[:shared]:
            raise ValueError(f"chunk {k} overlaps the chunk before it (span {start}:{end}) with other text")
        if end > pos:
            parts.append(text[shared:])
            pos = end
    return "".join(parts), [(s, e) for s, e, _ in placed]


def _late_chunker(pipe: EmbeddingPipeline) -> LateChunker:
    model_object = getattr(pipe.provider, "model_object", None)
    if model_object is None:
        raise ConfigurationError(
            f"late chunking needs a local transformer model (local:...); {pipe.provider.spec} gives only "
            "pooled vectors. Use mode='naive', or a local model")
    with _chunkers_lock:
        chunker = _chunkers.get(model_object)
        if chunker is None:
            chunker = _chunkers[model_object] = LateChunker.from_sentence_transformer(model_object)
        return chunker


def _material(pipe: EmbeddingPipeline, document: str, chunker: LateChunker) -> bytes:
    identity: dict[str, Any] = dict(pipe.provider.identity())
    if pipe.namespace is not None:
        identity.pop("base_url", None)
        identity["namespace"] = pipe.namespace
    identity.update(chunking="late", max_length=chunker.max_length, overlap=chunker.overlap,
                    document=hashlib.sha256(document.encode("utf-8", "surrogatepass")).hexdigest())
    return key_material(provider=pipe.provider.name, model=pipe.provider.model, dimensions=pipe.dimensions,
                        identity=identity, role="document")


def _reduce(pipe: EmbeddingPipeline, vectors: np.ndarray) -> np.ndarray:
    """Matryoshka reduction to ``pipe.dimensions`` (leading dims, renormalised), as the pipeline does."""
    d = pipe.dimensions
    if d and vectors.shape[1] > d:
        vectors = vectors[:, :d]
        norms = np.linalg.norm(vectors, axis=1, keepdims=True)
        vectors = vectors / np.where(norms == 0, 1, norms)
    return np.ascontiguousarray(vectors, dtype=np.float32)


def late_vectors(pipe: EmbeddingPipeline, document: str,
                 spans: list[tuple[int, int]]) -> tuple[np.ndarray, bool]:
    """Late vectors of ``spans`` of ``document``, and whether the model ran (``False``: all from the cache)."""
    chunker = _late_chunker(pipe)
    cache = pipe.cache
    if cache is None:
        return _reduce(pipe, chunker.embed_spans(document, spans)), True
    # The document is in the key material, so a span names the chunk; its text could repeat.
    keys = cache.keys_for(_material(pipe, document, chunker), [f"{s}:{e}" for s, e in spans], "document")
    try:
        values = cache.get_many(keys)
    except Exception as exc:  # fail open, as the pipeline does: a cache outage costs compute, not the call
        log.warning("embedpipe: late-chunk cache read failed (%s); embedding without it", exc)
        values = [None] * len(keys)
    present = [v for v in values if v is not None]
    if len(present) == len(spans):
        decoded, bad = decode_many(present, pipe.dimensions)
        if not bad:
            return np.ascontiguousarray(decoded.vectors, dtype=np.float32), False
    # One pass over the document gives every chunk, so a partial hit recomputes all of them.
    vectors = _reduce(pipe, chunker.embed_spans(document, spans))
    tokens = [0] * len(spans)  # a local model is free: no cost to record with the vector
    try:
        cache.set_many(list(zip(keys, encode_many(vectors, tokens), strict=True)))
    except Exception as exc:
        log.warning("embedpipe: late-chunk cache write failed (%s)", exc)
    return vectors, True


def embed_chunks(pipe: EmbeddingPipeline, document: str, chunks: Chunks,
                 mode: ChunkingMode = "late") -> np.ndarray:
    """Vectors of a document's ``chunks`` (texts in order, or ``(start, end)`` spans): ``(n_chunks, d)`` float32.

    ``mode="naive"`` embeds each chunk's text alone through ``pipe.embed_array`` (cached as
    usual); ``mode="late"`` pools them from one pass of a local transformer over the whole
    document (:mod:`embedpipe.chunking.late`), cached per document.
    """
    spans = chunk_spans(document, chunks)
    if mode == "naive":
        return np.asarray(pipe.embed_array([document[s:e] for s, e in spans]), dtype=np.float32)
    if mode == "late":
        return late_vectors(pipe, document, spans)[0]
    raise ConfigurationError(f"mode must be 'late' or 'naive', got {mode!r}")


async def aembed_chunks(pipe: EmbeddingPipeline, document: str, chunks: Chunks,
                        mode: ChunkingMode = "late") -> np.ndarray:
    """Async twin of :func:`embed_chunks` (the local model runs in a worker thread)."""
    spans = chunk_spans(document, chunks)
    if mode == "naive":
        return np.asarray(await pipe.aembed_array([document[s:e] for s, e in spans]), dtype=np.float32)
    if mode == "late":
        return (await asyncio.to_thread(late_vectors, pipe, document, spans))[0]
    raise ConfigurationError(f"mode must be 'late' or 'naive', got {mode!r}")
