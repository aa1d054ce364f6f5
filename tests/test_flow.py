"""Request sizes and what is in flight follow from the rate and the observed latency (Little's law).

What a SIGKILL re-bills is what is in flight. These tests run real calls against the test
server (with its latency and rate limits) and watch each request as the provider sends it:
the wrapper only records sizes and times, the calls are the real ones. Throughput is measured
in ``benchmarks/`` (ratelimit, crashbill), never here.
"""

from __future__ import annotations

import math
import time
from typing import Any

import pytest

from embedpipe import EmbeddingPipeline
from embedpipe.engine.flow import (
    MODERATE_REQUEST_TOKENS,
    InFlight,
    LatencyModel,
    Sizing,
    at_risk_for,
    server_seconds,
    shrunk,
    sizing,
)
from embedpipe.errors import ConfigurationError
from embedpipe.limits import MemoryRateLimiter
from tests.openai_server import OpenAITestServer

MODEL = "text-embedding-3-small"


class Watch:
    """Wraps a pipeline's provider call: the tokens and seconds of each request, and the most in flight at once."""

    def __init__(self, pipe: EmbeddingPipeline) -> None:
        self.sizes: list[int] = []
        self.seconds: list[float] = []
        self.in_flight = 0
        self.most_in_flight = 0
        self.most_requests = 0
        self._requests = 0
        send = pipe.provider.aembed_batch
        count = pipe.provider.tokenizer.count

        async def watched(batch: list[str], role: Any) -> Any:
            tokens = sum(count(batch))
            self.sizes.append(tokens)
            self.in_flight += tokens
            self._requests += 1
            self.most_in_flight = max(self.most_in_flight, self.in_flight)
            self.most_requests = max(self.most_requests, self._requests)
            sent = time.perf_counter()
            try:
                return await send(batch, role)
            finally:
                self.seconds.append(time.perf_counter() - sent)
                self.in_flight -= tokens
                self._requests -= 1

        pipe.provider.aembed_batch = watched  # type: ignore[method-assign]  # observes the real calls

    @property
    def latency(self) -> float:
        """The mean seconds a token spent at the provider: latencies weighted by request size (Little's law's W)."""
        return sum(t * s for t, s in zip(self.sizes, self.seconds, strict=True)) / sum(self.sizes)


def test_under_rate_limits_in_flight_is_rate_times_latency(openai_server: OpenAITestServer,
                                                           corpus: list[dict[str, str]]) -> None:
    """Defect 2's scenario, shortened: the server allows 300 requests and 600k tokens per 10 s with
    0.3 s + 0.05 s per 1k tokens of latency; the client is told 1,800 rpm and 3.6M tpm. Requests
    are a few thousand tokens and about rate x latency is in flight (at 18f4d1d: requests of up to
    300k tokens, all in flight at once)."""
    openai_server.control.configure(rpm=300, tpm=600_000, window=10.0, latency=0.3, latency_per_token=5e-5)
    texts = [r["text"] for r in corpus[:400]]
    with EmbeddingPipeline(f"openai:{MODEL}", base_url=openai_server.base_url, api_key="sk-test", cache=None,
                           rpm=1_800, tpm=3_600_000) as pipe:
        watch = Watch(pipe)
        out = pipe.embed(texts)
    assert all(v is not None for v in out)
    total = openai_server.ledger.billed_tokens
    assert total > 200_000 and sum(watch.sizes) == total
    assert openai_server.ledger.responses_429 == 0
    # Little's law, with the latency this run saw: the test server shares this process, so a busy
    # machine slows its answers, and more must be in flight to hold the rate. The rate is at most
    # the limit's 60k tokens/s x (1.05 + 2 x the share of the bucket the server says is left,
    # 600k of 3.6M). The factor 2 leaves room for what the latency at the provider leaves out (the
    # limiter's wait, the client's own work: a token holds its place longer) and for the gate's swing
    # of half a request about the figure; one input may be a request of its own.
    longest_input = 8_191
    rate = 60_000 * (1.05 + 2 * 600_000 / 3_600_000)
    bound = 2 * rate * watch.latency + longest_input
    assert watch.most_in_flight <= bound, (watch.most_in_flight, watch.latency)
    # (Idle, this run keeps 45-51k in flight. At 18f4d1d: 280,799, in requests of a median 48,539 tokens.)
    assert sorted(watch.sizes)[len(watch.sizes) // 2] <= 6_000
    assert max(watch.sizes) <= max(longest_input, bound / 2)  # several requests share what is in flight
    assert len(watch.sizes) >= 40


def test_without_limits_requests_stay_moderate(openai_server: OpenAITestServer,
                                               corpus: list[dict[str, str]]) -> None:
    """Told no rpm/tpm, requests keep the provider's sizing, capped at a moderate size, and at most
    ``max_concurrency`` are in flight (at 18f4d1d: one request of every text, up to 300k tokens)."""
    texts = [r["text"] for r in corpus[:600]]
    with EmbeddingPipeline(f"openai:{MODEL}", base_url=openai_server.base_url, api_key="sk-test",
                           cache=None) as pipe:
        watch = Watch(pipe)
        pipe.embed(texts)
        concurrency = pipe.max_concurrency
    assert sum(watch.sizes) > 3 * MODERATE_REQUEST_TOKENS
    assert max(watch.sizes) <= MODERATE_REQUEST_TOKENS
    assert watch.most_requests <= concurrency
    assert watch.most_in_flight <= concurrency * MODERATE_REQUEST_TOKENS


def test_batch_size_and_max_batch_tokens_stay_caps(openai_server: OpenAITestServer,
                                                   corpus: list[dict[str, str]]) -> None:
    openai_server.control.configure(rpm=300, tpm=600_000, window=10.0)
    texts = [r["text"][:1500] for r in corpus[:300]]
    with EmbeddingPipeline(f"openai:{MODEL}", base_url=openai_server.base_url, api_key="sk-test", cache=None,
                           rpm=1_800, tpm=3_600_000, batch_size=3, max_batch_tokens=900) as pipe:
        watch = Watch(pipe)
        requests: list[int] = []
        send = pipe.provider.aembed_batch

        async def counted(batch: list[str], role: Any) -> Any:
            requests.append(len(batch))
            return await send(batch, role)

        pipe.provider.aembed_batch = counted  # type: ignore[method-assign]  # observes the real calls
        pipe.embed(texts)
    assert max(requests) <= 3
    assert all(s <= 900 or n == 1 for s, n in zip(watch.sizes, requests, strict=True))


def test_max_concurrency_given_caps_requests_in_flight(openai_server: OpenAITestServer,
                                                       corpus: list[dict[str, str]]) -> None:
    openai_server.control.configure(rpm=300, tpm=600_000, window=10.0, latency=0.1)
    texts = [r["text"][:1500] for r in corpus[:300]]
    with EmbeddingPipeline(f"openai:{MODEL}", base_url=openai_server.base_url, api_key="sk-test", cache=None,
                           rpm=1_800, tpm=3_600_000, max_concurrency=2) as pipe:
        watch = Watch(pipe)
        pipe.embed(texts)
    assert watch.most_requests <= 2


# ------------------------------------------------------------------ the pure rules
def test_latency_model_fits_intercept_and_slope() -> None:
    model = LatencyModel()
    assert model.predict(1000) == pytest.approx(0.5)  # the prior
    for tokens in [500, 4000, 1000, 8000, 2000, 3000] * 3:
        model.observe(tokens, 0.3 + 5e-5 * tokens)
    assert model.intercept == pytest.approx(0.3, abs=1e-6)
    assert model.slope == pytest.approx(5e-5, rel=1e-6)
    # Little's law's waiting time for a token: latencies weighted by request size.
    assert model.per_token == pytest.approx(0.3 + 5e-5 * (sum(t * t for t in [500, 4000, 1000, 8000, 2000, 3000])
                                                          / 18_500), rel=1e-2)  # recent answers weigh more


def test_alike_sizes_give_no_slope() -> None:
    model = LatencyModel()
    for _ in range(10):
        model.observe(2000, 0.4)
    assert model.slope == 0.0 and model.intercept == pytest.approx(0.4)


def test_sizing_follows_the_rates() -> None:
    limiter = MemoryRateLimiter(rpm=1_800, tpm=3_600_000, window=60.0)
    model = LatencyModel()
    for tokens in [1000, 3000, 2000, 5000, 2500] * 4:
        model.observe(tokens, 0.3 + 5e-5 * tokens)
    size = sizing(limiter, model, cap=300_000, max_concurrency=8, concurrency_given=False, remote=True)
    assert size.paced
    # Requests of about rate / (90% of the request rate), at least a quarter of the fixed latency's worth.
    assert size.tokens == int(60_000 / (30 * 0.9))
    assert size.in_flight_requests > 8  # max_concurrency was not given: Little's law decides
    rate = 60_000 * (1.05 + 2 * 1.0)  # a full bucket is spent over about half a window
    assert size.in_flight_tokens == pytest.approx(rate * model.per_token)
    given = sizing(limiter, model, cap=300_000, max_concurrency=3, concurrency_given=True, remote=True)
    assert given.in_flight_requests == 3


def test_sizing_without_limits_is_the_providers_capped() -> None:
    limiter = MemoryRateLimiter()
    size = sizing(limiter, LatencyModel(), cap=300_000, max_concurrency=8, concurrency_given=False, remote=True)
    assert size.tokens == MODERATE_REQUEST_TOKENS and not size.paced
    assert math.isinf(size.in_flight_tokens) and size.in_flight_requests == 8
    local = sizing(limiter, LatencyModel(), cap=None, max_concurrency=1, concurrency_given=False, remote=False)
    assert local.tokens is None and local.in_flight_requests == 1


def test_requests_shrink_at_the_end_of_a_call() -> None:
    limiter = MemoryRateLimiter(rpm=1_800, tpm=3_600_000, window=60.0)
    size = sizing(limiter, LatencyModel(), cap=300_000, max_concurrency=8, concurrency_given=False, remote=True)
    assert size.tokens is not None
    slots = size.in_flight_tokens / size.tokens
    assert shrunk(size, 10 * size.tokens * math.ceil(slots)) == size.tokens  # far from the end
    left = size.tokens  # one request's worth left: spread over the requests that may be in flight
    assert shrunk(size, left) == math.ceil(left / max(1.0, min(size.in_flight_requests, slots)))
    assert shrunk(size, left) < size.tokens  # type: ignore[operator]


def test_a_busy_client_does_not_inflate_the_latency() -> None:
    """With the server's own figure (``openai-processing-ms``), an answer read late by a busy client
    counts as the server's time plus the network's round trip, the smallest gap seen."""
    model = LatencyModel()
    model.observe(1000, 0.35, server=0.30)   # a 50 ms round trip
    model.observe(1000, 1.40, server=0.31)   # read a second late: the loop was busy
    assert model.per_token == pytest.approx((0.35 + 0.36) / 2, rel=0.05)
    assert server_seconds({"OpenAI-Processing-Ms": "310"}) == pytest.approx(0.31)
    assert server_seconds({"openai-processing-ms": "n/a"}) is None and server_seconds(None) is None


def test_max_tokens_in_flight_caps_what_a_crash_may_rebill(openai_server: OpenAITestServer,
                                                           corpus: list[dict[str, str]]) -> None:
    """A cap on tokens in flight holds whatever the rates; a job sets it to 1.5% of its tokens
    (at least 32k), so a crash re-bills at most about that."""
    openai_server.control.configure(rpm=300, tpm=600_000, window=10.0, latency=0.2, latency_per_token=5e-5)
    texts = [r["text"] for r in corpus[:300]]
    with EmbeddingPipeline(f"openai:{MODEL}", base_url=openai_server.base_url, api_key="sk-test", cache=None,
                           rpm=1_800, tpm=3_600_000) as pipe:
        pipe.max_tokens_in_flight = 12_000
        watch = Watch(pipe)
        out = pipe.embed(texts)
        with pytest.raises(ConfigurationError, match="max_tokens_in_flight"):
            pipe.max_tokens_in_flight = 0
    assert all(v is not None for v in out)
    # One input longer than the cap still goes, alone.
    assert watch.most_in_flight <= max(12_000, max(watch.sizes)), watch.most_in_flight
    assert at_risk_for(10_000_000) == 150_000 and at_risk_for(2_094_764) == MODERATE_REQUEST_TOKENS


def test_the_jobs_cap_leaves_unlimited_sizing_alone() -> None:
    """Without rpm/tpm, a job's cap on tokens in flight does not apply: max_concurrency moderate requests go."""
    size = sizing(MemoryRateLimiter(), LatencyModel(), cap=300_000, max_concurrency=8, concurrency_given=False,
                  remote=True, at_risk=32_768)
    assert size.tokens == MODERATE_REQUEST_TOKENS and math.isinf(size.in_flight_tokens)
    paced = sizing(MemoryRateLimiter(rpm=1_800, tpm=3_600_000), LatencyModel(), cap=300_000, max_concurrency=8,
                   concurrency_given=False, remote=True, at_risk=32_768)
    assert paced.in_flight_tokens <= 32_768 and paced.tokens is not None and paced.tokens <= 16_384


def test_a_request_that_raises_stops_sending(openai_server: OpenAITestServer) -> None:
    """A request that raises (here a bug in a wrapped provider call: bugs propagate) stops the call:
    the requests still waiting to be cut are never sent."""
    with EmbeddingPipeline(f"openai:{MODEL}", base_url=openai_server.base_url, api_key="sk-test", cache=None,
                           batch_size=10, max_concurrency=2) as pipe:
        calls: list[int] = []

        async def broken(batch: list[str], role: Any) -> Any:
            calls.append(len(batch))
            raise TypeError("a bug in the provider call")

        pipe.provider.aembed_batch = broken  # type: ignore[method-assign]  # a bug, injected
        with pytest.raises(TypeError, match="a bug"):
            pipe.embed([f"text number {i}" for i in range(200)])
    assert len(calls) <= 2


def test_the_gate_holds_littles_figure_as_a_mean_and_a_jobs_cap_as_a_ceiling() -> None:
    """A request leaves once half of it fits under Little's law's figure (a gate that never passed the
    figure held half a request below it on average: 40k of a 49.5k-token/s target at 3 ms per 1k),
    but never past a hard cap."""
    gate = InFlight()
    gate.add(9_000)
    target = Sizing(2_000, 10_000.0, 8, True)
    assert gate.has_room(target, 2_000)             # 9,000 + half of 2,000 fits 10,000
    assert not gate.has_room(target, 2_400)         # 9,000 + 1,200 does not
    capped = Sizing(2_000, 10_000.0, 8, True, most_tokens=10_000.0)
    assert not gate.has_room(capped, 2_000)         # a job's cap: 11,000 would pass it
    assert gate.has_room(capped, 1_000)
    assert not gate.has_room(Sizing(2_000, 10_000.0, 1, True), 10)  # the request cap
    assert InFlight().has_room(capped, 50_000)      # one request always passes
    job = sizing(MemoryRateLimiter(rpm=1_800, tpm=3_600_000), LatencyModel(), cap=300_000, max_concurrency=8,
                 concurrency_given=False, remote=True, at_risk=32_768)
    assert job.most_tokens == 32_768 and job.in_flight_tokens <= 32_768


def test_near_the_end_the_longest_inputs_go_first(openai_server: OpenAITestServer,
                                                  corpus: list[dict[str, str]]) -> None:
    """An input no request can split, sent last, keeps the call waiting its whole latency. Under rate
    limits, the longest inputs left near the end of a call go first (in input order, a long text
    that comes last is sent last)."""
    openai_server.control.configure(rpm=300, tpm=600_000, window=10.0, latency=0.05, latency_per_token=2e-5)
    short = [r["text"][:400] for r in corpus[:300]]
    long_text = max((r["text"] for r in corpus), key=len)
    with EmbeddingPipeline(f"openai:{MODEL}", base_url=openai_server.base_url, api_key="sk-test", cache=None,
                           rpm=1_800, tpm=3_600_000) as pipe:
        sent: list[list[str]] = []
        send = pipe.provider.aembed_batch

        async def recorded(batch: list[str], role: Any) -> Any:
            sent.append(batch)
            return await send(batch, role)

        pipe.provider.aembed_batch = recorded  # type: ignore[method-assign]  # observes the real calls
        out = pipe.embed([*short, long_text])
    assert all(v is not None for v in out)
    where = [k for k, batch in enumerate(sent) if any(len(t) > 10_000 for t in batch)]
    assert where, "the long input was not sent"
    # The long input (its pieces, if it is over the model's limit) left well before the last request.
    assert max(where) < len(sent) - 3, (where, len(sent))
