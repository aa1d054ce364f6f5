"""LangChain's own standard suites (langchain-tests) run against the adapter's classes.

``EmbedPipeEmbeddings`` on a wrapped fake, on the real local model and on the OpenAI
provider against the fault-injecting test server; ``EmbedPipeByteStore`` on memory,
SQLite and Redis. The suites build one object per test and never close it.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from langchain_core.embeddings import DeterministicFakeEmbedding
from langchain_tests.integration_tests import BaseStoreAsyncTests, BaseStoreSyncTests, EmbeddingsIntegrationTests
from langchain_tests.unit_tests import EmbeddingsUnitTests

from langchain_embedpipe import EmbedPipeByteStore, EmbedPipeEmbeddings
from tests.openai_server import OpenAITestServer


# ------------------------------------------------------------------ EmbedPipeEmbeddings
class _WrappedFake:
    @property
    def embeddings_class(self) -> type[EmbedPipeEmbeddings]:
        return EmbedPipeEmbeddings

    @property
    def embedding_model_params(self) -> dict[str, Any]:
        return {"underlying": DeterministicFakeEmbedding(size=16), "cache": "memory://",
                "namespace": "deterministic-fake-16"}


class TestWrappedFakeUnit(_WrappedFake, EmbeddingsUnitTests):
    pass


class TestWrappedFakeIntegration(_WrappedFake, EmbeddingsIntegrationTests):
    pass


class _LocalModel:
    """The real all-MiniLM-L6-v2, shared with the session's ``local_provider`` (it loads once)."""

    provider: Any = None

    @pytest.fixture(autouse=True)
    def _share_provider(self, local_provider: Any) -> None:
        type(self).provider = local_provider

    @property
    def embeddings_class(self) -> type[EmbedPipeEmbeddings]:
        return EmbedPipeEmbeddings

    @property
    def embedding_model_params(self) -> dict[str, Any]:
        return {"model": self.provider, "cache": "memory://"}


class TestLocalModelUnit(_LocalModel, EmbeddingsUnitTests):
    pass


class TestLocalModelIntegration(_LocalModel, EmbeddingsIntegrationTests):
    pass


class _OpenAIProvider:
    """``model="openai:text-embedding-3-small"`` against the test server (conftest's, fresh per test)."""

    base_url = ""

    @pytest.fixture(autouse=True)
    def _use_server(self, openai_server: OpenAITestServer) -> None:
        type(self).base_url = openai_server.base_url

    @property
    def embeddings_class(self) -> type[EmbedPipeEmbeddings]:
        return EmbedPipeEmbeddings

    @property
    def embedding_model_params(self) -> dict[str, Any]:
        return {"model": "openai:text-embedding-3-small", "base_url": self.base_url, "api_key": "test",
                "cache": "memory://"}


class TestOpenAIProviderUnit(_OpenAIProvider, EmbeddingsUnitTests):
    @property
    def init_from_env_params(self) -> tuple[dict[str, str], dict[str, Any], dict[str, Any]]:
        # The official endpoint needs a key: OPENAI_API_KEY alone must satisfy it.
        return ({"OPENAI_API_KEY": "sk-from-env"},
                {"model": "openai:text-embedding-3-small", "cache": "memory://"},
                {"model": "openai:text-embedding-3-small"})


class TestOpenAIProviderIntegration(_OpenAIProvider, EmbeddingsIntegrationTests):
    pass


# ------------------------------------------------------------------ EmbedPipeByteStore
@pytest.fixture
def byte_store(cache_url: str) -> Iterator[EmbedPipeByteStore]:
    """An empty store over each backend (memory, a fresh SQLite file, a fresh Redis namespace)."""
    store = EmbedPipeByteStore(cache_url)
    yield store
    store.close()


class _ByteStoreFixtures:
    """The two fixtures LangChain's store suites ask for, shared by the sync and async suites."""

    @pytest.fixture
    def kv_store(self, byte_store: EmbedPipeByteStore) -> EmbedPipeByteStore:
        return byte_store

    @pytest.fixture
    def three_values(self) -> tuple[bytes, bytes, bytes]:
        return b"foo", b"bar", b"\x00buzz\xff"


class TestByteStoreSync(_ByteStoreFixtures, BaseStoreSyncTests[bytes]):
    pass


class TestByteStoreAsync(_ByteStoreFixtures, BaseStoreAsyncTests[bytes]):
    pass
