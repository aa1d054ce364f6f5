"""Side-by-side timing: cases run interleaved, round after round, so noise hits them alike."""

from __future__ import annotations

import gc
import time
from collections.abc import Callable


def interleaved(cases: dict[str, Callable[[], object]], rounds: int, *,
                slow: dict[str, int] | None = None) -> dict[str, list[float]]:
    """Seconds per call of each case, ``rounds`` times, the order rotated every round.

    ``slow`` caps the rounds of expensive cases (name -> rounds); they run in the first
    rounds, beside the others. Garbage is collected before each call; the collector stays on
    during it, as in real use.
    """
    names = list(cases)
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            if slow and name in slow and r >= slow[name]:
                continue
            gc.collect()
            start = time.perf_counter()
            cases[name]()
            times[name].append(time.perf_counter() - start)
    return times


def best(values: list[float]) -> float:
    """The fastest of the rounds (NaN for none).

    The estimate of a call's own cost that timeit's documentation recommends: other
    processes only ever add time, so the minimum is the least disturbed measurement.
    """
    return min(values) if values else float("nan")


def best_ratio(a: list[float], b: list[float]) -> float:
    """``best(a) / best(b)``: the ratio of the least disturbed times of two interleaved cases."""
    return best(a) / best(b) if a and b else float("nan")


def percentile(values: list[float], q: float) -> float:
    """The ``q``-th percentile (0-100), by linear interpolation."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    k = (len(ordered) - 1) * q / 100
    lo = int(k)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)
