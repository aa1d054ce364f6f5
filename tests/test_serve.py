"""``embedpipe serve`` live on 127.0.0.1 in front of the OpenAI test server, driven by real clients."""

from __future__ import annotations

import asyncio
import base64
import json
import time
from collections.abc import Iterator
from typing import Any

import httpx
import numpy as np
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("prometheus_client")

from tests.openai_server import OpenAITestServer, cl100k_encoding, expected_vector, expected_vectors
from tests.serve_live import MODEL, LiveService, metric, settings_for

TEXTS = ["the cat sat", "on the mat", "the cat sat", "a dog barked at the moon"]
UNIQUE = list(dict.fromkeys(TEXTS))


@pytest.fixture
def upstream() -> Iterator[OpenAITestServer]:
    with OpenAITestServer() as server:
        yield server


@pytest.fixture
def service(upstream: OpenAITestServer) -> Iterator[LiveService]:
    with LiveService(settings_for(upstream.base_url)) as live:
        yield live


@pytest.fixture
def offline_tiktoken(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """tiktoken's cache files, so LangChain's own tokenizer works without a download."""
    from embedpipe.tokens import write_tiktoken_cache

    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(write_tiktoken_cache(tmp_path_factory.mktemp("tiktoken"))))


def _post(service: LiveService, body: Any, **kw: Any) -> httpx.Response:
    return httpx.post(f"{service.base_url}/embeddings", json=body, timeout=10, **kw)


@pytest.mark.parametrize("encoding_format", ["float", "base64", None])
def test_openai_sdk_sync_gets_the_upstream_vectors_and_a_repeat_is_all_cache_hits(
        service: LiveService, upstream: OpenAITestServer, encoding_format: str | None) -> None:
    import openai

    extra = {"encoding_format": encoding_format} if encoding_format else {}  # None: the SDK's default, base64

    def vectors(answer: Any) -> list[Any]:
        if encoding_format == "base64":  # asked for explicitly, the SDK hands the strings over as they came
            return [np.frombuffer(base64.b64decode(d.embedding), dtype="<f4") for d in answer.data]
        return [d.embedding for d in answer.data]

    with openai.OpenAI(base_url=service.base_url, api_key="unused", max_retries=0) as client:
        first = client.embeddings.with_raw_response.create(model=MODEL, input=TEXTS, **extra)
        got = first.parse()
        assert [d.index for d in got.data] == [0, 1, 2, 3]
        assert np.allclose(vectors(got), expected_vectors(TEXTS, 1536), atol=1e-6)
        assert got.usage.prompt_tokens == upstream.ledger.billed_tokens > 0
        assert first.headers["x-embedpipe-cache-hits"] == "0"
        assert float(first.headers["x-embedpipe-cost-usd"]) == pytest.approx(got.usage.prompt_tokens * 0.02 / 1e6)

        again = client.embeddings.with_raw_response.create(model=MODEL, input=TEXTS, **extra)
        assert again.headers["x-embedpipe-cache-hits"] == str(len(UNIQUE))
        assert again.parse().usage.prompt_tokens == 0
        assert float(again.headers["x-embedpipe-cost-usd"]) == 0.0
        assert np.allclose(vectors(again.parse()), expected_vectors(TEXTS, 1536), atol=1e-6)
    assert dict(upstream.ledger.times_billed) == dict.fromkeys(UNIQUE, 1)


def test_base64_is_little_endian_float32_of_the_float_answer(service: LiveService) -> None:
    as_float = _post(service, {"model": MODEL, "input": "hello", "encoding_format": "float"}).json()
    as_b64 = _post(service, {"model": MODEL, "input": "hello", "encoding_format": "base64"}).json()
    decoded = np.frombuffer(base64.b64decode(as_b64["data"][0]["embedding"]), dtype="<f4")
    assert decoded.tolist() == np.asarray(as_float["data"][0]["embedding"], dtype=np.float32).tolist()
    assert as_b64["object"] == "list" and as_b64["model"] == MODEL and as_b64["data"][0]["object"] == "embedding"


async def test_openai_sdk_async_concurrent_requests_are_coalesced(service: LiveService,
                                                                  upstream: OpenAITestServer) -> None:
    import openai

    texts = [f"document number {i}" for i in range(30)]
    async with openai.AsyncOpenAI(base_url=service.base_url, api_key="unused", max_retries=0) as client:
        answers = await asyncio.gather(*(client.embeddings.create(model=MODEL, input=t) for t in texts))
    assert all(np.allclose(a.data[0].embedding, expected_vector(t, 1536), atol=1e-6)
               for a, t in zip(answers, texts, strict=True))
    assert dict(upstream.ledger.times_billed) == dict.fromkeys(texts, 1)
    # 30 requests arriving together share a handful of upstream requests, and their usage adds up to the bill.
    assert upstream.ledger.requests_total <= 5
    assert sum(a.usage.prompt_tokens for a in answers) == upstream.ledger.billed_tokens


def test_dimensions_are_passed_through_as_their_own_vector_space(service: LiveService,
                                                                 upstream: OpenAITestServer) -> None:
    small = _post(service, {"model": MODEL, "input": ["x y z"], "dimensions": 256, "encoding_format": "float"})
    full = _post(service, {"model": MODEL, "input": ["x y z"], "encoding_format": "float"})
    assert len(small.json()["data"][0]["embedding"]) == 256
    assert np.allclose(small.json()["data"][0]["embedding"], expected_vector("x y z", 256), atol=1e-6)
    assert len(full.json()["data"][0]["embedding"]) == 1536
    assert upstream.ledger.times_billed["x y z"] == 2  # two vector spaces, two cache entries


@pytest.mark.usefixtures("offline_tiktoken")
@pytest.mark.parametrize("check_ctx", [True, False], ids=["token-ids", "raw-text"])
def test_langchain_openai_embeddings(service: LiveService, upstream: OpenAITestServer, check_ctx: bool) -> None:
    from langchain_openai import OpenAIEmbeddings

    lc = OpenAIEmbeddings(model=MODEL, base_url=service.base_url, api_key="unused",  # type: ignore[arg-type]
                          check_embedding_ctx_length=check_ctx, max_retries=0)
    try:
        vectors = lc.embed_documents(TEXTS)
        assert np.allclose(vectors, expected_vectors(TEXTS, 1536), atol=1e-5)
        assert np.allclose(lc.embed_query("the cat sat"), expected_vector("the cat sat", 1536), atol=1e-5)
        requests = upstream.ledger.requests_total
        assert np.allclose(lc.embed_documents(TEXTS), expected_vectors(TEXTS, 1536), atol=1e-5)
        assert upstream.ledger.requests_total == requests  # all cache hits
        assert dict(upstream.ledger.times_billed) == dict.fromkeys(UNIQUE, 1)
    finally:
        lc.client._client.close()
        asyncio.run(lc.async_client._client.close())


def test_llamaindex_openai_embedding(service: LiveService, upstream: OpenAITestServer) -> None:
    from llama_index.embeddings.openai import OpenAIEmbedding

    emb = OpenAIEmbedding(model_name=MODEL, api_base=service.base_url, api_key="unused", max_retries=0)
    vectors = emb.get_text_embedding_batch(TEXTS)
    assert np.allclose(vectors, expected_vectors(TEXTS, 1536), atol=1e-6)
    requests = upstream.ledger.requests_total
    assert np.allclose(emb.get_text_embedding_batch(TEXTS), expected_vectors(TEXTS, 1536), atol=1e-6)
    assert upstream.ledger.requests_total == requests
    assert dict(upstream.ledger.times_billed) == dict.fromkeys(UNIQUE, 1)


def test_token_array_inputs_are_decoded_with_the_model_tokenizer(service: LiveService) -> None:
    ids = cl100k_encoding().encode("tokens in, vectors out")
    for body_input in (ids, [ids, cl100k_encoding().encode("second")]):
        got = _post(service, {"model": MODEL, "input": body_input, "encoding_format": "float"})
        assert got.status_code == 200, got.text
        assert np.allclose(got.json()["data"][0]["embedding"], expected_vector("tokens in, vectors out", 1536),
                           atol=1e-6)


@pytest.mark.parametrize(("body", "param", "fragment"), [
    ({"model": MODEL, "input": ""}, "input", "input[0] is an empty string"),
    ({"model": MODEL, "input": ["ok", ""]}, "input", "input[1] is an empty string"),
    ({"model": MODEL, "input": []}, "input", "must not be empty"),
    ({"model": MODEL}, "input", "Field required"),
    ({"model": MODEL, "input": [1.5]}, "input", "input"),
    ({"model": MODEL, "input": "x", "encoding_format": "int8"}, "encoding_format", "encoding_format"),
    ({"model": MODEL, "input": "x", "dimensions": 0}, "dimensions", "dimensions"),
    ({"model": MODEL, "input": ["x"] * 2049}, "input", "at most 2048"),
])
def test_bad_input_is_a_400_in_openais_envelope_before_anything_is_sent(
        service: LiveService, upstream: OpenAITestServer, body: dict[str, Any], param: str, fragment: str) -> None:
    got = _post(service, body)
    assert got.status_code == 400, got.text
    error = got.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == param
    assert fragment in error["message"]
    assert upstream.ledger.requests_total == 0


def test_unknown_model_not_json_and_too_large(service: LiveService, upstream: OpenAITestServer) -> None:
    got = _post(service, {"model": "nope", "input": "x"})
    assert got.status_code == 404 and got.json()["error"]["code"] == "model_not_found"
    got = httpx.post(f"{service.base_url}/embeddings", content=b"{not json", timeout=10,
                     headers={"content-type": "application/json"})
    assert got.status_code == 400 and got.json()["error"]["type"] == "invalid_request_error"
    big = json.dumps({"model": MODEL, "input": ["x" * 1000] * 2100}).encode()
    assert len(big) > 2 * 1024 * 1024
    got = httpx.post(f"{service.base_url}/embeddings", content=big, timeout=10,
                     headers={"content-type": "application/json"})
    assert got.status_code == 413 and got.json()["error"]["code"] == "request_too_large"

    def chunks() -> Iterator[bytes]:  # no content-length: the limit counts the streamed body
        for i in range(0, len(big), 65536):
            yield big[i:i + 65536]

    got = httpx.post(f"{service.base_url}/embeddings", content=chunks(), timeout=10,
                     headers={"content-type": "application/json"})
    assert got.status_code == 413
    assert upstream.ledger.requests_total == 0


def test_upstream_failure_is_a_502_and_the_next_request_succeeds(upstream: OpenAITestServer) -> None:
    with LiveService(settings_for(upstream.base_url, model_options={"max_retries": 0})) as live:
        upstream.control.fail_next("server_error")
        got = _post(live, {"model": MODEL, "input": "fails once"})
        assert got.status_code == 502 and got.json()["error"]["type"] == "server_error"
        assert _post(live, {"model": MODEL, "input": "fails once"}).status_code == 200


def test_health_readiness_and_metrics_of_an_open_service(service: LiveService) -> None:
    assert httpx.get(f"{service.url}/healthz").json() == {"status": "ok"}
    assert httpx.get(f"{service.url}/readyz").json()["status"] == "ok"
    assert _post(service, {"model": MODEL, "input": ["m1", "m2", "m1"]}).status_code == 200
    text = httpx.get(f"{service.url}/metrics").text
    spec = f"openai:{MODEL}"
    assert metric(text, "embedpipe_requests_total", route="/v1/embeddings", status="200", model=spec) == 1
    assert metric(text, "embedpipe_cache_misses_total", model=spec) == 2
    assert metric(text, "embedpipe_deduped_total", model=spec) == 1
    assert metric(text, "embedpipe_upstream_requests_total", model=spec, status="200") == 1
    assert metric(text, "embedpipe_batch_inputs_count", model=spec) == 1
    assert metric(text, "embedpipe_queue_wait_seconds_count", model=spec) == 1
    assert httpx.get(f"{service.url}/openapi.json").json()["paths"]["/v1/embeddings"]["post"]


def test_readyz_is_503_when_the_cache_is_down(upstream: OpenAITestServer, private_redis: Any) -> None:
    with LiveService(settings_for(upstream.base_url, cache=f"{private_redis.url}?socket_timeout=1")) as live:
        assert httpx.get(f"{live.url}/readyz", timeout=10).status_code == 200
        private_redis.kill()
        got = httpx.get(f"{live.url}/readyz", timeout=10)
        assert got.status_code == 503 and "cache" in got.json()["problems"]
        assert httpx.get(f"{live.url}/healthz", timeout=10).status_code == 200


def test_an_open_service_refuses_to_listen_beyond_loopback(upstream: OpenAITestServer) -> None:
    from embedpipe.errors import ConfigurationError
    from embedpipe.serve import create_app

    with pytest.raises(ConfigurationError, match="without keys"):
        create_app(settings_for(upstream.base_url, host="0.0.0.0"))


def test_json_logs_carry_the_request_id(service: LiveService, capsys: pytest.CaptureFixture[str]) -> None:
    import logging

    from embedpipe.serve.logs import JSONFormatter

    handler = logging.StreamHandler()
    handler.setFormatter(JSONFormatter())
    logger = logging.getLogger("embedpipe.serve")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    lines: list[dict[str, Any]] = []
    try:
        got = _post(service, {"model": MODEL, "input": "logged"}, headers={"x-request-id": "req-42",
                                                                           "authorization": "Bearer sk-secret-1"})
        # The line is written once the answer has left, so it may land just after the client has it.
        for _ in range(100):
            lines += [json.loads(line) for line in capsys.readouterr().err.splitlines() if line.startswith("{")]
            mine = [line for line in lines if line.get("request_id") == "req-42"]
            if mine:
                break
            time.sleep(0.02)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(logging.NOTSET)
    assert got.headers["x-request-id"] == "req-42"
    assert mine and mine[-1]["status"] == 200 and mine[-1]["route"] == "/v1/embeddings" and mine[-1]["inputs"] == 1
    assert "sk-secret-1" not in json.dumps(lines)


async def test_a_full_queue_is_a_429_with_retry_after_not_a_wait() -> None:
    with OpenAITestServer(latency=0.3) as slow:
        settings = settings_for(slow.base_url, max_queue=2, model_options={"max_retries": 0})
        with LiveService(settings) as live:
            async with httpx.AsyncClient(base_url=live.base_url, timeout=30) as http:
                answers = await asyncio.gather(*(http.post("/embeddings", json={"model": MODEL, "input": f"q{i}"})
                                                 for i in range(12)))
    codes = sorted(a.status_code for a in answers)
    refused = [a for a in answers if a.status_code == 429]
    assert refused and set(codes) == {200, 429}, codes
    assert all(a.json()["error"]["code"] == "queue_full" and a.headers["retry-after"] == "1" for a in refused)
