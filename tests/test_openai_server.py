"""Tests of the fault-injecting OpenAI test server, driven by the real openai SDK and httpx."""

from __future__ import annotations

import asyncio
import base64
import inspect
import json
import math
import re
import shlex
import time
from collections.abc import Callable, Iterator

import httpx
import numpy as np
import openai
import pytest
from tiktoken_ext import openai_public

from tests.openai_server import (
    _CL100K_PAT_STR,
    DEFAULT_MODEL,
    LedgerSnapshot,
    OpenAITestServer,
    RemoteControl,
    ServerConfig,
    ServerProcess,
    _config_from_args,
    _parser,
    cl100k_encoding,
    expected_vector,
    expected_vectors,
    format_go_duration,
    running_server,
)

TEXTS = ["hello world", "the quick brown fox", "embeddings are vectors", "ünïcödé ✓", "last one"]


@pytest.fixture(scope="module")
def server() -> Iterator[OpenAITestServer]:
    """One server for the module; each test starts from its default state (see `clean`)."""
    with running_server() as running:
        yield running


@pytest.fixture(autouse=True)
def clean(server: OpenAITestServer) -> None:
    server.reset()


@pytest.fixture
def client(server: OpenAITestServer) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=server.base_url, api_key="test", max_retries=0, timeout=5) as sdk:
        yield sdk


@pytest.fixture
def http(server: OpenAITestServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.base_url, timeout=5) as raw:
        yield raw


def parse_go_duration(value: str) -> float:
    """Parse the Go durations of ``x-ratelimit-reset-*`` into seconds."""
    units = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 1e-3, "us": 1e-6, "µs": 1e-6, "ns": 1e-9}
    parts = re.findall(r"(\d+(?:\.\d+)?)(h|ms|us|µs|ns|m|s)", value)
    assert parts and "".join(number + unit for number, unit in parts) == value, value
    return sum(float(number) * units[unit] for number, unit in parts)


def decode_base64(embedding: str) -> np.ndarray:
    return np.frombuffer(base64.b64decode(embedding), dtype="<f4")


def wait_until(condition: Callable[[], bool], timeout: float = 2.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.01)


# -- building blocks ---------------------------------------------------------


def test_tokenizer_loads_offline_and_matches_cl100k() -> None:
    encoding = cl100k_encoding()
    assert encoding.name == "cl100k_base"
    assert encoding.encode("hello world") == [15339, 1917]
    assert encoding.encode_ordinary("tiktoken is great!") == [83, 1609, 5963, 374, 2294, 0]
    assert encoding.encode("<|endoftext|>", allowed_special="all") == [100257]
    # The pattern is a copy of tiktoken's own definition (which would download the ranks if called).
    assert _CL100K_PAT_STR in inspect.getsource(openai_public.cl100k_base)


def test_expected_vector_is_deterministic_normalised_and_nested() -> None:
    vector = expected_vector("hello", 1536)
    assert vector.dtype == np.float32 and vector.shape == (1536,)
    assert np.array_equal(vector, expected_vector("hello", 1536))
    assert math.isclose(float(np.linalg.norm(vector)), 1.0, rel_tol=1e-6)
    assert not np.allclose(vector, expected_vector("hello!", 1536))
    assert not np.allclose(vector, expected_vector("hello", 1536, model="text-embedding-3-large")[:1536])
    # Shortened vectors are renormalised prefixes, like text-embedding-3's `dimensions`.
    prefix = vector[:256] / np.linalg.norm(vector[:256])
    np.testing.assert_allclose(expected_vector("hello", 256), prefix, rtol=1e-5, atol=1e-6)
    assert np.array_equal(expected_vectors(["a", "b"], 8), np.stack([expected_vector(t, 8) for t in "ab"]))
    vector[0] = 42  # callers get copies, never the cached array
    assert expected_vector("hello", 1536)[0] != 42


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(0, "0s"), (0.012, "12ms"), (0.0001, "1ms"), (1, "1s"), (8.64, "8.64s"), (360, "6m0s"), (3725.5, "1h2m5.5s")],
)
def test_go_duration_format(seconds: float, text: str) -> None:
    assert format_go_duration(seconds) == text
    assert parse_go_duration(text) == pytest.approx(max(seconds, 0.001) if seconds else 0)


def test_config_rejects_bad_values() -> None:
    with pytest.raises(ValueError, match="sum"):
        ServerConfig(fault_rates={"500": 0.7, "drop": 0.6})
    with pytest.raises(ValueError, match="unknown fault"):
        ServerConfig(fault_rates={"explode": 0.1})
    with pytest.raises(ValueError, match="dimensions_mode"):
        ServerConfig(dimensions_mode="maybe")  # type: ignore[arg-type]
    assert ServerConfig(fault_rates={"503": 0.5}).fault_rates == {"unavailable": 0.5}


# -- the wire format ---------------------------------------------------------


def test_float_vectors_match_expected_and_usage_counts_cl100k(client: openai.OpenAI, server: OpenAITestServer) -> None:
    response = client.embeddings.create(model=DEFAULT_MODEL, input=TEXTS, encoding_format="float")
    assert [item.index for item in response.data] == list(range(len(TEXTS)))
    for text, item in zip(TEXTS, response.data, strict=True):
        assert np.array_equal(np.asarray(item.embedding, dtype=np.float32), expected_vector(text, 1536))
    tokens = sum(len(cl100k_encoding().encode(text)) for text in TEXTS)
    assert response.usage.prompt_tokens == response.usage.total_tokens == tokens
    assert response.model == DEFAULT_MODEL
    assert server.ledger.billed_tokens == tokens


def test_base64_is_little_endian_float32(client: openai.OpenAI, http: httpx.Client) -> None:
    raw = http.post("/embeddings", json={"model": DEFAULT_MODEL, "input": TEXTS, "encoding_format": "base64"})
    assert raw.status_code == 200
    body = raw.json()
    assert body["object"] == "list" and body["data"][0]["object"] == "embedding"
    for text, item in zip(TEXTS, body["data"], strict=True):
        assert np.array_equal(decode_base64(item["embedding"]), expected_vector(text, 1536))
    # The SDK asks for base64 by default and decodes it itself.
    response = client.embeddings.create(model="text-embedding-3-large", input="hello world")
    assert np.array_equal(
        np.asarray(response.data[0].embedding, dtype=np.float32),
        expected_vector("hello world", 3072, "text-embedding-3-large"),
    )


def test_token_array_inputs_embed_their_text(client: openai.OpenAI, server: OpenAITestServer) -> None:
    encoding = cl100k_encoding()
    arrays = [encoding.encode(text) for text in TEXTS]
    response = client.embeddings.create(model=DEFAULT_MODEL, input=arrays, encoding_format="float")
    for text, item in zip(TEXTS, response.data, strict=True):
        assert np.array_equal(np.asarray(item.embedding, dtype=np.float32), expected_vector(text, 1536))
    assert response.usage.total_tokens == sum(map(len, arrays))
    single = client.embeddings.create(model=DEFAULT_MODEL, input=arrays[0])
    assert len(single.data) == 1
    assert np.array_equal(np.asarray(single.data[0].embedding, dtype=np.float32), expected_vector(TEXTS[0], 1536))
    assert server.ledger.times_billed[TEXTS[0]] == 2


def test_azure_deployment_path(server: OpenAITestServer) -> None:
    azure = openai.AzureOpenAI(azure_endpoint=server.url, azure_deployment="my-deployment", api_key="test",
                               api_version="2024-02-01", max_retries=0)
    with azure:
        named = azure.embeddings.create(model=DEFAULT_MODEL, input="hello")
        assert np.array_equal(np.asarray(named.data[0].embedding, dtype=np.float32), expected_vector("hello", 1536))
    with httpx.Client(base_url=server.url, timeout=5) as raw:
        response = raw.post("/openai/deployments/local-minilm/embeddings?api-version=2024-02-01", json={"input": "x"})
    assert response.json()["model"] == "local-minilm"  # no model in the body: the deployment's name
    assert len(response.json()["data"][0]["embedding"]) == 384


def test_unknown_model_and_paths_without_v1(server: OpenAITestServer) -> None:
    with httpx.Client(base_url=server.url, timeout=5) as raw:
        response = raw.post("/embeddings", json={"model": "local-minilm", "input": "hi"})
        assert response.status_code == 200
        assert response.json()["data"][0]["embedding"] == expected_vector("hi", 384, "local-minilm").tolist()
        models = raw.get("/v1/models").json()
        assert {"text-embedding-3-small", "text-embedding-ada-002"} <= {m["id"] for m in models["data"]}


def test_dimensions_for_text_embedding_3(client: openai.OpenAI) -> None:
    response = client.embeddings.create(model=DEFAULT_MODEL, input="hello", dimensions=256)
    assert np.array_equal(np.asarray(response.data[0].embedding, dtype=np.float32), expected_vector("hello", 256))
    for bad in (0, 1537):
        with pytest.raises(openai.BadRequestError) as caught:
            client.embeddings.create(model=DEFAULT_MODEL, input="hello", dimensions=bad)
        assert caught.value.body["param"] == "dimensions"  # type: ignore[index]


def test_dimensions_modes_for_other_models(client: openai.OpenAI, server: OpenAITestServer) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.embeddings.create(model="text-embedding-ada-002", input="hello", dimensions=256)
    assert caught.value.response.json() == {
        "error": {
            "message": "This model does not support specifying dimensions.",
            "type": "invalid_request_error",
            "param": "dimensions",
            "code": None,
        }
    }
    server.control.configure(dimensions_mode="ignore")
    ignored = client.embeddings.create(model="text-embedding-ada-002", input="hello", dimensions=256)
    assert len(ignored.data[0].embedding) == 1536
    server.control.configure(dimensions_mode="honour")
    honoured = client.embeddings.create(model="local-minilm", input="hello", dimensions=100)
    assert np.array_equal(
        np.asarray(honoured.data[0].embedding, dtype=np.float32), expected_vector("hello", 100, "local-minilm")
    )


def test_validation_errors_fail_the_whole_request(client: openai.OpenAI, server: OpenAITestServer) -> None:
    with pytest.raises(openai.BadRequestError, match=re.escape("'$.input' is invalid")):
        client.embeddings.create(model=DEFAULT_MODEL, input=["fine", ""])
    too_long = [15339] * 8192  # "hello" x 8192: one token each
    with pytest.raises(openai.BadRequestError) as caught:
        client.embeddings.create(model=DEFAULT_MODEL, input=[[15339], too_long])
    message = caught.value.response.json()["error"]["message"]
    assert message.startswith("This model's maximum context length is 8192 tokens, however you requested 8192 tokens")
    assert client.embeddings.create(model=DEFAULT_MODEL, input=[too_long[:8191]]).usage.total_tokens == 8191
    assert server.ledger.billed_tokens == 8191
    assert server.ledger.status_counts == {400: 2, 200: 1}


def test_poison_fails_only_requests_containing_it(client: openai.OpenAI, server: OpenAITestServer) -> None:
    server.control.configure(poison=["POISON"])
    with pytest.raises(openai.BadRequestError) as caught:
        client.embeddings.create(model=DEFAULT_MODEL, input=["ok", "a POISON pill", "fine"])
    assert "input[1]" in caught.value.response.json()["error"]["message"]
    client.embeddings.create(model=DEFAULT_MODEL, input=["ok", "fine"])
    assert server.ledger.times_billed == {"ok": 1, "fine": 1}


# -- rate limits ---------------------------------------------------------------


def test_request_bucket_limits_and_refills(client: openai.OpenAI, server: OpenAITestServer) -> None:
    server.control.configure(rpm=3, window=2.0)  # one request back every 667 ms
    remaining = []
    for _ in range(3):
        raw = client.embeddings.with_raw_response.create(model=DEFAULT_MODEL, input="hi")
        remaining.append(int(raw.headers["x-ratelimit-remaining-requests"]))
        assert raw.headers["x-ratelimit-limit-requests"] == "3"
        assert 0 < parse_go_duration(raw.headers["x-ratelimit-reset-requests"]) <= 2.0
    assert remaining == [2, 1, 0]
    with pytest.raises(openai.RateLimitError) as caught:
        client.embeddings.create(model=DEFAULT_MODEL, input="hi")
    headers = caught.value.response.headers
    retry_ms = int(headers["retry-after-ms"])
    assert 0 < retry_ms <= 667
    assert headers["retry-after"] == "1"
    assert headers["x-ratelimit-remaining-requests"] == "0"
    for name in ("x-ratelimit-reset-requests", "x-ratelimit-reset-tokens"):
        parse_go_duration(headers[name])
    assert caught.value.code == "rate_limit_exceeded"
    assert caught.value.response.json()["error"]["type"] == "requests"
    time.sleep(retry_ms / 1000)
    client.embeddings.create(model=DEFAULT_MODEL, input="hi")
    ledger = server.ledger
    assert (ledger.requests_ok, ledger.responses_429, ledger.times_billed["hi"]) == (4, 1, 4)


def test_token_bucket_limits_and_rejects_oversized_requests(client: openai.OpenAI, server: OpenAITestServer) -> None:
    server.control.configure(tpm=60, window=2.0)  # 30 tokens back per second
    forty = [[15339] * 40]
    client.embeddings.create(model=DEFAULT_MODEL, input=forty)
    with pytest.raises(openai.RateLimitError) as caught:
        client.embeddings.create(model=DEFAULT_MODEL, input=forty)
    assert caught.value.response.json()["error"]["type"] == "tokens"
    wait_ms = int(caught.value.response.headers["retry-after-ms"])
    assert 0 < wait_ms <= 667  # 20 tokens missing at 30 tokens/s
    with pytest.raises(openai.RateLimitError, match="Request too large") as too_large:
        client.embeddings.create(model=DEFAULT_MODEL, input=[[15339] * 61])
    assert "retry-after-ms" not in too_large.value.response.headers


def test_insufficient_quota_and_should_retry(server: OpenAITestServer) -> None:
    server.control.configure(quota_exhausted=True, should_retry=False)
    # max_retries=2, but x-should-retry: false tells the SDK not to.
    sdk = openai.OpenAI(base_url=server.base_url, api_key="test", max_retries=2)
    with sdk, pytest.raises(openai.RateLimitError) as caught:
        sdk.embeddings.create(model=DEFAULT_MODEL, input="hi")
    assert caught.value.code == "insufficient_quota"
    assert caught.value.response.headers["x-should-retry"] == "false"
    assert server.ledger.requests_total == 1


# -- faults --------------------------------------------------------------------


def test_scripted_status_faults_then_success(client: openai.OpenAI, server: OpenAITestServer) -> None:
    server.control.script("429", "server_error", None, "503")
    with pytest.raises(openai.RateLimitError) as limited:
        client.embeddings.create(model=DEFAULT_MODEL, input="a")
    assert limited.value.response.headers["retry-after-ms"] == "50"
    assert "x-ratelimit-limit-requests" in limited.value.response.headers
    with pytest.raises(openai.InternalServerError) as failed:
        client.embeddings.create(model=DEFAULT_MODEL, input="b")
    assert failed.value.status_code == 500
    client.embeddings.create(model=DEFAULT_MODEL, input="c")
    with pytest.raises(openai.InternalServerError) as unavailable:
        client.embeddings.create(model=DEFAULT_MODEL, input="d")
    assert unavailable.value.status_code == 503
    client.embeddings.create(model=DEFAULT_MODEL, input="e")
    ledger = server.ledger
    assert ledger.times_billed == {"c": 1, "e": 1}
    assert ledger.status_counts == {429: 1, 500: 1, 503: 1, 200: 2}
    assert ledger.requests_total == 5 and server.control.pending_faults == ()


def test_dropped_connection_is_a_connection_error(
    client: openai.OpenAI, http: httpx.Client, server: OpenAITestServer
) -> None:
    server.control.fail_next("drop", times=2)
    with pytest.raises(openai.APIConnectionError) as caught:
        client.embeddings.create(model=DEFAULT_MODEL, input="a")
    assert not isinstance(caught.value, openai.APITimeoutError)
    with pytest.raises((httpx.RemoteProtocolError, httpx.ReadError)):  # closed or reset: both a dropped connection
        http.post("/embeddings", json={"model": DEFAULT_MODEL, "input": "a"})
    client.embeddings.create(model=DEFAULT_MODEL, input="b")  # the server is unharmed
    ledger = server.ledger
    assert (ledger.connections_dropped, ledger.times_billed) == (2, {"b": 1})


def test_drop_after_work_bills_but_answers_nothing(client: openai.OpenAI, server: OpenAITestServer) -> None:
    server.control.fail_next("drop_after")
    with pytest.raises(openai.APIConnectionError):
        client.embeddings.create(model=DEFAULT_MODEL, input="lost answer")
    assert server.ledger.times_billed == {"lost answer": 1}
    assert server.ledger.requests_ok == 0


def test_stall_longer_than_timeout_times_out_and_bills_nothing(client: openai.OpenAI, server: OpenAITestServer) -> None:
    server.control.configure(stall_seconds=5.0)
    server.control.fail_next("stall")
    started = time.monotonic()
    with pytest.raises(openai.APITimeoutError):
        client.embeddings.create(model=DEFAULT_MODEL, input="slow", timeout=0.3)
    assert time.monotonic() - started < 1.0
    wait_until(lambda: server.ledger.requests_abandoned == 1)
    assert server.ledger.billed_tokens == 0 and server.ledger.stalls == 1


def test_short_stall_answers_normally(client: openai.OpenAI, server: OpenAITestServer) -> None:
    server.control.configure(stall_seconds=0.2)
    server.control.fail_next("stall")
    started = time.monotonic()
    client.embeddings.create(model=DEFAULT_MODEL, input="patience")
    assert time.monotonic() - started >= 0.2
    assert server.ledger.times_billed == {"patience": 1}


def test_shuffled_data_keeps_correct_indices(http: httpx.Client, server: OpenAITestServer) -> None:
    server.control.fail_next("shuffle")
    body = http.post("/embeddings", json={"model": DEFAULT_MODEL, "input": TEXTS, "encoding_format": "base64"}).json()
    indices = [item["index"] for item in body["data"]]
    assert indices != sorted(indices) and sorted(indices) == list(range(len(TEXTS)))
    for item in body["data"]:
        assert np.array_equal(decode_base64(item["embedding"]), expected_vector(TEXTS[item["index"]], 1536))


@pytest.mark.parametrize("encoding_format", ["float", "base64"])
def test_nan_vector(client: openai.OpenAI, server: OpenAITestServer, encoding_format: str) -> None:
    server.control.fail_next("nan")
    response = client.embeddings.create(model=DEFAULT_MODEL, input=TEXTS, encoding_format=encoding_format)  # type: ignore[arg-type]
    # With an explicit encoding_format the SDK hands base64 back undecoded.
    vectors = [
        decode_base64(item.embedding) if isinstance(item.embedding, str) else np.asarray(item.embedding)
        for item in response.data
    ]
    poisoned = [bool(np.isnan(vector).any()) for vector in vectors]
    assert sum(poisoned) == 1


def test_wrong_dims_and_wrong_count(client: openai.OpenAI, server: OpenAITestServer) -> None:
    server.control.script("wrong_dims", "wrong_count")
    widths = [len(item.embedding) for item in client.embeddings.create(model=DEFAULT_MODEL, input=TEXTS).data]
    assert sorted(widths) == [1535] + [1536] * (len(TEXTS) - 1)
    assert len(client.embeddings.create(model=DEFAULT_MODEL, input=TEXTS).data) == len(TEXTS) - 1


# -- malformed 200s, echoed credentials, per-row corruption -------------------------


def embeddings_post(http: httpx.Client, texts: list[str]) -> httpx.Response:
    return http.post("/embeddings", json={"model": DEFAULT_MODEL, "input": texts, "encoding_format": "base64"})


def test_wrong_dims_all_shortens_every_row_of_one_response(client: openai.OpenAI, server: OpenAITestServer) -> None:
    server.control.fail_next("wrong_dims_all")
    widths = {len(item.embedding) for item in client.embeddings.create(model=DEFAULT_MODEL, input=TEXTS).data}
    assert widths == {1535}
    again = client.embeddings.create(model=DEFAULT_MODEL, input=TEXTS).data
    assert {len(item.embedding) for item in again} == {1536}
    assert server.ledger.times_billed["hello world"] == 2  # a corrupted 200 is still billed


def test_html_page_with_status_200_bills_nothing(http: httpx.Client, server: OpenAITestServer) -> None:
    server.control.fail_next("html")
    response = embeddings_post(http, TEXTS)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/html")
    assert response.text.startswith("<!DOCTYPE html>")
    assert embeddings_post(http, TEXTS).json()["object"] == "list"
    ledger = server.ledger
    assert ledger.times_billed["hello world"] == 1 and ledger.status_counts == {200: 2}


def test_not_json_200_under_a_json_content_type(
    client: openai.OpenAI, http: httpx.Client, server: OpenAITestServer
) -> None:
    server.control.fail_next("not_json", times=2)
    response = embeddings_post(http, TEXTS)
    assert response.status_code == 200 and response.headers["content-type"] == "application/json"
    with pytest.raises(json.JSONDecodeError):
        response.json()
    # What the SDK does with it: the decode error escapes from create().
    with pytest.raises(json.JSONDecodeError):
        client.embeddings.create(model=DEFAULT_MODEL, input=TEXTS)
    assert server.ledger.billed_tokens == 0


def test_truncated_json_is_a_billed_prefix_of_the_real_answer(http: httpx.Client, server: OpenAITestServer) -> None:
    server.control.fail_next("truncated")
    cut = embeddings_post(http, TEXTS)
    whole = embeddings_post(http, TEXTS)
    assert cut.status_code == 200 and int(cut.headers["content-length"]) == len(cut.content)
    assert 0 < len(cut.content) < len(whole.content)
    assert whole.content.startswith(cut.content)
    with pytest.raises(json.JSONDecodeError, match=r"Unterminated string|Expecting"):
        cut.json()
    assert server.ledger.times_billed["hello world"] == 2


def test_missing_embedding_items_keep_object_and_index(client: openai.OpenAI, server: OpenAITestServer) -> None:
    server.control.fail_next("missing_embedding")
    raw = client.embeddings.with_raw_response.create(model=DEFAULT_MODEL, input=TEXTS)
    items = json.loads(raw.text)["data"]
    assert items == [{"object": "embedding", "index": i} for i in range(len(TEXTS))]
    assert server.ledger.times_billed["hello world"] == 1


@pytest.mark.parametrize("status", [401, 500])
def test_echo_auth_repeats_the_authorization_header(server: OpenAITestServer, status: int) -> None:
    server.control.configure(echo_auth_status=status)
    server.control.fail_next("echo_auth")
    secret = "sk-test-0123456789abcdefSECRET"
    with openai.OpenAI(base_url=server.base_url, api_key=secret, max_retries=0) as sdk:
        with pytest.raises(openai.APIStatusError) as caught:
            sdk.embeddings.create(model=DEFAULT_MODEL, input="x")
        assert caught.value.status_code == status
        assert f"Bearer {secret}" in caught.value.response.json()["error"]["message"]
        assert f"Bearer {secret}" in str(caught.value)
        sdk.embeddings.create(model=DEFAULT_MODEL, input="x")


def test_config_rejects_bad_new_fault_settings() -> None:
    for bad in ({"nan_rows": 1.5}, {"nan_rows": -0.1}, {"corrupt": [""]}, {"echo_auth_status": 200}):
        with pytest.raises(ValueError):
            ServerConfig(**bad)
    assert ServerConfig(corrupt="X").corrupt == ("X",)


def nan_rows_of(response: httpx.Response) -> list[int]:
    return [item["index"] for item in response.json()["data"] if np.isnan(decode_base64(item["embedding"])).any()]


def test_nan_rows_draws_per_row_reproducibly(http: httpx.Client, server: OpenAITestServer) -> None:
    texts = [f"row {i}" for i in range(200)]
    server.control.configure(nan_rows=0.1, seed=3)
    first = embeddings_post(http, texts)
    bad = nan_rows_of(first)
    assert 5 <= len(bad) <= 40  # about 20 of 200
    for item in first.json()["data"]:
        vector = decode_base64(item["embedding"])
        if item["index"] in bad:
            assert int(np.isnan(vector).sum()) == 1
        else:  # the other rows are the real answer, usable as they are
            assert np.array_equal(vector, expected_vector(texts[item["index"]], 1536))
    second = nan_rows_of(embeddings_post(http, texts))
    assert second != bad  # drawn afresh for every response
    server.control.configure(seed=3)
    assert nan_rows_of(embeddings_post(http, texts)) == bad
    assert server.ledger.rows_corrupted == 2 * len(bad) + len(second)
    server.control.configure(nan_rows=1.0)
    assert nan_rows_of(embeddings_post(http, texts[:5])) == list(range(5))


def test_corrupt_texts_come_back_nan_every_time(http: httpx.Client, server: OpenAITestServer) -> None:
    server.control.configure(corrupt=["BAD ROW"])
    texts = ["fine", "a BAD ROW here", "also fine", "BAD ROW again"]
    for _ in range(3):
        response = embeddings_post(http, texts)
        assert response.status_code == 200
        assert nan_rows_of(response) == [1, 3]
    assert embeddings_post(http, ["fine"]).status_code == 200 and server.ledger.rows_corrupted == 6
    assert server.ledger.times_billed["a BAD ROW here"] == 3  # billed like any other row


def test_remote_control_drives_the_new_shapes(server: OpenAITestServer) -> None:
    remote = RemoteControl(server.base_url)
    try:
        remote.script("html", "truncated", "missing_embedding", "not_json", "wrong_dims_all", "echo_auth")
        assert remote.pending_faults == (
            "html", "truncated", "missing_embedding", "not_json", "wrong_dims_all", "echo_auth"
        )
        config = remote.configure(corrupt=["BAD"], nan_rows=0.25, echo_auth_status=500)
        assert (config.corrupt, config.nan_rows, config.echo_auth_status) == (("BAD",), 0.25, 500)
        assert server.control.config.corrupt == ("BAD",)
        with httpx.Client(base_url=server.base_url, timeout=5) as http:
            assert embeddings_post(http, ["x"]).headers["content-type"].startswith("text/html")
        remote.set_fault_rate("not_json", 0.5)
        assert server.control.config.fault_rates == {"not_json": 0.5}
        assert remote.ledger == server.ledger
    finally:
        remote.close()


def test_random_faults_are_reproducible(http: httpx.Client, server: OpenAITestServer) -> None:
    server.control.configure(fault_rates={"500": 0.3, "503": 0.2}, seed=7)

    def run() -> list[int]:
        return [http.post("/embeddings", json={"model": "m", "input": "x"}).status_code for _ in range(30)]

    first = run()
    assert set(first) == {200, 500, 503}
    server.control.configure(seed=7)
    assert run() == first
    assert server.ledger.requests_ok == 2 * first.count(200)


def test_latency_is_added(client: openai.OpenAI, server: OpenAITestServer) -> None:
    server.control.configure(latency=0.1, latency_per_token=0.01)
    started = time.monotonic()
    client.embeddings.create(model=DEFAULT_MODEL, input=[[15339] * 10])
    assert time.monotonic() - started >= 0.2


# -- ledger, control, concurrency, processes ---------------------------------------


def test_ledger_counts_only_successes_and_resets(client: openai.OpenAI, server: OpenAITestServer) -> None:
    server.control.script("500", None, "429", None)
    outcomes: list[object] = []
    for text in ["a", "b", "c", "b"]:
        try:
            client.embeddings.create(model=DEFAULT_MODEL, input=[text, "shared"])
            outcomes.append("ok")
        except openai.APIStatusError as error:
            outcomes.append(error.status_code)
    assert outcomes == [500, "ok", 429, "ok"]
    ledger = server.ledger
    assert ledger.times_billed == {"b": 2, "shared": 2}
    assert ledger.tokens_billed == {"b": 2, "shared": 2}
    assert (ledger.billed_tokens, ledger.requests_total, ledger.requests_ok, ledger.responses_429) == (4, 4, 2, 1)
    assert LedgerSnapshot.from_json(ledger.to_json()) == ledger
    server.control.reset_ledger()
    assert server.ledger.requests_total == 0 and server.ledger.times_billed == {}


def test_http_control_and_ledger_endpoints(server: OpenAITestServer) -> None:
    with httpx.Client(base_url=server.url, timeout=5) as raw:
        state = raw.post("/_control", json={"configure": {"rpm": 7}, "script": ["503", None]}).json()
        assert state["config"]["rpm"] == 7 and state["pending_faults"] == ["unavailable", None]
        assert raw.post("/v1/embeddings", json={"model": "m", "input": "x"}).status_code == 503
        assert raw.post("/v1/embeddings", json={"model": "m", "input": "x"}).status_code == 200
        assert raw.post("/_control", json={"configure": {"fault_rates": {"boom": 1}}}).status_code == 400
        ledger = LedgerSnapshot.from_json(raw.get("/_ledger").json())
    assert ledger == server.ledger and ledger.status_counts == {503: 1, 200: 1}


@pytest.mark.asyncio
async def test_async_client_concurrent_requests(server: OpenAITestServer) -> None:
    server.control.configure(latency=0.2)
    texts = [f"text {i}" for i in range(20)]
    async with openai.AsyncOpenAI(base_url=server.base_url, api_key="test", max_retries=0) as sdk:
        started = time.monotonic()
        responses = await asyncio.gather(*(sdk.embeddings.create(model=DEFAULT_MODEL, input=t) for t in texts))
        assert time.monotonic() - started < 1.5  # latencies overlap rather than add up
    for text, response in zip(texts, responses, strict=True):
        assert np.array_equal(np.asarray(response.data[0].embedding, dtype=np.float32), expected_vector(text, 1536))
    assert server.ledger.requests_ok == 20


@pytest.mark.asyncio
async def test_async_client_stall_and_drop(server: OpenAITestServer) -> None:
    server.control.configure(stall_seconds=5.0)
    server.control.script("stall", "drop")
    async with openai.AsyncOpenAI(base_url=server.base_url, api_key="test", max_retries=0, timeout=0.3) as sdk:
        with pytest.raises(openai.APITimeoutError):
            await sdk.embeddings.create(model=DEFAULT_MODEL, input="x")
        with pytest.raises(openai.APIConnectionError):
            await sdk.embeddings.create(model=DEFAULT_MODEL, input="x")


def test_start_stop_fast_and_independent() -> None:
    started = time.monotonic()
    with running_server(rpm=1, window=5.0) as first, running_server() as second:
        first_url = first.base_url
        assert first.port != second.port
        assert time.monotonic() - started < 2.0  # two starts, under 1 s each
        assert httpx.post(f"{first.base_url}/embeddings", json={"model": "m", "input": "x"}).status_code == 200
        assert httpx.post(f"{first.base_url}/embeddings", json={"model": "m", "input": "x"}).status_code == 429
        assert httpx.post(f"{second.base_url}/embeddings", json={"model": "m", "input": "x"}).status_code == 200
    assert time.monotonic() - started < 3.0
    with pytest.raises(httpx.ConnectError):
        httpx.post(f"{first_url}/embeddings", json={"model": "m", "input": "x"})


def test_cli_flags_map_to_config() -> None:
    argv = shlex.split(
        "--rpm 500 --tpm none --window 2 --poison A --poison B --fault 503=0.25 --should-retry false"
        " --corrupt C --nan-rows 0.01 --echo-auth-status 500 --fault html=0.1"
        """ --config '{"default_dims": 64, "rpm": 1}'"""
    )
    args = _parser().parse_args(argv)
    config = _config_from_args(args)
    assert (config.rpm, config.tpm, config.window, config.default_dims) == (500, None, 2.0, 64)
    assert config.poison == ("A", "B") and config.fault_rates == {"unavailable": 0.25, "html": 0.1}
    assert config.should_retry is False
    assert (config.corrupt, config.nan_rows, config.echo_auth_status) == (("C",), 0.01, 500)


def test_server_process_with_remote_control() -> None:
    with ServerProcess(rpm=1, window=5.0, poison=["BAD"]) as process:
        control = process.control
        assert control.config.poison == ("BAD",)
        control.fail_next("503")
        with openai.OpenAI(base_url=process.base_url, api_key="test", max_retries=0) as sdk:
            with pytest.raises(openai.InternalServerError):
                sdk.embeddings.create(model=DEFAULT_MODEL, input="x")
            sdk.embeddings.create(model=DEFAULT_MODEL, input="y")
            with pytest.raises(openai.RateLimitError):
                sdk.embeddings.create(model=DEFAULT_MODEL, input="z")
        assert process.ledger.times_billed == {"y": 1}
        control.reset()
        assert process.ledger.requests_total == 0
