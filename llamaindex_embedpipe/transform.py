"""``EmbedPipeTransform``: embed nodes in an IngestionPipeline; failures become dead letters, not a failed run."""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

from llama_index.core.base.embeddings.base import BaseEmbedding
from llama_index.core.bridge.pydantic import BaseModel, Field, PrivateAttr
from llama_index.core.schema import BaseNode, ImageNode, MetadataMode, TransformComponent
from llama_index.core.storage.docstore.types import BaseDocumentStore
from llama_index.core.storage.docstore.utils import doc_to_json, json_to_doc
from llama_index.core.vector_stores.types import BasePydanticVectorStore

from embedpipe import EmbeddingResult
from embedpipe._urls import redact
from embedpipe.deadletters import DeadLetter, DeadLetterStore, aretry, dead_letter_store_from, retry
from embedpipe.errors import ConfigurationError, Failure
from embedpipe.inputs import IMAGE
from embedpipe.late_chunking import document_of_chunks
from embedpipe.stats import Stats
from llamaindex_embedpipe.embedding import EmbedPipeEmbedding, picklable_state
from llamaindex_embedpipe.multimodal import node_image

#: node metadata key naming the model and dimensions of the node's embedding, e.g. "openai:text-embedding-3-small@1536"
EMBEDDING_MODEL_KEY = "embedpipe_model"


@dataclass
class TransformCounts:
    """What an :class:`EmbedPipeTransform` has done to nodes, in nodes."""

    embedded: int = 0        #: embedded by the model in this process
    cached: int = 0          #: answered without a model call (embedpipe's cache, or a same-text node)
    skipped: int = 0         #: already carried an embedding from the same model and dimensions
    dead_lettered: int = 0   #: failed for good: sent to the dead-letter store, left out of the output


@dataclass
class _Plan:
    todo: list[int]
    texts: list[Any]    # str, or an embedpipe Image for an ImageNode when the model embeds images


class EmbedPipeTransform(TransformComponent):
    """An ingestion step that embeds each node's ``MetadataMode.EMBED`` content through embedpipe.

    ``embed_model`` is an :class:`EmbedPipeEmbedding`, a LlamaIndex model to wrap, or a core
    spec (``"openai:text-embedding-3-small"``); other keywords are pipeline options for the
    last two. ``dead_letter`` is where failures go: ``None`` (in memory), a SQLite path, a
    ``sqlite:///...`` URL, or a :class:`~embedpipe.deadletters.DeadLetterStore`.

    - A node whose embedding fails for good (after retries) becomes a dead letter (node id,
      ref doc id, text, metadata, reason, time) and is left out of the output, so the vector
      store never receives a node without an embedding; the run goes on.
    - Re-running the pipeline does **not** bring dead letters back: the docstore has already
      recorded their document's hash and skips it. Call :meth:`retry_dead_letters` instead.
    - Nodes that already carry an embedding from the same model and dimensions (per their
      ``embedpipe_model`` metadata, which is hidden from embed and LLM text) pass through.
    - Embedded nodes are returned as copies: the inputs keep the hash the docstore compares.
    - ``chunking="late"`` (local transformer models) embeds the nodes of each document
      together with late chunking (:meth:`embedpipe.EmbeddingPipeline.embed_chunks`): the
      nodes are grouped by their document (``ref_doc_id``), in node order, the document is
      rebuilt from their texts (placed at ``start_char_idx``/``end_char_idx`` when the
      parser set them, else joined by blank lines), and each node's vector is pooled from
      the whole document's token outputs. Each node's own text is pooled (metadata is not
      embedded). Put it right after the node parser, so a document's nodes arrive together.
    - :attr:`counts` counts nodes embedded, cached, skipped and dead-lettered in this process
      (with ``num_workers``, each worker counts its own; use a SQLite ``dead_letter`` there,
      as an in-memory store's letters stay in the worker).
    """

    embed_model: EmbedPipeEmbedding = Field(description="The model nodes are embedded with.")
    chunking: str = Field(default="none", description="'none': each node alone; 'late': a document's nodes "
                                                      "together, by late chunking (local models).")

    _store: DeadLetterStore = PrivateAttr()
    _counts: TransformCounts = PrivateAttr(default_factory=TransformCounts)

    def __init__(self, embed_model: EmbedPipeEmbedding | BaseEmbedding | str | dict[str, Any], *,
                 dead_letter: str | os.PathLike[str] | DeadLetterStore | None = None, chunking: str = "none",
                 **options: Any) -> None:
        if chunking not in CHUNKINGS:
            raise ConfigurationError(f"chunking={chunking!r}: use one of {', '.join(CHUNKINGS)}")
        if isinstance(embed_model, dict):  # from_dict()
            embed_model = EmbedPipeEmbedding.from_dict(embed_model)
        if isinstance(embed_model, EmbedPipeEmbedding):
            if options:
                raise ConfigurationError(f"options {sorted(options)} belong to the EmbedPipeEmbedding passed in")
        elif isinstance(embed_model, BaseEmbedding):
            embed_model = EmbedPipeEmbedding(embed_model, **options)
        else:
            embed_model = EmbedPipeEmbedding(model=embed_model, **options)
        fields: dict[str, Any] = {"embed_model": embed_model, "chunking": chunking}
        super().__init__(**fields)
        self._store = dead_letter_store_from(dead_letter)

    @classmethod
    def class_name(cls) -> str:
        return "EmbedPipeTransform"

    # ------------------------------------------------------------------ results
    @property
    def counts(self) -> TransformCounts:
        """Nodes embedded, cached, skipped and dead-lettered so far (a copy)."""
        return replace(self._counts)

    @property
    def dead_letters(self) -> list[DeadLetter]:
        """The nodes that failed for good, oldest first."""
        return self._store.all()

    @property
    def dead_letter_store(self) -> DeadLetterStore:
        """The store dead letters are kept in."""
        return self._store

    # ------------------------------------------------------------------ the transform
    def __call__(self, nodes: Sequence[BaseNode], **kwargs: Any) -> list[BaseNode]:
        plan = self._plan(nodes)
        if self.chunking == "late":
            result = _late_result(self.embed_model, nodes, plan)
        else:
            result = self.embed_model.embed_result(plan.texts, errors="collect") if plan.texts else EmbeddingResult()
        out, letters = self._apply(nodes, plan, result)
        self._store.add(letters)
        return out

    async def acall(self, nodes: Sequence[BaseNode], **kwargs: Any) -> list[BaseNode]:
        plan = self._plan(nodes)
        if self.chunking == "late":  # the local model runs in a worker thread
            result = await asyncio.to_thread(_late_result, self.embed_model, nodes, plan)
        else:
            result = await self.embed_model.aembed_result(plan.texts, errors="collect") if plan.texts else \
                EmbeddingResult()
        out, letters = self._apply(nodes, plan, result)
        await self._store.aadd(letters)
        return out

    def _identity(self) -> str:
        namespace = self.embed_model.namespace
        return f"{namespace}/{self.embed_model.model}" if namespace else self.embed_model.model

    def _carries_ours(self, node: BaseNode) -> bool:
        dims = len(node.embedding) if node.embedding is not None else 0
        expected = self.embed_model.pipeline.expected_dims
        return bool(dims) and (expected is None or dims == expected) and \
            node.metadata.get(EMBEDDING_MODEL_KEY) == f"{self._identity()}@{dims}"

    def _plan(self, nodes: Sequence[BaseNode]) -> _Plan:
        todo = [i for i, node in enumerate(nodes) if not self._carries_ours(node)]
        images = IMAGE in self.embed_model.pipeline.provider.info.modalities
        texts = [self._input(nodes[i], images) for i in todo]
        return _Plan(todo, texts)

    @staticmethod
    def _input(node: BaseNode, images: bool) -> Any:
        if images and isinstance(node, ImageNode):
            return node_image(node)
        return node.get_content(metadata_mode=MetadataMode.EMBED)

    def _apply(self, nodes: Sequence[BaseNode], plan: _Plan,
               result: EmbeddingResult) -> tuple[list[BaseNode], list[DeadLetter]]:
        out = list(nodes)
        letters: list[DeadLetter] = []
        failed: set[int] = set()
        for k, i in enumerate(plan.todo):
            vector = result[k]
            if vector is None:
                text = plan.texts[k] if isinstance(plan.texts[k], str) else plan.texts[k].name
                letters.append(self._letter(nodes[i], text, str(result.failures.get(k, "not embedded"))))
                failed.add(i)
            else:
                out[i] = self._embedded(nodes[i], vector)
        ok = len(plan.todo) - len(letters)
        # Stats count unique texts; a text embedded once answers its duplicates for free.
        embedded = min(ok, result.stats.embedded)
        self._counts.embedded += embedded
        self._counts.cached += ok - embedded
        self._counts.skipped += len(nodes) - len(plan.todo)
        self._counts.dead_lettered += len(letters)
        return [n for i, n in enumerate(out) if i not in failed], letters

    def _embedded(self, node: BaseNode, vector: list[float]) -> BaseNode:
        """A copy of ``node`` with ``vector`` and the model recorded in metadata hidden from embed and LLM text."""
        return node.model_copy(update={
            "embedding": vector,
            "metadata": {**node.metadata, EMBEDDING_MODEL_KEY: f"{self._identity()}@{len(vector)}"},
            "excluded_embed_metadata_keys": _hidden(node.excluded_embed_metadata_keys),
            "excluded_llm_metadata_keys": _hidden(node.excluded_llm_metadata_keys),
        })

    def _letter(self, node: BaseNode, text: str, reason: object) -> DeadLetter:
        bare = node.model_copy(update={"embedding": None})
        return DeadLetter(id=node.node_id, ref_id=node.ref_doc_id, text=text,
                          reason=redact(str(reason), self.embed_model.secrets), metadata=dict(node.metadata),
                          payload=json.dumps(doc_to_json(bare), default=str))

    # ------------------------------------------------------------------ retry
    def retry_dead_letters(self, vector_store: BasePydanticVectorStore | None = None, *,
                           docstore: BaseDocumentStore | None = None) -> list[BaseNode]:
        """Re-embed the dead letters; add the nodes that now succeed to ``vector_store`` and return them.

        Pass the pipeline's ``docstore`` to drop, unretried, the letters whose document has
        changed or gone since they failed (their nodes are stale).
        """
        ids = self._fresh(self._store.all(), docstore)
        outcome = retry(self._store, self.embed_model.pipeline, ids, secrets=self.embed_model.secrets)
        nodes = [self._restore(letter, vector) for letter, vector in outcome.recovered]
        if vector_store is not None and nodes:
            vector_store.add(nodes)
        return nodes

    async def aretry_dead_letters(self, vector_store: BasePydanticVectorStore | None = None, *,
                                  docstore: BaseDocumentStore | None = None) -> list[BaseNode]:
        """Async twin of :meth:`retry_dead_letters`."""
        ids = self._fresh(await self._store.aall(), docstore)
        outcome = await aretry(self._store, self.embed_model.pipeline, ids, secrets=self.embed_model.secrets)
        nodes = [self._restore(letter, vector) for letter, vector in outcome.recovered]
        if vector_store is not None and nodes:
            await vector_store.async_add(nodes)
        return nodes

    def _fresh(self, letters: list[DeadLetter], docstore: BaseDocumentStore | None) -> list[str]:
        """Ids of the letters still worth retrying; stale ones leave the store."""
        if docstore is None:
            return [d.id for d in letters]
        stale: set[str] = set()
        for d in letters:
            source = json_to_doc(json.loads(d.payload)).source_node if d.payload else None
            if d.ref_id is not None and source is not None and source.hash \
                    and docstore.get_document_hash(d.ref_id) != source.hash:
                stale.add(d.id)
        self._store.remove(sorted(stale))
        return [d.id for d in letters if d.id not in stale]

    def _restore(self, letter: DeadLetter, vector: list[float]) -> BaseNode:
        if letter.payload is None:
            raise ConfigurationError(f"dead letter {letter.id!r} has no payload to rebuild its node from")
        return self._embedded(json_to_doc(json.loads(letter.payload)), vector)

    # ------------------------------------------------------------------ pickling
    def __getstate__(self) -> dict[Any, Any]:
        return picklable_state(self)

    def __setstate__(self, state: dict[Any, Any]) -> None:
        BaseModel.__setstate__(self, state)


def _late_result(model: EmbedPipeEmbedding, nodes: Sequence[BaseNode], plan: _Plan) -> EmbeddingResult:
    """Late chunk vectors for the planned nodes, one document (``ref_doc_id``) at a time; a document
    that fails fails each of its nodes."""
    groups: dict[str, list[int]] = {}
    for k, i in enumerate(plan.todo):
        groups.setdefault(nodes[i].ref_doc_id or nodes[i].node_id, []).append(k)
    rows: list[list[float] | None] = [None] * len(plan.todo)
    failures: dict[int, Failure] = {}
    stats = Stats()
    for ks in groups.values():
        chunks = [(nodes[plan.todo[k]].get_content(metadata_mode=MetadataMode.NONE),
                   getattr(nodes[plan.todo[k]], "start_char_idx", None),  # TextNode's; other nodes have none
                   getattr(nodes[plan.todo[k]], "end_char_idx", None)) for k in ks]
        try:
            document, spans = document_of_chunks(chunks)
            vectors = model.pipeline.embed_chunks(document, spans, mode="late")
        except ConfigurationError:
            raise
        except Exception as exc:  # this document's nodes fail; the others go on
            bad = isinstance(exc, ValueError)
            for k in ks:
                failures[k] = Failure("invalid_input" if bad else "provider", message=f"late chunking failed: {exc}")
            continue
        stats.add(embedded=len(ks))
        for k, v in zip(ks, vectors.tolist(), strict=True):
            rows[k] = v
    return EmbeddingResult(rows, failures, False, stats)


#: the transform's chunking modes
CHUNKINGS = ("none", "late")


def _hidden(keys: list[str]) -> list[str]:
    return keys if EMBEDDING_MODEL_KEY in keys else [*keys, EMBEDDING_MODEL_KEY]
