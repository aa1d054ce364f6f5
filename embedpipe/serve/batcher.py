"""The micro-batcher: requests arriving together share one pipeline call, so they share upstream batches.

The engine batches within one call; HTTP requests are separate calls. :class:`MicroBatcher`
collects the inputs of requests for up to ``max_wait`` seconds, or until ``max_inputs``
inputs or ``max_tokens`` tokens are waiting, then makes one ``aembed_array`` call of all of
them and hands each request its rows. A full batch leaves while fewer than ``max_calls`` calls
are in flight; a partial one only while fewer than ``partial_calls`` are, so under load partial
batches keep collecting instead of queueing (the adaptive batching TEI does) and the upstream
sees few, large requests.
The engine dedupes the combined inputs, reads the cache once, and awaits texts that another
call is embedding, so nothing here repeats that work.

Each request first looks its texts up in the cache (:meth:`MicroBatcher.probe`, one bulk read). A
request the cache holds entirely skips the batcher: one direct call answers it without waiting for
company. The others are batched, and each is billed its share of what the call was billed: by the
tokens of the texts it was first to ask for among those the cache did not hold. The shares add up
to the call's bill exactly.

A batch leaves at once when no call is in flight (an idle service adds no wait); one that would
join calls in flight (``partial_calls`` above 1) first collects for ``max_wait``.

Hand-written rather than taken from a library: the batching libraries on PyPI (``aiobatch``,
``batched``…) cut by count and time only, know no token budget, and could not leave the
dedupe/cache/single-flight work to the engine.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from embedpipe.errors import CacheError, EmbedPipeError, Failure
from embedpipe.pipeline import EmbeddingPipeline

if TYPE_CHECKING:
    from embedpipe.metrics import PrometheusMetrics

__all__ = ["Answer", "MicroBatcher", "QueueFullError"]


class QueueFullError(EmbedPipeError):
    """The micro-batcher holds ``max_queue`` inputs already: the request is refused (429), not queued."""


@dataclass
class Answer:
    """One request's share of a coalesced call."""

    vectors: np.ndarray
    failures: dict[int, Failure]
    #: distinct texts of this request the cache held before the call
    cache_hits: int
    #: tokens billed upstream on this request's behalf, and their cost (``None``: unknown price)
    tokens: int
    cost_usd: float | None
    #: seconds spent waiting for the batch to leave
    queue_wait: float = 0.0


@dataclass
class _Job:
    texts: Sequence[str]
    tokens: Sequence[int]
    held: Sequence[bool]
    future: asyncio.Future[Answer]
    arrived: float = field(default_factory=time.perf_counter)


class MicroBatcher:
    """Coalesces concurrent requests into shared calls of ``pipeline``; use one per pipeline, on one loop."""

    def __init__(self, pipeline: EmbeddingPipeline, *, max_wait: float = 0.002, max_inputs: int = 2048,
                 max_tokens: int = 300_000, max_queue: int = 65_536, max_calls: int | None = None,
                 partial_calls: int = 1, metrics: PrometheusMetrics | None = None) -> None:
        self.pipeline = pipeline
        self.max_wait = max_wait
        self.max_inputs = max_inputs
        self.max_tokens = max_tokens
        self.max_queue = max_queue
        self.max_calls = max_calls or pipeline.max_concurrency
        self.partial_calls = max(1, min(partial_calls, self.max_calls))
        self.metrics = metrics
        self.model = pipeline.provider.spec
        self._open: list[_Job] = []
        self._open_inputs = 0
        self._open_tokens = 0
        self._busy = 0
        self._timer: asyncio.TimerHandle | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        #: calls made so far (each is one engine call, which may send several upstream requests)
        self.calls = 0

    @property
    def queued(self) -> int:
        """Inputs waiting for a batch to leave."""
        return self._open_inputs

    @property
    def room(self) -> int:
        """Inputs the queue still takes."""
        return self.max_queue - self._open_inputs

    async def probe(self, texts: Sequence[str]) -> list[bool]:
        """Which of ``texts`` the cache holds now (all ``False`` without a cache or when it fails)."""
        cache = self.pipeline.cache
        if cache is None:
            return [False] * len(texts)
        keys = cache.keys_for(self.pipeline.key_material("document"), list(texts), "document")
        with contextlib.suppress(CacheError):
            return [v is not None for v in await cache.aget_many(keys)]
        return [False] * len(texts)

    async def embed(self, texts: Sequence[str], tokens: Sequence[int], held: Sequence[bool] | None = None) -> Answer:
        """Embed ``texts`` (their token counts in ``tokens``; ``held``: what :meth:`probe` found).

        Fully cached texts are answered at once; others wait for the next batch. Raises
        :class:`QueueFullError` when the queue is full.
        """
        held = list(held) if held is not None else await self.probe(texts)
        if held and all(held):
            return await self._direct(texts)
        if self._open_inputs + len(texts) > self.max_queue:
            raise QueueFullError(f"the queue holds {self._open_inputs} inputs; {len(texts)} more would exceed "
                                 f"max_queue={self.max_queue}")
        loop = asyncio.get_running_loop()
        job = _Job(texts, tokens, held, loop.create_future())
        self._open.append(job)
        self._open_inputs += len(texts)
        self._open_tokens += sum(tokens)
        self._flush()  # at once when due (full, or nothing in flight); else a timer or a finishing call flushes
        return await job.future

    async def aclose(self) -> None:
        """Wait for calls in flight; refuse what is still queued."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        for job in self._open:
            if not job.future.done():
                job.future.set_exception(QueueFullError("the service is shutting down"))
        self._open.clear()
        self._open_inputs = self._open_tokens = 0
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    # ------------------------------------------------------------------ cutting batches
    def _full(self) -> bool:
        return self._open_inputs >= self.max_inputs or self._open_tokens >= self.max_tokens

    def _due(self) -> bool:
        if not self._open:
            return False
        if self._full():
            return self._busy < self.max_calls
        if self._busy == 0:
            return True
        return self._busy < self.partial_calls and time.perf_counter() - self._open[0].arrived >= self.max_wait

    def _on_timer(self) -> None:
        self._timer = None
        self._flush()

    def _flush(self) -> None:
        """Send what waits, while a call slot is free; a finishing call flushes again."""
        while self._due():
            jobs: list[_Job] = []
            inputs = tokens = 0
            while self._open:
                job = self._open[0]
                if jobs and (inputs + len(job.texts) > self.max_inputs or tokens + sum(job.tokens) > self.max_tokens):
                    break
                jobs.append(self._open.pop(0))
                inputs += len(job.texts)
                tokens += sum(job.tokens)
            self._open_inputs -= inputs
            self._open_tokens -= tokens
            self._busy += 1
            task = asyncio.get_running_loop().create_task(self._call(jobs))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        self._depth()
        if self._open and self._timer is None and self._busy < self.partial_calls:
            wait = self.max_wait - (time.perf_counter() - self._open[0].arrived)
            self._timer = asyncio.get_running_loop().call_later(max(wait, 0.0), self._on_timer)

    def _depth(self) -> None:
        if self.metrics is not None:
            self.metrics.queue_depth.labels(self.model).set(self._open_inputs)

    # ------------------------------------------------------------------ one call
    async def _call(self, jobs: list[_Job]) -> None:
        try:
            started = time.perf_counter()
            for job in jobs:
                if self.metrics is not None:
                    self.metrics.queue_wait.labels(self.model).observe(started - job.arrived)
            texts = [t for job in jobs for t in job.texts]
            unique, owner, weight, held = _owners(jobs)
            self.calls += 1
            result = await self.pipeline.aembed_array(texts, errors="collect")
            self._deliver(jobs, result, unique, owner, weight, held, started)
        except BaseException as exc:
            for job in jobs:
                if not job.future.done():
                    job.future.set_exception(exc if isinstance(exc, Exception) else EmbedPipeError("cancelled"))
            if not isinstance(exc, Exception):
                raise
        finally:
            self._busy -= 1
            self._flush()

    async def _direct(self, texts: Sequence[str]) -> Answer:
        """One call for a request the cache holds: no batch, no wait.

        In a worker thread, where the engine's sync path reads the cache without a hop to its loop
        (and where, should an entry vanish in between, the miss it sends upstream blocks no one).
        """
        self.calls += 1
        result = await asyncio.to_thread(self.pipeline.embed_array, list(texts), errors="collect")
        stats = result.stats
        return Answer(np.asarray(result), dict(result.failures), stats.hits, stats.tokens, stats.cost_usd)

    def _deliver(self, jobs: list[_Job], result: np.ndarray, unique: list[str], owner: list[int],
                 weight: list[int], held: list[bool], started: float) -> None:
        stats = result.stats  # type: ignore[attr-defined]  # an EmbeddingArray
        failures: dict[int, Failure] = result.failures  # type: ignore[attr-defined]
        new = [0] * len(jobs)
        for u, j in enumerate(owner):
            if not held[u]:
                new[j] += weight[u]
        if not any(new):  # billed although the cache held it all (another worker evicted?): share by size
            new = [sum(job.tokens) for job in jobs]
        shares = split_exactly(stats.tokens, new)
        position = {t: u for u, t in enumerate(unique)}
        offset = 0
        for j, job in enumerate(jobs):
            n = len(job.texts)
            mine = {i - offset: f for i, f in failures.items() if offset <= i < offset + n}
            hits = sum(held[position[t]] for t in set(job.texts))
            cost = None if stats.cost_usd is None else (stats.cost_usd * shares[j] / stats.tokens
                                                        if stats.tokens else 0.0)
            answer = Answer(np.asarray(result[offset:offset + n]), mine, hits, shares[j], cost,
                            started - job.arrived)
            if not job.future.done():
                job.future.set_result(answer)
            offset += n


def _owners(jobs: list[_Job]) -> tuple[list[str], list[int], list[int], list[bool]]:
    """The distinct texts of ``jobs`` in first-seen order, the job that asked first, its token count,
    and whether the cache held it when that job looked."""
    first: dict[str, int] = {}
    unique: list[str] = []
    owner: list[int] = []
    weight: list[int] = []
    held: list[bool] = []
    for j, job in enumerate(jobs):
        for text, n, h in zip(job.texts, job.tokens, job.held, strict=True):
            if text not in first:
                first[text] = len(unique)
                unique.append(text)
                owner.append(j)
                weight.append(n)
                held.append(h)
    return unique, owner, weight, held


def split_exactly(total: int, weights: Sequence[int]) -> list[int]:
    """``total`` split in proportion to ``weights`` into integers that add up to it (largest remainders)."""
    w = sum(weights)
    if total <= 0 or w <= 0:
        return [0] * len(weights)
    raw = [total * x / w for x in weights]
    out = [int(r) for r in raw]
    for i in sorted(range(len(raw)), key=lambda i: raw[i] - out[i], reverse=True)[:total - sum(out)]:
        out[i] += 1
    return out
