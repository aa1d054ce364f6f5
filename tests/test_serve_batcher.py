"""The micro-batcher on its own, in front of a real pipeline (the fake provider: no server needed)."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from embedpipe import EmbeddingPipeline
from embedpipe.serve.batcher import MicroBatcher, QueueFullError, split_exactly


@given(st.integers(0, 10_000), st.lists(st.integers(0, 500), min_size=1, max_size=30))
def test_split_exactly_adds_up_and_follows_the_weights(total: int, weights: list[int]) -> None:
    shares = split_exactly(total, weights)
    assert len(shares) == len(weights)
    if sum(weights) == 0:
        assert shares == [0] * len(weights)
        return
    assert sum(shares) == total
    for share, weight in zip(shares, weights, strict=True):
        assert abs(share - total * weight / sum(weights)) < 1  # never a whole token off its exact share
        assert weight or share == 0


async def test_concurrent_requests_share_calls_and_their_bills_add_up() -> None:
    with EmbeddingPipeline("fake:8", cache="memory://", price_per_1m_tokens=1.0) as pipe:
        batcher = MicroBatcher(pipe, max_wait=0.01)
        texts = [[f"t{i}", f"t{i % 5}"] for i in range(40)]
        tokens = [pipe.provider.tokenizer.count(t) for t in texts]
        answers = await asyncio.gather(*(batcher.embed(t, n) for t, n in zip(texts, tokens, strict=True)))
        direct = pipe.embed_array([t for pair in texts for t in pair])
        assert np.allclose(np.vstack([a.vectors for a in answers]), direct)
        assert batcher.calls < 10  # 40 requests, a handful of calls
        assert sum(a.tokens for a in answers) == pipe.stats.tokens > 0
        assert sum(a.cost_usd or 0 for a in answers) == pytest.approx(pipe.spent_usd)
        again = await batcher.embed(["t1", "t2"], [1, 1])
        assert again.cache_hits == 2 and again.tokens == 0  # answered from the cache, without a batch


async def test_the_queue_is_bounded() -> None:
    with EmbeddingPipeline("fake:8", cache=None) as pipe:
        batcher = MicroBatcher(pipe, max_queue=3, max_calls=1)
        first = asyncio.ensure_future(batcher.embed(["a", "b"], [1, 1]))  # leaves at once: nothing in flight
        await asyncio.sleep(0)
        queued = asyncio.ensure_future(batcher.embed(["c", "d"], [1, 1]))  # waits for the first call
        await asyncio.sleep(0)
        with pytest.raises(QueueFullError, match="max_queue=3"):
            await batcher.embed(["e", "f"], [1, 1])
        assert len((await first).vectors) == 2 and len((await queued).vectors) == 2
        await batcher.aclose()
