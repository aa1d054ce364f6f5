"""``StableTextSplitter``: a LangChain ``TextSplitter`` over :class:`embedpipe.chunking.StableSplitter`."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

from langchain_core.documents import Document
from langchain_text_splitters import TextSplitter

from embedpipe.chunking import StableSplitter, TokenCounter, chunk_ids


class StableTextSplitter(TextSplitter):
    """A LangChain splitter whose chunk boundaries survive edits, so an edit re-embeds one chunk.

    ``chunk_size``, ``min_size`` and ``max_size`` are in tokens (cl100k_base unless
    ``tokenizer`` is given); chunks never overlap. :meth:`split_documents` gives each chunk
    of a document that has an ``id`` an id derived from that id and the chunk's text.
    """

    def __init__(self, chunk_size: int = 256, min_size: int | None = None, max_size: int | None = None,
                 tokenizer: TokenCounter | Callable[[str], int] | None = None, **kwargs: Any) -> None:
        if kwargs.get("chunk_overlap"):
            raise ValueError("StableTextSplitter does not overlap chunks; leave chunk_overlap at 0")
        self.splitter = StableSplitter(chunk_size, min_size, max_size, tokenizer=tokenizer)
        kwargs["chunk_overlap"] = 0
        super().__init__(chunk_size=chunk_size, length_function=self.splitter.count_tokens, **kwargs)

    def split_text(self, text: str) -> list[str]:
        """The chunks of ``text`` (see :meth:`embedpipe.chunking.StableSplitter.split_text`)."""
        return self.splitter.split_text(text)

    def split_documents(self, documents: Iterable[Document]) -> list[Document]:
        """Split each document, keeping its metadata; chunk ids derive from the document's id and the text."""
        out: list[Document] = []
        for doc in documents:
            chunks = self.create_documents([doc.page_content], [dict(doc.metadata)])
            if doc.id is not None:
                for chunk, cid in zip(chunks, chunk_ids([c.page_content for c in chunks], doc.id), strict=True):
                    chunk.id = cid
            out.extend(chunks)
        return out

    def transform_documents(self, documents: Sequence[Document], **kwargs: Any) -> Sequence[Document]:
        return self.split_documents(list(documents))
