"""Outages ridden out: a rate limiter whose Redis dies mid-run, and a long 429 storm (on an injected clock)."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest

from embedpipe import EmbeddingPipeline
from embedpipe.events import Event, RateLimited, RequestDone, RequestSent
from embedpipe.limits import MemoryRateLimiter, RateLimiterUnavailableError, RedisRateLimiter
from tests.conftest import PrivateRedis
from tests.openai_server import OpenAITestServer

MODEL = "text-embedding-3-small"


class Clock:
    """A clock the fake sleeps advance: no test waits on the wall clock."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.waits: list[float] = []

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.waits.append(seconds)
        self.now += seconds
        await asyncio.sleep(0)


def pipe_for(server: OpenAITestServer, **kw: Any) -> EmbeddingPipeline:
    kw.setdefault("cache", "memory://")
    return EmbeddingPipeline(f"openai:{MODEL}", base_url=server.base_url, api_key="sk-test", batch_size=10, **kw)


def test_a_redis_limiter_killed_mid_run_fails_open_and_nothing_paid_is_lost(
        openai_server: OpenAITestServer, private_redis: PrivateRedis, caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    limiter = RedisRateLimiter(private_redis.url, key="outage", rpm=10_000, tpm=10_000_000, clock=clock,
                               sleep=clock.sleep)
    texts = [f"record {i}" for i in range(300)]
    with pipe_for(openai_server, rate_limiter=limiter, errors="collect") as pipe, \
            caplog.at_level(logging.WARNING, logger="embedpipe"):
        first = pipe.embed(texts[:100])
        assert not first.failures and first.stats.limiter_errors == 0
        private_redis.kill()
        during = pipe.embed(texts[100:200])
        assert not during.failures and during.stats.limiter_errors >= 1
        assert sum("falling back to a local limiter" in r.getMessage() for r in caplog.records) == 1
        private_redis.start()
        clock.now += 10  # past the stand-in's turn: the shared store is tried again
        after = pipe.embed(texts[200:])
        assert not after.failures and after.stats.limiter_errors == 0
        again = pipe.embed(texts)
        assert again.stats.hits == 300 and again.stats.requests == 0
    limiter.close()  # passed in, so the pipeline leaves it open: its sockets are ours to close
    billed = openai_server.ledger.times_billed
    assert len(billed) == 300 and max(billed.values()) == 1


def test_on_error_raise_fails_closed(openai_server: OpenAITestServer, private_redis: PrivateRedis) -> None:
    url = f"{private_redis.url}?key=closed&on_error=raise"
    with pipe_for(openai_server, rate_limiter=url, rpm=10_000, errors="collect") as pipe:
        assert not pipe.embed(["one"]).failures
        private_redis.kill()
        with pytest.raises(RateLimiterUnavailableError):
            pipe.embed(["two"])
        private_redis.start()
        assert not pipe.embed(["two"]).failures
    assert openai_server.ledger.times_billed == {"one": 1, "two": 1}


def storm(server: OpenAITestServer, statuses: list[int | None], length: int, burst: int) -> Any:
    """A hook that ends the server's 429 storm after ``length`` 429 answers, and records the most requests in
    flight at once once the opening ``burst`` (sent before any 429 came back) has been answered."""
    state = {"flying": 0, "sent": 0, "done": 0, "most": 0}

    def hook(event: Event) -> None:
        if isinstance(event, RequestSent):
            state["flying"] += 1
            if state["done"] >= burst and statuses.count(429) < length:
                state["most"] = max(state["most"], state["flying"])
        elif isinstance(event, RequestDone):
            state["flying"] -= 1
            state["done"] += 1
            statuses.append(event.status)
            if statuses.count(429) >= length:
                server.control.set_fault_rate("rate_limit", 0)
    return hook, state


def test_a_long_429_storm_is_ridden_out_with_one_probe_at_a_time(openai_server: OpenAITestServer) -> None:
    clock = Clock()
    openai_server.control.configure(retry_after_ms=10_000)
    openai_server.control.set_fault_rate("rate_limit", 1.0)
    statuses: list[int | None] = []
    hook, state = storm(openai_server, statuses, length=20, burst=8)
    limiter = MemoryRateLimiter(rpm=10_000, clock=clock, sleep=clock.sleep)
    texts = [f"storm text {i}" for i in range(80)]
    with pipe_for(openai_server, rate_limiter=limiter, sleep=clock.sleep, max_concurrency=8, hooks=[hook]) as pipe:
        out = pipe.embed(texts)   # max_retries=6, yet 20 429s in a row are ridden out
    assert len(out) == 80 and statuses.count(429) == 20
    assert state["most"] == 1, "more than one request probed at a time during the storm"
    assert out.stats.rate_limited == 20
    # The storm cost about 20 retry-afters of waiting, on the injected clock.
    assert sum(w for w in clock.waits if w >= 9.9) >= 19 * 10


def test_the_rate_limit_wait_budget_ends_a_storm_that_outlasts_it(openai_server: OpenAITestServer) -> None:
    clock = Clock()
    openai_server.control.configure(retry_after_ms=10_000)
    openai_server.control.set_fault_rate("rate_limit", 1.0)
    limiter = MemoryRateLimiter(rpm=10_000, clock=clock, sleep=clock.sleep)
    seen: list[Event] = []
    with pipe_for(openai_server, rate_limiter=limiter, sleep=clock.sleep, errors="collect",
                  max_rate_limit_wait=60, hooks=[seen.append]) as pipe:
        out = pipe.embed(["never answered"])
    assert out.failures[0].kind == "retries_exhausted" and out.failures[0].status == 429
    assert 6 <= sum(isinstance(e, RateLimited) for e in seen) <= 8
