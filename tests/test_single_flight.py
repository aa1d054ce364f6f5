"""Single-flight: a text in flight in one call is awaited by every other call that needs it, never paid twice."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import numpy as np
import pytest

from embedpipe import EmbeddingPipeline, Stats
from tests.openai_server import OpenAITestServer, expected_vector

MODEL = "text-embedding-3-small"


def pipe_for(server: OpenAITestServer, cache: str, **kw: Any) -> EmbeddingPipeline:
    return EmbeddingPipeline(f"openai:{MODEL}", base_url=server.base_url, api_key="sk-test", cache=cache,
                             batch_size=16, **kw)


def texts_for(seed: int, pool: list[str], n: int) -> list[str]:
    rng = np.random.default_rng(seed)
    return [pool[i] for i in rng.integers(0, len(pool), n)]


@pytest.fixture(params=["memory", "sqlite"])
def cache(request: pytest.FixtureRequest, tmp_path: Any) -> str:
    return "memory://" if request.param == "memory" else f"sqlite:///{tmp_path}/cache.db"


def test_200_concurrent_aembed_calls_pay_once_per_text(openai_server: OpenAITestServer, cache: str) -> None:
    pool = [f"shared paragraph {i} about files and sockets" for i in range(1000)]
    calls = [texts_for(k, pool, 15) for k in range(200)]
    unique = {t for c in calls for t in c}
    openai_server.control.configure(latency=0.02)

    async def main(pipe: EmbeddingPipeline) -> list[Any]:
        return await asyncio.gather(*(pipe.aembed(c) for c in calls))

    with pipe_for(openai_server, cache, max_concurrency=8) as pipe:
        results = asyncio.run(main(pipe))
        total = pipe.stats
    billed = openai_server.ledger.times_billed
    assert set(billed) == unique and max(billed.values()) == 1, "a text was billed twice"
    summed = Stats()
    for c, r in zip(calls, results, strict=True):
        assert r.stats.hits + r.stats.misses + r.stats.deduped == len(c)
        for t, v in zip(c, r, strict=True):
            np.testing.assert_allclose(v, expected_vector(t, 1536), rtol=1e-5)
        summed.merge(r.stats)
    assert summed.as_dict() == pytest.approx(total.as_dict())
    assert total.embedded == len(unique)


def test_16_threads_pay_once_per_text(openai_server: OpenAITestServer, cache: str) -> None:
    pool = [f"thread paragraph {i}" for i in range(600)]
    openai_server.control.configure(latency=0.02)
    errors: list[BaseException] = []
    with pipe_for(openai_server, cache, max_concurrency=8) as pipe:
        def work(k: int) -> None:
            try:
                for j in range(5):
                    pipe.embed(texts_for(100 * k + j, pool, 40))
            except BaseException as exc:  # re-raised below
                errors.append(exc)

        threads = [threading.Thread(target=work, args=(k,)) for k in range(16)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert not errors
    billed = openai_server.ledger.times_billed
    assert max(billed.values()) == 1, f"{sum(v > 1 for v in billed.values())} texts billed twice"


def test_a_waiting_call_embeds_itself_when_the_owner_fails(openai_server: OpenAITestServer) -> None:
    """The owner's request fails for good: the waiter does not inherit the failure, it tries on its own."""
    openai_server.control.configure(latency=0.05)
    text = ["one shared text"]

    async def main(owner: EmbeddingPipeline) -> tuple[Any, Any]:
        openai_server.control.fail_next("server_error")
        first = asyncio.ensure_future(owner.aembed(text, errors="collect"))
        await asyncio.sleep(0.01)
        second = await owner.aembed(text, errors="collect")
        return await first, second

    with pipe_for(openai_server, "memory://", max_retries=0) as pipe:
        first, second = asyncio.run(main(pipe))
    assert first.failures and first.failures[0].kind == "retries_exhausted"
    assert not second.failures and second[0] is not None


WORKER = """
import random, sys
from embedpipe import EmbeddingPipeline
base, cache, seed = sys.argv[1], sys.argv[2], int(sys.argv[3])
texts = [f"process paragraph {i}" for i in range(3000)]
random.Random(seed).shuffle(texts)
with EmbeddingPipeline("openai:text-embedding-3-small", base_url=base, api_key="sk-test", cache=cache,
                       batch_size=50, max_concurrency=4) as pipe:
    for start in range(0, len(texts), 500):
        out = pipe.embed(texts[start:start + 500])
        assert len(out) == 500
    print(pipe.stats.embedded, pipe.stats.hits)
"""


@pytest.mark.parametrize("store", ["sqlite", "redis"])
def test_4_processes_on_one_cache_pay_once_per_text(openai_server: OpenAITestServer, tmp_path: Any, store: str,
                                                     request: pytest.FixtureRequest) -> None:
    import subprocess
    import sys
    from pathlib import Path

    if store == "sqlite":
        cache = f"sqlite:///{tmp_path}/shared.db"
    else:
        cache = f"{request.getfixturevalue('redis_url')}?namespace={request.getfixturevalue('redis_namespace')}"
    openai_server.control.configure(latency=0.05)
    root = Path(__file__).resolve().parents[1]
    procs = [subprocess.Popen([sys.executable, "-c", WORKER, openai_server.base_url, cache, str(k)], cwd=root,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for k in range(4)]
    outs = [p.communicate(timeout=240) for p in procs]
    for p, (_out, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err[-2000:]
    billed = openai_server.ledger.times_billed
    assert len(billed) == 3000
    twice = sum(v > 1 for v in billed.values())
    assert twice == 0, f"{twice} of 3,000 texts billed twice"
    embedded = sum(int(o.split()[0]) for o, _ in outs)
    assert embedded == 3000
