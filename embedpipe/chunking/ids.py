"""Chunk ids derived from content, so a docstore or vector store sees an unchanged chunk as unchanged."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

__all__ = ["chunk_id", "chunk_ids"]


def chunk_id(text: str, document_id: str | None = None, occurrence: int = 0) -> str:
    """A 32-hex-digit id from a chunk's text, the id of its document, and which repeat of that text it is.

    The same text in the same document gets the same id across runs and edits elsewhere in
    the document; ``occurrence`` (0 for the first copy) keeps repeated chunks of one
    document apart. Each field is length-prefixed, so no two inputs encode alike.
    """
    h = hashlib.blake2b(digest_size=16, person=b"embedpipe-chunk")
    for field in (document_id or "", text, str(occurrence)):
        data = field.encode("utf-8", "surrogatepass")
        h.update(len(data).to_bytes(8, "big"))
        h.update(data)
    return h.hexdigest()


def chunk_ids(texts: Sequence[str], document_id: str | None = None) -> list[str]:
    """:func:`chunk_id` of each chunk of one document, numbering repeats of the same text in order."""
    seen: dict[str, int] = {}
    out = []
    for text in texts:
        k = seen.get(text, 0)
        seen[text] = k + 1
        out.append(chunk_id(text, document_id, k))
    return out
