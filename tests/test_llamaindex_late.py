"""``EmbedPipeTransform(chunking="late")`` in a real IngestionPipeline, with StableNodeParser and the real MiniLM."""

from __future__ import annotations

import asyncio
import os
from typing import Any

import numpy as np
import pytest
from llama_index.core import Document
from llama_index.core.ingestion import DocstoreStrategy, IngestionPipeline
from llama_index.core.node_parser import SentenceSplitter
from llama_index.core.schema import TextNode
from llama_index.core.storage.docstore import SimpleDocumentStore
from llama_index.core.vector_stores import SimpleVectorStore

from embedpipe.errors import ConfigurationError
from embedpipe.late_chunking import document_of_chunks
from llamaindex_embedpipe import EmbedPipeEmbedding, EmbedPipeTransform, StableNodeParser

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _sections(corpus: list[dict[str, str]], n: int = 3) -> list[dict[str, str]]:
    return [s for s in corpus if 2500 < len(s["text"]) < 5000][:n]


def test_document_of_chunks_places_spans_and_checks_them() -> None:
    doc, spans = document_of_chunks([("Hello there.", 0, 12), ("Bye now.", 14, 22)])
    assert doc == "Hello there.  Bye now." and spans == [(0, 12), (14, 22)]
    doc, spans = document_of_chunks([("abcdef", 0, 6), ("defgh", 3, 8)])  # overlapping nodes agree
    assert doc == "abcdefgh" and spans == [(0, 6), (3, 8)]
    doc, spans = document_of_chunks([("one", None, None), ("two", None, None)])
    assert doc == "one\n\ntwo" and [doc[a:b] for a, b in spans] == ["one", "two"]
    with pytest.raises(ValueError, match="chunk 1 overlaps"):
        document_of_chunks([("abcdef", 0, 6), ("xyz", 3, 6)])
    with pytest.raises(ValueError, match="chunk 0: span 0:9"):
        document_of_chunks([("abcdef", 0, 9)])


def test_late_transform_in_an_ingestion_pipeline_matches_embed_chunks_and_upserts(
        local_provider: Any, corpus: list[dict[str, str]]) -> None:
    sections = _sections(corpus)
    embed = EmbedPipeEmbedding(model=local_provider, cache="memory://")
    transform = EmbedPipeTransform(embed, chunking="late")
    store = SimpleVectorStore()
    pipeline = IngestionPipeline(transformations=[StableNodeParser(chunk_size=64), transform], vector_store=store,
                                 docstore=SimpleDocumentStore(), docstore_strategy=DocstoreStrategy.UPSERTS)
    docs = [Document(text=s["text"], id_=s["id"]) for s in sections]
    nodes = pipeline.run(documents=docs)
    assert len(nodes) > 3 * len(docs) and transform.counts.embedded == len(nodes)
    for doc in docs:
        mine = [n for n in nodes if n.ref_doc_id == doc.doc_id]
        assert isinstance(mine[0], TextNode)
        spans = [(n.start_char_idx, n.end_char_idx) for n in mine]
        want = embed.pipeline.embed_chunks(doc.text, spans, mode="late")  # the real document, whitespace and all
        assert np.allclose(np.asarray([n.embedding for n in mine]), want, atol=1e-4)
        naive = embed.pipeline.embed_chunks(doc.text, spans, mode="naive")
        assert not np.allclose(want, naive, atol=1e-2)
    # An edit to one document: the docstore re-runs it alone, its nodes get new late vectors.
    edited = Document(text=docs[1].text.replace(".", ". Indeed.", 1), id_=docs[1].doc_id)
    again = pipeline.run(documents=[docs[0], edited, docs[2]])
    assert {n.ref_doc_id for n in again} == {docs[1].doc_id}
    assert set(store.data.embedding_dict) >= {n.node_id for n in again}


def test_late_transform_without_char_indices_and_async(local_provider: Any, corpus: list[dict[str, str]]) -> None:
    section = _sections(corpus, 1)[0]
    embed = EmbedPipeEmbedding(model=local_provider, cache="none")
    nodes = SentenceSplitter(chunk_size=96, chunk_overlap=0).get_nodes_from_documents(
        [Document(text=section["text"], id_="s")])
    bare = [n.model_copy(update={"start_char_idx": None, "end_char_idx": None}) for n in nodes]
    out = asyncio.run(EmbedPipeTransform(embed, chunking="late").acall(bare))
    doc, spans = document_of_chunks([(n.get_content(), None, None) for n in bare])
    want = embed.pipeline.embed_chunks(doc, spans, mode="late")
    assert np.allclose(np.asarray([n.embedding for n in out]), want, atol=1e-4)


def test_late_transform_refuses_an_api_model_and_unknown_modes() -> None:
    with pytest.raises(ConfigurationError, match="chunking='sliding'"):
        EmbedPipeTransform("fake:8", chunking="sliding")
    nodes = [TextNode(text="One sentence.", id_="a")]
    with pytest.raises(ConfigurationError, match="local transformer model"):
        EmbedPipeTransform("fake:8", chunking="late")(nodes)
