"""Requests-per-minute and tokens-per-minute limits, kept in one process or shared through Redis.

Each budget is a continuous-refill token bucket (the GCRA): it holds at most one window's
limit and refills at ``limit / window`` per second, so a full bucket allows a burst of one
window and then the steady rate. :meth:`RateLimiter.acquire` waits until both buckets hold
enough, then takes from both at once.

Pick a backend by URL with :func:`rate_limiter_from`: ``memory://`` (this process, the
default) or ``redis://host:port/db?key=NAME`` (every process and host using that Redis and
key shares one budget, as they share one API key).

Why not the ``limits`` library (5.8), whose storage-by-URL design this module copies:

- Its fixed-window and sliding-window-counter strategies take a ``cost`` and are O(1), but
  ``hit`` only answers yes or no. It never says how long to wait, and the fixed window lets
  two windows' worth through around each boundary.
- A charge cannot be refunded. ``reconcile`` needs that: the tokens the server bills are
  known only after the response. (Only its storages have ``decr``, beneath the strategy API.)
- Requests and tokens would be two separate hits, so a request could be charged while its
  tokens are refused. Here one lock, or one Lua script, checks and charges both.
- Its moving window stores one list entry per unit of cost (``acquire_moving_window.lua``
  LPUSHes ``amount`` timestamps), which is useless for a million tokens a minute.
- Its Redis storage stamps entries with the client's ``time.time()``, so hosts with
  skewed clocks disagree. The script here reads the Redis server's ``TIME``.
- It knows nothing of ``x-ratelimit-*`` response headers.

Nothing from it is reused.
"""

from __future__ import annotations

import asyncio
import math
import re
import threading
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # redis-py is an optional extra: imported only where the Redis limiter runs
    import redis.asyncio
    from redis.commands.core import AsyncScript

from embedpipe import registry
from embedpipe._urls import URL, parse_url, redact_url
from embedpipe.errors import ConfigurationError, EmbedPipeError

__all__ = [
    "MemoryRateLimiter",
    "RateLimiter",
    "RateLimiterUnavailableError",
    "RedisRateLimiter",
    "parse_go_duration",
    "rate_limiter_from",
]

Clock = Callable[[], float]
Sleep = Callable[[float], Awaitable[None]]

# Float drift in the refill arithmetic must not turn "exactly enough" into a wait.
_SLACK = 1e-9


class RateLimiterUnavailableError(EmbedPipeError):
    """The shared rate-limit store (Redis) could not be reached or failed."""


# -- Go durations ------------------------------------------------------------------

_GO_UNITS = {
    "ns": 1e-9,
    "us": 1e-6,
    "\u00b5s": 1e-6,  # MICRO SIGN, as Go writes it
    "\u03bcs": 1e-6,  # GREEK SMALL LETTER MU, which Go accepts too
    "ms": 1e-3,
    "s": 1.0,
    "m": 60.0,
    "h": 3600.0,
}
_GO_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|\u00b5s|\u03bcs|ms|s|m|h)")


def parse_go_duration(s: str) -> float:
    """Seconds in a Go duration string such as ``"6m0s"``, ``"1s"``, ``"12ms"`` or ``"1h2m3.5s"``.

    OpenAI's ``x-ratelimit-reset-*`` headers use this format. Accepts what Go's
    ``time.ParseDuration`` accepts: an optional sign, then number-unit pairs with units
    ns, us (or µs), ms, s, m, h; a bare ``"0"`` is zero. Raises :class:`ValueError` otherwise.
    """
    text = s.strip()
    sign = 1.0
    if text[:1] in ("+", "-"):
        sign = -1.0 if text[0] == "-" else 1.0
        text = text[1:]
    if text == "0":
        return 0.0
    total, pos = 0.0, 0
    while pos < len(text):
        match = _GO_PART.match(text, pos)
        if match is None:
            break
        total += float(match.group(1)) * _GO_UNITS[match.group(2)]
        pos = match.end()
    if not text or pos != len(text):
        raise ValueError(f"invalid Go duration {s!r}")
    return sign * total


# -- the base class ------------------------------------------------------------------


class RateLimiter:
    """Waits before each request until its requests and tokens budgets allow it.

    ``rpm`` and ``tpm`` are limits per ``window`` seconds (a minute unless tests shrink
    it); ``None`` leaves that budget unlimited. Every method is safe to call from several
    threads and event loops at once.

    Subclasses override :meth:`_attempt`, :meth:`reconcile` and :meth:`_lower_levels`, and
    may extend :meth:`cooldown`, :meth:`aclose` and :meth:`close`. The waiting loop,
    argument checks and header parsing live here.
    """

    def __init__(self, *, rpm: int | None = None, tpm: int | None = None, window: float = 60.0,
                 clock: Clock = time.monotonic, sleep: Sleep = asyncio.sleep) -> None:
        for name, limit in (("rpm", rpm), ("tpm", tpm)):
            if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
                raise ConfigurationError(f"{name} must be a positive integer or None, got {limit!r}")
        if not window > 0:
            raise ConfigurationError(f"window must be positive, got {window!r}")
        self.rpm = rpm
        self.tpm = tpm
        self.window = float(window)
        #: when the store behind the limiter fails: "warn" (fail open: the pipeline falls back to a
        #: local limiter at the same rpm/tpm) or "raise" (fail closed); a URL's ``?on_error=`` sets it
        self.on_error = "warn"
        self._clock = clock
        self._sleep = sleep
        # Guards the state of this object; never held across an await.
        self._lock = threading.Lock()
        self._cooldown_until = -math.inf

    def __repr__(self) -> str:
        return f"{type(self).__name__}(rpm={self.rpm}, tpm={self.tpm}, window={self.window:g})"

    def clock(self) -> float:
        """Now, on the clock this limiter measures its windows with."""
        return self._clock()

    @property
    def max_tokens_per_request(self) -> int | None:
        """The largest token charge :meth:`acquire` can ever grant: the TPM capacity, or ``None``."""
        return self.tpm

    def level(self, bucket: str) -> float | None:
        """The share (0 to 1) of the ``"tokens"`` or ``"requests"`` bucket left now, or ``None`` when
        this limiter cannot tell without a round trip (a shared store) or has no such limit.

        The engine spends what a bucket holds a little faster than the limit's rate (see
        :mod:`embedpipe.engine.flow`). Override where the level is at hand.
        """
        return None

    async def acquire(self, tokens: int, requests: int = 1) -> float:
        """Wait until both the requests and the tokens budgets allow, then charge them.

        Returns the seconds spent waiting (0.0 when admitted at once). Waiters re-check
        after each sleep, so arrivals are served roughly, not strictly, in order. Raises
        :class:`~embedpipe.errors.ConfigurationError` for a charge larger than a budget's
        capacity, which could never be granted.
        """
        self._check_charge(tokens, requests)
        waited = 0.0
        while True:
            wait = await self._attempt(tokens, requests)
            if wait <= 0:
                return waited
            await self._sleep(wait)
            waited += wait

    async def _attempt(self, tokens: int, requests: int) -> float:
        """Charge both budgets and return 0.0, or charge nothing and return the seconds to wait.

        Override this. It must honour the cooldown and be atomic against other callers.
        """
        raise NotImplementedError

    async def reconcile(self, charged_tokens: int, actual_tokens: int) -> None:
        """Settle a charge once the response says what was used: refund or charge the difference.

        Override this.
        """
        raise NotImplementedError

    def update_from_headers(self, headers: Mapping[str, str]) -> None:
        """Lower the budgets to what the server says remains.

        Reads ``x-ratelimit-remaining-requests`` and ``x-ratelimit-remaining-tokens``; a
        level is only ever lowered to the server's figure, never raised above our own
        accounting. The ``x-ratelimit-reset-*`` durations do not move the level: for a
        server enforcing the limit we were configured with, "remaining X, full in T" says
        the same as X, and a longer T means its limit is lower than configured, which the
        429-then-:meth:`cooldown` path handles. Trusting T on its own can stall for
        minutes: OpenAI's own documented example pairs 149984 of 150000 tokens remaining
        with a reset of "6m0s". Unparseable values are ignored.
        """
        lowered = {k.lower(): v for k, v in headers.items()}
        requests = header_number(lowered.get("x-ratelimit-remaining-requests"))
        tokens = header_number(lowered.get("x-ratelimit-remaining-tokens"))
        if self.rpm is None or (requests is not None and requests >= self.rpm):
            requests = None
        if self.tpm is None or (tokens is not None and tokens >= self.tpm):
            tokens = None
        if requests is not None or tokens is not None:
            self._lower_levels(requests, tokens)

    def _lower_levels(self, requests: float | None, tokens: float | None) -> None:
        """Lower each bucket's level to at most the given figure (``None``: leave it). Override this."""
        raise NotImplementedError

    def cooldown(self, seconds: float) -> None:
        """After a 429: every :meth:`acquire`, waiters already asleep included, waits ``seconds`` from now.

        A later, shorter cooldown never shortens an earlier one.
        """
        with self._lock:
            self._cooldown_until = max(self._cooldown_until, self._clock() + seconds)

    async def aclose(self) -> None:
        """Release connections. Idempotent; the limiter reconnects if used again."""
        self.close()

    def close(self) -> None:
        """Blocking twin of :meth:`aclose`."""

    def _check_charge(self, tokens: int, requests: int) -> None:
        if tokens < 0 or requests < 0:
            raise ValueError(f"cannot charge negative amounts (tokens={tokens}, requests={requests})")
        if self.tpm is not None and tokens > self.tpm:
            raise ConfigurationError(
                f"a request of {tokens} tokens can never fit a budget of {self.tpm} tokens per "
                f"{self.window:g}s; plan batches of at most max_tokens_per_request tokens"
            )
        if self.rpm is not None and requests > self.rpm:
            raise ConfigurationError(
                f"{requests} requests at once can never fit a budget of {self.rpm} per {self.window:g}s"
            )


def header_number(value: str | None) -> float | None:
    if value is None:
        return None
    try:
        number = float(value)
    except ValueError:
        return None
    return number if math.isfinite(number) and number >= 0 else None


# -- in process ----------------------------------------------------------------------


class _Bucket:
    """A continuous-refill token bucket: at most ``capacity``, refilled at ``rate`` per second."""

    __slots__ = ("capacity", "level", "rate", "stamp")

    def __init__(self, capacity: int, window: float, now: float) -> None:
        self.capacity = float(capacity)
        self.rate = capacity / window
        self.level = self.capacity
        self.stamp = now

    def refill(self, now: float) -> None:
        if now > self.stamp:
            self.level = min(self.capacity, self.level + (now - self.stamp) * self.rate)
            self.stamp = now

    def wait_for(self, cost: float) -> float:
        deficit = cost - self.level
        return 0.0 if deficit <= _SLACK * self.capacity else deficit / self.rate


class MemoryRateLimiter(RateLimiter):
    """A rate limiter for this process: one object shared by every pipeline, thread and loop that uses it."""

    def __init__(self, *, rpm: int | None = None, tpm: int | None = None, window: float = 60.0,
                 clock: Clock = time.monotonic, sleep: Sleep = asyncio.sleep) -> None:
        super().__init__(rpm=rpm, tpm=tpm, window=window, clock=clock, sleep=sleep)
        now = clock()
        self._requests = _Bucket(rpm, self.window, now) if rpm is not None else None
        self._tokens = _Bucket(tpm, self.window, now) if tpm is not None else None

    def level(self, bucket: str) -> float | None:
        found = {"tokens": self._tokens, "requests": self._requests}.get(bucket)
        if found is None:
            return None
        with self._lock:
            found.refill(self._clock())
            return max(0.0, found.level / found.capacity)

    async def _attempt(self, tokens: int, requests: int) -> float:
        with self._lock:
            now = self._clock()
            wait = self._cooldown_until - now
            for bucket, cost in ((self._requests, requests), (self._tokens, tokens)):
                if bucket is not None:
                    bucket.refill(now)
                    wait = max(wait, bucket.wait_for(cost))
            if wait > 0:
                return wait
            if self._requests is not None:
                self._requests.level -= requests
            if self._tokens is not None:
                self._tokens.level -= tokens
            return 0.0

    async def reconcile(self, charged_tokens: int, actual_tokens: int) -> None:
        """Refund ``charged_tokens - actual_tokens`` to the tokens budget (or charge it, if negative)."""
        if self._tokens is None or charged_tokens == actual_tokens:
            return
        with self._lock:
            self._tokens.refill(self._clock())
            # Overuse may take the level below zero: later acquires then wait it off.
            level = self._tokens.level + charged_tokens - actual_tokens
            self._tokens.level = min(self._tokens.capacity, level)

    def _lower_levels(self, requests: float | None, tokens: float | None) -> None:
        with self._lock:
            now = self._clock()
            for bucket, ceiling in ((self._requests, requests), (self._tokens, tokens)):
                if bucket is not None and ceiling is not None:
                    bucket.refill(now)
                    bucket.level = min(bucket.level, ceiling)

    @classmethod
    def from_url(cls, url: URL | str, *, rpm: int | None, tpm: int | None, window: float = 60.0,
                 clock: Clock = time.monotonic, sleep: Sleep = asyncio.sleep) -> MemoryRateLimiter:
        """The limiter for ``memory://`` (the URL carries only the budgets, read by :func:`rate_limiter_from`)."""
        url = parse_url(url, "rate limiter") if isinstance(url, str) else url
        url.check_options(_BUDGET_OPTIONS, "rate limiter")
        return cls(rpm=rpm, tpm=tpm, window=window, clock=clock, sleep=sleep)


# -- Redis ---------------------------------------------------------------------------

# Both scripts keep each bucket as a hash {level, ts}, ts in the Redis server's
# milliseconds, and let a missing key mean "full", so keys expire once they would be full.
# Numbers are written with %.17g: Lua's default tostring keeps 14 digits, too few for
# millisecond timestamps with fractions.
_LUA_BUCKETS = """
local now
do
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
end
local window = tonumber(ARGV[1])

local function fmt(x) return string.format('%.17g', x) end

local function level_of(key, cap)
  local v = redis.call('HMGET', key, 'level', 'ts')
  local level, ts = tonumber(v[1]), tonumber(v[2])
  if level == nil or ts == nil then return cap end
  if now > ts then level = math.min(cap, level + (now - ts) * cap / window) end
  return level
end

local function store(key, cap, level)
  redis.call('HSET', key, 'level', fmt(level), 'ts', fmt(now))
  redis.call('PEXPIRE', key, math.ceil((cap - level) * window / cap) + 1000)
end
"""

# KEYS: requests bucket, tokens bucket, cooldown key.
# ARGV: window_ms, then for requests and for tokens: capacity (-1: unlimited), cost,
# ceiling (-1: none); then cooldown_ms to start now (0: none).
# Returns "0" after charging both buckets, or the milliseconds to wait, charging nothing.
_ACQUIRE_LUA = (
    # Redis < 5 replicates scripts verbatim, and a verbatim TIME would replay differently.
    "if redis.replicate_commands then redis.replicate_commands() end\n"
    + _LUA_BUCKETS
    + """
local cooldown_ms = tonumber(ARGV[8])
if cooldown_ms > 0 then
  local until_ms = now + cooldown_ms
  if until_ms > (tonumber(redis.call('GET', KEYS[3])) or 0) then
    redis.call('SET', KEYS[3], fmt(until_ms), 'PX', math.ceil(cooldown_ms))
  end
end
local wait = (tonumber(redis.call('GET', KEYS[3])) or 0) - now

local levels = {}
for i = 1, 2 do
  local cap, cost, ceiling = tonumber(ARGV[3 * i - 1]), tonumber(ARGV[3 * i]), tonumber(ARGV[3 * i + 1])
  if cap > 0 then
    local level = level_of(KEYS[i], cap)
    if ceiling >= 0 and ceiling < level then
      level = ceiling
      store(KEYS[i], cap, level)
    end
    levels[i] = level
    if cost - level > 1e-9 * cap then
      wait = math.max(wait, (cost - level) * window / cap)
    end
  end
end
if wait > 0 then return fmt(wait) end
for i = 1, 2 do
  if levels[i] ~= nil then store(KEYS[i], tonumber(ARGV[3 * i - 1]), levels[i] - tonumber(ARGV[3 * i])) end
end
return '0'
"""
)

# KEYS: one bucket. ARGV: window_ms, capacity, amount to give back (negative: to take).
_ADJUST_LUA = (
    "if redis.replicate_commands then redis.replicate_commands() end\n"
    + _LUA_BUCKETS
    + """
local cap = tonumber(ARGV[2])
store(KEYS[1], cap, math.min(cap, level_of(KEYS[1], cap) + tonumber(ARGV[3])))
return '0'
"""
)


@dataclass
class _Connection:
    client: redis.asyncio.Redis
    acquire: AsyncScript
    adjust: AsyncScript


@dataclass
class _Reading:
    """A level the server reported (``value`` at local time ``stamp``), not yet sent to Redis."""

    value: float
    stamp: float

    def aged(self, now: float, rate: float) -> float:
        # The server's bucket has refilled since it reported.
        return self.value + max(0.0, now - self.stamp) * rate


class RedisRateLimiter(RateLimiter):
    """A rate limiter shared by every process and host using the same Redis and ``key``.

    Each acquire attempt is one atomic Lua script call, O(1) whatever the charge: it
    reads the server's clock, refills both buckets, and either charges both or returns
    the wait. Keys are ``embedpipe:ratelimit:{KEY}:requests``, ``:tokens`` and
    ``:cooldown``; the braces are a Redis Cluster hash tag, keeping the three in one slot.

    :meth:`cooldown` and :meth:`update_from_headers` are synchronous, so they take effect
    in this process at once and reach Redis with this process's next acquire attempt
    (which a retry after a 429 makes promptly). Redis failures raise
    :class:`RateLimiterUnavailableError`.

    Clients are created per event loop, because a redis.asyncio client belongs to the
    loop it first ran on. Pass ``client`` to use your own (then you close it).
    """

    def __init__(self, url: str = "redis://127.0.0.1:6379/0", *, key: str = "default",
                 rpm: int | None = None, tpm: int | None = None, window: float = 60.0,
                 clock: Clock = time.monotonic, sleep: Sleep = asyncio.sleep,
                 client: redis.asyncio.Redis | None = None) -> None:
        super().__init__(rpm=rpm, tpm=tpm, window=window, clock=clock, sleep=sleep)
        if not key:
            raise ConfigurationError("the Redis rate limiter needs a non-empty key")
        self.url = url
        self.key = key
        prefix = f"embedpipe:ratelimit:{{{key}}}:"
        self._keys = [prefix + "requests", prefix + "tokens", prefix + "cooldown"]
        self._own_client = client is None
        self._given = client
        self._connections: dict[asyncio.AbstractEventLoop, _Connection] = {}
        self._pending_requests: _Reading | None = None
        self._pending_tokens: _Reading | None = None
        self._cooldown_unsent = False

    def __repr__(self) -> str:
        return (f"RedisRateLimiter({redact_url(self.url)!r}, key={self.key!r}, rpm={self.rpm}, "
                f"tpm={self.tpm}, window={self.window:g})")

    @classmethod
    def from_url(cls, url: URL | str, *, rpm: int | None, tpm: int | None, window: float = 60.0,
                 clock: Clock = time.monotonic, sleep: Sleep = asyncio.sleep) -> RedisRateLimiter:
        """The limiter for ``redis://host:port/db?key=NAME`` (also ``rediss://``, ``unix://``).

        ``key`` names the shared budget (default "default"); redis-py's own URL options
        (``socket_timeout``, ``max_connections``...) go to its client.
        """
        try:
            from redis.connection import URL_QUERY_ARGUMENT_PARSERS
        except ImportError as exc:
            raise ConfigurationError("the Redis rate limiter needs redis-py: pip install 'embedpipe[redis]'") from exc
        url = parse_url(url, "rate limiter") if isinstance(url, str) else url
        url.check_options({"key", "on_error", *_BUDGET_OPTIONS, *URL_QUERY_ARGUMENT_PARSERS}, "rate limiter")
        limiter = cls(url.without_options("key", "on_error", *_BUDGET_OPTIONS), key=url.options.get("key", "default"),
                      rpm=rpm, tpm=tpm, window=window, clock=clock, sleep=sleep)
        if "on_error" in url.options:
            from embedpipe.cache.base import parse_on_error

            limiter.on_error = parse_on_error(url.options["on_error"])
        return limiter

    def _connection(self) -> _Connection:
        loop = asyncio.get_running_loop()
        with self._lock:
            connection = self._connections.get(loop)
            if connection is None:
                # A closed loop took its connections with it; forget its client.
                for old in [old for old in self._connections if old.is_closed()]:
                    del self._connections[old]
                import redis.asyncio

                client = self._given or redis.asyncio.Redis.from_url(self.url)
                connection = _Connection(client, client.register_script(_ACQUIRE_LUA),
                                         client.register_script(_ADJUST_LUA))
                self._connections[loop] = connection
            return connection

    async def _call(self, script: AsyncScript, client: redis.asyncio.Redis, keys: list[str],
                    args: list[float]) -> float:
        """Run a script; the one place redis errors become embedpipe errors."""
        try:
            reply = await script(keys=keys, args=args, client=client)
        except _redis_error() as exc:
            raise RateLimiterUnavailableError(
                f"rate limiter store {redact_url(self.url)} failed: {exc}"
            ) from exc
        return float(reply.decode() if isinstance(reply, bytes) else reply)

    async def _attempt(self, tokens: int, requests: int) -> float:
        connection = self._connection()
        with self._lock:
            now = self._clock()
            local_wait = self._cooldown_until - now
            send_cooldown = self._cooldown_unsent and local_wait > 0
            if local_wait > 0 and not send_cooldown:
                return local_wait
            pending = (self._pending_requests, self._pending_tokens)
            self._cooldown_unsent = False
        ceilings = [
            -1.0 if reading is None or limit is None else reading.aged(now, limit / self.window)
            for reading, limit in zip(pending, (self.rpm, self.tpm), strict=True)
        ]
        args = [
            self.window * 1000,
            self.rpm or -1, requests, ceilings[0],
            self.tpm or -1, tokens, ceilings[1],
            local_wait * 1000 if send_cooldown else 0,
        ]
        try:
            wait_ms = await self._call(connection.acquire, connection.client, self._keys, args)
        except BaseException:
            if send_cooldown:
                with self._lock:
                    self._cooldown_unsent = True
            raise
        with self._lock:
            # Forget the readings just sent, unless newer ones replaced them meanwhile.
            if self._pending_requests is pending[0]:
                self._pending_requests = None
            if self._pending_tokens is pending[1]:
                self._pending_tokens = None
        return wait_ms / 1000

    async def reconcile(self, charged_tokens: int, actual_tokens: int) -> None:
        """Refund ``charged_tokens - actual_tokens`` to the shared tokens budget (charge it if negative)."""
        if self.tpm is None or charged_tokens == actual_tokens:
            return
        connection = self._connection()
        await self._call(connection.adjust, connection.client, [self._keys[1]],
                         [self.window * 1000, self.tpm, charged_tokens - actual_tokens])

    def _lower_levels(self, requests: float | None, tokens: float | None) -> None:
        with self._lock:
            now = self._clock()
            if requests is not None and self.rpm is not None:
                self._pending_requests = _lower(self._pending_requests, requests, now, self.rpm / self.window)
            if tokens is not None and self.tpm is not None:
                self._pending_tokens = _lower(self._pending_tokens, tokens, now, self.tpm / self.window)

    def cooldown(self, seconds: float) -> None:
        """After a 429: every acquire here, and everywhere from this process's next attempt on, waits ``seconds``."""
        super().cooldown(seconds)
        with self._lock:
            self._cooldown_unsent = True

    async def aclose(self) -> None:
        """Close the client this limiter opened on the running loop.

        Clients on other loops belong to pipelines that may still be using them; each
        closes its own, or :meth:`close` closes them all. Call this before a loop ends.
        """
        with self._lock:
            connection = self._connections.pop(asyncio.get_running_loop(), None)
        if connection is not None and self._own_client:
            await connection.client.aclose()

    def close(self) -> None:
        """Close every client this limiter opened, each on its own loop."""
        with self._lock:
            taken = list(self._connections.items())
            self._connections.clear()
        if self._own_client:
            for loop, connection in taken:
                _close_on(loop, connection.client)


def _lower(reading: _Reading | None, value: float, now: float, rate: float) -> _Reading:
    if reading is not None and reading.aged(now, rate) <= value:
        return _Reading(reading.aged(now, rate), now)
    return _Reading(value, now)


def _redis_error() -> type[Exception]:
    import redis.exceptions

    return redis.exceptions.RedisError


def _close_on(loop: asyncio.AbstractEventLoop, client: redis.asyncio.Redis) -> None:
    """Close ``client`` on the loop that owns it, without blocking on a loop running elsewhere."""
    if loop.is_closed():
        return
    if loop.is_running():
        asyncio.run_coroutine_threadsafe(client.aclose(), loop)
    else:
        loop.run_until_complete(client.aclose())


# -- by URL --------------------------------------------------------------------------

#: options every limiter URL may carry, read by :func:`rate_limiter_from`
_BUDGET_OPTIONS = ("rpm", "tpm", "window")


def rate_limiter_from(spec: RateLimiter | str | None, *, rpm: int | None = None,
                      tpm: int | None = None, window: float = 60.0,
                      clock: Clock = time.monotonic,
                      sleep: Sleep = asyncio.sleep) -> RateLimiter | None:
    """The rate limiter a pipeline option describes.

    ``spec`` is ``None`` (an in-process limiter if ``rpm`` or ``tpm`` is given, else no
    limiter), a :class:`RateLimiter` (returned as is), or a URL: ``memory://``,
    ``redis://host:port/db?key=NAME``, ``rediss://...`` or ``unix://...`` (the schemes of
    :data:`embedpipe.registry.rate_limiters`). A URL may carry ``rpm``, ``tpm`` and ``window``
    query options, used where the arguments are ``None``.
    """
    if spec is None:
        if rpm is None and tpm is None:
            return None
        return MemoryRateLimiter(rpm=rpm, tpm=tpm, window=window, clock=clock, sleep=sleep)
    if isinstance(spec, RateLimiter):
        return spec
    if not isinstance(spec, str):
        raise ConfigurationError(
            f"a rate limiter is a RateLimiter, a URL or None, not {type(spec).__name__}"
        )
    url = parse_url(spec, "rate limiter")
    backend = registry.rate_limiters.factory(url.scheme, spec)
    options = {k: v for k, v in url.options.items() if k in _BUDGET_OPTIONS}
    try:
        rpm = rpm if rpm is not None or "rpm" not in options else int(options["rpm"])
        tpm = tpm if tpm is not None or "tpm" not in options else int(options["tpm"])
        window = float(options["window"]) if "window" in options else window
    except ValueError:
        raise ConfigurationError(f"invalid rpm, tpm or window in {redact_url(spec)!r}") from None
    if rpm is None and tpm is None:
        raise ConfigurationError(f"the rate limiter {redact_url(spec)!r} needs rpm or tpm")
    limiter = backend(url, rpm=rpm, tpm=tpm, window=window, clock=clock, sleep=sleep)
    if not isinstance(limiter, RateLimiter):
        raise ConfigurationError(f"the rate limiter factory for {redact_url(spec)!r} returned "
                                 f"{type(limiter).__name__}, not a RateLimiter")
    return limiter
