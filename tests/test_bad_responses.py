"""Bad answers from a real OpenAI-compatible server: each is an invalid response, retried, never an input's fault.

Driven through the real pipeline, the real openai SDK and the fault-injecting test
server (tests/openai_server.py). Retry waits are recorded, never slept.
"""

from __future__ import annotations

import asyncio
import socket
from typing import Any

import numpy as np
import pytest

from embedpipe import EmbeddingPipeline
from embedpipe.errors import EmbeddingFailedError, EmbedPipeError, ProviderError
from tests.openai_server import OpenAITestServer, expected_vector

MODEL = "text-embedding-3-small"
# The 200s a proxy or a broken upstream sends instead of an embeddings list.
MALFORMED_200 = ["html", "not_json", "truncated", "missing_embedding"]


async def no_sleep(seconds: float) -> None:
    await asyncio.sleep(0)


def pipe_for(server: OpenAITestServer, **kw: Any) -> EmbeddingPipeline:
    kw.setdefault("cache", "memory://")
    kw.setdefault("sleep", no_sleep)
    return EmbeddingPipeline(f"openai:{MODEL}", base_url=server.base_url, api_key="sk-test", **kw)


def is_exhausted_invalid_response(reason: object, retries: int) -> bool:
    """A failure reason that says the answers stayed unusable through every retry (not an input fault).

    Works with reasons as strings and as ``Failure`` objects (``kind`` plus a message).
    """
    text = str(reason)
    kind = getattr(reason, "kind", None)
    if kind is not None and kind not in ("retries_exhausted", "invalid_response"):
        return False
    return f"{retries} retries" in text and "invalid response" in text


@pytest.mark.parametrize("fault", MALFORMED_200)
def test_a_few_malformed_200s_are_retried_and_no_good_record_fails(openai_server: OpenAITestServer,
                                                                   fault: str) -> None:
    texts = [f"record {i}" for i in range(40)]
    openai_server.control.fail_next(fault, times=3)
    with pipe_for(openai_server, batch_size=10, errors="collect") as pipe:
        result = pipe.embed(texts)
        retries = pipe.stats.retries
    assert result.failures == {}
    for text, vector in zip(texts, result, strict=True):
        np.testing.assert_allclose(vector, expected_vector(text, 1536), rtol=1e-6)
    # Four batches, three of them answered badly once and sent again whole: never bisected.
    assert openai_server.ledger.requests_total == 4 + 3
    assert retries == 3


@pytest.mark.parametrize("fault", MALFORMED_200)
def test_malformed_200s_that_never_stop_fail_as_exhausted_retries(openai_server: OpenAITestServer,
                                                                  fault: str) -> None:
    texts = [f"record {i}" for i in range(12)]
    openai_server.control.set_fault_rate(fault, 1.0)
    with pipe_for(openai_server, batch_size=4, max_retries=2, errors="collect") as pipe:
        result = pipe.embed(texts)
    assert sorted(result.failures) == list(range(len(texts)))
    for reason in result.failures.values():
        assert is_exhausted_invalid_response(reason, 2), reason
        assert "127.0.0.1" in str(reason)  # names the server that answered
    # Three batches, three attempts each, and no batch split to look for a bad input.
    assert openai_server.ledger.requests_total == 3 * 3


@pytest.mark.parametrize("fault", MALFORMED_200)
def test_malformed_200s_raise_only_embedpipe_errors(openai_server: OpenAITestServer, fault: str) -> None:
    openai_server.control.set_fault_rate(fault, 1.0)
    with pipe_for(openai_server, max_retries=1) as pipe:
        with pytest.raises(EmbedPipeError) as caught:
            pipe.embed(["one", "two", "three"])
        with pytest.raises(EmbedPipeError):
            pipe.embed_query("a query")
    assert isinstance(caught.value, EmbeddingFailedError)
    assert all(is_exhausted_invalid_response(r, 1) for r in caught.value.failures.values())


@pytest.mark.parametrize("fault", MALFORMED_200)
def test_the_provider_raises_a_retryable_request_level_invalid_response(openai_server: OpenAITestServer,
                                                                        fault: str) -> None:
    from embedpipe.errors import InvalidResponseError
    from embedpipe.providers.openai import OpenAIProvider

    provider = OpenAIProvider(MODEL, base_url=openai_server.base_url, api_key="sk-test")
    openai_server.control.fail_next(fault)

    async def call() -> None:
        try:
            with pytest.raises(InvalidResponseError) as caught:
                await provider.aembed_batch(["a", "b"], "document")
            assert caught.value.retryable and caught.value.request_level
            assert caught.value.status is None or caught.value.status == 200
            good = await provider.aembed_batch(["a", "b"], "document")
            assert good.vectors.shape == (2, 1536)
        finally:
            await provider._get_client().close()

    asyncio.run(call())


def test_an_unreachable_base_url_is_named_without_its_credentials() -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://user:hunter2@127.0.0.1:{port}/v1?token=abc"
    with EmbeddingPipeline(f"openai:{MODEL}", base_url=url, api_key="sk-test", cache=None, max_retries=1,
                           sleep=no_sleep) as pipe, pytest.raises(EmbeddingFailedError) as caught:
        pipe.embed(["hello"])
    reason = str(caught.value.failures[0])
    assert f"http://127.0.0.1:{port}/v1/embeddings" in reason
    assert "hunter2" not in reason and "token=abc" not in reason and "user" not in reason


def test_connection_errors_stay_retryable_provider_errors() -> None:
    """The SDK's own exception objects, built as it builds them (a timeout cannot be waited for here)."""
    import openai

    httpx2 = pytest.importorskip("httpx2", reason="the openai SDK builds its requests with httpx2")

    from embedpipe.providers.openai import map_openai_error

    request = httpx2.Request("POST", "https://me:pw@gateway.example/v1/embeddings?key=k")
    mapped = map_openai_error(openai.APIConnectionError(request=request))
    assert isinstance(mapped, ProviderError) and mapped.retryable
    assert "https://gateway.example/v1/embeddings" in str(mapped) and "pw" not in str(mapped)
    timed_out = map_openai_error(openai.APITimeoutError(request=request))
    assert timed_out.retryable and "gateway.example" in str(timed_out)
