"""A bounded load test: 50 concurrent clients, 1,000 single-text requests, ~30% duplicates."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Iterator

import httpx
import pytest

pytest.importorskip("fastapi")

from tests.openai_server import OpenAITestServer
from tests.serve_live import MODEL, LiveService, metric, settings_for

CLIENTS = 50
REQUESTS = 1000
DUPLICATE_SHARE = 0.3


@pytest.fixture
def upstream() -> Iterator[OpenAITestServer]:
    with OpenAITestServer(latency=0.005) as server:  # a little upstream latency, as a real provider has
        yield server


def _workload(seed: int = 7) -> list[str]:
    rng = random.Random(seed)
    unique = [f"document {i}: {rng.random():.12f}" for i in range(int(REQUESTS * (1 - DUPLICATE_SHARE)))]
    texts = unique + [rng.choice(unique) for _ in range(REQUESTS - len(unique))]
    rng.shuffle(texts)
    return texts


@pytest.mark.timeout(120)
async def test_fifty_clients_upstream_bills_each_unique_text_once_and_metrics_agree(
        upstream: OpenAITestServer) -> None:
    texts = _workload()
    unique = set(texts)
    statuses: list[int] = []
    usage = 0
    with LiveService(settings_for(upstream.base_url)) as live:
        queue: asyncio.Queue[str] = asyncio.Queue()
        for t in texts:
            queue.put_nowait(t)

        async def client() -> None:
            nonlocal usage
            async with httpx.AsyncClient(base_url=live.base_url, timeout=30) as http:
                while not queue.empty():
                    text = queue.get_nowait()
                    got = await http.post("/embeddings", json={"model": MODEL, "input": text})
                    statuses.append(got.status_code)
                    if got.status_code == 200:
                        usage += got.json()["usage"]["prompt_tokens"]

        started = time.perf_counter()
        await asyncio.wait_for(asyncio.gather(*(client() for _ in range(CLIENTS))), 90)
        elapsed = time.perf_counter() - started
        async with httpx.AsyncClient() as http:
            text = (await http.get(f"{live.url}/metrics")).text

    ledger = upstream.ledger
    assert statuses.count(200) == REQUESTS, {s: statuses.count(s) for s in set(statuses)}
    assert dict(ledger.times_billed) == dict.fromkeys(unique, 1)  # each unique text billed once
    assert usage == ledger.billed_tokens  # the requests' usage adds up to the bill
    # Coalescing: far fewer upstream requests than client requests (the goal is 10x fewer).
    assert ledger.requests_total * 10 <= REQUESTS, ledger.requests_total

    spec = f"openai:{MODEL}"
    assert metric(text, "embedpipe_requests_total", route="/v1/embeddings", status="200") == REQUESTS
    assert metric(text, "embedpipe_requests_total", route="/v1/embeddings") == REQUESTS  # no 5xx, no 4xx
    misses = metric(text, "embedpipe_cache_misses_total", model=spec)
    hits = metric(text, "embedpipe_cache_hits_total", model=spec)
    deduped = metric(text, "embedpipe_deduped_total", model=spec)
    assert misses == len(unique)
    assert hits + misses + deduped == REQUESTS
    assert metric(text, "embedpipe_tokens_total", model=spec, kind="billed") == ledger.billed_tokens
    assert metric(text, "embedpipe_upstream_requests_total", model=spec, status="200") == ledger.requests_ok
    assert metric(text, "embedpipe_batch_inputs_sum", model=spec) == len(unique)
    assert metric(text, "embedpipe_request_duration_seconds_count", route="/v1/embeddings") == REQUESTS
    assert metric(text, "embedpipe_inflight_requests", model=spec) == 0
    assert metric(text, "embedpipe_queue_depth", model=spec) == 0
    assert elapsed < 60
