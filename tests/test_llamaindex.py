"""The LlamaIndex adapter, run inside real LlamaIndex objects: IngestionPipeline, docstore, vector stores, Settings."""

from __future__ import annotations

import json
import pickle
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from llama_index.core import Document, Settings, VectorStoreIndex
from llama_index.core.base.embeddings.base import BaseEmbedding
from llama_index.core.bridge.pydantic import Field, PrivateAttr
from llama_index.core.callbacks import CallbackManager, CBEventType, LlamaDebugHandler
from llama_index.core.ingestion import DocstoreStrategy, IngestionPipeline
from llama_index.core.ingestion.pipeline import get_transformation_hash
from llama_index.core.instrumentation import get_dispatcher
from llama_index.core.instrumentation.event_handlers import BaseEventHandler
from llama_index.core.instrumentation.events import BaseEvent
from llama_index.core.instrumentation.events.embedding import EmbeddingEndEvent, EmbeddingStartEvent
from llama_index.core.llms import MockLLM
from llama_index.core.node_parser import SentenceSplitter
from llama_index.core.rate_limiter import TokenBucketRateLimiter
from llama_index.core.schema import MetadataMode, TextNode
from llama_index.core.storage.docstore import SimpleDocumentStore
from llama_index.core.storage.kvstore import SimpleKVStore
from llama_index.core.vector_stores import SimpleVectorStore

from embedpipe.deadletter import (
    DeadLetter,
    MemoryDeadLetterStore,
    SQLiteDeadLetterStore,
    dead_letter_store_from,
    redact,
)
from embedpipe.errors import ConfigurationError
from embedpipe.providers.fake import fake_vector
from embedpipe.tokens import write_tiktoken_cache
from llamaindex_embedpipe import EMBEDDING_MODEL_KEY, EmbedPipeEmbedding, EmbedPipeTransform, TransformCounts
from tests.openai_server import OpenAITestServer, expected_vector, running_server

# -- real LlamaIndex models for the tests ------------------------------------------------------


class RecordingEmbedding(BaseEmbedding):
    """A real LlamaIndex model: deterministic vectors, a record of every text it embeds, and chosen failures."""

    model_name: str = "recording-64"
    dims: int = 64
    fail_on: tuple[str, ...] = ()
    api_key: str = "sk-test-recording-0000000000000000"
    _batches: list[list[str]] = PrivateAttr(default_factory=list)

    @property
    def texts(self) -> list[str]:
        return [t for batch in self._batches for t in batch]

    @property
    def batches(self) -> list[list[str]]:
        return list(self._batches)

    def forget(self) -> None:
        self._batches.clear()

    def _vectors(self, texts: list[str]) -> list[list[float]]:
        self._batches.append(list(texts))
        for marker in self.fail_on:
            if any(marker in t for t in texts):
                # As some SDKs do, the message quotes the credentials: they must not reach a dead letter.
                raise ValueError(f"cannot embed text containing {marker!r} (api_key={self.api_key})")
        return [fake_vector(t, self.dims).tolist() for t in texts]

    def _get_query_embedding(self, query: str) -> list[float]:
        return self._vectors([query])[0]

    async def _aget_query_embedding(self, query: str) -> list[float]:
        return self._get_query_embedding(query)

    def _get_text_embedding(self, text: str) -> list[float]:
        return self._vectors([text])[0]

    def _get_text_embeddings(self, texts: list[str]) -> list[list[float]]:
        return self._vectors(texts)


class ConcurrencyProbe(RecordingEmbedding):
    """The same, noting how many batch calls run at once; the first two wait for each other."""

    model_name: str = "probe-64"
    _lock: threading.Lock = PrivateAttr(default_factory=threading.Lock)
    _first_two: threading.Barrier = PrivateAttr(default_factory=lambda: threading.Barrier(2, timeout=10))
    _calls: int = PrivateAttr(default=0)
    _in_flight: int = PrivateAttr(default=0)
    _most_in_flight: int = PrivateAttr(default=0)

    @property
    def most_in_flight(self) -> int:
        return self._most_in_flight

    def _get_text_embeddings(self, texts: list[str]) -> list[list[float]]:
        with self._lock:
            self._calls += 1
            call = self._calls
            self._in_flight += 1
            self._most_in_flight = max(self._most_in_flight, self._in_flight)
        try:
            if call <= 2:
                self._first_two.wait()  # proves two requests do run at once (never waits when they do)
            return self._vectors(texts)
        finally:
            with self._lock:
                self._in_flight -= 1


class EventLog(BaseEventHandler):
    """Collects LlamaIndex instrumentation events."""

    events: list[BaseEvent] = Field(default_factory=list)

    @classmethod
    def class_name(cls) -> str:
        return "EventLog"

    def handle(self, event: BaseEvent, **kwargs: Any) -> None:
        self.events.append(event)

    def of(self, kind: type[BaseEvent]) -> list[Any]:
        return [e for e in self.events if isinstance(e, kind)]


# -- documents: every paragraph is one chunk of SentenceSplitter(chunk_size=128, chunk_overlap=0) ----------

_WORDS = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "theta", "iota", "kappa", "lambda", "sigma", "omega"]


def paragraph(doc: int, section: int, marker: str = "") -> str:
    sentences = []
    for k in range(6):
        words = " ".join(_WORDS[(doc * 7 + section * 3 + k + j) % len(_WORDS)] for j in range(8))
        sentences.append(f"Document {doc} section {section} sentence {k} mentions {words}.")
    return " ".join(sentences) + (f" {marker}" if marker else "")


def documents(n_docs: int, n_chunks: int, markers: dict[tuple[int, int], str] | None = None) -> list[Document]:
    markers = markers or {}
    return [Document(text="\n\n\n".join(paragraph(d, c, markers.get((d, c), "")) for c in range(n_chunks)),
                     doc_id=f"doc-{d}") for d in range(n_docs)]


def splitter() -> SentenceSplitter:
    return SentenceSplitter(chunk_size=128, chunk_overlap=0)


def ingestion(transform: Any) -> IngestionPipeline:
    return IngestionPipeline(transformations=[splitter(), transform], docstore=SimpleDocumentStore(),
                             vector_store=SimpleVectorStore(), docstore_strategy=DocstoreStrategy.UPSERTS)


def stored(pipeline: IngestionPipeline) -> dict[str, list[float]]:
    vector_store = pipeline.vector_store
    assert isinstance(vector_store, SimpleVectorStore)
    return dict(vector_store.data.embedding_dict)


@pytest.fixture
def events() -> Iterator[EventLog]:
    handler = EventLog()
    root = get_dispatcher()
    root.add_event_handler(handler)
    yield handler
    root.event_handlers.remove(handler)


# -- EmbedPipeEmbedding ---------------------------------------------------------------------------------


def test_upsert_reembeds_only_the_changed_chunk() -> None:
    docs = documents(20, 10)
    inner = RecordingEmbedding()
    pipeline = ingestion(EmbedPipeEmbedding(inner, cache="memory://"))
    first = pipeline.run(documents=docs)
    assert len(first) == 200 and len(inner.texts) == 200
    assert len(stored(pipeline)) == 200

    changed = paragraph(7, 3).replace("sentence 2 mentions", "sentence 2 now says")
    edited = [*docs[:7], Document(text=docs[7].text.replace(paragraph(7, 3), changed), doc_id="doc-7"), *docs[8:]]
    inner.forget()
    second = pipeline.run(documents=edited)

    assert len(second) == 10  # the docstore re-runs the whole changed document...
    assert inner.texts == [changed]  # ...and only its changed chunk reaches the model
    assert len(stored(pipeline)) == 200
    assert {tuple(v) for v in stored(pipeline).values()} >= {tuple(fake_vector(changed, 64).tolist())}

    # Plain LlamaIndex, same pipeline and edit: all 10 chunks of the document are embedded again.
    plain_inner = RecordingEmbedding()
    plain = ingestion(plain_inner)
    plain.run(documents=docs)
    plain_inner.forget()
    plain.run(documents=edited)
    assert len(plain_inner.texts) == 10


def test_batch_goes_to_the_core_whole_and_fires_llamaindex_events(events: EventLog) -> None:
    inner = RecordingEmbedding()
    debug = LlamaDebugHandler()
    embed = EmbedPipeEmbedding(inner, cache="memory://", callback_manager=CallbackManager([debug]))
    texts = [f"text number {i}" for i in range(25)]

    vectors = embed.get_text_embedding_batch(texts)

    assert vectors == [fake_vector(t, 64).tolist() for t in texts]
    assert len(inner.batches) == 1 and sorted(inner.batches[0]) == sorted(texts)  # one request, not 3 of 10
    assert [len(e.model_dict) > 0 for e in events.of(EmbeddingStartEvent)] == [True]
    (end,) = events.of(EmbeddingEndEvent)
    assert end.chunks == texts and end.embeddings == vectors
    assert len(debug.get_event_pairs(CBEventType.EMBEDDING)) == 1
    assert "api_key" not in json.dumps(events.of(EmbeddingStartEvent)[0].model_dict)

    embed.get_query_embedding("a question")
    assert len(events.of(EmbeddingStartEvent)) == len(events.of(EmbeddingEndEvent)) == 2


async def test_async_batch_is_whole_bounded_and_evented(events: EventLog) -> None:
    inner = ConcurrencyProbe()
    embed = EmbedPipeEmbedding(inner, cache=None, batch_size=5, max_concurrency=2)
    texts = [f"async text {i}" for i in range(100)]

    vectors = await embed.aget_text_embedding_batch(texts)

    assert vectors == [fake_vector(t, 64).tolist() for t in texts]
    assert len(inner.batches) == 20 and all(len(b) == 5 for b in inner.batches)
    assert inner.most_in_flight == 2
    assert len(events.of(EmbeddingStartEvent)) == len(events.of(EmbeddingEndEvent)) == 1
    assert await embed.aget_query_embedding("q") == fake_vector("q", 64).tolist()
    assert await embed.aget_text_embedding("t") == fake_vector("t", 64).tolist()


def test_works_as_settings_embed_model_in_a_vector_store_index(local_provider: Any) -> None:
    saved = Settings._embed_model
    try:
        Settings.embed_model = EmbedPipeEmbedding(model=local_provider, cache="memory://")
        docs = [Document(text="The Eiffel Tower is a wrought-iron lattice tower in Paris, France."),
                Document(text="Photosynthesis converts light energy into chemical energy in plants."),
                Document(text="The Python language emphasises readability and has a large standard library.")]
        index = VectorStoreIndex.from_documents(docs)
        response = index.as_query_engine(llm=MockLLM(), similarity_top_k=1).query("How do plants use sunlight?")
        assert "Photosynthesis" in response.source_nodes[0].node.get_content()
        assert Settings.embed_model.stats.embedded == 4  # three documents and the query
    finally:
        Settings._embed_model = saved


def test_llamaindex_fields_stay_at_defaults_and_point_to_embedpipe_options() -> None:
    with pytest.raises(ConfigurationError, match="cache="):
        EmbedPipeEmbedding(model="fake:8", cache=None, embeddings_cache=SimpleKVStore())
    with pytest.raises(ConfigurationError, match="batch_size="):
        EmbedPipeEmbedding(model="fake:8", cache=None, embed_batch_size=64)
    with pytest.raises(ConfigurationError, match="rpm="):
        EmbedPipeEmbedding(model="fake:8", cache=None, rate_limiter=TokenBucketRateLimiter(requests_per_minute=60))
    with pytest.raises(ConfigurationError, match="EmbedPipeTransform"):
        EmbedPipeEmbedding(model="fake:8", cache=None, errors="collect")
    with pytest.raises(ConfigurationError, match="not both"):
        EmbedPipeEmbedding(RecordingEmbedding(), model="fake:8", cache=None)

    embed = EmbedPipeEmbedding(model="fake:8", cache=None, rate_limiter="memory://?rpm=600")  # embedpipe's option
    assert embed.rate_limiter is None and embed.embeddings_cache is None and embed.embed_batch_size == 10
    assert embed.pipeline.rate_limiter is not None
    with pytest.raises(ConfigurationError, match="rpm="):
        embed.rate_limiter = TokenBucketRateLimiter(requests_per_minute=60)
    with pytest.raises(ConfigurationError, match="cache="):
        embed.embeddings_cache = SimpleKVStore()
    with pytest.raises(ConfigurationError, match="max_batch_tokens="):
        embed.embed_batch_size = 100
    embed.embed_batch_size = 10  # the default stays settable (LlamaIndex copies models field by field)
    embed.callback_manager = CallbackManager([])  # Settings does this


def test_to_dict_is_stable_and_secret_free_across_key_rotation() -> None:
    openai_embedding = pytest.importorskip("llama_index.embeddings.openai").OpenAIEmbedding
    key_a, key_b = "sk-proj-AAAAAAAAAAAAAAAAAAAAAAAA", "sk-proj-BBBBBBBBBBBBBBBBBBBBBBBB"
    a = EmbedPipeEmbedding(openai_embedding(api_key=key_a, dimensions=256), cache=None)
    b = EmbedPipeEmbedding(openai_embedding(api_key=key_b, dimensions=256), cache=None)
    c = EmbedPipeEmbedding(openai_embedding(api_key=key_a, dimensions=512), cache=None)
    assert a.to_dict() == b.to_dict() != c.to_dict()
    assert key_a not in a.to_json() and "api_key" not in a.to_json()
    assert a.to_dict()["wrapped"]["dimensions"] == 256

    node = [TextNode(text="hello")]
    assert get_transformation_hash(node, a) == get_transformation_hash(node, b)

    spec_a = EmbedPipeEmbedding(model="openai:text-embedding-3-small", api_key=key_a, cache=None)
    spec_b = EmbedPipeEmbedding(model="openai:text-embedding-3-small", api_key=key_b, cache=None)
    assert spec_a.to_dict() == spec_b.to_dict() and key_a not in spec_a.to_json()
    assert key_a not in repr(spec_a)

    fake = EmbedPipeEmbedding(model="fake:8", cache=None)
    before = fake.to_dict()
    fake.get_text_embedding_batch(["learns nothing that changes its dict"])
    assert fake.to_dict() == before
    assert EmbedPipeEmbedding.from_dict(before).to_dict() == before


def test_pickles_with_its_pipeline(tmp_path: Path) -> None:
    embed = EmbedPipeEmbedding(model="fake:16", cache=f"sqlite:///{tmp_path}/cache.db", tpm=100_000)
    vector = embed.get_text_embedding("pickled")
    clone = pickle.loads(pickle.dumps(embed))
    assert clone.to_dict() == embed.to_dict()
    assert clone.get_text_embedding("pickled") == vector
    assert clone.stats.hits == 1 and clone.stats.requests == 0  # the re-opened SQLite cache answered

    wrapped = EmbedPipeEmbedding(RecordingEmbedding(), cache="memory://")
    assert pickle.loads(pickle.dumps(wrapped)).get_query_embedding("q") == fake_vector("q", 64).tolist()


# -- EmbedPipeTransform ------------------------------------------------------------------------------------


async def test_failing_nodes_become_dead_letters_and_the_rest_is_stored(tmp_path: Path) -> None:
    poisoned = {(d, 2): "POISON" for d in (0, 2, 4, 6, 8)}
    docs = documents(10, 5, poisoned)
    inner = RecordingEmbedding(fail_on=("POISON",))
    transform = EmbedPipeTransform(inner, dead_letter=tmp_path / "dead.db", cache="memory://")
    pipeline = ingestion(transform)

    nodes = await pipeline.arun(documents=docs)

    assert len(nodes) == 45
    assert len(stored(pipeline)) == 45
    letters = transform.dead_letters
    assert len(letters) == 5
    assert {d.ref_id for d in letters} == {f"doc-{d}" for d in (0, 2, 4, 6, 8)}
    assert not {d.id for d in letters} & set(stored(pipeline))
    for letter in letters:
        assert "POISON" in letter.text and "POISON" in letter.reason
        assert inner.api_key not in letter.reason and "api_key=***" in letter.reason
        assert letter.attempts == 1 and letter.time > 0
    assert transform.counts == TransformCounts(embedded=45, cached=0, skipped=0, dead_lettered=5)

    # Documented: running again does not bring them back, the docstore already has their documents.
    await pipeline.arun(documents=docs)
    assert len(stored(pipeline)) == 45 and len(transform.dead_letters) == 5

    inner.fail_on = ()
    recovered = await transform.aretry_dead_letters(vector_store=pipeline.vector_store, docstore=pipeline.docstore)
    assert len(recovered) == 5 and transform.dead_letters == []
    assert len(stored(pipeline)) == 50
    assert {n.ref_doc_id for n in recovered} == {f"doc-{d}" for d in (0, 2, 4, 6, 8)}
    for node in recovered:
        assert node.embedding == fake_vector(node.get_content(metadata_mode=MetadataMode.EMBED), 64).tolist()


def test_sync_run_dead_letters_and_retry_drops_stale_letters(tmp_path: Path) -> None:
    docs = documents(3, 4, {(0, 1): "POISON", (1, 1): "POISON"})
    inner = RecordingEmbedding(fail_on=("POISON",))
    transform = EmbedPipeTransform(inner, dead_letter=f"sqlite:///{tmp_path}/dead.db", cache="memory://")
    pipeline = ingestion(transform)
    assert len(pipeline.run(documents=docs)) == 10
    assert len(transform.dead_letters) == 2

    # doc-0 is edited (its bad chunk removed) and ingested again: its old letter is now stale.
    fixed = [Document(text=docs[0].text.replace(" POISON", ""), doc_id="doc-0"), *docs[1:]]
    pipeline.run(documents=fixed)
    assert len(stored(pipeline)) == 11  # doc-0 complete again, doc-1 still without its bad chunk

    inner.fail_on = ()
    recovered = transform.retry_dead_letters(vector_store=pipeline.vector_store, docstore=pipeline.docstore)
    assert [n.ref_doc_id for n in recovered] == ["doc-1"]
    assert transform.dead_letters == [] and len(stored(pipeline)) == 12


def test_nodes_embedded_by_the_same_model_are_skipped() -> None:
    nodes = splitter().get_nodes_from_documents(documents(2, 3))
    hashes = [n.hash for n in nodes]
    transform = EmbedPipeTransform("fake:32", cache="memory://")

    out = transform(nodes)
    assert [n.hash for n in nodes] == hashes  # the inputs are untouched: the docstore's hashes stay valid
    assert all(n.metadata[EMBEDDING_MODEL_KEY] == "fake:32@32" for n in out)
    assert [n.get_content(metadata_mode=MetadataMode.EMBED) for n in out] == \
           [n.get_content(metadata_mode=MetadataMode.EMBED) for n in nodes]
    assert EMBEDDING_MODEL_KEY not in out[0].get_content(metadata_mode=MetadataMode.LLM)
    requests = transform.embed_model.stats.requests

    again = transform(out)
    assert transform.embed_model.stats.requests == requests
    assert [n.embedding for n in again] == [n.embedding for n in out]

    fresh = transform(splitter().get_nodes_from_documents(documents(2, 3)))  # same texts, no embeddings
    assert [n.embedding for n in fresh] == [n.embedding for n in out]
    assert transform.counts == TransformCounts(embedded=6, cached=6, skipped=6, dead_lettered=0)

    other = EmbedPipeTransform("fake:16", cache="memory://")
    assert all(len(n.embedding or []) == 16 for n in other(out))
    assert other.counts.embedded == 6 and other.counts.skipped == 0


def test_run_with_two_worker_processes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The pickled SentenceSplitter carries a tiktoken encoding, which the spawned workers
    # would download again on unpickling; offline, give them tiktoken's cache.
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(write_tiktoken_cache(tmp_path / "tiktoken")))
    docs = documents(4, 5)
    embed = EmbedPipeEmbedding(model="fake:64", cache=f"sqlite:///{tmp_path}/cache.db")
    pipeline = ingestion(EmbedPipeTransform(embed, dead_letter=tmp_path / "dead.db"))

    nodes = pipeline.run(documents=docs, num_workers=2)

    assert len(nodes) == 20 and len(stored(pipeline)) == 20
    for node in nodes:
        assert node.embedding == fake_vector(node.get_content(metadata_mode=MetadataMode.EMBED), 64).tolist()
    # The workers wrote through their re-opened copy of the SQLite cache.
    texts = [n.get_content(metadata_mode=MetadataMode.EMBED) for n in nodes]
    assert embed.pipeline.estimate(texts).cached == 20


# -- against the OpenAI-compatible test server ---------------------------------------------------------


@pytest.fixture(scope="module")
def openai_server() -> Iterator[OpenAITestServer]:
    # Until conftest provides a shared `openai_server` fixture.
    with running_server() as server:
        yield server


@pytest.mark.parametrize("how", ["wrapped", "spec"])
async def test_tpm_keeps_the_server_from_answering_429(openai_server: OpenAITestServer, how: str) -> None:
    openai_server.reset()
    # The server allows 1500 tokens per half second; the chunks total ~4800 tokens.
    openai_server.control.configure(rpm=None, tpm=1500, window=0.5)
    key = "sk-test-server-key-000000000000"
    limits: dict[str, Any] = {"tpm": 1400, "rate_limiter": "memory://?window=0.5", "cache": None}
    http = httpx.Client()  # the wrapped SDK's connections, closed below
    if how == "wrapped":
        from llama_index.embeddings.openai import OpenAIEmbedding

        inner = OpenAIEmbedding(model="text-embedding-3-small", api_base=openai_server.base_url, api_key=key,
                                http_client=http)
        embed = EmbedPipeEmbedding(inner, **limits)
    else:
        embed = EmbedPipeEmbedding(model="openai:text-embedding-3-small", base_url=openai_server.base_url,
                                   api_key=key, **limits)
    pipeline = ingestion(embed)

    nodes = await pipeline.arun(documents=documents(4, 10))

    assert len(stored(pipeline)) == 40
    for node in nodes[:5]:
        text = node.get_content(metadata_mode=MetadataMode.EMBED)
        assert node.embedding == pytest.approx(expected_vector(text, 1536).tolist(), abs=1e-6)
    ledger = openai_server.ledger
    assert ledger.requests_ok >= 4  # the limiter split the work into requests the bucket can hold
    assert ledger.responses_429 <= 1
    embed.close()
    http.close()


# -- the dead-letter store (embedpipe.deadletter) ------------------------------------------------------------


@pytest.mark.parametrize("kind", ["memory", "sqlite"])
def test_dead_letter_store_upserts_counts_attempts_and_redacts(kind: str, tmp_path: Path) -> None:
    store = dead_letter_store_from(None if kind == "memory" else f"sqlite:///{tmp_path}/d.db")
    assert isinstance(store, MemoryDeadLetterStore if kind == "memory" else SQLiteDeadLetterStore)
    store.add([DeadLetter(id="a", text="t1", reason="HTTP 400 with Authorization: Bearer abc.def", ref_id="doc",
                          metadata={"page": 3}, time=1.0),
               DeadLetter(id="b", text="t2", reason="boom", time=2.0)])
    store.add([DeadLetter(id="a", text="t1", reason="api_key=sk-live-123456789012 rejected", time=3.0)])
    letters = store.all()
    assert [d.id for d in letters] == ["b", "a"]
    a = store.get(["a"])[0]
    assert a.attempts == 2 and a.time == 3.0 and "sk-live" not in a.reason
    assert "abc.def" not in redact("Authorization: Bearer abc.def")
    assert redact("key XYZSECRET in url", ["XYZSECRET"]) == "key *** in url"
    clone = pickle.loads(pickle.dumps(store))
    assert [d.id for d in clone.all()] == ["b", "a"]
    store.remove(["a", "missing"])
    assert len(store) == 1
    store.close()
    with pytest.raises(ConfigurationError):
        dead_letter_store_from("redis://localhost/0")
