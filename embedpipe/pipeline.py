"""The engine: validate, dedupe, look up in bulk, plan batches, send, validate, cache.

One engine serves both APIs. Decisions that do no I/O (validation, dedupe, keys,
decoding hits, planning, combining windows) are plain functions shared by both; the
one I/O loop that sends batches is async. The sync API does its cache lookup in the
caller's thread (a fully cached call never crosses threads) and runs the async miss
path on embedpipe's private loop (:mod:`embedpipe._runner`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import warnings
import weakref
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from embedpipe import _runner, codec
from embedpipe.cache import CacheBackend, default_cache_url, resolve_cache
from embedpipe.cost import Estimate, cost_of
from embedpipe.errors import (
    BudgetExceededError,
    CacheUnavailableError,
    ConfigurationError,
    DimensionMismatchError,
    EmbeddingFailedError,
    InputTypeError,
    InvalidInputError,
    InvalidResponseError,
    ProviderError,
    RateLimitedError,
)
from embedpipe.keys import key_material
from embedpipe.providers import Provider, Role, provider_from_spec
from embedpipe.retry import make_retrying
from embedpipe.stats import Stats

log = logging.getLogger("embedpipe")

OnLongInput = Literal["split", "truncate", "error"]
Errors = Literal["raise", "collect"]
_DEFAULT: Any = object()

#: a batch isolating a 400 gives up splitting after this many single-input failures with
#: no success at all: every request fails alike, so the request itself is at fault.
_REQUEST_LEVEL_PROBES = 3
#: under a TPM limit, a request holds at most this fraction (1/n) of the token bucket.
_REQUESTS_PER_TOKEN_BUCKET = 8


class EmbeddingResult(list):  # type: ignore[type-arg]
    """The vectors of one call (``None`` where an input failed), with ``failures``: index -> reason."""

    failures: dict[int, str]
    budget_exceeded: bool

    def __init__(self, items: Sequence[list[float] | None] = (), failures: dict[int, str] | None = None,
                 budget_exceeded: bool = False) -> None:
        super().__init__(items)
        self.failures = dict(failures or {})
        self.budget_exceeded = budget_exceeded


class EmbeddingArray(np.ndarray):
    """An (n, d) float32 array with ``failures`` (rows of failed inputs are NaN)."""

    failures: dict[int, str]
    budget_exceeded: bool

    def __array_finalize__(self, obj: Any) -> None:
        self.failures = getattr(obj, "failures", {})
        self.budget_exceeded = getattr(obj, "budget_exceeded", False)


@dataclass
class _Piece:
    """One input to send: a whole text, or one window of a long one."""

    owner: int          # index into _Call.unique
    text: str
    tokens: int
    window: int = 0


@dataclass
class _Call:
    """The state of one embed call, shared by the sync and async paths."""

    n: int
    role: Role
    failures: dict[int, str]
    unique: list[str]
    where: list[int]                       # input index -> unique index (-1 when invalid)
    keys: list[str] | None
    vectors: list[np.ndarray | None]
    tokens: list[int]                      # per unique text, once known
    hit_block: np.ndarray | None = None   # the decoded cache hits, one row per hit
    hit_rows: dict[int, int] = field(default_factory=dict)  # unique index -> row of hit_block
    unique_failures: dict[int, str] = field(default_factory=dict)
    budget_exceeded: bool = False
    errors: Errors = "raise"


class _Isolation:
    """Shared state of one batch's 400 isolation."""

    def __init__(self, batch: list[_Piece]) -> None:
        self.succeeded = False
        self.single_failures = 0
        self.abort: ProviderError | None = None
        #: the batch's last input: probed alone before giving up, since bisection
        #: visits the shortest inputs first and a few bad short ones could look like a
        #: request-level error
        self.far: _Piece | None = batch[-1] if len(batch) > 1 else None
        self.presolved: dict[int, np.ndarray] = {}


class EmbeddingPipeline:
    """Embed texts once: dedupe, cache by content hash, batch, rate-limit, retry, account for cost.

    ``model`` is a spec ``provider:name`` (``local:all-MiniLM-L6-v2``, ``fake:384``,
    ``openai:text-embedding-3-small``) or a :class:`~embedpipe.providers.Provider`.
    ``cache`` is a URL (``memory://``, ``sqlite:///path.db``, ``redis://host:6379/0``),
    a backend object, or ``None``; by default ``$EMBEDPIPE_CACHE`` or a SQLite file in
    the user's cache directory. ``cache_queries=False`` leaves queries uncached.
    """

    def __init__(
        self,
        model: str | Provider = "local:all-MiniLM-L6-v2",
        *,
        dimensions: int | None = None,
        cache: str | CacheBackend | None = _DEFAULT,
        namespace: str | None = None,
        batch_size: int | None = None,
        max_concurrency: int | None = None,
        rpm: int | None = None,
        tpm: int | None = None,
        rate_limiter: Any = None,
        max_retries: int = 6,
        timeout: float | None = 60.0,
        max_batch_tokens: int | None = None,
        on_long_input: OnLongInput = "split",
        budget_usd: float | None = None,
        price_per_1m_tokens: float | None = None,
        api_key: str | None = None,
        base_url: str | None = None,
        errors: Errors = "raise",
        cache_queries: bool = True,
        retry_wait: Any = None,
        sleep: Callable[[float], Awaitable[None]] | None = None,
    ) -> None:
        self._init_args = {k: v for k, v in locals().items() if k not in ("self", "__class__")}
        if on_long_input not in ("split", "truncate", "error"):
            raise ConfigurationError(f"on_long_input={on_long_input!r}: use 'split', 'truncate' or 'error'")
        if errors not in ("raise", "collect"):
            raise ConfigurationError(f"errors={errors!r}: use 'raise' or 'collect'")
        for name, value in (("batch_size", batch_size), ("max_concurrency", max_concurrency),
                            ("rpm", rpm), ("tpm", tpm), ("max_batch_tokens", max_batch_tokens),
                            ("dimensions", dimensions)):
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise ConfigurationError(f"{name}={value!r} must be a positive integer")
        if max_retries < 0:
            raise ConfigurationError(f"max_retries={max_retries!r} must be >= 0")

        if isinstance(model, Provider):
            self.provider = model
        else:
            opts: dict[str, Any] = {"dimensions": dimensions, "api_key": api_key, "base_url": base_url,
                                    "timeout": timeout}
            self.provider = provider_from_spec(model, **{k: v for k, v in opts.items() if v is not None})
        self.dimensions = dimensions
        self._native_dims_reduced = False
        self._check_dimensions()

        if cache is _DEFAULT:
            cache = default_cache_url()
            if cache.strip().lower() in ("", "none", "off"):  # EMBEDPIPE_CACHE=none disables it
                cache = None
        self.cache = resolve_cache(cache)
        self.namespace = namespace if namespace is not None else (self.cache.namespace if self.cache else None)
        self.batch_size = batch_size or self.provider.default_batch_size
        self.max_batch_tokens = max_batch_tokens or self.provider.max_batch_tokens
        self.max_concurrency = max_concurrency or self.provider.default_concurrency
        self.max_retries = max_retries
        self.timeout = timeout
        self.on_long_input: OnLongInput = on_long_input
        self.errors: Errors = errors
        self.cache_queries = cache_queries
        self.retry_wait = retry_wait
        self._sleep = sleep

        self.price_per_1m_tokens = (price_per_1m_tokens if price_per_1m_tokens is not None
                                    else self.provider.price_per_1m_tokens)
        if budget_usd is not None:
            if budget_usd < 0:
                raise ConfigurationError(f"budget_usd={budget_usd!r} must be >= 0")
            if self.price_per_1m_tokens is None:
                raise ConfigurationError(
                    f"budget_usd is set but the price of {self.provider.spec!r} is unknown; "
                    "pass price_per_1m_tokens=... so the budget can be enforced")
        self.budget_usd = budget_usd
        self._spent_usd = 0.0
        self._reserved_usd = 0.0

        from embedpipe.limits import MemoryRateLimiter, rate_limiter_from

        # Without rpm/tpm a budget-less limiter still shares 429 cooldowns between requests.
        self.rate_limiter = rate_limiter_from(rate_limiter, rpm=rpm, tpm=tpm) or MemoryRateLimiter()
        self.rpm, self.tpm = rpm, tpm
        self._stats = Stats()
        if self.price_per_1m_tokens is None:
            self._stats.cost_usd = None
            self._stats.saved_usd = None
        self._materials: dict[str, bytes] = {}
        self._semaphore: asyncio.Semaphore | None = None
        self._truncation_warned = False
        self._closed = False
        # Close only what this pipeline built from a spec or URL: objects passed in belong
        # to the caller, who may share them between pipelines.
        owned = [r for r, arg in ((self.provider, model), (self.cache, cache), (self.rate_limiter, rate_limiter))
                 if r is not None and r is not arg]
        self._owned = owned
        self._finalizer = weakref.finalize(self, _release, False, *owned)

    # ------------------------------------------------------------------ configuration
    def _check_dimensions(self) -> None:
        native = self.provider.dimensions
        if self.dimensions is not None and native is not None and self.dimensions > native \
                and not getattr(self.provider, "handles_dimensions", False):
            raise ConfigurationError(
                f"dimensions={self.dimensions} is larger than {self.provider.spec}'s {native}")

    @property
    def expected_dims(self) -> int | None:
        """The length every returned vector has (``None`` until a provider reports it)."""
        return self.dimensions or self.provider.dimensions

    @property
    def stats(self) -> Stats:
        """A snapshot of the counters."""
        return self._stats.snapshot()

    @property
    def spent_usd(self) -> float:
        """USD spent by this pipeline so far (from provider usage)."""
        return self._spent_usd

    def _material(self, role: Role) -> bytes:
        r = role if self.provider.role_sensitive else None
        cached = self._materials.get(str(r))
        if cached is None:
            identity = dict(self.provider.identity())
            if self.namespace is not None:
                # A namespace names the vector space instead of the server URL, so the same
                # model behind several URLs (a proxy, a replica) shares one cache.
                identity.pop("base_url", None)
                identity["namespace"] = self.namespace
            cached = key_material(provider=self.provider.name, model=self.provider.model,
                                  dimensions=self.dimensions, identity=identity, role=r)
            self._materials[str(r)] = cached
        return cached

    # ------------------------------------------------------------------ shared steps (no I/O)
    def _prepare(self, texts: Sequence[str], role: Role, errors: Errors | None = None) -> _Call:
        errors = errors or self.errors
        if errors not in ("raise", "collect"):
            raise ConfigurationError(f"errors={errors!r}: use 'raise' or 'collect'")
        if isinstance(texts, (str, bytes)):
            raise InputTypeError(f"texts must be a list of str, not a single {type(texts).__name__}; "
                                 "wrap it in a list or use embed_query")
        texts = list(texts)
        bad_type = [i for i, t in enumerate(texts) if not isinstance(t, str)]
        empty = [i for i, t in enumerate(texts) if isinstance(t, str) and not t.strip()]
        failures: dict[int, str] = {}
        if bad_type or empty:
            if errors == "raise":
                self._raise_invalid(texts, bad_type, empty)
            for i in bad_type:
                failures[i] = f"input is {type(texts[i]).__name__}, not str"
            for i in empty:
                failures[i] = "input is empty or whitespace only"
        index: dict[str, int] = {}
        where = [-1] * len(texts)
        for i, t in enumerate(texts):
            if i in failures:
                continue
            u = index.get(t)
            if u is None:
                u = index[t] = len(index)
            where[i] = u
        unique = list(index)
        valid = len(texts) - len(failures)
        self._stats.add(deduped=valid - len(unique))
        keys = None
        if self.cache is not None and (role == "document" or self.cache_queries):
            keys = self.cache.keys_for(self._material(role), unique, role)
        return _Call(len(texts), role, failures, unique, where, keys, [None] * len(unique), [0] * len(unique),
                     errors=errors)

    @staticmethod
    def _raise_invalid(texts: list[Any], bad_type: list[int], empty: list[int]) -> None:
        def show(idx: list[int]) -> str:
            return f"{idx[:20]}{' ...' if len(idx) > 20 else ''}"

        if bad_type:
            kinds = sorted({type(texts[i]).__name__ for i in bad_type})
            extra = f"; inputs at {show(empty)} are also empty" if empty else ""
            raise InputTypeError(
                f"{len(bad_type)} input(s) are not str ({', '.join(kinds)}) at indices {show(bad_type)}{extra}; "
                "nothing was embedded", bad_type)
        raise InvalidInputError(
            f"{len(empty)} input(s) are empty or whitespace only at indices {show(empty)}; nothing was embedded",
            empty)

    def _apply_hits(self, call: _Call, values: list[bytes | None]) -> list[int]:
        """Decode cache values into ``call``; return the unique indices still to embed."""
        present = [u for u, v in enumerate(values) if v is not None]
        corrupt: list[int] = []
        if present:
            decoded, bad = codec.decode_many([values[u] for u in present], self.expected_dims)  # type: ignore[misc]
            call.hit_block = decoded.vectors
            for row, (pos, tok) in enumerate(zip(decoded.positions, decoded.tokens, strict=True)):
                u = present[pos]
                call.vectors[u] = decoded.vectors[row]
                call.tokens[u] = tok
                call.hit_rows[u] = row
            corrupt = [present[p] for p in bad]
            if corrupt:
                self._stats.add(corrupt=len(corrupt))
                log.warning("embedpipe: %d cache value(s) failed to decode (corrupt, foreign or wrong dims); "
                            "re-embedding them", len(corrupt))
        hit_tokens = sum(call.tokens[u] for u in range(len(values)) if call.vectors[u] is not None)
        n_hits = len(present) - len(corrupt)
        self._stats.add(hits=n_hits, misses=len(call.unique) - n_hits,
                        saved_usd=cost_of(hit_tokens, self.price_per_1m_tokens))
        return [u for u in range(len(call.unique)) if call.vectors[u] is None]

    def _pieces(self, call: _Call, misses: list[int]) -> list[_Piece]:
        """Count tokens and apply ``on_long_input``; inputs over the limit become windows."""
        if not misses:
            return []
        tok = self.provider.tokenizer
        counts = tok.count([call.unique[u] for u in misses])
        limit = self.provider.max_input_tokens
        if self.max_batch_tokens:
            limit = min(limit or self.max_batch_tokens, self.max_batch_tokens)
        cap = getattr(self.rate_limiter, "max_tokens_per_request", None)
        if cap:
            limit = min(limit or cap, cap)
        pieces: list[_Piece] = []
        too_long: list[int] = []
        for u, n in zip(misses, counts, strict=True):
            call.tokens[u] = n
            text = call.unique[u]
            if limit is None or n <= limit:
                pieces.append(_Piece(u, text, n))
            elif self.on_long_input == "split":
                windows = tok.split(text, limit)
                self._stats.add(split=1)
                pieces.extend(_Piece(u, w, wn, k) for k, (w, wn) in enumerate(windows))
            elif self.on_long_input == "truncate":
                short, sn = tok.truncate(text, limit)
                call.tokens[u] = sn
                self._stats.add(truncated=1)
                pieces.append(_Piece(u, short, sn))
            else:
                too_long.append(u)
        if self.on_long_input == "truncate" and len(pieces) and not self._truncation_warned \
                and self._stats.truncated:
            self._truncation_warned = True
            warnings.warn(f"embedpipe: inputs over {limit} tokens were truncated (counted in stats.truncated)",
                          stacklevel=2)
        if too_long:
            reason = f"input is longer than the model's limit of {limit} tokens (on_long_input='error')"
            if call.errors == "raise":
                idx = sorted(i for i, u in enumerate(call.where) if u in set(too_long))
                raise InvalidInputError(f"{len(idx)} input(s) exceed {limit} tokens at indices {idx[:20]}; "
                                        "nothing was embedded. Use on_long_input='split' or 'truncate'", idx)
            for u in too_long:
                call.unique_failures[u] = reason
        return pieces

    def _plan(self, pieces: list[_Piece]) -> list[list[_Piece]]:
        """Pack pieces into requests by count and tokens, shortest first (similar lengths pad less)."""
        pieces = sorted(pieces, key=lambda p: p.tokens)
        cap = self.max_batch_tokens
        lim = getattr(self.rate_limiter, "max_tokens_per_request", None)
        if lim:
            # Under a TPM budget, requests of a fraction of the bucket keep the pipe full: the
            # limiter admits them as tokens refill instead of in a few big gulps, and the last
            # request of a run, whose latency nothing can hide, stays small. Spend at most a
            # quarter of an RPM budget on it.
            rpm = getattr(self.rate_limiter, "rpm", None)
            parts = _REQUESTS_PER_TOKEN_BUCKET if not rpm else max(1, min(_REQUESTS_PER_TOKEN_BUCKET, rpm // 4))
            cap = min(cap or lim, max(1, lim // parts))
        batches: list[list[_Piece]] = []
        cur: list[_Piece] = []
        cur_tokens = 0
        for p in pieces:
            if cur and (len(cur) >= self.batch_size or (cap is not None and cur_tokens + p.tokens > cap)):
                batches.append(cur)
                cur, cur_tokens = [], 0
            cur.append(p)
            cur_tokens += p.tokens
        if cur:
            batches.append(cur)
        return batches

    def _check_budget(self, tokens: int) -> None:
        if self.budget_usd is None:
            return
        est = cost_of(tokens, self.price_per_1m_tokens) or 0.0
        left = self.budget_usd - self._spent_usd - self._reserved_usd
        if est > left + 1e-12:
            raise BudgetExceededError(
                f"embedding {tokens:,} tokens would cost ${est:.6f}, but only ${max(left, 0):.6f} of the "
                f"${self.budget_usd:.6f} budget is left (spent ${self._spent_usd:.6f}); nothing was sent",
                estimate_usd=est, spent_usd=self._spent_usd, budget_usd=self.budget_usd)

    def _validate(self, vectors: np.ndarray, n: int) -> np.ndarray:
        """Check a response: count, dims, finite values; reduce Matryoshka dims. Raises InvalidResponseError."""
        arr = np.asarray(vectors, dtype=np.float32)
        if arr.ndim != 2 or arr.shape[0] != n:
            raise InvalidResponseError(f"provider returned {arr.shape[0] if arr.ndim else 0} vectors for {n} inputs")
        native = self.provider.dimensions
        if native is None:
            native = self.provider.dimensions = int(arr.shape[1])
            self._check_dimensions()
        if arr.shape[1] != native and not (self.dimensions and arr.shape[1] == self.dimensions):
            # Every row has the wrong length: a configuration problem, not a glitch to retry.
            hint = (" — the server seems to ignore the dimensions parameter"
                    if self.dimensions and self.dimensions == native else "")
            raise DimensionMismatchError(
                f"{self.provider.spec} returned {arr.shape[1]}-d vectors, expected {native}{hint}")
        if not np.isfinite(arr).all():
            rows = np.flatnonzero(~np.isfinite(arr).all(axis=1)).tolist()
            raise InvalidResponseError(f"provider returned non-finite values (NaN/inf) in rows {rows[:10]}")
        if self.dimensions and arr.shape[1] > self.dimensions:
            # Matryoshka reduction: keep the leading dims and renormalise.
            arr = arr[:, :self.dimensions]
            norms = np.linalg.norm(arr, axis=1, keepdims=True)
            arr = (arr / np.where(norms == 0, 1, norms)).astype(np.float32)
        if self.dimensions and arr.shape[1] != self.dimensions:
            raise DimensionMismatchError(
                f"{self.provider.spec} returned {arr.shape[1]}-d vectors but dimensions={self.dimensions} "
                "was asked; the server may ignore the dimensions parameter")
        return np.ascontiguousarray(arr, dtype=np.float32)

    @staticmethod
    def _combine(parts: list[tuple[int, np.ndarray | None]]) -> np.ndarray | None:
        """One text's vector from its pieces: ``None`` if any failed."""
        if any(v is None for _, v in parts):
            return None
        if len(parts) == 1:
            return parts[0][1]
        # Token-weighted mean of the windows, renormalised: a long text is the sum of its parts.
        weights = np.array([w for w, _ in parts], dtype=np.float64)
        stacked = np.stack([v for _, v in parts]).astype(np.float64)  # type: ignore[misc]
        mean = (stacked * weights[:, None]).sum(axis=0) / weights.sum()
        norm = np.linalg.norm(mean)
        out: np.ndarray = (mean / norm if norm else mean).astype(np.float32)
        return out

    def _finish(self, call: _Call) -> tuple[np.ndarray | None, dict[int, str]]:
        failures = dict(call.failures)
        for i, u in enumerate(call.where):
            if u >= 0 and call.vectors[u] is None:
                failures[i] = call.unique_failures.get(u, "not embedded")
        if failures:
            self._stats.add(failed=len(failures))
        # Gather every row with one fancy index over [cached rows; new rows]: a fully
        # cached call copies the decoded block once instead of stacking row by row.
        hits = call.hit_block
        n_hit = 0 if hits is None else hits.shape[0]
        fresh = [u for u, v in enumerate(call.vectors) if v is not None and u not in call.hit_rows]
        blocks: list[np.ndarray] = [] if hits is None else [hits]
        if fresh:
            blocks.append(np.stack([call.vectors[u] for u in fresh]))  # type: ignore[misc]
        dims = blocks[0].shape[1] if blocks else (self.expected_dims or 0)
        row_of = np.full(len(call.unique) + 1, -1, dtype=np.int64)  # the extra slot: invalid inputs
        for u, r in call.hit_rows.items():
            row_of[u] = r
        for k, u in enumerate(fresh):
            row_of[u] = n_hit + k
        idx = row_of[np.asarray(call.where, dtype=np.int64)]  # where == -1 reads the extra slot
        if not blocks:
            return np.full((call.n, dims), np.nan, dtype=np.float32), failures
        pool = blocks[0] if len(blocks) == 1 else np.concatenate(blocks)
        out = pool[np.maximum(idx, 0)]
        if failures:
            out[idx < 0] = np.nan
        return out, failures

    def _raise_or(self, call: _Call, failures: dict[int, str]) -> None:
        if failures and call.errors == "raise":
            if call.budget_exceeded:
                raise BudgetExceededError(
                    f"the budget of ${self.budget_usd} was reached after spending ${self._spent_usd:.6f}; "
                    f"{len(failures)} input(s) were not embedded (all finished work is cached)",
                    spent_usd=self._spent_usd, budget_usd=self.budget_usd)
            raise EmbeddingFailedError(failures)

    # ------------------------------------------------------------------ the async I/O loop
    def _chunks(self, call: _Call, misses: list[int]) -> list[list[int]]:
        """Slices of the misses to count and send in turn, small first so the first request
        leaves at once, then growing. One slice when nothing may be sent before everything
        is counted: a budget, or on_long_input="error" with errors="raise", must refuse first."""
        if self.budget_usd is not None or (self.on_long_input == "error" and call.errors == "raise"):
            return [misses]
        chunks: list[list[int]] = []
        cur: list[int] = []
        size, limit = 0, 50_000  # characters
        for u in misses:
            cur.append(u)
            size += len(call.unique[u])
            if size >= limit:
                chunks.append(cur)
                cur, size, limit = [], 0, min(limit * 2, 2_000_000)
        if cur:
            chunks.append(cur)
        return chunks

    async def _embed_misses(self, call: _Call, misses: list[int]) -> None:
        counts: dict[int, int] = {}                                  # unique -> pieces
        slots: dict[int, list[tuple[int, np.ndarray | None]]] = {}   # unique -> (tokens, vector) per piece
        done: dict[int, int] = {}
        if self._semaphore is None:
            self._semaphore = asyncio.Semaphore(self.max_concurrency)
        sem = self._semaphore

        async def deliver(batch: list[_Piece], vectors: np.ndarray | None, reason: str | None) -> None:
            finished: list[int] = []
            for k, p in enumerate(batch):
                slots[p.owner][p.window] = (p.tokens, None if vectors is None else vectors[k])
                if vectors is None and reason is not None:
                    call.unique_failures.setdefault(p.owner, reason)
                done[p.owner] += 1
                if done[p.owner] == counts[p.owner]:
                    finished.append(p.owner)
            items: list[tuple[str, bytes]] = []
            for u in finished:
                vec = self._combine(slots.pop(u))
                if vec is None:
                    continue
                call.vectors[u] = vec
                call.unique_failures.pop(u, None)
                if call.keys is not None:
                    items.append((call.keys[u], codec.encode(vec, call.tokens[u])))
            self._stats.add(embedded=sum(1 for u in finished if call.vectors[u] is not None))
            if items:
                await self._cache_write(items)

        async def run_batch(batch: list[_Piece]) -> None:
            async with sem:
                await self._isolate(call, batch, _Isolation(batch), deliver)

        # Count and plan slice by slice, sending each slice's batches while the next is
        # counted (in a thread: tiktoken releases the GIL): the server's rate-limit bucket
        # never idles while a big call is tokenised.
        tasks: list[asyncio.Task[None]] = []
        try:
            for chunk in self._chunks(call, misses):
                pieces = await asyncio.to_thread(self._pieces, call, chunk)
                if not pieces:
                    continue
                self._check_budget(sum(p.tokens for p in pieces))
                for p in pieces:
                    counts[p.owner] = counts.get(p.owner, 0) + 1
                for u in {p.owner for p in pieces}:
                    slots[u] = [(0, None)] * counts[u]
                    done[u] = 0
                tasks.extend(asyncio.ensure_future(run_batch(b)) for b in self._plan(pieces))
            await asyncio.gather(*tasks)
        except BaseException:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise

    async def _cache_write(self, items: list[tuple[str, bytes]]) -> None:
        assert self.cache is not None
        with self._cache_guard("write"):
            await self.cache.aset_many(items)

    async def _isolate(self, call: _Call, batch: list[_Piece], iso: _Isolation,
                       deliver: Callable[[list[_Piece], np.ndarray | None, str | None], Awaitable[None]]) -> None:
        """Send ``batch``; on an input-level 400, bisect to find the inputs at fault."""
        if iso.presolved:
            done = [p for p in batch if id(p) in iso.presolved]
            if done:
                await deliver(done, np.stack([iso.presolved.pop(id(p)) for p in done]), None)
                batch = [p for p in batch if id(p) not in {id(d) for d in done}]
                if not batch:
                    return
        if iso.abort is not None:
            await deliver(batch, None, f"{iso.abort}")
            return
        if call.budget_exceeded:
            await deliver(batch, None, "budget exceeded: not sent")
            return
        try:
            vectors = await self._send(call, batch)
        except BudgetExceededError as exc:
            call.budget_exceeded = True
            await deliver(batch, None, f"budget exceeded: {exc}")
            return
        except ProviderError as exc:
            # Only an error that an input can cause (400/413/422, or a wrapped model's
            # exception without a status) is worth isolating by splitting the batch.
            input_caused = exc.status in (None, 400, 413, 422) and not exc.request_level
            if exc.retryable:
                reason = f"failed after {self.max_retries} retries: {exc}"
            elif not input_caused or len(batch) == 1:
                reason = str(exc)
            else:
                reason = ""
            if reason:
                if len(batch) == 1 and not exc.retryable and input_caused:
                    iso.single_failures += 1
                    if not iso.succeeded and iso.single_failures >= _REQUEST_LEVEL_PROBES:
                        await self._probe_far(call, iso, batch[0], exc)
                if not exc.retryable and not input_caused:
                    iso.abort = exc
                await deliver(batch, None, reason)
                return
            mid = len(batch) // 2
            for half in (batch[:mid], batch[mid:]):
                await self._isolate(call, half, iso, deliver)
            return
        iso.succeeded = True
        await deliver(batch, vectors, None)

    async def _probe_far(self, call: _Call, iso: _Isolation, current: _Piece, exc: ProviderError) -> None:
        """Every single input so far failed alike: try the batch's far end before calling the
        request itself bad; one success there means the inputs were at fault after all."""
        far, iso.far = iso.far, None
        if far is None or far is current:
            iso.abort = exc
            return
        try:
            iso.presolved[id(far)] = (await self._send(call, [far]))[0]
            iso.succeeded = True
        except ProviderError:
            iso.abort = exc

    async def _send(self, call: _Call, batch: list[_Piece]) -> np.ndarray:
        """One request with rate limiting, retries and response validation."""
        texts = [p.text for p in batch]
        est = sum(p.tokens for p in batch)
        est_cost = cost_of(est, self.price_per_1m_tokens) or 0.0
        self._check_budget(est)
        self._reserved_usd += est_cost
        limiter = self.rate_limiter

        def before_sleep(state: Any) -> None:
            self._stats.add(retries=1)

        try:
            async for attempt in make_retrying(self.max_retries, wait=self.retry_wait, sleep=self._sleep,
                                               before_sleep=before_sleep):
                with attempt:
                    await limiter.acquire(est)
                    self._stats.add(requests=1)
                    try:
                        result = await self.provider.aembed_batch(texts, call.role)
                    except ProviderError as exc:
                        # A failed request bills nothing: give its tokens back.
                        await limiter.reconcile(est, 0)
                        if exc.headers:
                            limiter.update_from_headers(exc.headers)
                        if isinstance(exc, RateLimitedError):
                            self._stats.add(rate_limited=1)
                            if exc.retry_after:
                                limiter.cooldown(exc.retry_after)
                        raise
                    billed = result.tokens if result.tokens is not None else est
                    await limiter.reconcile(est, billed)
                    if result.headers:
                        limiter.update_from_headers(result.headers)
                    # Billed whether or not the answer is usable.
                    cost = cost_of(billed, self.price_per_1m_tokens)
                    self._spent_usd += cost or 0.0
                    self._stats.add(tokens=billed, cost_usd=cost)
                    vectors = self._validate(result.vectors, len(texts))
        finally:
            self._reserved_usd -= est_cost
        return vectors

    # ------------------------------------------------------------------ public API
    def embed(self, texts: Sequence[str], *, errors: Errors | None = None) -> EmbeddingResult:
        """Embed documents; the vectors come back as lists, in the order of ``texts``.

        ``errors`` overrides the pipeline's ``errors`` option for this call.
        """
        out, failures, budget = self._embed_sync(texts, "document", errors)
        return self._as_lists(out, failures, budget)

    async def aembed(self, texts: Sequence[str], *, errors: Errors | None = None) -> EmbeddingResult:
        """Async twin of :meth:`embed`."""
        out, failures, budget = await _runner.run_async(self._embed_async(texts, "document", errors))
        return self._as_lists(out, failures, budget)

    def embed_array(self, texts: Sequence[str], *, role: Role = "document") -> EmbeddingArray:
        """Embed into an (n, d) float32 array, without building Python lists."""
        out, failures, budget = self._embed_sync(texts, role)
        return self._as_array(out, failures, budget)

    async def aembed_array(self, texts: Sequence[str], *, role: Role = "document") -> EmbeddingArray:
        """Async twin of :meth:`embed_array`."""
        out, failures, budget = await _runner.run_async(self._embed_async(texts, role))
        return self._as_array(out, failures, budget)

    def embed_query(self, text: str) -> list[float]:
        """Embed one query (the role enters the cache key where the provider tells them apart)."""
        out, failures, budget = self._embed_sync(self._one(text), "query")
        return self._as_lists(out, failures, budget)[0]  # type: ignore[no-any-return]

    async def aembed_query(self, text: str) -> list[float]:
        """Async twin of :meth:`embed_query`."""
        out, failures, budget = await _runner.run_async(self._embed_async(self._one(text), "query"))
        return self._as_lists(out, failures, budget)[0]  # type: ignore[no-any-return]

    def estimate(self, texts: Sequence[str]) -> Estimate:
        """Tokens, cost, cached share, requests and ETA for ``texts``, with no provider call."""
        self._check_open()
        saved = self.errors
        self.errors = "collect"
        try:
            stats_before = self._stats.snapshot()
            call = self._prepare(texts, "document")
            values = self.cache.get_many(call.keys) if self.cache is not None and call.keys else None
            misses = self._lookup_only(call, values)
            pieces = self._pieces(call, misses)
            batches = self._plan(pieces)
        finally:
            self.errors = saved
            # An estimate is not a call: leave the counters as they were.
            self._stats = stats_before
            if self.price_per_1m_tokens is None:
                self._stats.cost_usd = self._stats.saved_usd = None
        tokens = sum(p.tokens for p in pieces)
        eta = None
        if self.rpm or self.tpm:
            eta = max(len(batches) / self.rpm * 60 if self.rpm else 0.0,
                      tokens / self.tpm * 60 if self.tpm else 0.0)
        return Estimate(texts=call.n, unique=len(call.unique), cached=len(call.unique) - len(misses),
                        tokens=tokens, cost_usd=cost_of(tokens, self.price_per_1m_tokens),
                        requests=len(batches), eta_seconds=eta, invalid=len(call.failures))

    def _lookup_only(self, call: _Call, values: list[bytes | None] | None) -> list[int]:
        if values is None:
            return list(range(len(call.unique)))
        present = [u for u, v in enumerate(values) if v is not None]
        decoded, _ = codec.decode_many([values[u] for u in present], self.expected_dims)  # type: ignore[misc]
        hit = {present[p] for p in decoded.positions}
        return [u for u in range(len(call.unique)) if u not in hit]

    # ------------------------------------------------------------------ drivers
    @staticmethod
    def _one(text: str) -> list[str]:
        if not isinstance(text, str):
            raise InputTypeError(f"query must be a str, not {type(text).__name__}", [0])
        return [text]

    def _embed_sync(self, texts: Sequence[str], role: Role,
                    errors: Errors | None = None) -> tuple[np.ndarray | None, dict[int, str], bool]:
        self._check_open()
        call = self._prepare(texts, role, errors)
        values: list[bytes | None] = [None] * len(call.unique)
        if self.cache is not None and call.keys:
            with self._cache_guard("read"):
                values = self.cache.get_many(call.keys)
        misses = self._apply_hits(call, values)
        if misses:
            _runner.run_sync(self._embed_misses(call, misses))
        out, failures = self._finish(call)
        self._raise_or(call, failures)
        return out, failures, call.budget_exceeded

    async def _embed_async(self, texts: Sequence[str], role: Role,
                           errors: Errors | None = None) -> tuple[np.ndarray | None, dict[int, str], bool]:
        self._check_open()
        call = self._prepare(texts, role, errors)
        values: list[bytes | None] = [None] * len(call.unique)
        if self.cache is not None and call.keys:
            with self._cache_guard("read"):
                values = await self.cache.aget_many(call.keys)
        misses = self._apply_hits(call, values)
        if misses:
            await self._embed_misses(call, misses)
        out, failures = self._finish(call)
        self._raise_or(call, failures)
        return out, failures, call.budget_exceeded

    @contextlib.contextmanager
    def _cache_guard(self, what: str) -> Iterator[None]:
        """A cache that fails (other than fail-closed Redis) costs the cache, never the vectors."""
        try:
            yield
        except CacheUnavailableError:
            raise
        except Exception as exc:
            self._stats.add(cache_errors=1)
            log.warning("embedpipe: cache %s failed (%s); continuing uncached", what, exc)

    def _as_lists(self, out: np.ndarray | None, failures: dict[int, str], budget: bool) -> EmbeddingResult:
        assert out is not None
        rows: list[list[float] | None] = out.tolist()
        for i in failures:
            rows[i] = None
        return EmbeddingResult(rows, failures, budget)

    @staticmethod
    def _as_array(out: np.ndarray | None, failures: dict[int, str], budget: bool) -> EmbeddingArray:
        assert out is not None
        arr = out.view(EmbeddingArray)
        arr.failures = failures
        arr.budget_exceeded = budget
        return arr

    # ------------------------------------------------------------------ lifecycle
    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("this EmbeddingPipeline is closed")

    def close(self) -> None:
        """Release the provider, cache connections and limiter. Idempotent."""
        if not self._closed:
            self._closed = True
            self._finalizer.detach()
            _release(True, *self._owned)

    async def aclose(self) -> None:
        """Async twin of :meth:`close`."""
        self.close()

    def __enter__(self) -> EmbeddingPipeline:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    async def __aenter__(self) -> EmbeddingPipeline:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def __getstate__(self) -> dict[str, Any]:
        # Rebuilt from its arguments on unpickling: connections, loops and locks re-open
        # in the new process (LlamaIndex's num_workers pickles transforms).
        args = dict(self._init_args)
        args["model"] = self.provider
        args["cache"] = self.cache
        if args.get("rate_limiter") is not None and not isinstance(args["rate_limiter"], str):
            raise TypeError("a pipeline with a rate_limiter object cannot be pickled; pass a URL instead")
        return args

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(**state)  # type: ignore[misc]

    def __repr__(self) -> str:
        cache = type(self.cache).__name__ if self.cache else None
        return f"EmbeddingPipeline(model={self.provider.spec!r}, dimensions={self.dimensions}, cache={cache})"


def _release(wait: bool, *resources: Any) -> None:
    """Close ``resources``. Async clients (the Redis limiter's) live on the runner loop and
    close there: an explicit close waits for that; the garbage-collection finalizer, which
    may run in any thread, only schedules it and never blocks."""
    for resource in resources:
        with contextlib.suppress(Exception):  # closing must never raise
            aclose = getattr(resource, "aclose", None)
            loop = _runner.current_loop()
            if aclose is not None and loop is not None and not _runner.in_runner():
                future = asyncio.run_coroutine_threadsafe(aclose(), loop)
                if wait:
                    future.result(timeout=10)
            else:
                resource.close()
