"""RPM/TPM rate limiters: exact waits on a virtual clock, and real Redis shared by two processes."""

from __future__ import annotations

import asyncio
import heapq
import itertools
import json
import os
import random
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from collections.abc import Awaitable, Coroutine, Iterator
from typing import Any

import pytest
import redis

from embedpipe.errors import ConfigurationError
from embedpipe.limits import (
    MemoryRateLimiter,
    RateLimiter,
    RedisRateLimiter,
    parse_go_duration,
    rate_limiter_from,
)

REDIS_URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")


class VirtualTime:
    """A clock and sleep for limiters: time moves only when every task is asleep.

    ``sleeps`` records every requested wait, so tests assert on waits instead of sleeping.
    """

    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []
        self._sleepers: list[tuple[float, int, asyncio.Future[None]]] = []
        self._order = itertools.count()

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._sleepers, (self.now + seconds, next(self._order), future))
        await future

    def run(self, *coros: Coroutine[Any, Any, Any]) -> list[Any]:
        """Run ``coros`` concurrently to completion, advancing time to each next wake-up."""

        async def drive() -> list[Any]:
            tasks = [asyncio.ensure_future(c) for c in coros]
            while not all(t.done() for t in tasks):
                for _ in range(5):  # let every runnable task reach its next sleep
                    await asyncio.sleep(0)
                if self._sleepers:
                    wake, _, future = heapq.heappop(self._sleepers)
                    self.now = max(self.now, wake)
                    future.set_result(None)
            return await asyncio.gather(*tasks)

        return asyncio.run(drive())

    def limiter(self, **kw: Any) -> MemoryRateLimiter:
        return MemoryRateLimiter(clock=self, sleep=self.sleep, **kw)


def assert_never_over(grants: list[tuple[float, int]], capacity: float, rate: float) -> None:
    """Over any interval [a, b], at most ``capacity + rate * (b - a)`` was granted."""
    grants = sorted(grants)
    for i in range(len(grants)):
        total = 0
        for j in range(i, len(grants)):
            total += grants[j][1]
            span = grants[j][0] - grants[i][0]
            assert total <= capacity + rate * span + 1e-6, (grants[i], grants[j], total)


# -- Go durations -----------------------------------------------------------------------


@pytest.mark.parametrize(("text", "seconds"), [
    ("6m0s", 360.0),
    ("1s", 1.0),
    ("12ms", 0.012),
    ("1h2m3.5s", 3723.5),
    ("0s", 0.0),
    ("0", 0.0),
    ("500us", 0.0005),
    ("500\u00b5s", 0.0005),
    ("500\u03bcs", 0.0005),
    ("250ns", 2.5e-7),
    ("1.5h", 5400.0),
    (".5s", 0.5),
    ("2m30.25s", 150.25),
    ("-1.5s", -1.5),
    (" 20ms ", 0.02),
])
def test_parse_go_duration(text: str, seconds: float) -> None:
    assert parse_go_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "1", "s", "1x", "1m 2s", "ms", "1.2.3s", "abc", "-", "1s2"])
def test_parse_go_duration_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        parse_go_duration(text)


# -- in process ---------------------------------------------------------------------


def test_rpm_exact_waits() -> None:
    vt = VirtualTime()
    limiter = vt.limiter(rpm=60)  # one request a second, bursts of 60

    async def go() -> None:
        for _ in range(60):
            await limiter.acquire(0)
        assert vt.sleeps == []
        await limiter.acquire(0)
        await limiter.acquire(0)

    vt.run(go())
    assert vt.sleeps == pytest.approx([1.0, 1.0])
    assert vt.now == pytest.approx(2.0)


def test_tpm_exact_waits() -> None:
    vt = VirtualTime()
    limiter = vt.limiter(tpm=1000)  # 1000/60 tokens a second

    async def go() -> None:
        await limiter.acquire(600)
        await limiter.acquire(600)  # short by 200: 12 s
        await limiter.acquire(1000)  # empty: a whole minute

    vt.run(go())
    assert vt.sleeps == pytest.approx([12.0, 60.0])


def test_waits_for_the_slower_budget() -> None:
    vt = VirtualTime()
    limiter = vt.limiter(rpm=2, tpm=100, window=1.0)

    async def go() -> None:
        await limiter.acquire(10)
        await limiter.acquire(10)
        await limiter.acquire(10)  # requests short by 1 (0.5 s); tokens are fine
        await limiter.acquire(100)  # requests short by 1 again (0.5 s), tokens by 10 (0.1 s)

    vt.run(go())
    assert vt.sleeps == pytest.approx([0.5, 0.5])


def test_concurrent_acquirers_never_exceed_the_budget() -> None:
    vt = VirtualTime()
    limiter = vt.limiter(rpm=30, tpm=1000, window=1.0)
    rng = random.Random(3)
    costs = [rng.randint(1, 400) for _ in range(200)]
    grants: list[tuple[float, int]] = []
    requests: list[tuple[float, int]] = []

    async def one(cost: int) -> None:
        await limiter.acquire(cost)
        grants.append((vt.now, cost))
        requests.append((vt.now, 1))

    vt.run(*(one(c) for c in costs))
    assert len(grants) == len(costs)
    assert_never_over(grants, 1000, 1000)
    assert_never_over(requests, 30, 30)
    # Most of the rate is used: the last grant comes about when the budget allows it.
    ideal = max((sum(costs) - 1000) / 1000, (len(costs) - 30) / 30)
    assert vt.now <= ideal * 1.1 + 1


def test_threads_share_one_limiter_without_lost_updates() -> None:
    limiter = MemoryRateLimiter(tpm=8 * 500, clock=lambda: 0.0)  # time stands still

    def worker() -> None:
        async def take() -> None:
            for _ in range(500):
                await limiter.acquire(1)
        asyncio.run(take())

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    # Exactly the whole budget was taken: one more token must wait.
    assert asyncio.run(limiter._attempt(1, 1)) > 0


def test_reconcile_refunds_and_charges() -> None:
    vt = VirtualTime()
    limiter = vt.limiter(tpm=600)  # 10 tokens a second

    async def go() -> None:
        await limiter.acquire(600)
        await limiter.reconcile(600, 200)  # 400 back
        await limiter.acquire(400)
        assert vt.sleeps == []
        await limiter.reconcile(100, 300)  # used 200 more than charged: a debt
        await limiter.acquire(100)  # 300 short: 30 s

    vt.run(go())
    assert vt.sleeps == pytest.approx([30.0])


def test_reconcile_never_overfills() -> None:
    vt = VirtualTime()
    limiter = vt.limiter(tpm=600)

    async def go() -> None:
        await limiter.reconcile(600, 0)
        await limiter.acquire(600)
        await limiter.acquire(10)

    vt.run(go())
    assert vt.sleeps == pytest.approx([1.0])


def test_cooldown_makes_every_waiter_wait() -> None:
    vt = VirtualTime()
    limiter = vt.limiter(rpm=1000, tpm=600)  # 10 tokens a second
    granted: dict[str, float] = {}

    async def acquire(name: str, tokens: int) -> None:
        await limiter.acquire(tokens)
        granted[name] = vt.now

    async def scenario() -> None:
        await limiter.acquire(600)
        sleeper = asyncio.ensure_future(acquire("sleeping", 100))  # asleep until t=10
        await vt.sleep(1)
        limiter.cooldown(30)  # at t=1: nobody before t=31
        limiter.cooldown(5)  # a shorter one does not shorten it
        await asyncio.gather(sleeper, *(acquire(f"new{i}", 1) for i in range(5)))

    vt.run(scenario())
    assert granted["sleeping"] == pytest.approx(31.0)
    assert all(t == pytest.approx(31.0) for name, t in granted.items())


def test_headers_lower_the_level_never_raise_it() -> None:
    vt = VirtualTime()
    limiter = vt.limiter(rpm=60, tpm=600)  # 1 request, 10 tokens a second

    async def go() -> None:
        limiter.update_from_headers({"X-RateLimit-Remaining-Tokens": "100",
                                     "x-ratelimit-remaining-requests": "59",
                                     "x-ratelimit-reset-tokens": "6m0s",
                                     "x-ratelimit-reset-requests": "1s"})
        await limiter.acquire(300)  # 200 short: 20 s
        # We believe 0 remain; the server says more: we keep our own figure.
        limiter.update_from_headers({"x-ratelimit-remaining-tokens": "500"})
        await limiter.acquire(50)  # 5 s
        limiter.update_from_headers({"x-ratelimit-remaining-tokens": "soon",
                                     "x-ratelimit-remaining-requests": "-3"})
        await limiter.acquire(1)  # ignored garbage: 0.1 s

    vt.run(go())
    assert vt.sleeps == pytest.approx([20.0, 5.0, 0.1])


def test_headers_lower_the_requests_budget() -> None:
    vt = VirtualTime()
    limiter = vt.limiter(rpm=60)

    async def go() -> None:
        limiter.update_from_headers({"x-ratelimit-remaining-requests": "0"})
        await limiter.acquire(5000)  # no token budget: tokens are free

    vt.run(go())
    assert vt.sleeps == pytest.approx([1.0])


def test_oversize_charge_is_an_error_not_a_wait() -> None:
    limiter = MemoryRateLimiter(rpm=1, tpm=1000)
    assert limiter.max_tokens_per_request == 1000
    with pytest.raises(ConfigurationError, match="1001 tokens"):
        asyncio.run(limiter.acquire(1001))
    with pytest.raises(ConfigurationError):
        asyncio.run(limiter.acquire(1, requests=2))
    with pytest.raises(ValueError):
        asyncio.run(limiter.acquire(-1))
    assert MemoryRateLimiter(rpm=10).max_tokens_per_request is None


@pytest.mark.parametrize("kw", [{"rpm": 0}, {"tpm": -5}, {"tpm": 1.5}, {"rpm": True}, {"rpm": 1, "window": 0}])
def test_bad_limits(kw: dict[str, Any]) -> None:
    with pytest.raises(ConfigurationError):
        MemoryRateLimiter(**kw)


def test_rate_limiter_from() -> None:
    assert rate_limiter_from(None, rpm=None, tpm=None) is None
    memory = rate_limiter_from(None, rpm=10, tpm=None)
    assert isinstance(memory, MemoryRateLimiter)
    assert (memory.rpm, memory.tpm) == (10, None)
    assert rate_limiter_from(memory, rpm=1, tpm=1) is memory
    from_url = rate_limiter_from("memory://", rpm=None, tpm=5000)
    assert isinstance(from_url, MemoryRateLimiter)
    assert from_url.tpm == 5000
    query = rate_limiter_from("memory://?tpm=7&window=1", rpm=None, tpm=None)
    assert query is not None
    assert (query.tpm, query.window) == (7, 1.0)
    shared = rate_limiter_from("redis://:secret@localhost:6379/2?key=openai&socket_timeout=3", rpm=3, tpm=None)
    assert isinstance(shared, RedisRateLimiter)
    assert shared.key == "openai"
    assert shared.url == "redis://:secret@localhost:6379/2?socket_timeout=3"
    assert "secret" not in repr(shared)
    with pytest.raises(ConfigurationError, match="memory://"):
        rate_limiter_from("sqlite:///x", rpm=1, tpm=None)
    with pytest.raises(ConfigurationError, match="rpm or tpm"):
        rate_limiter_from("redis://localhost", rpm=None, tpm=None)
    with pytest.raises(ConfigurationError):
        rate_limiter_from("memory://?tpm=lots", rpm=None, tpm=None)


def test_cooldown_alone_needs_no_budget() -> None:
    vt = VirtualTime()
    limiter = vt.limiter()
    limiter.cooldown(2.5)
    vt.run(limiter.acquire(10**9))
    assert vt.sleeps == pytest.approx([2.5])


# -- Redis --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def redis_url() -> str:
    try:
        client = redis.Redis.from_url(REDIS_URL, socket_connect_timeout=2)
        client.ping()
        client.close()
    except redis.RedisError as exc:
        message = f"Redis is not reachable at REDIS_URL={REDIS_URL} ({exc})"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return REDIS_URL


@pytest.fixture
def key(redis_url: str) -> Iterator[str]:
    name = f"test-{uuid.uuid4().hex}"
    yield name
    client = redis.Redis.from_url(redis_url)
    client.delete(*(f"embedpipe:ratelimit:{{{name}}}:{part}" for part in ("requests", "tokens", "cooldown")))
    client.close()


class Waited(Exception):
    """Raised by the recording sleep: the test wanted the wait, not the sleep."""


class RecordingSleep:
    def __init__(self) -> None:
        self.sleeps: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        raise Waited


def run_and_close(limiter: RateLimiter, body: Awaitable[None]) -> None:
    async def go() -> None:
        try:
            await body
        finally:
            await limiter.aclose()

    asyncio.run(go())


def test_redis_waits_and_charges(redis_url: str, key: str) -> None:
    sleep = RecordingSleep()
    limiter = RedisRateLimiter(redis_url, key=key, rpm=100, tpm=600, sleep=sleep)  # 10 tokens a second

    async def go() -> None:
        await limiter.acquire(400)
        with pytest.raises(Waited):
            await limiter.acquire(400)  # 200 short: 20 s, less the few ms since
        await limiter.acquire(200)  # the refused attempt charged nothing

    run_and_close(limiter, go())
    assert len(sleep.sleeps) == 1
    assert 19.9 < sleep.sleeps[0] <= 20.0


def test_redis_reconcile(redis_url: str, key: str) -> None:
    sleep = RecordingSleep()
    limiter = RedisRateLimiter(redis_url, key=key, tpm=600, sleep=sleep)

    async def go() -> None:
        await limiter.acquire(600)
        await limiter.reconcile(600, 100)
        await limiter.acquire(500)
        await limiter.reconcile(0, 300)
        with pytest.raises(Waited):
            await limiter.acquire(100)  # 400 short: 40 s

    run_and_close(limiter, go())
    assert len(sleep.sleeps) == 1
    assert 39.8 < sleep.sleeps[0] <= 40.0


def test_redis_cooldown_and_headers_are_shared(redis_url: str, key: str) -> None:
    sleep_a, sleep_b = RecordingSleep(), RecordingSleep()
    a = RedisRateLimiter(redis_url, key=key, rpm=1000, tpm=6000, sleep=sleep_a)  # 100 tokens a second
    b = RedisRateLimiter(redis_url, key=key, rpm=1000, tpm=6000, sleep=sleep_b)

    async def go() -> None:
        a.update_from_headers({"x-ratelimit-remaining-tokens": "1000"})
        await a.acquire(900)  # sends the reading along: 100 left for everyone
        with pytest.raises(Waited):
            await b.acquire(300)  # 200 short: 2 s
        a.cooldown(30)
        with pytest.raises(Waited):
            await a.acquire(1)  # its first attempt takes the cooldown to Redis
        with pytest.raises(Waited):
            await b.acquire(1)
        await a.aclose()
        await b.aclose()

    asyncio.run(go())
    assert 1.9 < sleep_b.sleeps[0] <= 2.0
    assert 29.9 < sleep_a.sleeps[0] <= 30.0
    assert 29.9 < sleep_b.sleeps[1] <= 30.0


def test_redis_keys_expire(redis_url: str, key: str) -> None:
    limiter = RedisRateLimiter(redis_url, key=key, rpm=60, tpm=600, sleep=RecordingSleep())

    async def go() -> None:
        await limiter.acquire(300)
        limiter.cooldown(5)
        with pytest.raises(Waited):
            await limiter.acquire(1)

    run_and_close(limiter, go())
    client = redis.Redis.from_url(redis_url)
    prefix = f"embedpipe:ratelimit:{{{key}}}:"
    # Each key lives about as long as its bucket takes to refill (or the cooldown lasts).
    assert 29_000 < client.pttl(prefix + "tokens") <= 31_000
    assert 0 < client.pttl(prefix + "requests") <= 2_000
    assert 4_000 < client.pttl(prefix + "cooldown") <= 5_000
    client.close()


def test_redis_oversize_charge_is_an_error(redis_url: str, key: str) -> None:
    limiter = RedisRateLimiter(redis_url, key=key, tpm=100)
    with pytest.raises(ConfigurationError):
        run_and_close(limiter, limiter.acquire(101))


def test_redis_limiter_serves_several_loops(redis_url: str, key: str) -> None:
    year = 365 * 24 * 3600.0  # so that refill during the test is negligible
    limiter = RedisRateLimiter(redis_url, key=key, tpm=10**6, window=year)
    errors: list[BaseException] = []

    def worker() -> None:
        async def go() -> None:
            for _ in range(20):
                await limiter.acquire(10)
            await limiter.aclose()
        try:
            asyncio.run(go())
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    client = redis.Redis.from_url(redis_url)
    level = client.hget(f"embedpipe:ratelimit:{{{key}}}:tokens", "level")
    client.close()
    assert level is not None
    assert float(level) == pytest.approx(10**6 - 4 * 20 * 10, abs=1)


def test_redis_unreachable_is_an_embedpipe_error() -> None:
    from embedpipe.limits import RateLimiterUnavailableError

    limiter = RedisRateLimiter("redis://127.0.0.1:9/0?socket_connect_timeout=1", key="x", rpm=1)
    with pytest.raises(RateLimiterUnavailableError, match=r"127\.0\.0\.1:9"):
        run_and_close(limiter, limiter.acquire(1))


WORKER = """
import asyncio, json, sys, time
from embedpipe.limits import RedisRateLimiter

url, key, seed, start, stop = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4]), float(sys.argv[5])
import random
rng = random.Random(seed)
grants = []
attempt_started = 0.0

async def sleep(seconds):
    global attempt_started
    await asyncio.sleep(seconds)
    attempt_started = time.time()

async def main():
    global attempt_started
    limiter = RedisRateLimiter(url, key=key, tpm=1000, window=1.0, sleep=sleep)
    await asyncio.sleep(max(0.0, start - time.time()))
    while time.time() < stop:
        tokens = rng.randint(20, 250)
        attempt_started = time.time()
        await limiter.acquire(tokens)
        # The grant happened, by the Redis server's clock, between these two moments.
        grants.append((attempt_started, time.time(), tokens))
    await limiter.aclose()

asyncio.run(main())
print(json.dumps(grants))
"""


def test_two_processes_share_one_budget(redis_url: str, key: str) -> None:
    start = time.time() + 1.5  # both import and connect first
    stop = start + 2.5
    workers = [
        subprocess.Popen([sys.executable, "-c", textwrap.dedent(WORKER), redis_url, key, str(seed),
                          str(start), str(stop)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for seed in (1, 2)
    ]
    outputs = [w.communicate(timeout=30) for w in workers]
    for worker, (_, err) in zip(workers, outputs, strict=True):
        assert worker.returncode == 0, err
    grants = [[tuple(g) for g in json.loads(out)] for out, _ in outputs]
    assert all(len(g) > 3 for g in grants), "both processes got a share"
    every = sorted(g for per_process in grants for g in per_process)
    # Over any interval of server time, at most capacity + refill was granted. A grant's
    # server time lies in [lo, hi], so grants surely inside [lo_i, hi_j] must fit
    # capacity + rate * (hi_j - lo_i).
    for i, (lo_i, _, _) in enumerate(every):
        for _, hi_j, _ in every[i:]:
            inside = sum(n for lo, hi, n in every if lo >= lo_i and hi <= hi_j)
            assert inside <= 1000 + 1000 * (hi_j - lo_i), (lo_i, hi_j, inside)
    # Together they use most of the budget: 1000 at once, then 1000 a second.
    total = sum(n for *_, n in every)
    assert total >= 0.6 * (1000 + 1000 * 2.5)
