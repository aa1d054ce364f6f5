"""Cohere, Voyage, Azure OpenAI, Gemini and Bedrock through their official SDKs and the real pipeline.

Every request goes over real HTTP to ``tests/provider_servers.py`` on 127.0.0.1, so each SDK's own
request building and response parsing run; the server enforces each vendor's limits and bills
what the vendor would.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

from embedpipe import EmbeddingPipeline
from embedpipe.cache.memory import MemoryCache
from embedpipe.errors import BudgetExceededError, ConfigurationError, ProviderError, RateLimitedError
from embedpipe.limits import MemoryRateLimiter
from embedpipe.providers import PROVIDERS, provider_from_spec
from embedpipe.providers.base import Provider
from embedpipe.providers.quantized import QuantizedBatchResult
from tests.openai_server import cl100k_encoding
from tests.provider_servers import ProviderTestServer, expected_float, server_int8

pytest.importorskip("cohere")
pytest.importorskip("voyageai")
pytest.importorskip("google.genai")
pytest.importorskip("boto3")

API_VERSION = "2024-10-21"
AWS = {"region": "us-east-1", "aws_access_key_id": "AKIDTEST", "aws_secret_access_key": "secret"}


class FakeClock:
    """Time that passes only when someone sleeps: retry and limiter waits are recorded, never waited."""

    def __init__(self) -> None:
        self.t = 0.0
        self.waits: list[float] = []

    def now(self) -> float:
        return self.t

    async def sleep(self, seconds: float) -> None:
        self.waits.append(seconds)
        self.t += max(0.0, seconds)
        await asyncio.sleep(0)


#: providers a test built; closed after it (a pipeline closes only the providers it built itself)
_MADE: list[Provider] = []


@pytest.fixture
def server() -> Iterator[ProviderTestServer]:
    with ProviderTestServer() as s:
        try:
            yield s
        finally:
            while _MADE:
                _MADE.pop().close()


def made(provider: Provider) -> Provider:
    _MADE.append(provider)
    return provider


def pipe_for(provider: Provider, clock: FakeClock | None = None, **kw: Any) -> EmbeddingPipeline:
    kw.setdefault("cache", "memory://")
    if clock is not None:
        kw["sleep"] = clock.sleep
        kw["rate_limiter"] = MemoryRateLimiter(clock=clock.now, sleep=clock.sleep)
    return EmbeddingPipeline(provider, **kw)


def cohere(server: ProviderTestServer, model: str = "embed-english-v3.0", **kw: Any) -> Provider:
    return made(provider_from_spec(f"cohere:{model}", api_key="co-test", base_url=server.url, **kw))


def voyage(server: ProviderTestServer, model: str = "voyage-3.5", **kw: Any) -> Provider:
    return made(provider_from_spec(f"voyage:{model}", api_key="pa-test", base_url=f"{server.url}/v1", **kw))


def azure(server: ProviderTestServer, deployment: str = "emb-small", **kw: Any) -> Provider:
    kw.setdefault("api_key", "az-test")
    return made(provider_from_spec(f"azure:{deployment}", azure_endpoint=server.url, api_version=API_VERSION, **kw))


def gemini(server: ProviderTestServer, **kw: Any) -> Provider:
    return made(provider_from_spec("gemini:gemini-embedding-001", api_key="g-test", base_url=server.url, **kw))


def bedrock(server: ProviderTestServer, model: str = "amazon.titan-embed-text-v2:0", **kw: Any) -> Provider:
    opts = {**AWS, **kw} if "api_key" not in kw else {"region": "us-east-1", **kw}
    return made(provider_from_spec(f"bedrock:{model}", endpoint_url=server.url, **opts))


def run(provider: Provider, texts: list[str], role: str = "document") -> Any:
    """One direct batch call, on embedpipe's runner loop (where the provider's clients live)."""
    from embedpipe import _runner

    return _runner.run_sync(provider.aembed_batch(texts, role))  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------- registry
def test_every_provider_is_registered_and_needs_its_credentials() -> None:
    assert {"cohere", "voyage", "azure", "gemini", "bedrock"} <= set(PROVIDERS)
    with pytest.raises(ConfigurationError, match="CO_API_KEY"):
        provider_from_spec("cohere:embed-v4.0")
    with pytest.raises(ConfigurationError, match="VOYAGE_API_KEY"):
        provider_from_spec("voyage:voyage-3.5")
    with pytest.raises(ConfigurationError, match="api_version"):
        provider_from_spec("azure:emb", azure_endpoint="https://x.openai.azure.com", api_key="k")
    with pytest.raises(ConfigurationError, match="GEMINI_API_KEY"):
        provider_from_spec("gemini:gemini-embedding-001")
    with pytest.raises(ConfigurationError, match="Titan text"):
        provider_from_spec("bedrock:meta.llama3", region="us-east-1")


def test_bad_options_fail_before_any_request(server: ProviderTestServer) -> None:
    with pytest.raises(ConfigurationError, match="output_dimension"):
        cohere(server, dimensions=512)  # v3 has no output_dimension
    with pytest.raises(ConfigurationError, match="256, 512, 1024, 1536"):
        cohere(server, "embed-v4.0", dimensions=300)
    with pytest.raises(ConfigurationError, match="truncate"):
        cohere(server, truncate="MIDDLE")
    with pytest.raises(ConfigurationError, match="output_dtype"):
        cohere(server, output_dtype="int4")
    with pytest.raises(ConfigurationError, match="float embeddings only"):
        voyage(server, "voyage-law-2", output_dtype="int8")
    with pytest.raises(ConfigurationError, match="task_type"):
        gemini(server, task_type="RETRIEVAL")
    with pytest.raises(ConfigurationError, match="128 to 3072"):
        gemini(server, dimensions=64)
    with pytest.raises(ConfigurationError, match="256, 512, 1024"):
        bedrock(server, dimensions=768)
    with pytest.raises(ConfigurationError, match="does not take dimensions"):
        bedrock(server, "cohere.embed-english-v3", dimensions=512)
    assert all(led.requests == 0 for led in server.control.ledgers.values())


# ---------------------------------------------------------------------------------------------- Cohere
def test_cohere_roles_vectors_and_billing(server: ProviderTestServer) -> None:
    texts = ["alpha", "beta", "alpha", "gamma"]
    with pipe_for(cohere(server)) as pipe:
        out = pipe.embed_array(texts)
        query = pipe.embed_query("alpha")
        for t, v in zip(texts, out, strict=True):
            np.testing.assert_allclose(v, expected_float("cohere", "embed-english-v3.0", "search_document", t),
                                       rtol=1e-6)
        np.testing.assert_allclose(query, expected_float("cohere", "embed-english-v3.0", "search_query", "alpha"),
                                   rtol=1e-6)
        led = server.ledger("cohere")
        assert [b["input_type"] for b in led.bodies] == ["search_document", "search_query"]
        assert led.bodies[0]["truncate"] == "END" and led.bodies[0]["embedding_types"] == ["float"]
        assert pipe.stats.tokens == led.billed_tokens  # meta.billed_units.input_tokens, not our estimate
        assert pipe.stats.cost_usd == pytest.approx(led.billed_tokens * 0.10 / 1e6)
        assert led.headers[0]["authorization"] == "Bearer co-test"


def test_cohere_never_sends_97_texts(server: ProviderTestServer) -> None:
    texts = [f"text number {i}" for i in range(250)]
    with pipe_for(cohere(server)) as pipe:
        assert pipe.embed_array(texts).shape == (250, 1024)
    led = server.ledger("cohere")
    assert max(led.batch_sizes) == 96 and sum(led.batch_sizes) == 250 and led.rejected == 0
    # The server does reject 97 (the SDK straight at it) ...
    import cohere as sdk
    import httpx

    with httpx.Client() as http, pytest.raises(sdk.BadRequestError, match="at most 96"):
        sdk.ClientV2(api_key="co-test", base_url=server.url, httpx_client=http).embed(
            model="embed-english-v3.0", texts=texts[:97], input_type="search_document", embedding_types=["float"])
    # ... and the provider refuses a 97-text batch before sending it.
    sent = server.ledger("cohere").requests
    with pytest.raises(ConfigurationError, match="at most 96"):
        run(cohere(server), texts[:97])
    assert server.ledger("cohere").requests == sent


def test_cohere_fixed_input_type_shares_one_vector_space(server: ProviderTestServer) -> None:
    provider = cohere(server, input_type="clustering")
    assert provider.role_sensitive is False and provider.identity()["input_type"] == "clustering"
    with pipe_for(provider) as pipe:
        doc = pipe.embed_array(["delta"])[0]
        query = pipe.embed_query("delta")  # same key: a cache hit, not a request
    np.testing.assert_allclose(doc, query)
    np.testing.assert_allclose(doc, expected_float("cohere", "embed-english-v3.0", "clustering", "delta"), rtol=1e-6)
    assert server.ledger("cohere").requests == 1


def test_cohere_v4_output_dimension(server: ProviderTestServer) -> None:
    with pipe_for(cohere(server, "embed-v4.0", dimensions=512), dimensions=512) as pipe:
        out = pipe.embed_array(["epsilon"])
    assert out.shape == (1, 512)
    np.testing.assert_allclose(out[0], expected_float("cohere", "embed-v4.0", "search_document", "epsilon", 512),
                               rtol=1e-6)
    assert server.ledger("cohere").bodies[0]["output_dimension"] == 512


@pytest.mark.parametrize("dtype", ["int8", "uint8", "binary", "ubinary"])
def test_cohere_native_output_types(server: ProviderTestServer, dtype: str) -> None:
    provider = cohere(server, "embed-v4.0", output_dtype=dtype)
    result = run(provider, ["zeta", "eta"])
    assert isinstance(result, QuantizedBatchResult) and result.quantized is not None
    q = result.quantized
    assert q.dtype == dtype and q.dimensions == 1536 and len(q) == 2
    assert server.ledger("cohere").bodies[-1]["embedding_types"] == [dtype]
    want = [expected_float("cohere", "embed-v4.0", "search_document", t) for t in ("zeta", "eta")]
    if dtype in ("int8", "uint8"):
        offset = 128 if dtype == "uint8" else 0
        np.testing.assert_array_equal(q.values.astype(np.int64) - offset, np.stack([server_int8(w) for w in want]))
    else:
        np.testing.assert_array_equal(q.values, np.stack([np.packbits(w > 0) for w in want]))
        np.testing.assert_array_equal(result.vectors > 0, np.stack(want) > 0)  # the ±1 view keeps each sign
    assert result.tokens == server.ledger("cohere").billed_tokens
    assert provider.identity()["embedding_type"] == dtype


def test_cohere_429_is_retried_after_the_hint(server: ProviderTestServer) -> None:
    server.control.fail_next("cohere", 429, times=2, retry_after=3)
    clock = FakeClock()
    with pipe_for(cohere(server), clock) as pipe:
        out = pipe.embed_array(["theta"])
        assert pipe.stats.rate_limited == 2 and pipe.stats.retries == 2
    np.testing.assert_allclose(out[0], expected_float("cohere", "embed-english-v3.0", "search_document", "theta"),
                               rtol=1e-6)
    assert sum(1 for w in clock.waits if w >= 3) >= 2
    server.control.fail_next("cohere", 429, retry_after=3)
    with pytest.raises(RateLimitedError) as info:
        run(cohere(server), ["iota"])
    assert info.value.retry_after == 3 and info.value.status == 429


def test_cohere_cache_keys_follow_role_and_options(server: ProviderTestServer) -> None:
    cache = MemoryCache()
    with pipe_for(cohere(server), cache=cache) as pipe:
        pipe.embed(["kappa"])
        pipe.embed_query("kappa")  # another role: another key
        pipe.embed(["kappa"])  # hit
    assert server.ledger("cohere").requests == 2
    for opts in ({"truncate": "NONE"}, {"output_dtype": "int8"}, {"input_type": "classification"}):
        with pipe_for(cohere(server, **opts), cache=cache) as pipe:
            pipe.embed(["kappa"])
    assert server.ledger("cohere").requests == 5, "each option that changes vectors has its own keys"


def test_cohere_4xx_is_not_retried_and_names_the_reason(server: ProviderTestServer) -> None:
    with pipe_for(cohere(server), errors="collect") as pipe:
        server.control.fail_next("cohere", 400)
        result = pipe.embed(["lambda"])
    assert 0 in result.failures and "HTTP 400" in str(result.failures[0])


# ---------------------------------------------------------------------------------------------- Voyage
def test_voyage_roles_vectors_usage_and_price(server: ProviderTestServer) -> None:
    with pipe_for(voyage(server)) as pipe:
        doc = pipe.embed_array(["mu", "nu"])
        query = pipe.embed_query("mu")
        np.testing.assert_allclose(doc[1], expected_float("voyage", "voyage-3.5", "document", "nu"), rtol=1e-6)
        np.testing.assert_allclose(query, expected_float("voyage", "voyage-3.5", "query", "mu"), rtol=1e-6)
        led = server.ledger("voyage")
        assert [b["input_type"] for b in led.bodies] == ["document", "query"]
        assert all(b["truncation"] is True for b in led.bodies)
        assert pipe.stats.tokens == led.billed_tokens
        assert pipe.stats.cost_usd == pytest.approx(led.billed_tokens * 0.06 / 1e6)


def test_voyage_batches_stay_under_1000_inputs_and_the_token_cap(server: ProviderTestServer) -> None:
    provider = voyage(server, "voyage-3-large")
    assert provider.info.batch_size == 1000 and provider.info.max_batch_tokens == 120_000
    words = " ".join(f"w{i}" for i in range(600))
    long_texts = [f"{i} {words}" for i in range(150)]
    short_texts = [f"short {i}" for i in range(1200)]
    with pipe_for(provider) as pipe:
        assert pipe.embed_array(long_texts).shape == (150, 1024)
        assert pipe.embed_array(short_texts).shape == (1200, 1024)
    led = server.ledger("voyage")
    assert led.rejected == 0 and max(led.batch_sizes) <= 1000 and len(led.batch_sizes) >= 4
    enc = cl100k_encoding()
    per_request = [sum(len(enc.encode(t)) for t in b["input"]) for b in led.bodies]
    assert max(per_request) <= 120_000 < sum(len(enc.encode(t)) for t in long_texts)  # they needed 2+ requests


@pytest.mark.parametrize("dtype", ["int8", "ubinary"])
def test_voyage_native_output_types(server: ProviderTestServer, dtype: str) -> None:
    result = run(voyage(server, output_dtype=dtype, dimensions=256), ["xi"], "query")
    assert isinstance(result, QuantizedBatchResult) and result.quantized is not None
    body = server.ledger("voyage").bodies[-1]
    assert body["output_dtype"] == dtype and body["output_dimension"] == 256 and body["input_type"] == "query"
    want = expected_float("voyage", "voyage-3.5", "query", "xi", 256)
    if dtype == "int8":
        np.testing.assert_array_equal(result.quantized.values[0], server_int8(want))
    else:
        assert result.quantized.values.shape == (1, 32)
        np.testing.assert_array_equal(result.quantized.values[0], np.packbits(want > 0))


def test_voyage_429_hint_and_no_input_type(server: ProviderTestServer) -> None:
    server.control.fail_next("voyage", 429, retry_after=4)
    with pytest.raises(RateLimitedError) as info:
        run(voyage(server), ["omicron"])
    assert info.value.retry_after == 4
    provider = voyage(server, input_type=False)
    assert provider.role_sensitive is False
    run(provider, ["omicron"], "query")
    assert server.ledger("voyage").bodies[-1]["input_type"] is None


# ---------------------------------------------------------------------------------------------- Azure
def test_azure_deployment_url_api_version_and_key(server: ProviderTestServer) -> None:
    provider = azure(server, model="text-embedding-3-small")
    assert provider.price_per_1m_tokens == 0.02 and provider.dimensions == 1536
    with pipe_for(provider) as pipe:
        out = pipe.embed_array(["pi", "rho"])
        assert pipe.stats.cost_usd == pytest.approx(server.ledger("azure").billed_tokens * 0.02 / 1e6)
    np.testing.assert_allclose(out[0], expected_float("azure", "text-embedding-3-small", None, "pi"), rtol=1e-6)
    led = server.ledger("azure")
    assert led.headers[0]["api-key"] == "az-test"
    assert led.bodies[0]["encoding_format"] == "base64"  # the OpenAI provider's decode path


def test_azure_entra_token_dimensions_and_unknown_deployment(server: ProviderTestServer) -> None:
    provider = azure(server, "text-embedding-3-small", api_key=None, azure_ad_token_provider=lambda: "entra-tok",
                     dimensions=256)
    with pipe_for(provider, dimensions=256) as pipe:
        out = pipe.embed_array(["sigma"])
    np.testing.assert_allclose(out[0], expected_float("azure", "text-embedding-3-small", None, "sigma", 256),
                               rtol=1e-6)
    assert server.ledger("azure").headers[-1]["authorization"] == "Bearer entra-tok"
    unknown = azure(server, "no-such-deployment")
    assert unknown.price_per_1m_tokens is None  # an unknown model's price is unknown, never $0
    with pytest.raises(ProviderError, match="404") as info:
        run(unknown, ["tau"])
    assert info.value.request_level


def test_azure_429_retry_after_ms(server: ProviderTestServer) -> None:
    server.control.fail_next("azure", 429, retry_after=2)
    with pytest.raises(RateLimitedError) as info:
        run(azure(server), ["upsilon"])
    assert info.value.retry_after == 2.0


# ---------------------------------------------------------------------------------------------- Gemini
def test_gemini_task_types_dimensions_and_usage(server: ProviderTestServer) -> None:
    with pipe_for(gemini(server, dimensions=768), dimensions=768) as pipe:
        doc = pipe.embed_array(["phi"])[0]
        query = pipe.embed_query("phi")
        assert pipe.stats.tokens == server.ledger("gemini").billed_tokens
        assert pipe.stats.cost_usd == pytest.approx(pipe.stats.tokens * 0.15 / 1e6)
    # Gemini sends the truncated vector unnormalized; the provider scales it to unit length.
    np.testing.assert_allclose(doc, expected_float("gemini", "gemini-embedding-001", "RETRIEVAL_DOCUMENT", "phi", 768),
                               rtol=1e-5)
    np.testing.assert_allclose(query, expected_float("gemini", "gemini-embedding-001", "RETRIEVAL_QUERY", "phi", 768),
                               rtol=1e-5)
    led = server.ledger("gemini")
    req = led.bodies[0]["requests"][0]
    assert req["taskType"] == "RETRIEVAL_DOCUMENT" and req["outputDimensionality"] == 768
    assert req["model"] == "models/gemini-embedding-001" and led.headers[0]["x-goog-api-key"] == "g-test"


def test_gemini_batches_of_100_and_missing_usage(server: ProviderTestServer) -> None:
    server.control.gemini_usage = False
    texts = [f"chi {i}" for i in range(250)]
    with pipe_for(gemini(server)) as pipe:
        assert pipe.embed_array(texts).shape == (250, 3072)
        assert pipe.stats.tokens > 0  # no usage reported: the engine bills its own count
    led = server.ledger("gemini")
    assert max(led.batch_sizes) == 100 and led.rejected == 0


def test_gemini_429_retry_info_and_query_task_type(server: ProviderTestServer) -> None:
    server.control.fail_next("gemini", 429, retry_after=7)
    with pytest.raises(RateLimitedError) as info:
        run(gemini(server), ["psi"])
    assert info.value.retry_after == 7.0
    provider = gemini(server, query_task_type="QUESTION_ANSWERING")
    run(provider, ["psi"], "query")
    assert server.ledger("gemini").bodies[-1]["requests"][0]["taskType"] == "QUESTION_ANSWERING"
    assert provider.identity()["query_task_type"] == "QUESTION_ANSWERING"


# ---------------------------------------------------------------------------------------------- Bedrock
def test_bedrock_titan_is_one_text_per_request_sent_concurrently(server: ProviderTestServer) -> None:
    provider = bedrock(server, dimensions=512, normalize=False)
    assert provider.info.batch_size == 1 and provider.info.default_concurrency > 1
    texts = [f"omega {i}" for i in range(20)]
    with pipe_for(provider, dimensions=512) as pipe:
        out = pipe.embed_array(texts)
        assert pipe.stats.tokens == server.ledger("bedrock").billed_tokens  # the token-count header
        assert pipe.stats.cost_usd == pytest.approx(pipe.stats.tokens * 0.02 / 1e6)
    led = server.ledger("bedrock")
    assert led.batch_sizes == [1] * 20
    assert all(b["dimensions"] == 512 and b["normalize"] is False for b in led.bodies)
    np.testing.assert_allclose(out[3], 3.0 * expected_float("bedrock", "amazon.titan-embed-text-v2:0", None,
                                                            texts[3], 512), rtol=1e-5)
    assert led.headers[0]["authorization"].startswith("AWS4-HMAC-SHA256 Credential=AKIDTEST/")


def test_bedrock_titan_binary_api_key_and_throttling(server: ProviderTestServer) -> None:
    provider = bedrock(server, api_key="bedrock-key", output_dtype="ubinary")
    result = run(provider, ["alef"])
    assert isinstance(result, QuantizedBatchResult) and result.quantized is not None
    want = expected_float("bedrock", "amazon.titan-embed-text-v2:0", None, "alef")
    np.testing.assert_array_equal(result.quantized.values[0], np.packbits(want > 0))
    led = server.ledger("bedrock")
    assert led.bodies[-1]["embeddingTypes"] == ["binary"] and led.headers[-1]["authorization"] == "Bearer bedrock-key"
    server.control.fail_next("bedrock", 429, retry_after=5)
    with pytest.raises(RateLimitedError, match="ThrottlingException") as info:
        run(provider, ["bet"])
    assert info.value.retry_after == 5


def test_bedrock_cohere_roles_batches_and_int8(server: ProviderTestServer) -> None:
    texts = [f"gimel {i}" for i in range(100)]
    with pipe_for(bedrock(server, "cohere.embed-english-v3")) as pipe:
        out = pipe.embed_array(texts)
        query = pipe.embed_query("gimel 0")
    led = server.ledger("bedrock")
    assert sorted(led.batch_sizes) == [1, 4, 96] and led.rejected == 0
    assert {b["input_type"] for b in led.bodies} == {"search_document", "search_query"}
    np.testing.assert_allclose(out[0], expected_float("bedrock", "cohere.embed-english-v3", "search_document",
                                                      "gimel 0"), rtol=1e-6)
    np.testing.assert_allclose(query, expected_float("bedrock", "cohere.embed-english-v3", "search_query",
                                                     "gimel 0"), rtol=1e-6)
    result = run(bedrock(server, "cohere.embed-english-v3", output_dtype="int8"), ["dalet"])
    assert isinstance(result, QuantizedBatchResult) and result.quantized is not None
    np.testing.assert_array_equal(result.quantized.values[0], server_int8(
        expected_float("bedrock", "cohere.embed-english-v3", "search_document", "dalet")))


def test_bedrock_503_is_retried(server: ProviderTestServer) -> None:
    server.control.fail_next("bedrock", 503, times=2)
    clock = FakeClock()
    with pipe_for(bedrock(server), clock) as pipe:
        pipe.embed_array(["he"])
        assert pipe.stats.retries == 2


# ---------------------------------------------------------------------------------------------- prices
def test_estimate_and_budget_work_for_every_priced_provider(server: ProviderTestServer) -> None:
    texts = [f"estimate me {i}" for i in range(10)]
    providers = [cohere(server, "embed-v4.0"), voyage(server), azure(server, "text-embedding-3-small"),
                 gemini(server), bedrock(server), bedrock(server, "cohere.embed-english-v3")]
    for provider in providers:
        assert provider.price_per_1m_tokens and provider.price_per_1m_tokens > 0, provider.spec
        with pipe_for(provider, budget_usd=1.0) as pipe:
            est = pipe.estimate(texts)
            assert est.cost_usd == pytest.approx(est.tokens * provider.price_per_1m_tokens / 1e6)
    assert all(led.requests == 0 for led in server.control.ledgers.values()), "estimate sends nothing"
    unpriced = cohere(server, "my-finetune")
    assert unpriced.price_per_1m_tokens is None
    with pytest.raises(ConfigurationError, match="price"):
        pipe_for(unpriced, budget_usd=1.0)


def test_budget_stops_spending(server: ProviderTestServer) -> None:
    with pipe_for(cohere(server), budget_usd=1e-9) as pipe, pytest.raises(BudgetExceededError):
        pipe.embed_array([f"too expensive {i}" for i in range(5)])
    assert server.ledger("cohere").requests == 0


def test_output_dtype_reaches_only_providers_that_ask_for_it(server: ProviderTestServer) -> None:
    """The engine passes output_dtype to every spec; a float-only provider ignores it, and the engine quantizes."""
    titan = bedrock(server, output_dtype="int8")
    assert "int8" not in titan.native_output_dtypes  # type: ignore[attr-defined]
    result = run(titan, ["vav"])
    assert not isinstance(result, QuantizedBatchResult) and result.vectors.dtype == np.float32
    assert "embeddingTypes" not in server.ledger("bedrock").bodies[-1]
    g = made(provider_from_spec("gemini:gemini-embedding-001", api_key="g", base_url=server.url, output_dtype="int8"))
    assert not hasattr(g, "output_dtype")
    assert "int8" in cohere(server, output_dtype="int8").native_output_dtypes  # type: ignore[attr-defined]


def test_specs_through_the_pipeline_options(server: ProviderTestServer) -> None:
    """The pipeline's own api_key/base_url/dimensions reach each provider built from a spec (and it closes them)."""
    with EmbeddingPipeline("cohere:embed-v4.0", api_key="co-test", base_url=server.url, dimensions=256,
                           cache="memory://") as pipe:
        assert pipe.embed_array(["spec"]).shape == (1, 256)
    assert server.ledger("cohere").bodies[-1]["output_dimension"] == 256
    with EmbeddingPipeline("gemini:gemini-embedding-001", api_key="g-test", base_url=server.url,
                           cache="memory://") as pipe:
        assert pipe.embed_array(["spec"]).shape == (1, 3072)
    with EmbeddingPipeline("voyage:voyage-4-lite", api_key="pa-test", base_url=f"{server.url}/v1",
                           cache="memory://") as pipe:
        assert pipe.provider.info.max_batch_tokens == 1_000_000
        assert pipe.embed_array(["spec"]).shape == (1, 1024)
