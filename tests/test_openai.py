"""The OpenAI provider through the real SDK and HTTP stack, against the fault-injecting test server."""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any

import numpy as np
import pytest

from embedpipe import EmbeddingPipeline
from embedpipe.errors import (
    BudgetExceededError,
    ConfigurationError,
    DimensionMismatchError,
    EmbeddingFailedError,
)
from embedpipe.tokens import TiktokenTokenizer
from tests.openai_server import OpenAITestServer, expected_vector

MODEL = "text-embedding-3-small"


class Sleeps:
    """Records retry waits without waiting (the server's retry-after-ms is honoured in the record)."""

    def __init__(self) -> None:
        self.waits: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.waits.append(seconds)
        await asyncio.sleep(0)


def pipe_for(server: OpenAITestServer, **kw: Any) -> EmbeddingPipeline:
    kw.setdefault("cache", "memory://")
    return EmbeddingPipeline(f"openai:{kw.pop('model', MODEL)}", base_url=server.base_url, api_key="sk-test", **kw)


def test_exact_vectors_order_usage_and_cost(openai_server: OpenAITestServer) -> None:
    texts = ["alpha", "beta", "gamma", "alpha"]
    with pipe_for(openai_server) as pipe:
        out = pipe.embed(texts)
        for t, v in zip(texts, out, strict=False):
            np.testing.assert_allclose(v, expected_vector(t, 1536), rtol=1e-6)
        ledger = openai_server.ledger
        assert ledger.requests_ok == 1 and ledger.billed_tokens == pipe.stats.tokens
        assert pipe.stats.cost_usd == pytest.approx(pipe.stats.tokens * 0.02 / 1e6)
        assert pipe.embed(texts) == out
        assert openai_server.ledger.requests_total == 1
        assert pipe.stats.saved_usd == pytest.approx(pipe.stats.tokens * 0.02 / 1e6)


def test_1500_real_documents_through_20_percent_faults(openai_server: OpenAITestServer,
                                                       corpus: list[dict[str, str]]) -> None:
    """Faults that bill nothing (429, 5xx, stalls, dropped connections) plus shuffled data:
    every vector exact, in order, and no text billed twice."""
    docs = [r["text"] for r in corpus[:1200] if r["text"].strip()]
    texts = docs + docs[:300]  # 1,500 inputs with duplicates
    openai_server.control.configure(
        stall_seconds=12, retry_after_ms=20, seed=7,
        fault_rates={"rate_limit": 0.05, "server_error": 0.04, "unavailable": 0.03, "stall": 0.02,
                     "drop": 0.03, "shuffle": 0.05})
    sleeps = Sleeps()
    # The timeout must cut stalls short but never a healthy request: on a loaded 2-core CI machine
    # a 64-input request can take over a second, and a client that gives up on a request the server
    # then completes is billed twice, as OpenAI would bill it.
    with pipe_for(openai_server, batch_size=64, timeout=4.0, max_retries=12, sleep=sleeps) as pipe:
        out = pipe.embed_array(texts)
        st = pipe.stats
    expected = np.stack([expected_vector(t, 1536) for t in texts])
    long_ones = {i for i, t in enumerate(texts)
                 if TiktokenTokenizer.for_encoding("cl100k_base").count([t])[0] > 8191}
    short = [i for i in range(len(texts)) if i not in long_ones]
    np.testing.assert_allclose(out[short], expected[short], rtol=1e-5, atol=1e-6)
    ledger = openai_server.ledger
    assert max(ledger.times_billed.values()) == 1, "a text was billed twice"
    assert st.retries > 0 and st.rate_limited > 0, "faults were injected"
    assert ledger.billed_tokens == st.tokens
    assert any(w >= 0.02 for w in sleeps.waits), "retry-after-ms was honoured"


def test_nan_and_wrong_count_are_retried_never_returned(openai_server: OpenAITestServer) -> None:
    sleeps = Sleeps()
    openai_server.control.script("nan", "wrong_count", "wrong_dims", "ok")
    with pipe_for(openai_server, sleep=sleeps) as pipe:
        out = pipe.embed_array(["one", "two", "three"])
        assert np.isfinite(out).all()
        assert pipe.stats.retries == 3
        np.testing.assert_allclose(out[1], expected_vector("two", 1536), rtol=1e-6)


def test_sdk_retries_are_off(openai_server: OpenAITestServer) -> None:
    openai_server.control.script("server_error", "ok")
    with pipe_for(openai_server, sleep=Sleeps()) as pipe:
        pipe.embed(["x"])
        assert pipe.stats.requests == 2
    assert openai_server.ledger.requests_total == 2, "the SDK retried on its own"


@pytest.mark.parametrize("fault,status", [("insufficient_quota", 429), ("server_error", 500)])
def test_fail_fast_rules(openai_server: OpenAITestServer, fault: str, status: int) -> None:
    if fault == "insufficient_quota":
        openai_server.control.fail_next("insufficient_quota", 20)
    else:
        openai_server.control.configure(should_retry=False)
        openai_server.control.fail_next("server_error", 20)
    with pipe_for(openai_server, sleep=Sleeps()) as pipe, pytest.raises(EmbeddingFailedError, match=str(status)):
        pipe.embed(["a", "b"])
    assert openai_server.ledger.requests_total == 1


def test_unknown_limits_recover_from_429s(openai_server: OpenAITestServer) -> None:
    """Told no limits, the pipeline meets the server's 429s, waits them out and loses nothing."""
    openai_server.control.configure(rpm=20, tpm=None, window=1.0)
    with pipe_for(openai_server, batch_size=1, max_concurrency=8) as pipe:
        out = pipe.embed([f"t{i}" for i in range(40)])
        st = pipe.stats
    ledger = openai_server.ledger
    assert ledger.requests_ok == 40 and all(v is not None for v in out)
    assert st.rate_limited == ledger.responses_429 > 0
    assert st.requests == ledger.requests_total


def test_tpm_limit_keeps_429s_rare(openai_server: OpenAITestServer, corpus: list[dict[str, str]]) -> None:
    texts = [r["text"][:2000] for r in corpus[:300]]
    # A 3-second window: long enough that a loaded CI machine's scheduling jitter is a
    # small share of it, short enough that the test waits on no real minute.
    tpm = 60_000
    openai_server.control.configure(rpm=None, tpm=tpm, window=3.0)
    from embedpipe.limits import MemoryRateLimiter

    # The limiter is told the server's limit and window.
    limiter = MemoryRateLimiter(tpm=tpm, window=3.0)
    with pipe_for(openai_server, cache=None, rate_limiter=limiter, batch_size=16) as pipe:
        pipe.embed(texts)
        st = pipe.stats
    ledger = openai_server.ledger
    assert ledger.requests_ok == st.requests - st.rate_limited
    assert ledger.responses_429 <= 0.05 * ledger.requests_total, ledger.status_counts


@pytest.mark.parametrize(("rpm", "most_tokens", "filled"), [(None, 80_000 // 8, 1024 // 2),
                                                            (8, int(80_000 / 8 / 0.9), int(80_000 / 8 / 0.9) // 2)])
def test_requests_hold_a_fraction_of_the_tpm_bucket(openai_server: OpenAITestServer, corpus: list[dict[str, str]],
                                                    rpm: int | None, most_tokens: int, filled: int) -> None:
    """Under a TPM limit requests stay small enough to flow as the bucket refills (at most an
    eighth of it). With an RPM limit too, they are the smallest that keep the request rate at 90%
    of its limit while the token rate is met (tpm / (rpm x 0.9)); without one, on this fast server
    (little needs to be in flight), they hold at least 1,024 tokens, not one text each."""
    from embedpipe.limits import MemoryRateLimiter

    texts = [r["text"][:2000] for r in corpus[:200]]
    limiter = MemoryRateLimiter(rpm=rpm, tpm=80_000, window=60.0)
    with pipe_for(openai_server, cache=None, rate_limiter=limiter) as pipe:
        sizes: list[int] = []
        send = pipe.provider.aembed_batch

        async def recording(batch: list[str], role: Any) -> Any:
            result = await send(batch, role)
            sizes.append(result.tokens)
            return result

        pipe.provider.aembed_batch = recording  # type: ignore[method-assign]  # observes the real calls
        out = pipe.embed(texts)
    assert all(v is not None for v in out)
    assert sum(sizes) == openai_server.ledger.billed_tokens > most_tokens  # needs several requests
    assert max(sizes) <= most_tokens
    assert max(sizes) > filled, "requests are filled up to their size"


def test_estimate_matches_billed_tokens(openai_server: OpenAITestServer, corpus: list[dict[str, str]]) -> None:
    texts = [r["text"] for r in corpus[:400]]
    with pipe_for(openai_server, cache=None) as pipe:
        est = pipe.estimate(texts)
        assert openai_server.ledger.requests_total == 0, "estimate made an API call"
        pipe.embed(texts)
    billed = openai_server.ledger.billed_tokens
    assert abs(est.tokens - billed) <= 0.01 * billed
    assert est.cost_usd == pytest.approx(est.tokens * 0.02 / 1e6)


def test_budget_refuses_then_stops_before_overspending(openai_server: OpenAITestServer,
                                                       corpus: list[dict[str, str]]) -> None:
    texts = [r["text"] for r in corpus[:200]]
    with pipe_for(openai_server, budget_usd=0.0001) as pipe:
        with pytest.raises(BudgetExceededError, match="nothing was sent"):
            pipe.embed(texts)
        assert openai_server.ledger.requests_total == 0
        # Spend in chunks until the budget refuses: it never crosses it.
        spent_before_refusal = 0.0
        for start in range(0, 200, 10):
            try:
                pipe.embed(texts[start:start + 10])
            except BudgetExceededError:
                break
            spent_before_refusal = pipe.spent_usd
        assert 0 < spent_before_refusal <= 0.0001
        assert pipe.spent_usd <= 0.0001


def test_one_rejected_input_is_isolated(openai_server: OpenAITestServer) -> None:
    openai_server.control.configure(poison=("POISON",))
    texts = [f"document {i}" for i in range(100)]
    texts[37] = "this one holds POISON"
    with pipe_for(openai_server, errors="collect") as pipe:
        out = pipe.embed(texts)
    assert list(out.failures) == [37] and "400" in str(out.failures[37])
    assert out.failures[37].kind == "rejected" and out.failures[37].status == 400
    billed = openai_server.ledger.times_billed
    assert all(billed[t] == 1 for i, t in enumerate(texts) if i != 37)
    assert openai_server.ledger.requests_total <= 2 * 7 + 2


def test_unsupported_dimensions_fail_on_first_call(openai_server: OpenAITestServer) -> None:
    openai_server.control.configure(dimensions_mode="reject")
    with pipe_for(openai_server, model="nomic-embed-text:latest", dimensions=64, errors="collect") as pipe:
        out = pipe.embed([f"t{i}" for i in range(300)])
        assert len(out.failures) == 300
        assert "dimensions" in str(out.failures[0])
    assert openai_server.ledger.requests_total == 1


def test_ignored_dimensions_are_detected(openai_server: OpenAITestServer) -> None:
    openai_server.control.configure(dimensions_mode="ignore")
    with pipe_for(openai_server, model="my-model", dimensions=64) as pipe, \
            pytest.raises(DimensionMismatchError, match="ignore"):
        pipe.embed(["x"])


def test_matryoshka_dimensions_are_sent_and_keyed(openai_server: OpenAITestServer) -> None:
    from embedpipe.cache import cache_from_url

    backend = cache_from_url("memory://")
    with pipe_for(openai_server, cache=backend) as full:
        full.embed(["m"])
    with pipe_for(openai_server, cache=backend, dimensions=256) as small:
        v = small.embed(["m"])[0]
        assert small.stats.hits == 0
    np.testing.assert_allclose(v, expected_vector("m", 256), rtol=1e-5)
    with pytest.raises(ConfigurationError, match="does not support"):
        pipe_for(openai_server, model="text-embedding-ada-002", dimensions=256)


def test_unknown_model_learns_dims_and_has_unknown_cost(openai_server: OpenAITestServer) -> None:
    with pipe_for(openai_server, model="nomic-embed-text:latest") as pipe:
        assert pipe.provider.model == "nomic-embed-text:latest"
        v = pipe.embed(["hello"])[0]
        # Learned dimensions live in the pipeline, never on a provider other pipelines may share.
        assert len(v) == 384 and pipe.expected_dims == 384 and pipe.provider.dimensions is None
        assert pipe.stats.cost_usd is None and pipe.stats.tokens > 0
    with pytest.raises(ConfigurationError, match="price"):
        pipe_for(openai_server, model="nomic-embed-text:latest", budget_usd=1.0)


def test_base_url_enters_the_key_unless_namespaced(openai_server: OpenAITestServer) -> None:
    from embedpipe.cache import cache_from_url

    backend = cache_from_url("memory://")
    with pipe_for(openai_server, cache=backend) as a:
        a.embed(["k"])
    with OpenAITestServer() as other, pipe_for(other, cache=backend) as b:
        b.embed(["k"])
        assert b.stats.hits == 0, "another server must not hit this server's vectors"
    shared = cache_from_url("memory://?namespace=prod")
    with pipe_for(openai_server, cache=shared) as a:
        a.embed(["k"])
    with OpenAITestServer() as other, pipe_for(other, cache=shared) as b:
        b.embed(["k"])
        assert b.stats.hits == 1


def test_long_documents_are_split_and_averaged(openai_server: OpenAITestServer,
                                               corpus: list[dict[str, str]]) -> None:
    tok = TiktokenTokenizer.for_encoding("cl100k_base")
    long_text = next(r["text"] for r in corpus if tok.count([r["text"]])[0] > 8192)
    with pipe_for(openai_server, cache=None) as pipe:
        v = np.array(pipe.embed([long_text])[0])
        assert pipe.stats.split == 1
    windows = tok.split(long_text, 8191)
    parts = np.stack([expected_vector(w, 1536) for w, _ in windows]).astype(np.float64)
    weights = np.array([n for _, n in windows], dtype=np.float64)
    mean = (parts * weights[:, None]).sum(0) / weights.sum()
    np.testing.assert_allclose(v, mean / np.linalg.norm(mean), atol=1e-5)
    assert openai_server.ledger.billed_tokens == sum(weights)


def test_async_concurrent_calls_share_limits(openai_server: OpenAITestServer) -> None:
    async def main() -> list[list[list[float]]]:
        async with pipe_for(openai_server, max_concurrency=4, batch_size=5) as pipe:
            return await asyncio.gather(*(pipe.aembed([f"q{k}-{i}" for i in range(20)]) for k in range(5)))

    results = asyncio.run(main())
    assert [len(r) for r in results] == [20] * 5
    assert Counter(openai_server.ledger.times_billed.values()) == Counter({1: 100})


def test_api_key_is_required_for_openai_proper(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    with pytest.raises(ConfigurationError, match="OPENAI_API_KEY"):
        EmbeddingPipeline("openai:text-embedding-3-small", cache=None)


def test_shared_redis_limiter_by_url(openai_server: OpenAITestServer, redis_url: str,
                                     redis_namespace: str) -> None:
    url = f"{redis_url}?key={redis_namespace}&rpm=1000&tpm=100000"
    with pipe_for(openai_server, rate_limiter=url) as a, pipe_for(openai_server, rate_limiter=url) as b:
        a.embed(["shared one"])
        b.embed(["shared two"])
        assert type(a.rate_limiter).__name__ == "RedisRateLimiter"
    assert openai_server.ledger.requests_ok == 2
