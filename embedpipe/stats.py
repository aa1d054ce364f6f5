"""Counters: one dataclass for a call's own stats and for a pipeline's running total.

Each call counts into its own :class:`Stats` (``result.stats``); when it ends, the pipeline's
running total adds it whole (a subscriber to :class:`~embedpipe.events.CallDone`), so the
per-call stats of all calls sum exactly to the total and nobody subtracts snapshots.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field, fields, replace
from typing import Any


@dataclass
class Stats:
    """What a pipeline has done since it was built.

    ``cost_usd`` and ``saved_usd`` are ``None`` when the model's price is unknown
    (an unknown price is never reported as $0).
    """

    hits: int = 0            #: unique texts served from the cache
    misses: int = 0          #: unique texts not in the cache (embedded, or failed)
    deduped: int = 0         #: inputs answered by another copy of the same text in the same call
    requests: int = 0        #: provider requests sent, retries included
    tokens: int = 0          #: tokens billed (provider usage where reported, else counted)
    cost_usd: float | None = 0.0
    saved_usd: float | None = 0.0  #: what cache hits would have cost
    retries: int = 0         #: requests retried after a retryable failure
    rate_limited: int = 0    #: responses that were 429
    corrupt: int = 0         #: cache values that failed to decode and were re-embedded
    cache_errors: int = 0    #: cache reads or writes that failed (fail-open)
    limiter_errors: int = 0  #: rate-limiter store failures (fail-open: a local limiter took over)
    truncated: int = 0       #: inputs cut to the model's limit (on_long_input="truncate")
    split: int = 0           #: inputs embedded as several windows (on_long_input="split")
    failed: int = 0          #: inputs that could not be embedded
    embedded: int = 0        #: unique texts embedded by the provider
    transcribed: int = 0     #: recordings transcribed (not served from the transcript cache)
    audio_seconds: float = 0.0  #: seconds of audio transcribed (billed seconds where the service said)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, **deltas: Any) -> None:
        """Add to counters atomically; a ``None`` cost makes that counter unknown for good."""
        # The instance dict directly: this runs several times per call, on the cached path too.
        d = self.__dict__
        with self._lock:
            for name, delta in deltas.items():
                current = d[name]
                if current is None:
                    continue
                d[name] = None if delta is None else current + delta

    def merge(self, other: Stats) -> None:
        """Add every counter of ``other`` (a finished call's stats) to this one, atomically."""
        d = self.__dict__
        theirs = other.__dict__
        with self._lock:
            for name in _COUNTERS:
                delta = theirs[name]
                if delta is None:
                    d[name] = None
                elif delta:
                    current = d[name]
                    if current is not None:
                        d[name] = current + delta

    def snapshot(self) -> Stats:
        """A consistent copy."""
        with self._lock:
            return replace(self, _lock=threading.Lock())

    @property
    def hit_rate(self) -> float | None:
        """Share of unique texts served from the cache."""
        total = self.hits + self.misses
        return self.hits / total if total else None

    def as_dict(self) -> dict[str, Any]:
        """Plain dict of the counters."""
        snap = self.snapshot()
        return {f.name: getattr(snap, f.name) for f in fields(snap) if f.name != "_lock"}

    def __getstate__(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "_lock"}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()


#: the counter fields, in order (every field but the lock)
_COUNTERS: tuple[str, ...] = tuple(f.name for f in fields(Stats) if f.name != "_lock")
