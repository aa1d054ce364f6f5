"""Request sizes and what is in flight, from the rate limits and the observed latency (Little's law).

A request a crash cuts off has been billed and its answer is lost: the tokens in flight at any
moment are what a SIGKILL re-bills, and the last requests of a call are a tail nothing can hide.
Little's law says how much must be in flight to run at a rate: tokens in flight = token rate *
latency. So under a rate limit the engine keeps about that much in flight (on average) and no more, in
requests sized from the request and token rates, and shrinks them at the end of a call so its
last answers come back together. ``batch_size`` and ``max_batch_tokens`` stay caps.

Without rpm/tpm the sizing is the provider's (``batch_size``, ``max_batch_tokens``), with a remote
API's requests capped at :data:`MODERATE_REQUEST_TOKENS`, and ``max_concurrency`` of them in flight.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from embedpipe.limits import RateLimiter, header_number

#: the latency assumed before any answer: the first requests leave before anything is observed
PRIOR_LATENCY = 0.5
#: in flight for this much above the limit's rate, so that at steady state the limiter, not the
#: in-flight cap, sets the pace (the gap between one answer and the next request costs nothing)
HEADROOM = 1.05
#: what a bucket holds is spent at this many times the limit's rate per window: a full bucket
#: is gone in about half a window, after which the limit's rate alone is what the server refills
SPEND = 2.0
#: requests use at most this share of the request rate the limiter allows: the token rate binds
RPM_SHARE = 0.9
#: without a token limit, the most tokens one request to a remote API holds (at most
#: ``max_concurrency`` requests of this size are at risk at a crash)
MODERATE_REQUEST_TOKENS = 32_768
#: without ``max_concurrency`` given, the most requests in flight under a rate limit
MAX_REQUESTS_IN_FLIGHT = 256
#: the share of a job a crash may re-bill: a job keeps at most this share of its tokens in flight
AT_RISK_SHARE = 0.015
#: the fewest requests that share the tokens in flight
PIPELINE = 4
#: without a request limit, the fewest tokens a paced request holds (a fast server needs little in
#: flight, but a request per text would cost more than it saves)
MIN_REQUEST_TOKENS = 1024
#: the end of a call, in what may be in flight: once that little is left to send, the longest inputs
#: go first (each is a request of its own, and one sent last would keep the call waiting its latency)
TAIL_LATENCIES = 8
#: answers seen before the latency's slope sizes requests (a few answers give a noisy slope)
SETTLED = 10
#: the weight an earlier observation keeps at each new one (about the last 20 answers count)
LATENCY_DECAY = 0.95


class LatencyModel:
    """Seconds a request takes, as ``intercept + slope * tokens``, fitted to recent answers.

    Exponentially weighted least squares: a few sums, updated per answer. While the answers'
    sizes are too alike to tell a slope, the slope is 0 and the intercept is their mean latency.
    """

    def __init__(self, decay: float = LATENCY_DECAY) -> None:
        self.decay = decay
        self.samples = 0
        self._w = self._x = self._y = self._xx = self._xy = 0.0
        self._gap = math.inf
        self._held_x = self._held_y = 0.0

    def observe(self, tokens: float, seconds: float, server: float | None = None) -> None:
        """Learn from one answer: ``seconds`` from send to answer here, ``server`` what the server
        says it took (``openai-processing-ms``), when it says.

        With the server's figure, the latency is that plus the smallest gap seen between the two
        (the network's round trip): a busy client, late to read its answers, does not make it
        look as if more must be in flight. Answers already in are not at risk; a client that
        cannot keep up gains nothing from sending more.
        """
        if not (seconds >= 0 and math.isfinite(seconds)) or tokens < 0:
            return
        if server is not None and 0 <= server <= seconds:
            self._gap = min(self._gap, seconds - server)
            seconds = server + self._gap
        d = self.decay
        self._w = self._w * d + 1.0
        self._x = self._x * d + tokens
        self._y = self._y * d + seconds
        self._xx = self._xx * d + tokens * tokens
        self._xy = self._xy * d + tokens * seconds
        self.samples += 1

    def observe_held(self, tokens: float, seconds: float) -> None:
        """Learn how long a request held its place in flight (from admission to its answer handled:
        the limiter's wait and the client's own work included)."""
        if seconds >= 0 and math.isfinite(seconds) and tokens > 0:
            d = self.decay
            self._held_x = self._held_x * d + tokens
            self._held_y = self._held_y * d + tokens * seconds

    @property
    def held(self) -> float:
        """The mean time a token holds its place in flight, by request size (:attr:`per_token` until known)."""
        if self._held_x <= 0:
            return self.per_token
        return max(self.per_token, self._held_y / self._held_x)

    @property
    def per_token(self) -> float:
        """The mean latency of a token in flight: latencies weighted by request size (Little's law's
        waiting time, for tokens; the prior before any answer)."""
        if not self.samples or self._x <= 0:
            return PRIOR_LATENCY
        return self._xy / self._x

    @property
    def slope(self) -> float:
        """Seconds per token (0.0 until sizes vary enough to tell)."""
        if self.samples < 3:
            return 0.0
        var = self._w * self._xx - self._x * self._x
        mean = self._x / self._w
        if var <= (0.05 * mean * self._w) ** 2:  # sizes within ~5% of each other
            return 0.0
        return max(0.0, (self._w * self._xy - self._x * self._y) / var)

    @property
    def intercept(self) -> float:
        """Seconds a request takes whatever its size."""
        if not self.samples:
            return PRIOR_LATENCY
        return max(0.0, (self._y - self.slope * self._x) / self._w)

    def predict(self, tokens: float) -> float:
        """The expected latency of a request of ``tokens`` tokens (at least a millisecond)."""
        if not self.samples:
            return PRIOR_LATENCY
        return max(1e-3, self.intercept + self.slope * tokens)


def server_seconds(headers: Mapping[str, str] | None) -> float | None:
    """The seconds the server says a request took (OpenAI's ``openai-processing-ms``), or ``None``."""
    if not headers:
        return None
    lowered = {k.lower(): v for k, v in headers.items()}  # other providers may not lower-case them
    ms = header_number(lowered.get("openai-processing-ms"))
    return None if ms is None else ms / 1000


@dataclass(frozen=True)
class Sizing:
    """What the next requests should look like: ``tokens`` each (``None``: no token target), about
    ``in_flight_tokens`` tokens in flight on average, never more than ``most_tokens``, in at most
    ``in_flight_requests`` requests at once."""

    tokens: int | None
    in_flight_tokens: float
    in_flight_requests: int
    paced: bool                     #: sized from rate limits (Little's law), not the provider's defaults
    most_tokens: float = math.inf   #: a hard cap on tokens in flight (a job's, see :func:`at_risk_for`)


def _level(limiter: RateLimiter, bucket: str) -> float:
    """The share of a bucket the limiter has left now (0.0 when it cannot tell)."""
    level = limiter.level(bucket)
    return 0.0 if level is None else min(1.0, max(0.0, level))


def sizing(limiter: RateLimiter, latency: LatencyModel, *, cap: int | None, max_concurrency: int,
           concurrency_given: bool, remote: bool, at_risk: int | None = None) -> Sizing:
    """The request size and in-flight caps for ``limiter``'s limits and the latency seen so far.

    ``cap``: the most tokens a request may hold (``max_batch_tokens``, an eighth of the token
    bucket); ``remote``: a paid API (its requests are capped at :data:`MODERATE_REQUEST_TOKENS`
    when no token limit sizes them); ``at_risk``: the most tokens in flight at once whatever the
    rates, under rate limits (a job sets it from its size, see :func:`at_risk_for`).
    """
    size = _sizing(limiter, latency, cap=cap, max_concurrency=max_concurrency, concurrency_given=concurrency_given,
                   remote=remote)
    if at_risk is None or not size.paced:
        return size  # without rate limits: max_concurrency moderate requests, as documented
    tokens = size.tokens if size.tokens is None else max(1, min(size.tokens, at_risk // PIPELINE))
    most = max(float(at_risk), float(tokens or 0))
    return Sizing(tokens, min(size.in_flight_tokens, most), size.in_flight_requests, size.paced, most)


def at_risk_for(job_tokens: int) -> int:
    """The most tokens a job of ``job_tokens`` keeps in flight: :data:`AT_RISK_SHARE` of it, so a crash
    re-bills at most about that, and never less than :data:`MODERATE_REQUEST_TOKENS` (a small job
    is cheap to re-bill and should not crawl)."""
    return max(MODERATE_REQUEST_TOKENS, int(job_tokens * AT_RISK_SHARE))


def _sizing(limiter: RateLimiter, latency: LatencyModel, *, cap: int | None, max_concurrency: int,
            concurrency_given: bool, remote: bool) -> Sizing:
    # Before the first answer the limiter's level is only what it was told (a bucket a server may not
    # have: a per-minute figure for a per-10-s limit): run at the rate alone until answers sync it.
    observed = latency.samples > 0

    def pace(limit_rate: float, bucket: str) -> float:
        """The rate to run at: the limit's, plus what the bucket holds spent over about half a window."""
        return limit_rate * (HEADROOM + (SPEND * _level(limiter, bucket) if observed else 0.0))

    window = limiter.window
    tok_rate = limiter.tpm / window if limiter.tpm else None
    req_rate = limiter.rpm / window if limiter.rpm else None
    # Today's sizes where no token limit sizes requests, a paid API's capped at a moderate size.
    unpaced = min(cap or MODERATE_REQUEST_TOKENS, MODERATE_REQUEST_TOKENS) if remote else cap
    if tok_rate is None and req_rate is None:
        return Sizing(unpaced, math.inf, max_concurrency, False)
    requests_cap = max_concurrency if concurrency_given else MAX_REQUESTS_IN_FLIGHT
    if tok_rate is None:
        # Requests only: Little's law in requests, today's sizes (capped when remote).
        assert req_rate is not None
        tokens = unpaced
        n = max(1, math.ceil(pace(req_rate, "requests") * latency.predict(tokens or 0)))
        return Sizing(tokens, math.inf, min(requests_cap, n), True)
    rate = pace(tok_rate, "tokens")
    # Little's law: tokens in flight = rate x the time a token holds its place (observed, by size).
    # At the server only its latency of that is at risk: the rest is the limiter's wait before
    # sending and the client's work after the answer.
    in_flight = rate * latency.held
    slope = latency.slope if latency.samples >= SETTLED else 0.0  # a few answers give a noisy slope
    if req_rate is not None:
        # The smallest requests that keep the request rate below its limit: the fewer tokens a
        # request holds, the shorter its latency and the less is in flight.
        floor = rate / (pace(req_rate, "requests") * RPM_SHARE)
        # Bigger, up to a quarter of the fixed latency's worth: each request costs the client and the
        # server some work of its own, which the token rate does not pay for (on a fast server, a
        # thousand 1k-token requests lose 3% of the rate to it, as measured in BENCHMARKS.md).
        size = latency.intercept / (4 * slope) if slope > 0 else floor
    else:
        floor = float(MIN_REQUEST_TOKENS)
        # No request limit: requests big enough that their size costs half the fixed latency.
        size = latency.intercept / (2 * slope) if slope > 0 else float(cap or MODERATE_REQUEST_TOKENS)
    # At least PIPELINE requests share what may be in flight: one request bigger than all of it
    # would leave the pipe empty while the limiter refills its whole size, then wait its latency.
    size = max(floor, min(size, in_flight / PIPELINE))
    if cap:
        size = min(size, cap)
    tokens = max(1, int(size))
    return Sizing(tokens, max(float(tokens), in_flight), requests_cap, True)


def shrunk(size: Sizing, remaining: int) -> int | None:
    """The request size for the end of a call: what is left spread over the requests in flight, so the
    last answers come back together instead of behind one big request."""
    if size.tokens is None or not size.paced:
        return size.tokens
    slots = size.in_flight_tokens / size.tokens if math.isfinite(size.in_flight_tokens) else size.in_flight_requests
    slots = max(1.0, min(float(size.in_flight_requests), slots))
    if remaining >= size.tokens * slots:
        return size.tokens
    return max(1, min(size.tokens, math.ceil(remaining / slots)))


class InFlight:
    """A gate on what is in flight: at most so many requests, about so many tokens on average, and never
    more than a hard cap (one request always passes).

    Little's law's figure is a mean. A gate that never let the tokens in flight pass it would hold
    them about half a request below it (with two requests sharing it, measured: 40k of a
    49.5k-token/s target), so a request leaves once half of it fits, and what is in flight swings
    about the figure instead of under it. A hard cap (a job's) is never passed.

    Created on, and used from, the engine's loop only.
    """

    def __init__(self) -> None:
        self.requests = 0
        self.tokens = 0
        self._changed = asyncio.Condition()

    def has_room(self, size: Sizing, tokens: int) -> bool:
        if self.requests == 0:
            return True
        return (self.requests < size.in_flight_requests and self.tokens + tokens / 2 <= size.in_flight_tokens
                and self.tokens + tokens <= size.most_tokens)

    async def wait(self, room: Callable[[], bool]) -> None:
        """Wait until ``room()`` says a request may leave (re-asked whenever one finishes)."""
        async with self._changed:
            await self._changed.wait_for(room)

    def add(self, tokens: int) -> None:
        self.requests += 1
        self.tokens += tokens

    async def done(self, tokens: int) -> None:
        self.requests -= 1
        self.tokens -= tokens
        async with self._changed:
            self._changed.notify_all()


__all__ = ["TAIL_LATENCIES", "InFlight", "LatencyModel", "Sizing", "at_risk_for", "server_seconds", "shrunk", "sizing"]
