"""A LlamaIndex IngestionPipeline that embeds through embedpipe, on the local model (no API key).

    python examples/llamaindex_ingest.py            # a few built-in documents
    python examples/llamaindex_ingest.py DOCS_DIR   # your own files (SimpleDirectoryReader)

It ingests the documents, edits one paragraph of one of them and ingests again: the
docstore re-runs the whole edited document, and embedpipe's cache sends only the changed
chunk to the model. A chunk the model cannot embed would become a dead letter instead of
failing the run. It then answers a query with the same model as ``Settings.embed_model``.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from llama_index.core import Document, Settings, SimpleDirectoryReader, VectorStoreIndex
from llama_index.core.ingestion import DocstoreStrategy, IngestionPipeline
from llama_index.core.node_parser import SentenceSplitter
from llama_index.core.storage.docstore import SimpleDocumentStore
from llama_index.core.vector_stores import SimpleVectorStore

from llamaindex_embedpipe import EmbedPipeEmbedding, EmbedPipeTransform

TOPICS = {
    "tea": "Green tea is steamed or pan-fired soon after picking, which stops oxidation.",
    "bikes": "A derailleur moves the chain between sprockets so the rider can change gear.",
    "bees": "Honey bees communicate the direction of flowers with a waggle dance.",
    "rust": "Iron rusts when it reacts with oxygen and water to form hydrated iron oxides.",
}


def builtin_documents() -> list[Document]:
    """Four documents of five paragraphs each; each paragraph becomes one chunk."""
    return [Document(text="\n\n\n".join(f"{fact} (Part {i} of the {topic} notes.) " * 4 for i in range(5)),
                     doc_id=topic, metadata={"topic": topic})
            for topic, fact in TOPICS.items()]


def main() -> None:
    documents = (SimpleDirectoryReader(sys.argv[1], filename_as_id=True).load_data() if len(sys.argv) > 1
                 else builtin_documents())
    workdir = Path(tempfile.mkdtemp(prefix="embedpipe-llamaindex-"))
    # The one line that changes: embedpipe's cache, batching, limits and retries for any model.
    embed_model = EmbedPipeEmbedding(model="local:all-MiniLM-L6-v2", cache=f"sqlite:///{workdir}/cache.db")
    transform = EmbedPipeTransform(embed_model, dead_letter=workdir / "dead-letters.db")
    pipeline = IngestionPipeline(
        transformations=[SentenceSplitter(chunk_size=128, chunk_overlap=0), transform],
        docstore=SimpleDocumentStore(), vector_store=SimpleVectorStore(),
        docstore_strategy=DocstoreStrategy.UPSERTS)

    nodes = pipeline.run(documents=documents)
    print(f"first run:  {len(nodes)} nodes, {transform.counts}")

    first = documents[0]
    edited = Document(text=first.text.replace(".", "!", 1), doc_id=first.doc_id, metadata=first.metadata)
    rerun = pipeline.run(documents=[edited, *documents[1:]])
    print(f"second run: {len(rerun)} nodes re-run by the docstore, {transform.counts}")
    print(f"dead letters: {len(transform.dead_letters)}")
    stats = embed_model.stats
    print(f"model calls: {stats.requests} requests, {stats.embedded} texts embedded, {stats.hits} cache hits, "
          f"{stats.tokens} tokens")

    # The nodes carry their embeddings, so building the index embeds only the query.
    Settings.embed_model = embed_model
    current = [n for n in nodes if n.ref_doc_id != first.doc_id] + list(rerun)
    index = VectorStoreIndex(nodes=current)
    best = index.as_retriever(similarity_top_k=1).retrieve("How do bees tell each other where flowers are?")[0]
    print(f"query: best match is from {best.node.ref_doc_id!r} (score {best.score:.2f})")
    embed_model.close()


if __name__ == "__main__":
    main()
