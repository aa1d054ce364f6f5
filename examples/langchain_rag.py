"""A LangChain RAG ingestion through embedpipe: the local model, a SQLite cache, no API key.

    pip install 'embedpipe[local,langchain]'
    python examples/langchain_rag.py     # first run: every distinct chunk is embedded
    python examples/langchain_rag.py     # second run: every chunk is a cache hit, nothing is embedded

Everything is plain LangChain except the line that builds ``embeddings``. With OpenAI it
would read ``EmbedPipeEmbeddings(OpenAIEmbeddings(model="text-embedding-3-small"), cache=...)``
and the cost and saved lines would show dollars; a local model costs nothing.
"""

from __future__ import annotations

import argparse
from typing import Any

from langchain_core.documents import Document
from langchain_core.vectorstores import InMemoryVectorStore

from embedpipe import Stats
from langchain_embedpipe import EmbedPipeEmbeddings

FOOTER = "This page is part of the Python documentation; report problems on the issue tracker."

PAGES = {
    "tutorial/datastructures": [
        "Lists are mutable sequences. list.append adds an item to the end, list.pop removes and returns one.",
        "Tuples are immutable sequences, typically used to store collections of heterogeneous data.",
        "A dictionary maps keys to values; keys must be hashable, and lookups take constant time on average.",
        "Sets are unordered collections with no duplicate elements, supporting union and intersection.",
        FOOTER,
    ],
    "tutorial/errors": [
        "Exceptions are raised with the raise statement and handled with try and except clauses.",
        "A finally clause runs whether or not an exception occurred, which makes it right for cleanup.",
        "Exception groups bundle several unrelated exceptions; except* handles the members by type.",
        FOOTER,
    ],
    "library/asyncio": [
        "asyncio runs coroutines on an event loop; asyncio.run starts a loop and closes it when done.",
        "asyncio.gather runs awaitables concurrently and returns their results in the order given.",
        "A semaphore bounds how many coroutines enter a section at once, limiting concurrency.",
        FOOTER,
    ],
    "library/sqlite3": [
        "sqlite3 provides a DB-API 2.0 interface to SQLite databases stored in a single file.",
        "Use placeholders instead of string formatting to pass values to SQL queries safely.",
        FOOTER,
    ],
}

QUESTION = "How do I limit how many coroutines run at the same time?"


def documents() -> list[Document]:
    """The chunks to index, one Document per paragraph (the footer repeats on every page)."""
    return [Document(page_content=text, metadata={"source": page, "chunk": i})
            for page, chunks in PAGES.items() for i, text in enumerate(chunks)]


def ingest(cache: str, model: Any = "local:all-MiniLM-L6-v2") -> tuple[list[Document], Stats]:
    """Index the documents, ask one question; return the answers and embedpipe's counters."""
    embeddings = EmbedPipeEmbeddings(model=model, cache=cache)  # the one embedpipe line
    store = InMemoryVectorStore.from_documents(documents(), embeddings)
    answers = store.similarity_search(QUESTION, k=2)
    stats = embeddings.stats
    embeddings.close()
    return answers, stats


def report(answers: list[Document], stats: Stats) -> str:
    """What a run did, in a few lines."""
    cost = "unknown" if stats.cost_usd is None else f"${stats.cost_usd:.6f}"
    saved = "unknown" if stats.saved_usd is None else f"${stats.saved_usd:.6f}"
    lines = [
        f"chunks: {len(documents())}  embedded: {stats.embedded}  cache hits: {stats.hits}  "
        f"duplicates skipped: {stats.deduped}",
        f"requests: {stats.requests}  tokens: {stats.tokens}  cost: {cost}  saved: {saved}",
        f"Q: {QUESTION}",
        *(f"  {doc.metadata['source']}: {doc.page_content}" for doc in answers),
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", default="sqlite:///langchain_rag.db", help="embedpipe cache URL")
    parser.add_argument("--model", default="local:all-MiniLM-L6-v2", help="embedpipe model spec")
    args = parser.parse_args(argv)
    print(report(*ingest(args.cache, args.model)))


if __name__ == "__main__":
    main()
