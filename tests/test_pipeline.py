"""The engine on the fake provider and small real providers written for the test."""

from __future__ import annotations

import asyncio
import pickle
import sqlite3
import threading
from pathlib import Path

import numpy as np
import pytest

from embedpipe import EmbeddingPipeline, codec
from embedpipe.errors import (
    BudgetExceededError,
    ConfigurationError,
    EmbeddingFailedError,
    InputTypeError,
    InvalidInputError,
    ProviderError,
)
from embedpipe.providers import BatchResult, Provider
from embedpipe.providers.fake import fake_vector


class CountingProvider(Provider):
    """Deterministic vectors; records every batch; fails on chosen texts; injects NaN once."""

    name = "counting"
    default_batch_size = 8

    def __init__(self, dims: int = 16, *, poison: tuple[str, ...] = (), nan_once: bool = False,
                 request_error: str | None = None) -> None:
        super().__init__("m1", dims)
        self.batches: list[list[str]] = []
        self.poison = poison
        self.nan_once = nan_once
        self.request_error = request_error
        self.lock = threading.Lock()

    @property
    def price_per_1m_tokens(self) -> float | None:
        return 1.0

    def embed_batch(self, texts: list[str], role: str) -> BatchResult:  # type: ignore[override]
        with self.lock:
            self.batches.append(list(texts))
        if self.request_error:
            raise ProviderError(self.request_error, status=400)
        if any(p in t for t in texts for p in self.poison):
            raise ProviderError("HTTP 400: input rejected", status=400)
        vecs = np.stack([fake_vector(t, self.dimensions or 16) for t in texts])
        if self.nan_once:
            self.nan_once = False
            vecs[0, 0] = np.nan
        return BatchResult(vecs, tokens=sum(len(t.split()) for t in texts))

    @property
    def sent(self) -> list[str]:
        return [t for b in self.batches for t in b]


def test_dedupe_order_and_cache(cache_url: str) -> None:
    from embedpipe.cache import cache_from_url

    backend = cache_from_url(cache_url)  # one object, so memory:// is shared too
    prov = CountingProvider()
    texts = [f"text {i % 7}" for i in range(30)]
    with EmbeddingPipeline(prov, cache=backend) as pipe:
        out = pipe.embed(texts)
        assert len(out) == 30
        for t, v in zip(texts, out, strict=False):
            np.testing.assert_allclose(v, fake_vector(t, 16), rtol=1e-6)
        assert sorted(prov.sent) == sorted(set(texts)), "each distinct text embedded once"
        st = pipe.stats
        assert (st.misses, st.hits, st.deduped, st.embedded) == (7, 0, 23, 7)
    prov2 = CountingProvider()
    with EmbeddingPipeline(prov2, cache=backend) as pipe:
        out2 = pipe.embed(list(reversed(texts)))
        assert prov2.sent == [], "a second pipeline on the same cache embeds nothing"
        assert out2 == list(reversed(out))
        assert pipe.stats.hits == 7
        counted = sum(prov2.tokenizer.count(sorted(set(texts))))
        assert pipe.stats.saved_usd == pytest.approx(counted / 1e6)
    backend.close()


def test_query_and_async_twins() -> None:
    prov = CountingProvider()
    pipe = EmbeddingPipeline(prov, cache="memory://")

    async def main() -> None:
        vs = await pipe.aembed(["a b", "c d", "a b"])
        q = await pipe.aembed_query("a b")
        assert q == vs[0]
        arr = await pipe.aembed_array(["c d"])
        assert arr.shape == (1, 16) and arr.dtype == np.float32

    asyncio.run(main())
    assert pipe.embed_query("c d") == pytest.approx(fake_vector("c d", 16).tolist())
    pipe.close()
    pipe.close()  # idempotent
    with pytest.raises(RuntimeError, match="closed"):
        pipe.embed(["x"])

    async def context() -> None:
        async with EmbeddingPipeline("fake:4", cache=None) as p:
            assert len((await p.aembed(["z"]))[0]) == 4
        with pytest.raises(RuntimeError, match="closed"):
            await p.aembed(["z"])

    asyncio.run(context())


def test_sync_api_inside_running_loop() -> None:
    """Jupyter runs a loop in the caller's thread; the sync API must still work there."""
    pipe = EmbeddingPipeline("fake:8", cache=None)

    async def notebook_cell() -> list[list[float]]:
        return pipe.embed(["inside a running loop"])

    assert len(asyncio.run(notebook_cell())[0]) == 8


def test_bad_input_named_before_any_call() -> None:
    prov = CountingProvider()
    pipe = EmbeddingPipeline(prov, cache=None)
    with pytest.raises(TypeError, match=r"indices \[1, 3\]") as exc:
        pipe.embed(["ok", None, "fine", b"bytes", " "])  # type: ignore[list-item]
    assert isinstance(exc.value, InputTypeError) and exc.value.indices == [1, 3]
    assert "[4]" in str(exc.value)
    with pytest.raises(InvalidInputError, match=r"indices \[0, 2\]") as exc2:
        pipe.embed(["", "x", "  \n"])
    assert isinstance(exc2.value, ValueError)
    with pytest.raises(TypeError, match="single str"):
        pipe.embed("not a list")
    assert prov.batches == [], "nothing reaches the provider"


def test_collect_mode_embeds_the_rest() -> None:
    prov = CountingProvider(poison=("BAD",))
    pipe = EmbeddingPipeline(prov, cache="memory://", errors="collect")
    texts = [f"t{i}" for i in range(20)] + ["", "xx BAD xx", None]  # type: ignore[list-item]
    out = pipe.embed(texts)  # type: ignore[arg-type]
    assert set(out.failures) == {20, 21, 22}
    assert "input rejected" in str(out.failures[21])
    assert out[21] is None and out[0] is not None
    assert pipe.stats.failed == 3


def test_one_bad_input_does_not_fail_its_batch() -> None:
    prov = CountingProvider(poison=("BAD",))
    prov.default_batch_size = 64
    pipe = EmbeddingPipeline(prov, cache="memory://", batch_size=64)
    texts = [f"doc {i}" for i in range(63)] + ["BAD one"]
    with pytest.raises(EmbeddingFailedError) as exc:
        pipe.embed(texts)
    assert list(exc.value.failures) == [63]
    # Everything else was embedded and cached, so a retry sends nothing but the bad one.
    prov.batches.clear()
    with pytest.raises(EmbeddingFailedError):
        pipe.embed(texts)
    assert prov.sent == ["BAD one"]


def test_several_bad_short_inputs_are_not_mistaken_for_a_bad_request() -> None:
    """Bisection visits the shortest inputs first; five bad short ones must not abort the batch."""
    prov = CountingProvider(poison=("BAD",))
    pipe = EmbeddingPipeline(prov, cache=None, batch_size=64, errors="collect")
    texts = [f"BAD {i}" for i in range(5)] + [f"a much longer good document number {i}" for i in range(59)]
    out = pipe.embed(texts)
    assert sorted(out.failures) == [0, 1, 2, 3, 4]
    assert all(v is not None for v in out[5:])
    assert prov.sent.count(texts[-1]) == 2  # once in the first failed batch, once as the probe


def test_request_level_error_stops_isolation_quickly() -> None:
    prov = CountingProvider(request_error="HTTP 400: unsupported parameter")
    pipe = EmbeddingPipeline(prov, cache=None, batch_size=1024, errors="collect")
    out = pipe.embed([f"d{i}" for i in range(1024)])
    assert len(out.failures) == 1024
    # log2(1024) halvings, then a few single-input probes
    assert len(prov.batches) <= 16, f"{len(prov.batches)} requests for one request-level error"


def test_nan_response_is_retried_never_cached(tmp_path: Path) -> None:
    prov = CountingProvider(nan_once=True)
    sleeps: list[float] = []

    async def fake_sleep(s: float) -> None:
        sleeps.append(s)

    pipe = EmbeddingPipeline(prov, cache=f"sqlite:///{tmp_path}/c.db", sleep=fake_sleep)
    out = pipe.embed(["alpha", "beta"])
    assert np.isfinite(np.array(out)).all()
    assert pipe.stats.retries == 1 and len(sleeps) == 1
    pipe.close()
    conn = sqlite3.connect(tmp_path / "c.db")
    for (value,) in conn.execute("SELECT value FROM entries"):
        _, bad = codec.decode_many([value], 16)
        assert bad == []


def test_corrupt_value_is_a_miss(cache_url: str) -> None:
    from embedpipe.cache import cache_from_url

    backend = cache_from_url(cache_url)
    prov = CountingProvider()
    pipe = EmbeddingPipeline(prov, cache=backend)
    first = pipe.embed(["alpha"])
    (key,) = list(backend.yield_keys())
    backend.set_many([(key, b"\x00garbage" * 9)])
    prov.batches.clear()
    again = pipe.embed(["alpha"])
    assert again == first
    assert prov.sent == ["alpha"]
    assert pipe.stats.corrupt == 1
    pipe.close()


def test_dimensions_and_model_enter_the_key() -> None:
    cache = "memory://"
    from embedpipe.cache import cache_from_url

    backend = cache_from_url(cache)
    p384 = EmbeddingPipeline("fake:32", cache=backend)
    p384.embed(["same text"])
    p16 = EmbeddingPipeline("fake:32", dimensions=16, cache=backend)
    v16 = p16.embed(["same text"])[0]
    assert len(v16) == 16 and p16.stats.hits == 0
    other = EmbeddingPipeline("fake:48", cache=backend)
    assert len(other.embed(["same text"])[0]) == 48 and other.stats.hits == 0
    full = np.array(p384.embed(["same text"])[0])
    np.testing.assert_allclose(v16, full[:16] / np.linalg.norm(full[:16]), rtol=1e-5)


def test_budget_refuses_before_spending() -> None:
    prov = CountingProvider()
    # 1 $/1M tokens; the fake tokenizer is cl100k: ~3 tokens per text.
    pipe = EmbeddingPipeline(prov, cache=None, budget_usd=10 / 1e6)
    with pytest.raises(BudgetExceededError, match="nothing was sent"):
        pipe.embed([f"text number {i}" for i in range(10)])
    assert prov.batches == []
    pipe.embed(["a"])  # small enough
    assert pipe.spent_usd > 0


def test_budget_with_unknown_price_is_refused() -> None:
    class Unpriced(CountingProvider):
        @property
        def price_per_1m_tokens(self) -> float | None:
            return None

    with pytest.raises(ConfigurationError, match="price"):
        EmbeddingPipeline(Unpriced(), cache=None, budget_usd=1.0)
    pipe = EmbeddingPipeline(Unpriced(), cache=None)
    pipe.embed(["x"])
    assert pipe.stats.cost_usd is None and pipe.stats.saved_usd is None
    ok = EmbeddingPipeline(Unpriced(), cache=None, budget_usd=1.0, price_per_1m_tokens=0.5)
    ok.embed(["x"])
    assert ok.stats.cost_usd is not None and ok.stats.cost_usd > 0


def test_long_inputs_split_truncate_error() -> None:
    from embedpipe.providers.fake import FakeProvider

    long_text = " ".join(f"word{i}" for i in range(300))
    split = EmbeddingPipeline(FakeProvider(8, max_input_tokens=50), cache=None)
    v = split.embed([long_text])[0]
    assert abs(np.linalg.norm(v) - 1) < 1e-5 and split.stats.split == 1
    assert split.stats.tokens >= 300
    with pytest.warns(UserWarning, match="truncated"):
        trunc = EmbeddingPipeline(FakeProvider(8, max_input_tokens=50), cache=None, on_long_input="truncate")
        trunc.embed([long_text, "short"])
    assert trunc.stats.truncated == 1
    strict = EmbeddingPipeline(FakeProvider(8, max_input_tokens=50), cache=None, on_long_input="error")
    with pytest.raises(InvalidInputError, match=r"indices \[1\]"):
        strict.embed(["short", long_text])


def test_estimate_makes_no_call_and_counts_cached() -> None:
    prov = CountingProvider()
    pipe = EmbeddingPipeline(prov, cache="memory://", batch_size=4)
    pipe.embed(["one two", "three"])
    prov.batches.clear()
    est = pipe.estimate(["one two", "three", "four five six", "seven", "eight", "nine", "", "three"])
    assert prov.batches == []
    assert (est.texts, est.unique, est.cached, est.invalid) == (8, 6, 2, 1)
    assert est.requests == 1 and est.tokens > 0
    assert est.cost_usd == pytest.approx(est.tokens / 1e6)
    assert pipe.stats.hits == 0 and pipe.stats.misses == 2, "an estimate leaves the counters alone"


def test_pipeline_pickles_and_reopens(tmp_path: Path) -> None:
    pipe = EmbeddingPipeline("fake:8", cache=f"sqlite:///{tmp_path}/p.db")
    v = pipe.embed(["hello"])
    clone = pickle.loads(pickle.dumps(pipe))
    assert clone.embed(["hello"]) == v
    assert clone.stats.hits == 1
    clone.close()
    pipe.close()


def test_default_cache_from_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EMBEDPIPE_CACHE", f"sqlite:///{tmp_path}/env.db")
    pipe = EmbeddingPipeline("fake:8")
    pipe.embed(["x"])
    pipe.close()
    assert (tmp_path / "env.db").exists()
    monkeypatch.setenv("EMBEDPIPE_CACHE", "none")
    assert EmbeddingPipeline("fake:8").cache is None


def test_bad_options() -> None:
    with pytest.raises(ConfigurationError, match="spec"):
        EmbeddingPipeline("nocolon", cache=None)
    with pytest.raises(ConfigurationError, match="unknown provider"):
        EmbeddingPipeline("cohere2:x", cache=None)
    with pytest.raises(ConfigurationError, match="batch_size"):
        EmbeddingPipeline("fake:8", cache=None, batch_size=0)
    with pytest.raises(ConfigurationError, match="on_long_input"):
        EmbeddingPipeline("fake:8", cache=None, on_long_input="drop")  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="larger"):
        EmbeddingPipeline("fake:8", cache=None, dimensions=16)


def test_threads_share_one_pipeline() -> None:
    prov = CountingProvider()
    pipe = EmbeddingPipeline(prov, cache="memory://")
    results: list[list[list[float]]] = []

    def work(k: int) -> None:
        results.append(pipe.embed([f"shared {i}" for i in range(k, k + 20)]))

    threads = [threading.Thread(target=work, args=(k,)) for k in range(0, 50, 10)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 5
    assert all(len(r) == 20 for r in results)
