"""The engine's seams: typed failures, per-call stats, hooks and events, non-text inputs, errors mapped
at each seam, closed pipelines, and the lone-surrogate/partial-response/wrong-dimension rules."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import threading
from collections import Counter
from dataclasses import dataclass, fields
from typing import Any

import numpy as np
import pytest

from embedpipe import (
    EmbeddingPipeline,
    Failure,
    InvalidInputError,
    PipelineClosedError,
    PipelineConfig,
    Provider,
    ProviderInfo,
    Stats,
)
from embedpipe.cache import SQLiteCache
from embedpipe.errors import CacheError, DimensionMismatchError, EmbeddingFailedError
from embedpipe.events import (
    EVENT_TYPES,
    BudgetChanged,
    CacheRead,
    CallDone,
    Event,
    InputsFailed,
    LimiterWaited,
    LimitsObserved,
    RateLimited,
    RequestDone,
    RequestSent,
    Retried,
)
from embedpipe.limits import MemoryRateLimiter
from embedpipe.providers.base import BatchResult
from embedpipe.providers.fake import fake_vector
from tests.openai_server import OpenAITestServer

MODEL = "text-embedding-3-small"


async def no_sleep(seconds: float) -> None:
    await asyncio.sleep(0)


def openai_pipe(server: OpenAITestServer, **kw: Any) -> EmbeddingPipeline:
    kw.setdefault("cache", "memory://")
    kw.setdefault("sleep", no_sleep)
    return EmbeddingPipeline(f"openai:{MODEL}", base_url=server.base_url, api_key="sk-test", **kw)


def counters(s: Stats) -> dict[str, Any]:
    return s.as_dict()


# ---------------------------------------------------------------- per-call stats
def test_per_call_stats_sum_to_the_total_under_threads_tasks_and_estimates() -> None:
    texts = [f"text {i}" for i in range(400)]
    calls: list[tuple[int, Stats]] = []
    lock = threading.Lock()
    with EmbeddingPipeline("fake:16", cache="memory://") as pipe:
        stop = threading.Event()

        def estimator() -> None:
            while not stop.is_set():
                est = pipe.estimate(texts)
                assert est.texts == len(texts)

        def worker(seed: int) -> None:
            rng = np.random.default_rng(seed)
            for _ in range(10):
                batch = [texts[i] for i in rng.integers(0, len(texts), 120)]
                out = pipe.embed(batch)
                with lock:
                    calls.append((len(batch), out.stats))

        async def tasks() -> None:
            async def one(seed: int) -> None:
                rng = np.random.default_rng(1000 + seed)
                batch = [texts[i] for i in rng.integers(0, len(texts), 60)]
                out = await pipe.aembed(batch)
                with lock:
                    calls.append((len(batch), out.stats))
            await asyncio.gather(*(one(k) for k in range(50)))

        est = threading.Thread(target=estimator)
        est.start()
        threads = [threading.Thread(target=worker, args=(k,)) for k in range(8)]
        for t in threads:
            t.start()
        asyncio.run(tasks())
        for t in threads:
            t.join()
        stop.set()
        est.join()
        total = pipe.stats
    assert len(calls) == 8 * 10 + 50
    summed = Stats()
    for n, s in calls:
        assert s.hits + s.misses + s.deduped == n
        summed.merge(s)
    assert counters(summed) == pytest.approx(counters(total))
    assert total.embedded > 0 and total.hits > 0


def test_estimate_shares_nothing_with_a_running_call() -> None:
    """estimate() used to swap the pipeline's counters while it ran: an embed of 3,000 texts could end at 0."""
    texts = [f"doc {i}" for i in range(3000)]
    with EmbeddingPipeline("fake:8", cache="memory://", batch_size=64) as pipe:
        done = threading.Event()

        def estimates() -> None:
            while not done.is_set():
                pipe.estimate(texts[:500])

        t = threading.Thread(target=estimates)
        t.start()
        out = pipe.embed(texts)
        done.set()
        t.join()
        assert out.stats.embedded == 3000 and pipe.stats.embedded == 3000
        assert pipe.errors == "raise"


# ---------------------------------------------------------------- hooks and events
def test_a_hook_sees_every_event_kind_of_a_run(openai_server: OpenAITestServer) -> None:
    seen: list[Event] = []
    clock = [0.0]

    def now() -> float:
        return clock[0]

    async def advance(seconds: float) -> None:
        clock[0] += seconds
        await asyncio.sleep(0)

    limiter = MemoryRateLimiter(rpm=2, window=60.0, clock=now, sleep=advance)
    openai_server.control.configure(poison=("POISON",))
    with openai_pipe(openai_server, hooks=[seen.append], rate_limiter=limiter, budget_usd=1.0,
                     errors="collect", batch_size=4) as pipe:
        openai_server.control.fail_next("server_error")
        openai_server.control.fail_next("rate_limit")
        out = pipe.embed([f"text {i}" for i in range(7)] + ["holds POISON"])
    kinds = {type(e) for e in seen}
    assert kinds == set(EVENT_TYPES), set(EVENT_TYPES) - kinds
    assert list(out.failures) == [7] and out.failures[7].kind == "rejected"
    done = [e for e in seen if isinstance(e, CallDone)]
    assert len(done) == 1 and counters(done[0].stats) == counters(out.stats)
    assert all(e.model == f"openai:{MODEL}" and e.call_id == done[0].call_id for e in seen)
    sent = [e for e in seen if isinstance(e, RequestSent)]
    answered = [e for e in seen if isinstance(e, RequestDone)]
    assert len(sent) == len(answered) == out.stats.requests
    assert sum(e.tokens for e in answered) == out.stats.tokens == openai_server.ledger.billed_tokens
    assert {e.status for e in answered} >= {200, 500, 429, 400}
    assert [e.reason for e in seen if isinstance(e, Retried)].count("rate_limited") == 1
    assert any(isinstance(e, LimiterWaited) and e.wait > 0 for e in seen)
    assert any(isinstance(e, RateLimited) for e in seen)
    failed = [e for e in seen if isinstance(e, InputsFailed)]
    assert list(failed[0].failures) == [7]
    read = [e for e in seen if isinstance(e, CacheRead)]
    assert read[0].misses == 8 and read[0].hits == 0
    budget = [e for e in seen if isinstance(e, BudgetChanged)]
    assert budget[-1].spent_usd == pytest.approx(out.stats.cost_usd)
    assert budget[-1].remaining_usd == pytest.approx(1.0 - out.stats.cost_usd)
    assert any(isinstance(e, LimitsObserved) and e.remaining_tokens is not None for e in seen)


def test_a_raising_hook_is_logged_once_and_removed(caplog: pytest.LogCaptureFixture) -> None:
    calls: list[Event] = []

    def bad(event: Event) -> None:
        calls.append(event)
        raise RuntimeError("hook bug")

    good: list[Event] = []
    with EmbeddingPipeline("fake:8", cache="memory://", hooks=[bad, good.append]) as pipe, \
            caplog.at_level(logging.ERROR, logger="embedpipe"):
        assert len(pipe.embed(["a", "b"])) == 2
        assert len(pipe.embed(["c"])) == 1
    assert len(calls) == 1
    assert sum("hook" in r.getMessage() and "removed" in r.getMessage() for r in caplog.records) == 1
    assert sum(isinstance(e, CallDone) for e in good) == 2


# ---------------------------------------------------------------- failure kinds
def test_failure_kind_for_each_failure_path(openai_server: OpenAITestServer) -> None:
    openai_server.control.configure(poison=("POISON",))
    with openai_pipe(openai_server, errors="collect", max_retries=1, on_long_input="error") as pipe:
        out = pipe.embed(["fine", "", "bad \ud800 text", "holds POISON", "word " * 9000])
        assert {i: f.kind for i, f in out.failures.items()} == {
            1: "invalid_input", 2: "invalid_input", 3: "rejected", 4: "invalid_input"}
        assert out.failures[3].status == 400 and not out.failures[3].retryable
        assert "400" in str(out.failures[3])

        openai_server.control.fail_next("server_error", times=2)
        out = pipe.embed(["retry me"])
        assert out.failures[0].kind == "retries_exhausted" and out.failures[0].retryable
        assert out.failures[0].status == 500

        openai_server.control.fail_next("wrong_count", times=2)
        out = pipe.embed(["a bad answer"])
        assert out.failures[0].kind == "invalid_response"

        openai_server.control.fail_next("insufficient_quota")
        out = pipe.embed(["no money", "left"])
        assert {f.kind for f in out.failures.values()} == {"provider"}
        assert all(f.status == 429 and not f.retryable for f in out.failures.values())

    with openai_pipe(openai_server, errors="collect", budget_usd=1e-9, cache=None) as pipe, \
            pytest.raises(Exception, match="budget"):
        pipe.embed(["too expensive " * 50])
    with pytest.raises(ValueError, match="not one of"):
        Failure("oops")  # type: ignore[arg-type]


def test_budget_failures_mid_call_are_of_kind_budget(openai_server: OpenAITestServer) -> None:
    """An answer with a NaN row is paid for, and the row again: the budget then stops the call's last request."""
    texts = [f"some text number {i} " * 20 for i in range(20)]
    with openai_pipe(openai_server, batch_size=5, max_concurrency=1, price_per_1m_tokens=1.0) as pipe:
        need = pipe.estimate(texts).cost_usd
    assert need is not None
    with openai_pipe(openai_server, errors="collect", batch_size=5, max_concurrency=1, price_per_1m_tokens=1.0,
                     budget_usd=need * 1.000001) as pipe:
        openai_server.control.fail_next("nan")
        out = pipe.embed(texts)
    assert out.budget_exceeded and out.failures
    assert {f.kind for f in out.failures.values()} == {"budget"}
    assert len(out.failures) == 5 and out.stats.cost_usd <= need * 1.000001


# ---------------------------------------------------------------- errors mapped at the seams
class OutOfMemoryProvider(Provider):
    """A blocking provider whose model raises RuntimeError (as CUDA does) on some inputs."""

    name = "oom"
    info = ProviderInfo(batch_size=8, default_concurrency=2, price_per_1m_units=0.0, dimensions=8)

    def __init__(self) -> None:
        super().__init__("toy")

    def embed_batch(self, texts: list[Any], role: str) -> BatchResult:  # type: ignore[override]
        if any("boom" in t for t in texts):
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return BatchResult(np.stack([fake_vector(t, 8) for t in texts]))


def test_a_provider_runtime_error_is_mapped_and_the_rest_is_embedded() -> None:
    limiter = MemoryRateLimiter(tpm=1_000_000)
    texts = [f"t{i}" for i in range(30)]
    texts[11] = "boom"
    with EmbeddingPipeline(OutOfMemoryProvider(), cache="memory://", errors="collect", rate_limiter=limiter) as pipe:
        out = pipe.embed(texts)
        assert list(out.failures) == [11]
        f = out.failures[11]
        assert f.kind == "provider" and "CUDA out of memory" in str(f) and f.status is None
        assert all(out[i] is not None for i in range(30) if i != 11)
        assert out.stats.embedded == 29
        with pytest.raises(EmbeddingFailedError) as exc:
            pipe.embed(["boom"], errors="raise")
        assert exc.value.failures[0].kind == "provider"
    # Failed requests gave their token charge back to the limiter.
    assert limiter._tokens is not None  # type: ignore[attr-defined]
    level = limiter._tokens.level  # type: ignore[attr-defined]
    assert level > 1_000_000 - 2 * sum(len(t) for t in texts)


class BuggyProvider(OutOfMemoryProvider):
    def embed_batch(self, texts: list[Any], role: str) -> BatchResult:  # type: ignore[override]
        raise TypeError("a bug in the provider's own code")


def test_a_bug_is_not_a_failure_it_propagates() -> None:
    with EmbeddingPipeline(BuggyProvider(), cache=None, errors="collect") as pipe, \
            pytest.raises(TypeError, match="a bug"):
        pipe.embed(["x"])


def test_a_sqlite_cache_error_is_mapped_and_the_call_goes_on(tmp_path: Any) -> None:
    cache = SQLiteCache(tmp_path / "c.db")
    with EmbeddingPipeline("fake:8", cache=cache) as pipe:
        pipe.embed(["warm"])
        cache._conn().execute("DROP TABLE entries")  # a damaged store: sqlite3.OperationalError
        with pytest.raises(CacheError):
            cache.get_many(["k"])
        out = pipe.embed(["warm", "new"])
        assert len(out) == 2 and out.stats.cache_errors >= 2 and out.stats.embedded == 2


def test_calls_after_close_raise_pipeline_closed() -> None:
    pipe = EmbeddingPipeline("fake:8", cache=None)
    pipe.close()
    for call in (lambda: pipe.embed(["a"]), lambda: pipe.embed_query("a"), lambda: pipe.estimate(["a"]),
                 lambda: asyncio.run(pipe.aembed(["a"]))):
        with pytest.raises(PipelineClosedError) as exc:
            call()
        assert isinstance(exc.value, RuntimeError)


# ---------------------------------------------------------------- non-text inputs
@dataclass(frozen=True)
class Toy:
    """A toy modality: a name for the object and its content."""

    name: str
    data: bytes
    kind: str = "toy"

    def content_key(self) -> bytes:
        return hashlib.sha256(self.data).digest()


class ToyProvider(Provider):
    """Embeds text and toys (a toy's vector comes from its content)."""

    name = "toyprov"
    info = ProviderInfo(batch_size=16, price_per_1m_units=0.0, dimensions=8, modalities=frozenset({"text", "toy"}))

    def __init__(self) -> None:
        super().__init__("v1")
        self.seen: Counter[str] = Counter()

    async def aembed_batch(self, texts: list[Any], role: str) -> BatchResult:  # type: ignore[override]
        rows = []
        for t in texts:
            key = t if isinstance(t, str) else "toy:" + t.data.decode()
            self.seen[key] += 1
            rows.append(fake_vector(key, 8))
        return BatchResult(np.stack(rows))


def test_a_toy_item_flows_through_cache_keys_and_dedupe(tmp_path: Any) -> None:
    provider = ToyProvider()
    url = f"sqlite:///{tmp_path}/c.db"
    inputs = [Toy("a.toy", b"red"), "a text", Toy("b.toy", b"red"), Toy("c.toy", b"blue")]
    with EmbeddingPipeline(provider, cache=url) as pipe:
        out = pipe.embed(inputs)
        assert out.stats.deduped == 1 and out.stats.misses == 3
        np.testing.assert_allclose(out[0], out[2])
        np.testing.assert_allclose(out[0], fake_vector("toy:red", 8), rtol=1e-6)
        assert provider.seen == Counter({"toy:red": 1, "a text": 1, "toy:blue": 1})
    # A toy whose content equals a text's bytes never shares its key.
    with EmbeddingPipeline(provider, cache=url) as pipe:
        again = pipe.embed([Toy("renamed.toy", b"red"), Toy("x", b"a text")])
        assert again.stats.hits == 1 and again.stats.misses == 1
        assert provider.seen["toy:red"] == 1


def test_a_text_only_provider_refuses_items_before_any_request(openai_server: OpenAITestServer) -> None:
    with openai_pipe(openai_server) as pipe:
        with pytest.raises(InvalidInputError, match=r"kind toy.*indices \[1\]") as exc:
            pipe.embed(["fine", Toy("a", b"x")])
        assert exc.value.indices == [1]
        out = pipe.embed(["fine", Toy("a", b"x")], errors="collect")
        assert out.failures[1].kind == "invalid_input" and out[0] is not None
    assert openai_server.ledger.times_billed == {"fine": 1}


# ---------------------------------------------------------------- Hardening I, engine side
def test_a_lone_surrogate_is_invalid_input_before_any_spend(openai_server: OpenAITestServer) -> None:
    texts = [f"document number {i}" for i in range(1000)]
    texts[500] = "broken \ud800 text"
    with openai_pipe(openai_server, batch_size=100) as pipe:
        with pytest.raises(InvalidInputError, match=r"UTF-8.*\[500\]") as exc:
            pipe.embed(texts)
        assert exc.value.indices == [500]
        assert openai_server.ledger.requests_total == 0
        out = pipe.embed(texts, errors="collect")
    assert list(out.failures) == [500] and out.failures[500].kind == "invalid_input"
    assert openai_server.ledger.requests_total == 10


def test_a_partly_invalid_response_keeps_its_valid_rows(openai_server: OpenAITestServer) -> None:
    texts = [f"row {i}" for i in range(300)]
    with openai_pipe(openai_server) as pipe:
        openai_server.control.fail_next("nan")
        out = pipe.embed(texts)
    assert all(v is not None for v in out)
    ledger = openai_server.ledger
    assert ledger.requests_ok == 2
    # Only the NaN row was asked for again: 301 inputs billed for 300 texts, not 600.
    assert sum(ledger.times_billed.values()) == 301
    assert out.stats.retries == 1


class OnceWrongDims(Provider):
    """Answers 1535-d vectors to the first ``bad`` requests, then 1536-d ones."""

    name = "dims"
    info = ProviderInfo(batch_size=64, price_per_1m_units=0.0, dimensions=1536)

    def __init__(self, bad: int) -> None:
        super().__init__("m")
        self.bad = bad
        self.calls = 0

    async def aembed_batch(self, texts: list[Any], role: str) -> BatchResult:  # type: ignore[override]
        self.calls += 1
        width = 1535 if self.calls <= self.bad else 1536
        return BatchResult(np.stack([fake_vector(t, width) for t in texts]))


def test_one_wrong_dimension_answer_is_retried_consistent_ones_are_fatal() -> None:
    provider = OnceWrongDims(bad=1)
    with EmbeddingPipeline(provider, cache=None, sleep=no_sleep) as pipe:
        out = pipe.embed(["a", "b"])
        assert len(out[0]) == 1536 and out.stats.retries == 1
    with EmbeddingPipeline(OnceWrongDims(bad=100), cache=None, sleep=no_sleep) as pipe, \
            pytest.raises(DimensionMismatchError, match=r"1535-d.*expected 1536.*3 answers in a row"):
        pipe.embed(["a"])


def test_a_misspelt_keyword_names_the_close_match() -> None:
    with pytest.raises(TypeError, match=r"rate_limit=.*did you mean rpm=, tpm=, rate_limiter="):
        EmbeddingPipeline("fake:8", rate_limit=100)  # type: ignore[call-arg]
    with pytest.raises(TypeError, match=r"max_concurency=.*max_concurrency="):
        EmbeddingPipeline("fake:8", max_concurency=4)  # type: ignore[call-arg]


# ---------------------------------------------------------------- config
def test_every_pipeline_has_a_config_that_round_trips() -> None:
    with EmbeddingPipeline("fake:8", cache="redis://:s3cret@127.0.0.1:6379/0?namespace=x", rpm=60,
                           api_key="sk-secret-key-1234567890") as pipe:
        text = pipe.config.to_json()
    assert "s3cret" not in text and "sk-secret" not in text
    cfg = PipelineConfig.from_json(text)
    assert cfg.rpm == 60 and cfg.cache == "redis://127.0.0.1:6379/0?namespace=x"
    assert {f.name for f in fields(cfg)} >= {"model", "cache", "rpm", "tpm", "budget_usd", "errors"}
    with EmbeddingPipeline(OutOfMemoryProvider(), cache=None, hooks=[print]) as pipe, \
            pytest.raises(Exception, match="model, hooks"):
        pipe.config.to_json()
