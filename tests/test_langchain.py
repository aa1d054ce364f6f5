"""The LangChain adapter with real LangChain objects: vector stores, CacheBackedEmbeddings, OpenAIEmbeddings.

Underlying models here are small real ``Embeddings`` that record what they were asked
to embed, so "zero underlying calls" is observed, not assumed.
"""

from __future__ import annotations

import asyncio
import threading
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from langchain_classic.embeddings import CacheBackedEmbeddings
from langchain_classic.storage import LocalFileStore
from langchain_core.documents import Document
from langchain_core.embeddings import DeterministicFakeEmbedding, Embeddings
from langchain_core.stores import InMemoryByteStore
from langchain_core.vectorstores import InMemoryVectorStore

from embedpipe import Stats, codec
from embedpipe.errors import ConfigurationError, EmbeddingFailedError
from langchain_embedpipe import ByteStoreCache, EmbedPipeByteStore, EmbedPipeEmbeddings, langchain_key_encoder
from tests.openai_server import OpenAITestServer, expected_vectors

TEXTS = ["alpha", "beta", "gamma", "alpha", "delta", "beta", "epsilon"]
UNIQUE = list(dict.fromkeys(TEXTS))


class Recording(Embeddings):
    """DeterministicFakeEmbedding's vectors, recording every call; it has no async methods of its own."""

    def __init__(self, size: int = 16, model: str = "recording-fake") -> None:
        self.fake = DeterministicFakeEmbedding(size=size)
        self.model = model
        self.dimensions = size
        self.document_calls: list[list[str]] = []
        self.query_calls: list[str] = []
        self.threads: set[str] = set()

    def embed_documents(self, texts: list[str]) -> list[list[float]]:
        self.document_calls.append(list(texts))
        self.threads.add(threading.current_thread().name)
        return self.fake.embed_documents(texts)

    def embed_query(self, text: str) -> list[float]:
        self.query_calls.append(text)
        return self.fake.embed_query(text)

    @property
    def embedded(self) -> list[str]:
        return [t for call in self.document_calls for t in call]


class AsyncRecording(Recording):
    """Native async methods that only return once two calls are in flight together."""

    def __init__(self, size: int = 16) -> None:
        super().__init__(size, model="async-recording-fake")
        self.in_flight = 0
        self.peak = 0
        self.together: asyncio.Event | None = None

    def embed_documents(self, texts: list[str]) -> list[list[float]]:
        raise AssertionError("the blocking method must not be used when an async one exists")

    async def aembed_documents(self, texts: list[str]) -> list[list[float]]:
        self.together = self.together or asyncio.Event()
        self.threads.add(threading.current_thread().name)
        self.in_flight += 1
        self.peak = max(self.peak, self.in_flight)
        if self.in_flight >= 2:
            self.together.set()
        # Returns only once another request is in flight: a sequential caller times out here.
        await asyncio.wait_for(self.together.wait(), 5)
        self.in_flight -= 1
        self.document_calls.append(list(texts))
        return self.fake.embed_documents(texts)


def fill_with_langchain(store: Any, texts: list[str], *, size: int = 16, **kwargs: Any) -> list[list[float]]:
    """Embed ``texts`` through LangChain's own CacheBackedEmbeddings into ``store``."""
    with warnings.catch_warnings():
        # LangChain warns (once per process) that its default SHA-1 key encoder is weak; that is
        # its own notice about the cache we are migrating from, not ours.
        warnings.filterwarnings("ignore", message="Using default key encoder", category=UserWarning)
        cached = CacheBackedEmbeddings.from_bytes_store(DeterministicFakeEmbedding(size=size), store, **kwargs)
    return cached.embed_documents(texts)


# ------------------------------------------------------------------ the one-line change
def test_vector_store_reingestion_is_free_and_duplicates_embed_once(cache_url: str) -> None:
    under = Recording()
    embeddings = EmbedPipeEmbeddings(under, cache=cache_url)
    docs = [Document(page_content=t, metadata={"i": i}) for i, t in enumerate(TEXTS)]

    InMemoryVectorStore.from_documents(docs, embeddings)
    assert sorted(under.embedded) == sorted(UNIQUE)
    assert embeddings.stats.deduped == len(TEXTS) - len(UNIQUE)

    calls = len(under.document_calls)
    store = InMemoryVectorStore.from_documents(docs, embeddings)
    assert len(under.document_calls) == calls
    assert embeddings.stats.hits == len(UNIQUE)

    found = store.similarity_search("gamma", k=1)
    assert found[0].page_content == "gamma"
    embeddings.close()


def test_a_second_instance_reads_the_sqlite_cache_of_the_first(tmp_path: Path, local_provider: Any) -> None:
    url = f"sqlite:///{tmp_path}/rag.db"
    first = EmbedPipeEmbeddings(model=local_provider, cache=url)
    vectors = first.embed_documents(UNIQUE)
    first.close()
    second = EmbedPipeEmbeddings(model=local_provider, cache=url)
    assert np.allclose(second.embed_documents(UNIQUE), vectors)
    stats = second.stats
    assert (stats.hits, stats.embedded, stats.requests) == (len(UNIQUE), 0, 0)
    second.close()


def test_queries_are_cached_unless_turned_off() -> None:
    under = Recording()
    embeddings = EmbedPipeEmbeddings(under, cache="memory://")
    assert embeddings.embed_query("what is alpha?") == embeddings.embed_query("what is alpha?")
    assert under.query_calls == ["what is alpha?"]

    under = Recording()
    uncached = EmbedPipeEmbeddings(under, cache="memory://", cache_queries=False)
    uncached.embed_query("what is alpha?")
    uncached.embed_query("what is alpha?")
    assert under.query_calls == ["what is alpha?"] * 2
    assert uncached.stats.hits == 0


def test_stats_are_the_cores() -> None:
    embeddings = EmbedPipeEmbeddings(Recording(), cache="memory://")
    embeddings.embed_documents(TEXTS)
    stats = embeddings.stats
    assert isinstance(stats, Stats)
    assert stats == embeddings.pipeline.stats
    assert stats.embedded == len(UNIQUE)


# ------------------------------------------------------------------ async
async def test_async_uses_the_models_own_async_methods_concurrently() -> None:
    under = AsyncRecording()
    embeddings = EmbedPipeEmbeddings(under, cache=None, batch_size=2, max_concurrency=4)
    vectors = await embeddings.aembed_documents(UNIQUE)
    assert np.allclose(vectors, DeterministicFakeEmbedding(size=16).embed_documents(UNIQUE), atol=1e-6)
    assert under.peak >= 2
    # Awaited on embedpipe's loop, never pushed to an executor thread.
    assert under.threads == {"embedpipe-loop"}


async def test_a_model_without_async_methods_runs_in_a_worker_thread() -> None:
    under = Recording()
    embeddings = EmbedPipeEmbeddings(under, cache="memory://")
    assert await embeddings.aembed_documents(["alpha", "beta"]) == embeddings.embed_documents(["alpha", "beta"])
    assert np.allclose(await embeddings.aembed_query("alpha"), DeterministicFakeEmbedding(size=16).embed_query("alpha"),
                       atol=1e-6)
    assert len(under.document_calls) == 1
    assert "embedpipe-loop" not in under.threads


async def test_concurrent_async_queries_share_one_cache() -> None:
    under = Recording()
    embeddings = EmbedPipeEmbeddings(under, cache="memory://")
    await asyncio.gather(*(embeddings.aembed_query(q) for q in ["q1", "q2", "q3"]))
    await asyncio.gather(*(embeddings.aembed_query(q) for q in ["q1", "q2", "q3"]))
    assert sorted(under.query_calls) == ["q1", "q2", "q3"]


# ------------------------------------------------------------------ CacheBackedEmbeddings compatibility
def test_migration_from_a_local_file_store_filled_by_cache_backed_embeddings(tmp_path: Path) -> None:
    store = LocalFileStore(tmp_path / "langchain-cache")
    theirs = fill_with_langchain(store, UNIQUE, namespace="fake-16")

    under = Recording()
    embeddings = EmbedPipeEmbeddings.from_bytes_store(under, store, namespace="fake-16")
    ours = embeddings.embed_documents(TEXTS)

    assert under.document_calls == []
    assert embeddings.stats.hits == len(UNIQUE)
    by_text = dict(zip(UNIQUE, theirs, strict=True))
    assert np.allclose(ours, [by_text[t] for t in TEXTS], atol=1e-6)

    # A new text is written under LangChain's key, in embedpipe's compact format.
    embeddings.embed_documents(["zeta"])
    key = langchain_key_encoder("fake-16", "sha1")("zeta")
    (raw,) = store.mget([key])
    assert raw is not None and raw[:2] == codec.MAGIC
    assert len(raw) == codec.HEADER_SIZE + 4 * 16


@pytest.mark.parametrize("encoder", ["sha1", "blake2b", "sha256", "sha512", "callable"])
def test_keys_are_langchains(encoder: str) -> None:
    key_encoder: Any = (lambda text: f"custom/{len(text)}/{text}") if encoder == "callable" else encoder
    namespace = "" if encoder == "callable" else "ns/"
    store = InMemoryByteStore()
    fill_with_langchain(store, UNIQUE, namespace=namespace, key_encoder=key_encoder)
    encode = langchain_key_encoder(namespace, key_encoder)
    assert sorted(store.yield_keys()) == sorted(encode(t) for t in UNIQUE)

    under = Recording()
    embeddings = EmbedPipeEmbeddings.from_bytes_store(under, store, namespace=namespace, key_encoder=key_encoder)
    embeddings.embed_documents(UNIQUE)
    assert under.document_calls == []


def test_empty_namespace_warns_and_still_migrates() -> None:
    store = InMemoryByteStore()
    fill_with_langchain(store, UNIQUE)
    under = Recording()
    with pytest.warns(UserWarning, match="nothing in the cache key names the embedding model"):
        embeddings = EmbedPipeEmbeddings.from_bytes_store(under, store)
    embeddings.embed_documents(UNIQUE)
    assert under.document_calls == []


def test_a_legacy_entry_of_other_dimensions_is_re_embedded() -> None:
    store = InMemoryByteStore()
    fill_with_langchain(store, UNIQUE, size=8, namespace="shared")
    under = Recording(size=16)
    embeddings = EmbedPipeEmbeddings.from_bytes_store(under, store, namespace="shared")
    vectors = embeddings.embed_documents(UNIQUE)
    assert sorted(under.embedded) == sorted(UNIQUE)
    assert {len(v) for v in vectors} == {16}
    assert embeddings.stats.hits == 0


def test_langchain_value_format_is_read_by_cache_backed_embeddings(tmp_path: Path) -> None:
    store = LocalFileStore(tmp_path / "two-way")
    ours = EmbedPipeEmbeddings.from_bytes_store(Recording(), store, namespace="fake-16", value_format="langchain")
    vectors = ours.embed_documents(UNIQUE)

    theirs = CacheBackedEmbeddings.from_bytes_store(Recording(), store, namespace="fake-16", key_encoder="sha256")
    assert theirs.document_embedding_store.mget(UNIQUE) == [None] * len(UNIQUE)  # other key encoder, other keys
    under = Recording()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Using default key encoder", category=UserWarning)
        theirs = CacheBackedEmbeddings.from_bytes_store(under, store, namespace="fake-16")
    assert np.allclose(theirs.embed_documents(UNIQUE), vectors, atol=1e-6)
    assert under.document_calls == []


def test_query_embedding_cache_keeps_langchains_meaning() -> None:
    docs, queries = InMemoryByteStore(), InMemoryByteStore()
    key = langchain_key_encoder("q/", "sha256")

    under = Recording()
    off = EmbedPipeEmbeddings.from_bytes_store(under, docs, namespace="q/", key_encoder="sha256")
    off.embed_query("alpha")
    off.embed_query("alpha")
    assert under.query_calls == ["alpha", "alpha"]
    assert list(docs.yield_keys()) == []

    # True: the document store, under the document's key (a cached document answers the query).
    under = Recording()
    same = EmbedPipeEmbeddings.from_bytes_store(under, docs, namespace="q/", key_encoder="sha256",
                                                query_embedding_cache=True)
    same.embed_documents(["alpha"])
    same.embed_query("alpha")
    same.embed_query("beta")
    same.embed_query("beta")
    assert under.query_calls == ["beta"]
    assert sorted(docs.yield_keys()) == sorted([key("alpha"), key("beta")])

    # A ByteStore: queries there, documents in theirs.
    under = Recording()
    apart = EmbedPipeEmbeddings.from_bytes_store(under, docs, namespace="q/", key_encoder="sha256",
                                                 query_embedding_cache=queries)
    apart.embed_query("gamma")
    apart.embed_query("gamma")
    apart.embed_documents(["delta"])
    assert under.query_calls == ["gamma"]
    assert list(queries.yield_keys()) == [key("gamma")]
    assert key("gamma") not in set(docs.yield_keys())
    assert key("delta") in set(docs.yield_keys())


def test_batch_size_bounds_the_texts_between_store_writes() -> None:
    class CountingStore(InMemoryByteStore):
        def __init__(self) -> None:
            super().__init__()
            self.writes: list[int] = []

        def mset(self, key_value_pairs: Any) -> None:
            self.writes.append(len(key_value_pairs))
            super().mset(key_value_pairs)

    store = CountingStore()
    under = Recording()
    embeddings = EmbedPipeEmbeddings.from_bytes_store(under, store, namespace="b/", batch_size=2, max_concurrency=1)
    embeddings.embed_documents(UNIQUE)
    assert sum(store.writes) == len(UNIQUE)
    assert max(store.writes) <= 2
    assert max(len(c) for c in under.document_calls) <= 2
    # It never enlarges the model's own batch size.
    big = EmbedPipeEmbeddings.from_bytes_store(Recording(), store, namespace="b/", batch_size=100_000)
    assert big.pipeline.batch_size == embeddings.pipeline.provider.default_batch_size


def test_from_bytes_store_rejects_what_langchain_rejects() -> None:
    with pytest.raises(ConfigurationError, match="custom key_encoder"):
        EmbedPipeEmbeddings.from_bytes_store(Recording(), InMemoryByteStore(), namespace="x", key_encoder=str.upper)
    with pytest.raises(ConfigurationError, match="key_encoder='md5'"):
        EmbedPipeEmbeddings.from_bytes_store(Recording(), InMemoryByteStore(), namespace="x",
                                             key_encoder="md5")  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="value_format"):
        EmbedPipeEmbeddings.from_bytes_store(Recording(), InMemoryByteStore(), namespace="x",
                                             value_format="pickle")  # type: ignore[arg-type]


def test_a_foreign_value_in_the_store_is_re_embedded() -> None:
    store = InMemoryByteStore()
    key = langchain_key_encoder("f/", "sha1")
    store.mset([(key("alpha"), b"not json"), (key("beta"), b'{"a": 1}')])
    under = Recording()
    embeddings = EmbedPipeEmbeddings.from_bytes_store(under, store, namespace="f/")
    embeddings.embed_documents(["alpha", "beta"])
    assert sorted(under.embedded) == ["alpha", "beta"]
    assert embeddings.stats.corrupt == 2


def test_byte_store_cache_clear_keeps_other_namespaces() -> None:
    store = InMemoryByteStore()
    fill_with_langchain(store, ["alpha"], namespace="other/")
    cache = ByteStoreCache(store, namespace="mine/")
    EmbedPipeEmbeddings(Recording(), cache=cache).embed_documents(["alpha", "beta"])
    assert len(list(store.yield_keys(prefix="mine/"))) == 2
    cache.clear()
    assert list(store.yield_keys()) == [langchain_key_encoder("other/")("alpha")]


# ------------------------------------------------------------------ EmbedPipeByteStore under LangChain's classes
def test_langchains_cache_backed_embeddings_on_an_embedpipe_cache(cache_url: str) -> None:
    store = EmbedPipeByteStore(cache_url)
    under = Recording()
    cached = CacheBackedEmbeddings.from_bytes_store(under, store, namespace="lc/", key_encoder="sha256")
    first = cached.embed_documents(UNIQUE)
    assert cached.embed_documents(UNIQUE) == first
    assert len(under.document_calls) == 1
    assert sorted(store.yield_keys(prefix="lc/")) == sorted(langchain_key_encoder("lc/", "sha256")(t) for t in UNIQUE)
    store.close()


# ------------------------------------------------------------------ OpenAI, real SDKs against the test server
@pytest.fixture
def server(openai_server: OpenAITestServer) -> OpenAITestServer:
    """conftest's fresh test server."""
    return openai_server


@pytest.fixture
def openai_embeddings(server: OpenAITestServer) -> Iterator[Any]:
    """A factory of LangChain OpenAIEmbeddings on the test server, their connections closed afterwards."""
    from langchain_openai import OpenAIEmbeddings

    from embedpipe import _runner

    made: list[OpenAIEmbeddings] = []

    def make(**kwargs: Any) -> OpenAIEmbeddings:
        made.append(OpenAIEmbeddings(model="text-embedding-3-small", base_url=server.base_url, api_key="test",
                                     **kwargs))
        return made[-1]

    yield make
    for lc in made:
        # Its async pool opened its connections on embedpipe's loop, so it closes there; left to
        # the garbage collector, they would end as ResourceWarnings.
        _runner.run_sync(lc.async_client._client.close())
        lc.client._client.close()


@pytest.fixture
def offline_tiktoken(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """tiktoken's cache files, so LangChain's own tokenizer call works without a download."""
    from embedpipe.tokens import write_tiktoken_cache

    directory = write_tiktoken_cache(tmp_path_factory.mktemp("tiktoken"))
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(directory))


async def _no_sleep(seconds: float) -> None:
    _no_sleep.waits.append(seconds)  # type: ignore[attr-defined]


_no_sleep.waits = []  # type: ignore[attr-defined]


@pytest.mark.usefixtures("offline_tiktoken")
@pytest.mark.parametrize("check_ctx", [True, False], ids=["token-ids", "raw-text"])
def test_wrapping_langchains_openai_embeddings(server: OpenAITestServer, openai_embeddings: Any,
                                               check_ctx: bool) -> None:
    lc = openai_embeddings(check_embedding_ctx_length=check_ctx)
    embeddings = EmbedPipeEmbeddings(lc, cache="memory://")
    vectors = embeddings.embed_documents(TEXTS)
    expected = expected_vectors(TEXTS, 1536)
    assert np.allclose(vectors, expected, atol=1e-6)
    assert dict(server.ledger.times_billed) == dict.fromkeys(UNIQUE, 1)

    requests = server.ledger.requests_total
    assert np.allclose(embeddings.embed_documents(TEXTS), expected, atol=1e-6)
    assert server.ledger.requests_total == requests
    stats = embeddings.stats
    assert stats.tokens > 0 and stats.cost_usd and stats.cost_usd > 0  # the model's price is known
    assert stats.saved_usd and stats.saved_usd > 0


@pytest.mark.parametrize("how", ["sync", "async"])
def test_hits_on_entries_cache_backed_embeddings_wrote_count_as_saved(
        server: OpenAITestServer, openai_embeddings: Any, tmp_path: Path, how: str) -> None:
    """LangChain's JSON entries carry no token count: the texts are counted, so saved_usd is right."""
    from embedpipe.tokens import TiktokenTokenizer

    store = LocalFileStore(tmp_path / "langchain-cache")
    theirs = CacheBackedEmbeddings.from_bytes_store(openai_embeddings(check_embedding_ctx_length=False), store,
                                                    namespace="te3s/", key_encoder="sha256")
    theirs.embed_documents(UNIQUE)
    requests = server.ledger.requests_total

    ours = EmbedPipeEmbeddings.from_bytes_store(openai_embeddings(), store, namespace="te3s/", key_encoder="sha256")
    vectors = ours.embed_documents(TEXTS) if how == "sync" else asyncio.run(ours.aembed_documents(TEXTS))
    assert server.ledger.requests_total == requests  # every text a hit
    assert np.allclose(vectors, expected_vectors(TEXTS, 1536), atol=1e-6)
    tokens = sum(TiktokenTokenizer.for_encoding("cl100k_base").count(UNIQUE))
    assert ours.stats.hits == len(UNIQUE)
    assert ours.stats.saved_usd == pytest.approx(tokens * 0.02 / 1e6)
    assert ours.pipeline.cache._pending == {}  # type: ignore[union-attr]  # nothing held after the lookups


def test_wrapped_openai_embeddings_do_not_retry_on_their_own(server: OpenAITestServer, openai_embeddings: Any) -> None:
    lc = openai_embeddings(check_embedding_ctx_length=False, max_retries=5)
    embeddings = EmbedPipeEmbeddings(lc, cache=None, max_retries=0)
    assert lc.max_retries == 0
    assert lc.client._client.max_retries == 0
    assert lc.async_client._client.max_retries == 0

    server.control.fail_next("unavailable", times=1)
    with pytest.raises(EmbeddingFailedError, match="503"):
        embeddings.embed_documents(["alpha"])
    assert server.ledger.requests_total == 1  # the SDK's own retry would have sent a second

    # Retries are embedpipe's, with its injected sleep: one failure, one retry.
    _no_sleep.waits.clear()  # type: ignore[attr-defined]
    retrying = EmbedPipeEmbeddings(lc, cache=None, max_retries=2, sleep=_no_sleep)
    server.control.fail_next("unavailable", times=1)
    assert np.allclose(retrying.embed_documents(["alpha"]), expected_vectors(["alpha"], 1536), atol=1e-6)
    assert retrying.stats.retries == 1
    assert len(_no_sleep.waits) == 1  # type: ignore[attr-defined]
    assert server.ledger.requests_total == 3


def test_core_openai_provider_with_options(server: OpenAITestServer) -> None:
    embeddings = EmbedPipeEmbeddings(model="openai:text-embedding-3-small", base_url=server.base_url,
                                     api_key="test", cache="memory://", dimensions=256, rpm=1000, tpm=1_000_000,
                                     max_concurrency=2, budget_usd=1.0)
    assert embeddings.model == "openai:text-embedding-3-small"
    vectors = embeddings.embed_documents(TEXTS)
    assert np.allclose(vectors, expected_vectors(TEXTS, 256), atol=1e-6)
    assert embeddings.embed_query("alpha") == embeddings.embed_query("alpha")
    stats = embeddings.stats
    # One request: OpenAI embeds queries and documents alike, so the query is the document's hit.
    assert (stats.requests, stats.hits) == (1, 2)
    assert stats.cost_usd is not None and 0 < stats.cost_usd < 1.0
    assert embeddings.pipeline.rate_limiter is not None


# ------------------------------------------------------------------ construction
def test_construction_errors() -> None:
    with pytest.raises(ConfigurationError, match="exactly one"):
        EmbedPipeEmbeddings()
    with pytest.raises(ConfigurationError, match="exactly one"):
        EmbedPipeEmbeddings(Recording(), model="fake:8")
    with pytest.raises(ConfigurationError, match="errors='raise'"):
        EmbedPipeEmbeddings(Recording(), errors="collect")
    with pytest.raises(ConfigurationError, match="already embeds through embedpipe"):
        EmbedPipeEmbeddings(EmbedPipeEmbeddings(model="fake:8", cache=None))
    with pytest.raises(ConfigurationError, match="LangChain Embeddings"):
        EmbedPipeEmbeddings(object())  # type: ignore[arg-type]


def test_a_spec_may_be_given_positionally_and_the_class_is_a_context_manager() -> None:
    with EmbedPipeEmbeddings("fake:8", cache="memory://") as embeddings:
        assert len(embeddings.embed_query("hello")) == 8
    with pytest.raises(RuntimeError, match="closed"):
        embeddings.embed_query("hello")


def test_a_nameless_model_warns_unless_a_namespace_names_it() -> None:
    class Nameless(Embeddings):
        def embed_documents(self, texts: list[str]) -> list[list[float]]:
            return [[1.0, 0.0] for _ in texts]

        def embed_query(self, text: str) -> list[float]:
            return [1.0, 0.0]

    EmbedPipeEmbeddings(Nameless(), cache=None)  # nothing is cached: nothing to tell apart
    EmbedPipeEmbeddings(Nameless(), cache="memory://", namespace="nameless-v1")
    with pytest.warns(UserWarning, match="pass namespace="):
        EmbedPipeEmbeddings(Nameless(), cache="memory://")


# ------------------------------------------------------------------ the example
def test_the_rag_example_hits_the_cache_on_its_second_run(tmp_path: Path, local_provider: Any) -> None:
    import importlib.util

    spec = importlib.util.spec_from_file_location("langchain_rag", Path(__file__).parent.parent / "examples" /
                                                  "langchain_rag.py")
    assert spec is not None and spec.loader is not None
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    url = f"sqlite:///{tmp_path}/rag.db"

    answers, first = example.ingest(url, local_provider)
    assert first.embedded > 0 and first.deduped == 3 and first.hits == 0
    assert answers[0].page_content.startswith("A semaphore")
    answers, second = example.ingest(url, local_provider)
    assert (second.embedded, second.requests, second.hits) == (0, 0, first.embedded)
    text = example.report(answers, second)
    assert f"cache hits: {first.embedded}" in text and "cost: $0.000000" in text


def test_from_bytes_store_takes_no_second_cache() -> None:
    with pytest.raises(ConfigurationError, match="pass no cache="):
        EmbedPipeEmbeddings.from_bytes_store(Recording(), InMemoryByteStore(), namespace="x", cache="memory://")
