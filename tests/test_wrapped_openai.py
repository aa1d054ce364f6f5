"""Wrapped OpenAI classes of LangChain and LlamaIndex get what ``openai:<model>`` gets, offline.

Real ``OpenAIEmbeddings``/``AzureOpenAIEmbeddings`` (LangChain) and ``OpenAIEmbedding``
(LlamaIndex; ``AzureOpenAIEmbedding`` where installed) against the test server, with every
host but 127.0.0.1 unreachable and tiktoken's cache empty, as on a machine offline.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import tiktoken
import tiktoken.registry
from langchain_core.embeddings import Embeddings

from embedpipe import _runner
from embedpipe.errors import BudgetExceededError, EmbeddingFailedError
from embedpipe.providers.framework import FrameworkProvider, classify_exception
from embedpipe.tokens import TiktokenTokenizer
from langchain_embedpipe import EmbedPipeEmbeddings
from llamaindex_embedpipe import EmbedPipeEmbedding
from tests.openai_server import OpenAITestServer, expected_vector

MODEL = "text-embedding-3-small"
PRICE = 0.02  # USD per 1M tokens, embedpipe.cost.OPENAI_MODELS
CL100K = TiktokenTokenizer.for_encoding("cl100k_base")
# About 50,000 tokens: six times the model's 8,191-token limit.
LONG_TEXT = " ".join(f"word{i % 97}" for i in range(25_000))
TIKTOKEN_HOST = "openaipublic.blob.core.windows.net"


async def no_sleep(seconds: float) -> None:
    return None


@pytest.fixture
def offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every host but 127.0.0.1 unreachable (a proxy on a closed port); tiktoken with nothing cached."""
    for name in ("HTTPS_PROXY", "HTTP_PROXY", "ALL_PROXY", "https_proxy", "http_proxy", "all_proxy"):
        monkeypatch.setenv(name, "http://127.0.0.1:9")
    for name in ("NO_PROXY", "no_proxy"):
        monkeypatch.setenv(name, "127.0.0.1,localhost")
    empty = tmp_path / "tiktoken-cache"
    empty.mkdir()
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(empty))
    # A fresh process has loaded no encoding yet; one loaded by an earlier test would hide the download.
    monkeypatch.setattr(tiktoken.registry, "ENCODINGS", {})


Wrapper = Callable[..., Any]


@pytest.fixture
def wrapped(openai_server: OpenAITestServer, offline: None, request: pytest.FixtureRequest) -> Iterator[Wrapper]:
    """A factory: ``wrapped(**pipeline_options)`` wraps one real framework class (the param) on the server."""
    kind: str = request.param
    http = httpx.Client()
    made: list[Any] = []

    def make(**options: Any) -> Any:
        options.setdefault("cache", None)
        options.setdefault("sleep", no_sleep)
        server = openai_server
        if kind == "langchain-openai":
            from langchain_openai import OpenAIEmbeddings

            inner: Any = OpenAIEmbeddings(model=MODEL, base_url=server.base_url, api_key="sk-test")
        elif kind == "langchain-azure":
            from langchain_openai import AzureOpenAIEmbeddings

            inner = AzureOpenAIEmbeddings(model=MODEL, azure_endpoint=server.url, azure_deployment="emb",
                                          api_version="2024-02-01", api_key="sk-test")
        elif kind == "llamaindex-openai":
            from llama_index.embeddings.openai import OpenAIEmbedding

            inner = OpenAIEmbedding(model=MODEL, api_base=server.base_url, api_key="sk-test", http_client=http)
        else:
            azure = pytest.importorskip("llama_index.embeddings.azure_openai")
            inner = azure.AzureOpenAIEmbedding(model=MODEL, azure_endpoint=server.url, azure_deployment="emb",
                                               api_version="2024-02-01", api_key="sk-test", http_client=http)
        made.append(inner)
        if kind.startswith("langchain"):
            return EmbedPipeEmbeddings(inner, **options)
        return EmbedPipeEmbedding(inner, **options)

    yield make
    for inner in made:
        if hasattr(inner, "async_client"):  # LangChain's: its async pool opened on embedpipe's loop
            _runner.run_sync(inner.async_client._client.close())
            inner.client._client.close()
    http.close()


def embed(wrapper: Any, texts: list[str]) -> list[list[float]]:
    if isinstance(wrapper, EmbedPipeEmbeddings):
        return wrapper.embed_documents(texts)
    return list(wrapper.get_text_embedding_batch(texts))


KINDS = pytest.mark.parametrize(
    "wrapped", ["langchain-openai", "langchain-azure", "llamaindex-openai", "llamaindex-azure"], indirect=True)


@KINDS
def test_price_input_limit_and_dimensions_are_known(wrapped: Wrapper, openai_server: OpenAITestServer) -> None:
    wrapper = wrapped()
    provider = wrapper.pipeline.provider
    assert isinstance(provider, FrameworkProvider)
    assert (provider.price_per_1m_tokens, provider.max_input_tokens) == (PRICE, 8191)
    # Azure's model name labels a deployment, which decides the width: learned from the first answer.
    assert provider.dimensions == (None if "azure" in provider.class_path.lower() else 1536)
    texts = ["alpha", "beta gamma", "delta"]
    vectors = embed(wrapper, texts)
    # Learned in the pipeline, never written onto the provider.
    assert wrapper.pipeline.expected_dims == 1536
    np.testing.assert_allclose(vectors, [expected_vector(t, 1536) for t in texts], atol=1e-6)
    billed = openai_server.ledger.billed_tokens
    assert billed == sum(CL100K.count(texts))
    assert wrapper.stats.cost_usd == pytest.approx(billed * PRICE / 1e6)
    assert wrapper.stats.retries == 0


@KINDS
def test_budget_is_enforced_before_any_request(wrapped: Wrapper, openai_server: OpenAITestServer) -> None:
    wrapper = wrapped(budget_usd=1e-7)  # five tokens' worth
    with pytest.raises(BudgetExceededError):
        embed(wrapper, ["a text of well over five tokens, which the budget cannot pay for"])
    assert openai_server.ledger.requests_total == 0
    assert embed(wrapper, ["ok"])  # one token fits


@KINDS
def test_a_50000_token_text_is_split_not_sent_whole(wrapped: Wrapper, openai_server: OpenAITestServer) -> None:
    wrapper = wrapped(budget_usd=1.0)
    vectors = embed(wrapper, ["short", LONG_TEXT])
    assert len(vectors) == 2 and len(vectors[1]) == 1536
    assert wrapper.stats.split == 1
    ledger = openai_server.ledger
    assert ledger.status_counts.get(400, 0) == 0
    window_tokens = [ledger.tokens_billed[t] // n for t, n in ledger.times_billed.items()]
    assert max(window_tokens) <= 8191 and len(ledger.times_billed) >= 1 + 6
    assert ledger.billed_tokens == pytest.approx(CL100K.count([LONG_TEXT])[0] + 1, abs=20)
    # The mean of its windows, weighted by their tokens, as the core averages any split text.
    windows = CL100K.split(LONG_TEXT, 8191)
    mean = sum(n * expected_vector(w, 1536) for w, n in windows)
    np.testing.assert_allclose(vectors[1], mean / np.linalg.norm(mean), atol=1e-5)


@pytest.mark.parametrize("wrapped", ["langchain-openai"], indirect=True)
def test_langchains_length_check_is_embedpipes_own_offline(wrapped: Wrapper, openai_server: OpenAITestServer) -> None:
    from langchain_openai import OpenAIEmbeddings

    inner = OpenAIEmbeddings(model=MODEL, base_url=openai_server.base_url, api_key="sk-test", embedding_ctx_length=100)
    try:
        wrapper = EmbedPipeEmbeddings(inner, cache=None, sleep=no_sleep)
        # LangChain would tokenise with tiktoken, which downloads; embedpipe splits at its limit instead.
        assert inner.check_embedding_ctx_length is False
        assert wrapper.pipeline.provider.max_input_tokens == 100
        text = " ".join(f"w{i}" for i in range(150))
        assert CL100K.count([text])[0] > 200
        assert len(wrapper.embed_documents([text])[0]) == 1536
        assert wrapper.stats.retries == 0 and wrapper.stats.split == 1
        assert max(openai_server.ledger.tokens_billed.values()) <= 100
        # Wrapped again (its check now off), it keeps its limit.
        assert EmbedPipeEmbeddings(inner, cache=None).pipeline.provider.max_input_tokens == 100
    finally:
        _runner.run_sync(inner.async_client._client.close())
        inner.client._client.close()


class TokenCountingEmbeddings(Embeddings):
    """A LangChain model of the kind users write: counts tokens with tiktoken, then calls its API."""

    def __init__(self, base_url: str, fail_with: Callable[[], object]) -> None:
        self.model = "counting-model"
        self.base_url = base_url
        self.fail_with = fail_with
        self.calls = 0

    def embed_documents(self, texts: list[str]) -> list[list[float]]:
        self.calls += 1
        self.fail_with()
        return [[1.0, 0.0] for _ in texts]

    def embed_query(self, text: str) -> list[float]:
        return self.embed_documents([text])[0]


@pytest.mark.usefixtures("offline")
def test_a_download_from_a_host_that_is_not_the_api_is_not_retried(openai_server: OpenAITestServer) -> None:
    model = TokenCountingEmbeddings(openai_server.base_url, lambda: tiktoken.get_encoding("cl100k_base"))
    wrapper = EmbedPipeEmbeddings(model, cache=None, max_retries=6, sleep=no_sleep)
    with pytest.raises(EmbeddingFailedError) as caught:
        wrapper.embed_documents(["one", "two", "three", "four"])
    assert model.calls == 1  # neither retried nor split to find a bad input
    assert wrapper.stats.retries == 0
    reason = str(caught.value.failures[0])
    assert TIKTOKEN_HOST in reason and "not retried" in reason
    assert sorted(caught.value.failures) == [0, 1, 2, 3]


def test_an_import_error_is_not_retried_nor_blamed_on_an_input(openai_server: OpenAITestServer) -> None:
    model = TokenCountingEmbeddings(openai_server.base_url,
                                    lambda: importlib.import_module("embedpipe_test_missing_dependency"))
    wrapper = EmbedPipeEmbeddings(model, cache=None, max_retries=6, sleep=no_sleep)
    with pytest.raises(EmbeddingFailedError) as caught:
        wrapper.embed_documents(["one", "two", "three", "four"])
    assert model.calls == 1
    assert "embedpipe_test_missing_dependency" in str(caught.value.failures[3])


@pytest.mark.usefixtures("offline")
def test_classify_exception_on_real_failures() -> None:
    with pytest.raises(Exception) as download:
        tiktoken.get_encoding("cl100k_base")
    error = classify_exception(download.value, api_hosts={"127.0.0.1"})
    assert (error.retryable, error.request_level) == (False, True)
    assert f"https://{TIKTOKEN_HOST}/encodings/cl100k_base.tiktoken" in str(error)
    # The same failure from the API's own host is a connection error, retried as before.
    assert classify_exception(download.value, api_hosts={TIKTOKEN_HOST}).retryable
    # Without knowing the API's host, embedpipe cannot tell and keeps the old rule.
    assert classify_exception(download.value).retryable


@pytest.mark.parametrize("fault", ["truncated", "not_json"])
@pytest.mark.parametrize("wrapped", ["langchain-openai"], indirect=True)
def test_a_200_that_is_not_json_is_retried_not_blamed_on_an_input(wrapped: Wrapper, openai_server: OpenAITestServer,
                                                                  fault: str) -> None:
    wrapper = wrapped(batch_size=4)
    texts = ["one", "two", "three", "four"]
    openai_server.control.fail_next(fault, times=2)
    vectors = wrapper.embed_documents(texts)
    np.testing.assert_allclose(vectors, [expected_vector(t, 1536) for t in texts], atol=1e-6)
    assert wrapper.stats.retries == 2
    assert openai_server.ledger.requests_total == 3  # the same batch again, never split
