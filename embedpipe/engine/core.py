"""The engine behind :class:`~embedpipe.EmbeddingPipeline`: one call from inputs to vectors.

A call is: validate and dedupe (:func:`~embedpipe.engine.planning.prepare`), look up in bulk,
cut and plan what missed, send the requests with rate limits, retries and validation
(:meth:`Engine.send`), isolate inputs a provider rejects (:mod:`~embedpipe.engine.isolate`),
cache each answer as it arrives, and assemble the result. Every step counts into the call's own
:class:`~embedpipe.stats.Stats` and emits :mod:`~embedpipe.events`; when the call ends, its stats
are added to the pipeline's running total.

The sync entry does its cache lookup in the caller's thread (a fully cached call never
crosses threads) and runs the miss path on embedpipe's private loop
(:mod:`embedpipe._runner`); the async entry runs all of it on that loop. There is one copy
of the logic.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import logging
import time
import uuid
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np

from embedpipe import _runner, codec
from embedpipe.cache import CacheBackend
from embedpipe.cost import Estimate, cost_of
from embedpipe.engine.audio import AudioStage, Expanded, is_audio
from embedpipe.engine.budget import Budget
from embedpipe.engine.flow import TAIL_LATENCIES, InFlight, LatencyModel, Sizing, server_seconds, shrunk, sizing
from embedpipe.engine.isolate import Isolation, isolate
from embedpipe.engine.items import acontent_keys, content_keys
from embedpipe.engine.planning import (
    Call,
    Errors,
    OnLongInput,
    Piece,
    apply_hits,
    assemble,
    combine,
    cut_pieces,
    plan_batches,
    prepare,
    slices,
    take,
)
from embedpipe.engine.validate import WrongDimensionsError, check_response
from embedpipe.errors import (
    BudgetExceededError,
    CacheError,
    CacheUnavailableError,
    DimensionMismatchError,
    EmbeddingFailedError,
    EmbedPipeError,
    Failure,
    InvalidInputError,
    InvalidResponseError,
    ProviderError,
    RateLimitedError,
)
from embedpipe.events import (
    BudgetChanged,
    CacheRead,
    CallDone,
    Event,
    Hooks,
    InputsFailed,
    LimiterWaited,
    LimitsObserved,
    RateLimited,
    RequestDone,
    RequestSent,
    Retried,
    next_call_id,
)
from embedpipe.keys import item_keys, key_material, text_keys
from embedpipe.limits import MemoryRateLimiter, RateLimiter, RateLimiterUnavailableError, header_number
from embedpipe.owners import owner_name
from embedpipe.providers.base import BUG_EXCEPTIONS, Provider, Role
from embedpipe.retry import make_retrying
from embedpipe.stats import Stats
from embedpipe.transcribers import Transcript

log = logging.getLogger("embedpipe")

#: under a TPM limit, a request holds at most this fraction (1/n) of the token bucket
REQUESTS_PER_TOKEN_BUCKET = 8
#: consecutive wrong-dimension answers to one request before it is a configuration error
WRONG_DIMS_LIMIT = 3
#: seconds the local stand-in limits alone before the shared limiter's store is tried again
LIMITER_RETRY_SECONDS = 5.0
#: how long a claim on a key in a shared cache lasts: a dead process blocks others no longer than this
CLAIM_TTL_SECONDS = 60.0
#: first pause between looks for a vector another process is embedding (grows to 1 s)
CLAIM_POLL_SECONDS = 0.05

Result = tuple[np.ndarray, dict[int, Failure], bool, Stats]


def _listed(inputs: Sequence[Any]) -> Sequence[Any]:
    """``inputs`` as a list (a generator is read once), left alone when it is a str or bytes (an error later)."""
    return inputs if isinstance(inputs, (str, bytes, list)) else list(inputs)


def retry_reason(exc: BaseException | None) -> str:
    """A short slug for why a request is retried (a metric label)."""
    if isinstance(exc, RateLimitedError):
        return "rate_limited"
    if isinstance(exc, InvalidResponseError):
        return "invalid_response"
    if isinstance(exc, ProviderError):
        if exc.status is not None and exc.status >= 500:
            return "server_error"
        text = str(exc).lower()
        if "timed out" in text or "timeout" in text:
            return "timeout"
        if "connection" in text:
            return "connection"
    return "other"


class Engine:
    """Runs embed calls for one pipeline. Built by :class:`~embedpipe.EmbeddingPipeline`; not public."""

    def __init__(self, *, provider: Provider, cache: CacheBackend | None, limiter: RateLimiter, budget: Budget,
                 hooks: Hooks, dimensions: int | None, namespace: str | None, batch_size: int,
                 max_batch_tokens: int | None, max_concurrency: int, max_retries: int, retry_wait: Any,
                 sleep: Callable[[float], Any] | None, on_long_input: OnLongInput, errors: Errors,
                 cache_queries: bool, price_per_1m: float | None, max_rate_limit_wait: float | None = 300.0,
                 concurrency_given: bool = True, audio: AudioStage | None = None,
                 value_format: codec.ValueFormat = codec.FLOAT32) -> None:
        self.provider = provider
        #: how vectors are stored in the cache (float32, or the pipeline's compact output_dtype)
        self.value_format = value_format
        self.info = provider.info
        self.spec = provider.spec
        self.cache = cache
        self.limiter = limiter
        self.budget = budget
        self.hooks = hooks
        self.dimensions = dimensions
        self.namespace = namespace
        self.batch_size = batch_size
        self.max_batch_tokens = max_batch_tokens
        self.max_concurrency = max_concurrency
        self.max_retries = max_retries
        self.retry_wait = retry_wait
        self.sleep = sleep
        self.on_long_input: OnLongInput = on_long_input
        self.errors: Errors = errors
        self.cache_queries = cache_queries
        self.price = price_per_1m
        self.max_rate_limit_wait = max_rate_limit_wait
        #: transcripts for Audio inputs (``audio_to_text``), or None
        self.audio = audio
        self.total = Stats()
        if price_per_1m is None:
            self.total.cost_usd = self.total.saved_usd = None
        #: native dimensions learned from the first response, when the provider did not declare them
        self.learned_dims: int | None = None
        self._materials: dict[str, bytes] = {}
        #: what is in flight (requests, tokens), gated by :meth:`sizing`; made on the runner loop
        self._in_flight: InFlight | None = None
        #: the latency of recent answers by request size, for Little's law
        self.latency = LatencyModel()
        #: the most tokens in flight at once, whatever the rates (what a crash may re-bill); None: no such cap
        self.max_tokens_in_flight: int | None = None
        #: whether max_concurrency was set (a cap) or is the provider's default (rate limits may go above it)
        self.concurrency_given = concurrency_given
        self._truncation_warned = False
        #: single-flight: key -> the future of the call embedding it now. Touched only on the runner loop.
        self._flights: dict[str, asyncio.Future[np.ndarray | None]] = {}
        #: how many times calls finished embedding something; a call that read the cache before this
        #: moved re-reads its misses, so a text finished in between is not paid again
        self._epoch = 0
        #: the local limiter that stands in while the shared one's store is down (fail open)
        self._fallback: RateLimiter | None = None
        self._limiter_down_until = -1.0
        #: this engine's name in claims on a cache shared by processes, and how long a claim lasts
        self._tail = uuid.uuid4().hex[:12]
        self.claim_ttl = CLAIM_TTL_SECONDS
        #: after a 429, one request at a time probes until one succeeds (see :meth:`send`)
        self._storm = False
        self._probe: asyncio.Lock | None = None

    # ------------------------------------------------------------------ settings
    @property
    def native_dims(self) -> int | None:
        return self.provider.info.dimensions or self.learned_dims

    @property
    def expected_dims(self) -> int | None:
        return self.dimensions or self.native_dims

    def material(self, role: Role) -> bytes:
        """The cache-key material of this pipeline's vector space for ``role``."""
        r = role if self.info.role_sensitive else None
        cached = self._materials.get(str(r))
        if cached is None:
            identity = dict(self.provider.identity())
            if self.value_format.compact:
                identity["output_dtype"] = self.value_format.dtype  # compact values are another cache entry
            if self.namespace is not None:
                # A namespace names the vector space instead of the server URL, so the same
                # model behind several URLs (a proxy, a replica) shares one cache.
                identity.pop("base_url", None)
                identity["namespace"] = self.namespace
            cached = key_material(provider=self.provider.name, model=self.provider.model,
                                  dimensions=self.dimensions, identity=identity, role=r)
            self._materials[str(r)] = cached
        return cached

    def token_limit(self) -> int | None:
        """The most tokens one piece may hold: the model's input limit, a request's, the limiter's."""
        limit = self.provider.info.max_input_tokens
        for cap in (self.max_batch_tokens, self.limiter.max_tokens_per_request):
            if cap:
                limit = min(limit or cap, cap)
        return limit

    def request_cap(self) -> int | None:
        """The most tokens one request may hold."""
        cap = self.max_batch_tokens
        lim = self.limiter.max_tokens_per_request
        if lim:
            # Under a TPM budget, requests of a fraction of the bucket keep the pipe full: the
            # limiter admits them as tokens refill instead of in a few big gulps, and the last
            # request of a run, whose latency nothing can hide, stays small. Spend at most a
            # quarter of an RPM budget on it.
            rpm = self.limiter.rpm
            parts = REQUESTS_PER_TOKEN_BUCKET if not rpm else max(1, min(REQUESTS_PER_TOKEN_BUCKET, rpm // 4))
            cap = min(cap or lim, max(1, lim // parts))
        return cap

    # ------------------------------------------------------------------ events
    def emit(self, event: Event) -> None:
        self.hooks.emit(event)

    def _end(self, call: Call) -> None:
        """Close a call's books: the running total adds its stats, then hooks hear CallDone."""
        self.total.merge(call.stats)
        if self.hooks:
            self.emit(CallDone(self.spec, call.id, call.stats.snapshot()))

    # ------------------------------------------------------------------ the steps of a call
    def begin(self, inputs: Sequence[Any], role: Role, errors: Errors | None, stats: Stats | None = None,
              content_keys: dict[int, bytes | str] | None = None) -> Call:
        errors = errors or self.errors
        if errors not in ("raise", "collect"):
            from embedpipe.errors import ConfigurationError

            raise ConfigurationError(f"errors={errors!r}: use 'raise' or 'collect'")
        if stats is None:
            stats = Stats()
            if self.price is None:
                stats.cost_usd = stats.saved_usd = None
        call = prepare(inputs, role, errors, call_id=next_call_id(), stats=stats,
                       modalities=self.info.modalities, spec=self.spec, content_keys=content_keys)
        if self.cache is not None and (role == "document" or self.cache_queries) and call.unique:
            cache = self.cache
            call.keys = self._derive_keys(call, lambda material, texts: cache.keys_for(material, texts, role))
        return call

    def read_hits(self, call: Call, values: Sequence[bytes | None], seconds: float, epoch: int) -> list[int]:
        """Apply cache values read when the engine's completion count was ``epoch``; count hits, misses,
        corrupt values; return the misses."""
        call.read_epoch = epoch
        misses, corrupt, hit_tokens = apply_hits(call, values, self.expected_dims, self.value_format)
        if corrupt:
            log.warning("embedpipe: %d cache value(s) failed to decode (corrupt, foreign or wrong dims); "
                        "re-embedding them", corrupt)
        hits = len(call.unique) - len(misses)
        saved = cost_of(hit_tokens, self.price)
        call.stats.add(hits=hits, misses=len(misses), saved_usd=saved, corrupt=corrupt)
        if self.hooks and call.keys is not None:
            self.emit(CacheRead(self.spec, call.id, hits, len(misses), seconds, hit_tokens, saved))
        return misses

    def cut(self, call: Call, misses: list[int]) -> list[Piece]:
        """Count tokens and apply ``on_long_input`` to ``misses``."""
        limit = self.token_limit()
        cut = cut_pieces(call, misses, self.provider.tokenizer, limit, self.on_long_input, self.provider.item_tokens)
        if cut.split or cut.truncated:
            call.stats.add(split=cut.split, truncated=cut.truncated)
        if cut.truncated and not self._truncation_warned:
            self._truncation_warned = True
            warnings.warn(f"embedpipe: inputs over {limit} tokens were truncated (counted in stats.truncated)",
                          stacklevel=2)
        if cut.too_long:
            message = f"input is longer than the model's limit of {limit} tokens (on_long_input='error')"
            if call.errors == "raise":
                over = set(cut.too_long)
                idx = sorted(i for i, u in enumerate(call.where) if u in over)
                raise InvalidInputError(f"{len(idx)} input(s) exceed {limit} tokens at indices {idx[:20]}; "
                                        "nothing was embedded. Use on_long_input='split' or 'truncate'", idx)
            for u in cut.too_long:
                call.unique_failures[u] = Failure("invalid_input", message=message)
        return cut.pieces

    def finish(self, call: Call) -> tuple[np.ndarray, dict[int, Failure]]:
        out, failures = assemble(call, self.expected_dims)
        if failures:
            call.stats.add(failed=len(failures))
            if self.hooks:
                self.emit(InputsFailed(self.spec, call.id, dict(failures)))
        return out, failures

    def raise_or(self, call: Call, failures: dict[int, Failure]) -> None:
        if failures and call.errors == "raise":
            if call.budget_exceeded:
                raise BudgetExceededError(
                    f"the budget of ${self.budget.limit_usd} was reached after spending "
                    f"${self.budget.spent_usd:.6f}; {len(failures)} input(s) were not embedded (all finished work "
                    "is cached)", spent_usd=self.budget.spent_usd, budget_usd=self.budget.limit_usd)
            raise EmbeddingFailedError(failures, stats=call.stats.snapshot())

    @contextlib.contextmanager
    def cache_guard(self, call: Call, what: str) -> Iterator[None]:
        """A failing cache costs the cache, never the vectors (unless it was set to fail closed)."""
        try:
            yield
        except CacheUnavailableError:
            raise
        except CacheError as exc:
            call.stats.add(cache_errors=1)
            log.warning("embedpipe: cache %s failed (%s); continuing uncached", what, exc)

    # ------------------------------------------------------------------ drivers
    def run_sync(self, inputs: Sequence[Any], role: Role, errors: Errors | None = None,
                 stats: Stats | None = None) -> Result:
        inputs = _listed(inputs)
        if self.audio is not None and any(is_audio(t) for t in inputs):
            return self._run_audio_sync(inputs, role, errors)
        call = self.begin(inputs, role, errors, stats, content_keys=content_keys(inputs, self.info.modalities))
        try:
            values: Sequence[bytes | None] = [None] * len(call.unique)
            epoch, t0 = self._epoch, time.perf_counter()
            if self.cache is not None and call.keys:
                with self.cache_guard(call, "read"):
                    values = self.cache.get_many(call.keys)
            misses = self.read_hits(call, values, time.perf_counter() - t0, epoch)
            if misses:
                _runner.run_sync(self.embed_misses(call, misses))
            out, failures = self.finish(call)
        finally:
            self._end(call)
        self.raise_or(call, failures)
        return out, failures, call.budget_exceeded, call.stats

    async def run_async(self, inputs: Sequence[Any], role: Role, errors: Errors | None = None,
                        stats: Stats | None = None) -> Result:
        inputs = _listed(inputs)
        if self.audio is not None and any(is_audio(t) for t in inputs):
            return await self._run_audio_async(inputs, role, errors)
        call = self.begin(inputs, role, errors, stats, content_keys=await acontent_keys(inputs, self.info.modalities))
        try:
            values: Sequence[bytes | None] = [None] * len(call.unique)
            epoch, t0 = self._epoch, time.perf_counter()
            if self.cache is not None and call.keys:
                with self.cache_guard(call, "read"):
                    values = await self.cache.aget_many(call.keys)
            misses = self.read_hits(call, values, time.perf_counter() - t0, epoch)
            if misses:
                await self.embed_misses(call, misses)
            out, failures = self.finish(call)
        finally:
            self._end(call)
        self.raise_or(call, failures)
        return out, failures, call.budget_exceeded, call.stats

    # ------------------------------------------------------------------ audio: transcripts around a call
    def _new_stats(self) -> Stats:
        stats = Stats()
        if self.price is None:
            stats.cost_usd = stats.saved_usd = None
        return stats

    def _audio_begin(self, inputs: Sequence[Any], errors: Errors | None) -> tuple[Expanded, Stats]:
        assert self.audio is not None
        per_minute = self.audio.transcriber.price_per_minute
        if self.budget.limit_usd is not None and per_minute:
            # Refuse before transcribing what the budget cannot pay for (lengths from the files' headers).
            _, seconds, _ = self.audio.plan(inputs)
            self.budget.check_usd(seconds / 60 * per_minute, f"transcribing {seconds:.1f} s of audio")
        stats = self._new_stats()
        expanded = self.audio.expand(inputs, stats)
        spent = stats.cost_usd or 0.0
        if spent:
            self.budget.spend(spent)
        if expanded.failures and (errors or self.errors) == "raise":
            self.total.merge(stats)
            idx = sorted(expanded.failures)
            shown = "; ".join(f"input {i}: {expanded.failures[i].message}" for i in idx[:5])
            raise InvalidInputError(f"{len(idx)} audio input(s) cannot be embedded at indices {idx[:20]}: {shown}; "
                                    "nothing was embedded", idx)
        return expanded, stats

    def _audio_end(self, expanded: Expanded, result: Result, errors: Errors | None) -> Result:
        assert self.audio is not None
        out, failures, budget, stats = result
        block, merged = self.audio.collapse(expanded, out, failures, self.provider.tokenizer, self.expected_dims)
        if merged and (errors or self.errors) == "raise":
            raise EmbeddingFailedError(merged, stats=stats.snapshot())
        return block, merged, budget, stats

    def _run_audio_sync(self, inputs: Sequence[Any], role: Role, errors: Errors | None) -> Result:
        expanded, stats = self._audio_begin(inputs, errors)
        return self._audio_end(expanded, self.run_sync(expanded.inputs, role, "collect", stats), errors)

    async def _run_audio_async(self, inputs: Sequence[Any], role: Role, errors: Errors | None) -> Result:
        expanded, stats = await asyncio.to_thread(self._audio_begin, inputs, errors)
        return self._audio_end(expanded, await self.run_async(expanded.inputs, role, "collect", stats), errors)

    def transcribe(self, audio: Any) -> Transcript:
        """``audio``'s transcript through the transcript cache (counted in the running total)."""
        if self.audio is None:
            from embedpipe.errors import ConfigurationError

            raise ConfigurationError("this pipeline has no audio_to_text model: pass audio_to_text='local-whisper:"
                                     "tiny.en' (or 'openai:whisper-1')")
        stats = self._new_stats()
        try:
            return self.audio.transcribe(audio, stats)
        finally:
            if stats.cost_usd:
                self.budget.spend(stats.cost_usd)
            self.total.merge(stats)

    def estimate(self, inputs: Sequence[Any], rpm: int | None, tpm: int | None) -> Estimate:
        """What embedding ``inputs`` would cost; shares no mutable state with running calls."""
        inputs = _listed(inputs)
        if self.audio is not None and any(is_audio(t) for t in inputs):
            texts, seconds, unreadable = self.audio.plan(inputs)
            est = self.estimate(texts, rpm, tpm)
            per_minute = self.audio.transcriber.price_per_minute
            cost = None if per_minute is None or est.cost_usd is None else est.cost_usd + seconds / 60 * per_minute
            return dataclasses.replace(est, texts=len(inputs), invalid=est.invalid + unreadable,
                                       audio_seconds=seconds, cost_usd=cost)
        call = self.begin(inputs, "document", "collect", stats=Stats(),
                          content_keys=content_keys(inputs, self.info.modalities))
        values: Sequence[bytes | None] | None = None
        if self.cache is not None and call.keys:
            with self.cache_guard(call, "read"):
                values = self.cache.get_many(call.keys)
        misses = self._lookup_only(call, values)
        limit = self.token_limit()
        cut = cut_pieces(call, misses, self.provider.tokenizer, limit, self.on_long_input, self.provider.item_tokens)
        batches = plan_batches(cut.pieces, self.batch_size, self.sizing().tokens)
        tokens = sum(p.tokens for p in cut.pieces)
        eta = None
        if rpm or tpm:
            eta = max(len(batches) / rpm * 60 if rpm else 0.0, tokens / tpm * 60 if tpm else 0.0)
        return Estimate(texts=call.n, unique=len(call.unique), cached=len(call.unique) - len(misses),
                        tokens=tokens, cost_usd=cost_of(tokens, self.price), requests=len(batches),
                        eta_seconds=eta, invalid=len(call.failures))

    def _lookup_only(self, call: Call, values: Sequence[bytes | None] | None) -> list[int]:
        if values is None:
            return list(range(len(call.unique)))
        present = [u for u, v in enumerate(values) if v is not None]
        decoded, _ = self.value_format.decode_many([values[u] for u in present], self.expected_dims)  # type: ignore[misc]
        hit = {present[p] for p in decoded.positions}
        return [u for u in range(len(call.unique)) if u not in hit]

    # ------------------------------------------------------------------ the async I/O loop
    def _flight_keys(self, call: Call) -> list[str]:
        """The key of each unique input: the cache key, or the same derivation when there is no cache."""
        if call.keys is not None:
            return call.keys
        return self._derive_keys(call, text_keys)

    def _derive_keys(self, call: Call, keys_of_texts: Callable[[bytes, list[str]], list[str]]) -> list[str]:
        """The key of each unique input: texts through ``keys_of_texts``, items by kind and content."""
        material = self.material(call.role)
        if not call.has_items:
            return keys_of_texts(material, call.unique)
        keys = [""] * len(call.unique)
        texts = [(u, t) for u, t in enumerate(call.unique) if isinstance(t, str)]
        for (u, _), k in zip(texts, keys_of_texts(material, [t for _, t in texts]), strict=True):
            keys[u] = k
        items = [(u, t) for u, t in enumerate(call.unique) if not isinstance(t, str)]
        for (u, _), k in zip(items, item_keys(material, [t for _, t in items]), strict=True):
            keys[u] = k
        return keys

    async def embed_misses(self, call: Call, misses: list[int]) -> None:
        """Embed ``misses``; inputs another call is embedding right now are awaited, not paid twice."""
        keys = self._flight_keys(call)
        if self.cache is not None and call.keys is not None and self._epoch != call.read_epoch:
            # Some call finished since this one read the cache: what it wrote may be among our misses.
            # Inputs still in flight are awaited below; any that land while we read are read again.
            todo, misses = misses, []
            while todo:
                flying = [u for u in todo if keys[u] in self._flights]
                misses += await self._reread(call, [u for u in todo if keys[u] not in self._flights])
                todo = [u for u in flying if keys[u] not in self._flights]
                misses += [u for u in flying if keys[u] in self._flights]
        # No await from here until every own key is registered: the check and the claim are one step.
        waits = {u: self._flights[keys[u]] for u in misses if keys[u] in self._flights}
        own = [u for u in misses if u not in waits]
        if waits:
            # Answered by another call's request: deduped here, as a copy in this call would be.
            call.stats.add(misses=-len(waits), deduped=len(waits))
        loop = asyncio.get_running_loop()
        mine: dict[int, asyncio.Future[np.ndarray | None]] = {}
        for u in own:
            mine[u] = self._flights[keys[u]] = loop.create_future()
        try:
            if own:
                foreign = await self._claim_and_embed(call, own, mine)
                if foreign:
                    await self._await_foreign(call, foreign, mine)
        finally:
            finished = False
            for u, fut in mine.items():
                if not fut.done():
                    fut.set_result(call.vectors[u])
                finished = finished or call.vectors[u] is not None
                if self._flights.get(keys[u]) is fut:
                    del self._flights[keys[u]]
            if finished:
                self._epoch += 1
        again: list[int] = []
        for u, fut in waits.items():
            vector = await asyncio.shield(fut)
            if vector is None:
                again.append(u)  # the other call failed or was cancelled: embed it here
            else:
                call.vectors[u] = vector
        if again:
            call.stats.add(misses=len(again), deduped=-len(again))
            await self.embed_misses(call, again)

    @property
    def owner(self) -> str:
        """This engine's name in cross-process claims (the pid changes after a fork, and so does the name)."""
        return owner_name(self._tail)

    async def _claim_and_embed(self, call: Call, own: list[int],
                               flights: dict[int, asyncio.Future[np.ndarray | None]]) -> list[int]:
        """Claim ``own`` in a cache shared by processes and embed what this engine claimed; return the
        inputs another live process has claimed (it is embedding them: their vectors will appear)."""
        cache = self.cache
        if cache is None or call.keys is None or not cache.supports_claims:
            await self._embed_own(call, own, flights)
            return []
        keys = call.keys
        ok: Sequence[bool] = [True] * len(own)
        with self.cache_guard(call, "claim"):
            ok = await cache.aclaim([keys[u] for u in own], self.owner, self.claim_ttl)
        claimed = [u for u, mine in zip(own, ok, strict=True) if mine]
        try:
            # A claim freed since our cache read may have been freed by a process that finished the key:
            # owners write the cache before releasing, so one more read after claiming sees its vector.
            todo = await self._reread(call, claimed)
            for u in claimed:
                if call.vectors[u] is not None and not flights[u].done():
                    flights[u].set_result(call.vectors[u])
            if todo:
                await self._embed_own(call, todo, flights)
        finally:
            with self.cache_guard(call, "release"):
                await cache.arelease([keys[u] for u in claimed], self.owner)
        return [u for u, mine in zip(own, ok, strict=True) if not mine]

    async def _await_foreign(self, call: Call, foreign: list[int],
                             flights: dict[int, asyncio.Future[np.ndarray | None]]) -> None:
        """Wait for another process's vectors (read as cache hits); claim and embed any whose claim expired."""
        pause = CLAIM_POLL_SECONDS
        while foreign:
            await asyncio.sleep(pause)
            pause = min(pause * 1.5, 1.0)
            foreign = await self._reread(call, foreign)
            for u in list(flights):
                if call.vectors[u] is not None and not flights[u].done():
                    flights[u].set_result(call.vectors[u])
            if foreign:
                foreign = await self._claim_and_embed(call, foreign, flights)

    async def _reread(self, call: Call, us: list[int]) -> list[int]:
        """Read ``us`` from the cache again; apply what is there now and return the rest."""
        if not us:
            return us
        assert self.cache is not None and call.keys is not None
        values: Sequence[bytes | None] = [None] * len(us)
        with self.cache_guard(call, "read"):
            values = await self.cache.aget_many([call.keys[u] for u in us])
        present = [k for k, v in enumerate(values) if v is not None]
        if not present:
            return us
        decoded, _ = self.value_format.decode_many([values[k] for k in present],  # type: ignore[misc]
                                                   self.expected_dims)
        found = 0
        hit_tokens = 0
        for row, (pos, tok) in enumerate(zip(decoded.positions, decoded.tokens, strict=True)):
            u = us[present[pos]]
            call.vectors[u] = decoded.vectors[row]
            call.tokens[u] = tok
            hit_tokens += tok
            found += 1
        call.stats.add(hits=found, misses=-found, saved_usd=cost_of(hit_tokens, self.price))
        return [u for u in us if call.vectors[u] is None]

    async def _embed_own(self, call: Call, misses: list[int], flights: dict[int, asyncio.Future[np.ndarray | None]]
                         ) -> None:
        counts: dict[int, int] = {}                                  # unique -> pieces
        parts: dict[int, list[tuple[int, np.ndarray | None]]] = {}   # unique -> (tokens, vector) per piece
        done: dict[int, int] = {}
        fmt = self.value_format

        async def deliver(batch: list[Piece], vectors: np.ndarray | None, failure: Failure | None) -> None:
            finished: list[int] = []
            for k, p in enumerate(batch):
                parts[p.owner][p.window] = (p.tokens, None if vectors is None else vectors[k])
                if vectors is None and failure is not None:
                    call.unique_failures.setdefault(p.owner, failure)
                done[p.owner] += 1
                if done[p.owner] == counts[p.owner]:
                    finished.append(p.owner)
            items: list[tuple[str, bytes]] = []
            embedded = 0
            for u in finished:
                vec = combine(parts.pop(u))
                if vec is None:
                    continue
                if fmt.compact:
                    vec = fmt.roundtrip(vec)  # the same vector a later cache read gives back
                call.vectors[u] = vec
                call.unique_failures.pop(u, None)
                embedded += 1
                fut = flights.get(u)
                if fut is not None and not fut.done():
                    fut.set_result(vec)
                if call.keys is not None:
                    items.append((call.keys[u], fmt.encode(vec, call.tokens[u])))
            if embedded:
                call.stats.add(embedded=embedded)
            if items:
                assert self.cache is not None
                with self.cache_guard(call, "write"):
                    await self.cache.aset_many(items)

        gate = self._gate()
        # A request that raised (a fail-fast error, a bug) stops the call: nothing more is sent.
        failed: list[BaseException] = []

        async def run_batch(batch: list[Piece], tokens: int) -> None:
            admitted = time.perf_counter()
            try:
                await isolate(self, call, batch, Isolation(batch), deliver)
            except Exception as exc:
                failed.append(exc)  # before the gate wakes the sender, so it sends nothing more
                raise
            finally:
                self.latency.observe_held(tokens, time.perf_counter() - admitted)
                await gate.done(tokens)

        whole = self.budget.limit_usd is not None or (self.on_long_input == "error" and call.errors == "raise")
        # Count slice by slice in a thread (tiktoken releases the GIL) while what is counted is
        # sent: the server's rate-limit bucket never idles while a big call is tokenised. Each
        # request is cut when it can leave, at the size the rates and latencies then call for.
        pending: collections.deque[Piece] = collections.deque()
        counted = asyncio.Event()
        state = {"counting": True, "sent": 0, "pending_tokens": 0}

        async def count() -> None:
            try:
                for chunk in slices(call, misses, whole):
                    pieces = await asyncio.to_thread(self.cut, call, chunk)
                    if not pieces:
                        continue
                    self.budget.check(sum(p.tokens for p in pieces))
                    for p in pieces:
                        counts[p.owner] = counts.get(p.owner, 0) + 1
                    for u in {p.owner for p in pieces}:
                        parts[u] = [(0, None)] * counts[u]
                        done[u] = 0
                    if not self.sizing().paced:
                        pieces = sorted(pieces, key=lambda p: p.tokens)  # similar lengths pad less
                    # Paced by rate limits, sizes stay mixed: sorted, a slice's long texts would come
                    # last, together, in requests too slow for what may be in flight.
                    pending.extend(pieces)
                    state["pending_tokens"] += sum(p.tokens for p in pieces)
                    counted.set()
            finally:
                state["counting"] = False
                counted.set()

        def note(task: asyncio.Future[None]) -> None:
            if not task.cancelled() and task.exception() is not None:
                failed.append(task.exception())  # type: ignore[arg-type]
                counted.set()

        counter = asyncio.ensure_future(count())
        counter.add_done_callback(note)
        tasks: list[asyncio.Future[None]] = [counter]
        longest_first = False
        try:
            while not failed:
                while not pending and not failed:
                    if not state["counting"]:
                        break
                    counted.clear()
                    await counted.wait()
                if not pending or failed:
                    break
                size = self.sizing()
                if (size.paced and not longest_first and not state["counting"]
                        and state["pending_tokens"] <= TAIL_LATENCIES * size.in_flight_tokens):
                    # Near the end of the call the longest inputs go first, so that it ends on short
                    # requests: an input no request can split is a tail of its own latency if it comes
                    # last. (Earlier, the sizes stay mixed, as the latency model has learnt them.)
                    longest_first = True
                    rest = sorted(pending, key=lambda p: -p.tokens)
                    pending.clear()
                    pending.extend(rest)
                target = size.tokens
                left = state["pending_tokens"]
                if not state["counting"] and state["sent"] >= 1:
                    target = shrunk(size, left)
                want = max(pending[0].tokens, min(target or left, left))
                await gate.wait(lambda want=want: bool(failed) or gate.has_room(self.sizing(), want))  # type: ignore[misc]
                if failed:
                    break
                batch, tokens = take(pending, self.batch_size, target)
                state["pending_tokens"] -= tokens
                gate.add(tokens)
                state["sent"] += 1
                tasks.append(asyncio.ensure_future(run_batch(batch, tokens)))
            await asyncio.gather(*tasks)
        except BaseException:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise

    # ------------------------------------------------------------------ sizing (Little's law)
    def sizing(self) -> Sizing:
        """The size of the next request and the caps on what is in flight (see :mod:`embedpipe.engine.flow`)."""
        return sizing(self._limiter(), self.latency, cap=self.request_cap(), max_concurrency=self.max_concurrency,
                      concurrency_given=self.concurrency_given, remote=self.info.price_per_1m_units != 0.0,
                      at_risk=self.max_tokens_in_flight)

    def _gate(self) -> InFlight:
        if self._in_flight is None:
            self._in_flight = InFlight()
        return self._in_flight

    async def send(self, call: Call, batch: list[Piece]) -> tuple[dict[int, np.ndarray], ProviderError | None]:
        """One request with rate limiting, retries and validation.

        Returns the vectors obtained (batch position -> vector) and, when some inputs are still
        without one after the retries, the error that stopped them. Rows of a response that are
        valid are kept; only the others are asked for again.
        """
        est_all = sum(p.tokens for p in batch)
        self.budget.check(est_all)
        reserved = self.budget.reserve(est_all)
        got: dict[int, np.ndarray] = {}
        pending = list(range(len(batch)))
        wrong_dims = 0
        hooks = self.hooks

        def before_sleep(state: Any) -> None:
            call.stats.add(retries=1)
            if hooks:
                exc = state.outcome.exception() if state.outcome else None
                wait = state.next_action.sleep if state.next_action else 0.0
                self.emit(Retried(self.spec, call.id, retry_reason(exc), float(wait)))

        try:
            async for attempt in make_retrying(self.max_retries, wait=self.retry_wait, sleep=self.sleep,
                                               before_sleep=before_sleep,
                                               max_rate_limit_wait=self.max_rate_limit_wait):
                with attempt:
                    # During a 429 storm one request at a time probes (after the shared cooldown), so
                    # probes come at about one per retry-after instead of one per waiting request.
                    async with self._storm_gate():
                        result, est, inputs, seconds = await self._attempt(call, batch, pending)
                    billed = result.tokens if result.tokens is not None else est
                    # Billed whether or not the answer is usable.
                    cost = cost_of(billed, self.price)
                    self.budget.spend(cost or 0.0)
                    call.stats.add(tokens=billed, cost_usd=cost)
                    if hooks:
                        self._emit_response(call, result.headers, len(inputs), billed, cost, seconds, result.status)
                    try:
                        checked = check_response(result.vectors, len(inputs), native=self.native_dims,
                                                 dimensions=self.dimensions, spec=self.spec)
                    except WrongDimensionsError as exc:
                        wrong_dims += 1
                        if wrong_dims >= min(WRONG_DIMS_LIMIT, self.max_retries + 1):
                            raise DimensionMismatchError(f"{exc} in {wrong_dims} answers in a row") from None
                        raise
                    wrong_dims = 0
                    if self.native_dims is None:
                        self.learned_dims = checked.native
                        self._check_learned_dims()
                    bad = set(checked.bad_rows)
                    for j, k in enumerate(pending):
                        if j not in bad:
                            got[k] = checked.vectors[j]
                    if bad:
                        pending = [pending[j] for j in sorted(bad)]
                        raise InvalidResponseError(
                            f"provider returned non-finite values (NaN/inf) for {len(bad)} of {len(inputs)} inputs")
        except ProviderError as exc:
            return got, exc
        finally:
            self.budget.release(reserved)
        return got, None

    @contextlib.asynccontextmanager
    async def _storm_gate(self) -> Any:
        if not self._storm:
            yield
            return
        if self._probe is None:
            self._probe = asyncio.Lock()
        async with self._probe:
            yield

    async def _attempt(self, call: Call, batch: list[Piece], pending: list[int]) -> tuple[Any, int, list[Any], float]:
        """One request: the limiter, the provider, and what the limiter learns from the answer."""
        hooks = self.hooks
        inputs = [batch[k].text for k in pending]
        est = sum(batch[k].tokens for k in pending)
        waited = await self._acquire(call, est)
        if waited and hooks:
            self.emit(LimiterWaited(self.spec, call.id, waited))
        call.stats.add(requests=1)
        if hooks:
            self.emit(RequestSent(self.spec, call.id, len(inputs), est))
        t0 = time.perf_counter()
        try:
            result = await self.provider.aembed_batch(inputs, call.role)
        except Exception as raw:
            # A failed request bills nothing: give its tokens back.
            await self._reconcile(call, est, 0)
            exc = self._map_provider_error(raw)
            limiter = self._limiter()
            if exc.headers:
                limiter.update_from_headers(exc.headers)
            if isinstance(exc, RateLimitedError):
                self._storm = True
                call.stats.add(rate_limited=1)
                if exc.retry_after:
                    limiter.cooldown(exc.retry_after)
                if hooks:
                    self.emit(RateLimited(self.spec, call.id, float(exc.retry_after or 0.0)))
            if hooks:
                self.emit(RequestDone(self.spec, call.id, len(inputs), 0, 0.0 if self.price is not None else None,
                                      time.perf_counter() - t0, exc.status))
            if exc is raw:
                raise
            raise exc from raw
        self._storm = False
        seconds = time.perf_counter() - t0
        self.latency.observe(est, seconds, server_seconds(result.headers))
        billed = result.tokens if result.tokens is not None else est
        await self._reconcile(call, est, billed)
        if result.headers:
            self._limiter().update_from_headers(result.headers)
        return result, est, inputs, seconds

    # ------------------------------------------------------------------ the limiter, failing open
    def _limiter(self) -> RateLimiter:
        if self._fallback is not None and self.limiter.clock() < self._limiter_down_until:
            return self._fallback
        return self.limiter

    def _limiter_failed(self, call: Call, exc: RateLimiterUnavailableError) -> RateLimiter:
        """The shared limiter's store failed: count it, and hand back the local stand-in (fail open)."""
        call.stats.add(limiter_errors=1)
        if self._fallback is None:
            log.warning("embedpipe: %s; falling back to a local limiter at the same rpm/tpm (counted in "
                        "stats.limiter_errors; pass ?on_error=raise to fail closed)", exc)
            self._fallback = MemoryRateLimiter(rpm=self.limiter.rpm, tpm=self.limiter.tpm, window=self.limiter.window)
        # Try the shared store again after a few seconds: it usually comes back.
        self._limiter_down_until = self.limiter.clock() + LIMITER_RETRY_SECONDS
        return self._fallback

    async def _acquire(self, call: Call, tokens: int) -> float:
        limiter = self._limiter()
        try:
            return await limiter.acquire(tokens)
        except RateLimiterUnavailableError as exc:
            if limiter is not self.limiter or self.limiter.on_error == "raise":
                raise
            return await self._limiter_failed(call, exc).acquire(tokens)

    async def _reconcile(self, call: Call, charged: int, actual: int) -> None:
        """Settle a charge. A response that arrived is kept whatever the limiter's store does."""
        limiter = self._limiter()
        try:
            await limiter.reconcile(charged, actual)
        except RateLimiterUnavailableError as exc:
            if self.limiter.on_error == "raise":
                call.stats.add(limiter_errors=1)
            else:
                await self._limiter_failed(call, exc).reconcile(charged, actual)

    def _emit_response(self, call: Call, headers: Any, inputs: int, billed: int, cost: float | None,
                       seconds: float, status: int | None) -> None:
        self.emit(RequestDone(self.spec, call.id, inputs, billed, cost, seconds, status))
        if headers:
            lowered = {k.lower(): v for k, v in headers.items()}
            requests = header_number(lowered.get("x-ratelimit-remaining-requests"))
            tokens = header_number(lowered.get("x-ratelimit-remaining-tokens"))
            if requests is not None or tokens is not None:
                self.emit(LimitsObserved(self.spec, call.id, requests, tokens))
        if cost:
            self.emit(BudgetChanged(self.spec, call.id, self.budget.spent_usd, self.budget.remaining_usd))

    def _map_provider_error(self, exc: Exception) -> ProviderError:
        """The seam's rule: embedpipe's own errors pass, bugs propagate, the rest is mapped by the provider."""
        if isinstance(exc, ProviderError):
            return exc
        if isinstance(exc, (EmbedPipeError, *BUG_EXCEPTIONS)):
            raise exc
        mapped = self.provider.map_error(exc)
        if not isinstance(mapped, ProviderError):
            raise mapped from exc
        return mapped

    def _check_learned_dims(self) -> None:
        native = self.native_dims
        if self.dimensions is not None and native is not None and self.dimensions > native \
                and not self.info.handles_dimensions:
            from embedpipe.errors import ConfigurationError

            raise ConfigurationError(f"dimensions={self.dimensions} is larger than {self.spec}'s {native}")


__all__ = ["Engine", "retry_reason"]
