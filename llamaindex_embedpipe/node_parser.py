"""``StableNodeParser``: LlamaIndex nodes cut by :class:`~embedpipe.chunking.StableSplitter`, ids from content."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from llama_index.core.bridge.pydantic import Field, PrivateAttr
from llama_index.core.node_parser.interface import TextSplitter
from llama_index.core.node_parser.node_utils import build_nodes_from_splits
from llama_index.core.schema import BaseNode
from llama_index.core.utils import get_tqdm_iterable

from embedpipe.chunking import StableSplitter, TokenCounter, chunk_ids


class StableNodeParser(TextSplitter):
    """A LlamaIndex ``NodeParser`` whose chunk boundaries survive edits, so an edit re-embeds one chunk.

    Sizes are in tokens (cl100k_base unless ``tokenizer`` is given). Each node's id derives
    from its document's id and its own text, so an unchanged chunk keeps its id across
    re-ingestion and vector stores overwrite rather than duplicate it.
    """

    chunk_size: int = Field(default=256, description="Target chunk size in tokens.", gt=1)
    min_size: int | None = Field(default=None, description="Smallest chunk in tokens (default chunk_size // 2).")
    max_size: int | None = Field(default=None, description="Largest chunk in tokens (default 2 * chunk_size).")
    _splitter: StableSplitter = PrivateAttr()

    def __init__(self, chunk_size: int = 256, min_size: int | None = None, max_size: int | None = None,
                 tokenizer: TokenCounter | Callable[[str], int] | None = None, **kwargs: Any) -> None:
        super().__init__(chunk_size=chunk_size, min_size=min_size, max_size=max_size, **kwargs)  # type: ignore[call-arg]  # pydantic fields declared on this class
        self._splitter = StableSplitter(chunk_size, min_size, max_size, tokenizer=tokenizer)

    @classmethod
    def class_name(cls) -> str:
        return "StableNodeParser"

    def split_text(self, text: str) -> list[str]:
        """The chunks of ``text`` (see :meth:`embedpipe.chunking.StableSplitter.split_text`)."""
        return self._splitter.split_text(text)

    def _parse_nodes(self, nodes: Sequence[BaseNode], show_progress: bool = False, **kwargs: Any) -> list[BaseNode]:
        out: list[BaseNode] = []
        for node in get_tqdm_iterable(nodes, show_progress, "Parsing nodes"):
            splits = self.split_text(node.get_content())
            ids = chunk_ids(splits, node.ref_doc_id or node.node_id)
            out.extend(build_nodes_from_splits(splits, node, id_func=lambda i, _doc, ids=ids: ids[i]))
        return out
