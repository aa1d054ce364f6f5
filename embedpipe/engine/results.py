"""What an embed call returns: the vectors, each failed input's :class:`~embedpipe.errors.Failure`,
and the call's own :class:`~embedpipe.stats.Stats`."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from embedpipe.errors import Failure
from embedpipe.stats import Stats


class EmbeddingResult(list):  # type: ignore[type-arg]
    """The vectors of one call as lists (``None`` where an input failed).

    ``failures``: input index -> :class:`~embedpipe.errors.Failure`. ``stats``: what this
    call did (hits, misses, deduped, requests, tokens, cost...). ``budget_exceeded``: some
    inputs were not sent because the budget was reached.
    """

    failures: dict[int, Failure]
    budget_exceeded: bool
    stats: Stats

    def __init__(self, items: Sequence[list[float] | None] = (), failures: Mapping[int, Failure] | None = None,
                 budget_exceeded: bool = False, stats: Stats | None = None) -> None:
        super().__init__(items)
        self.failures = dict(failures or {})
        self.budget_exceeded = budget_exceeded
        self.stats = stats if stats is not None else Stats()


class EmbeddingArray(np.ndarray):
    """An (n, d) float32 array with ``failures`` (rows of failed inputs are NaN), ``stats`` and
    ``budget_exceeded``, as on :class:`EmbeddingResult`."""

    failures: dict[int, Failure]
    budget_exceeded: bool
    stats: Stats

    def __array_finalize__(self, obj: Any) -> None:
        self.failures = getattr(obj, "failures", {})
        self.budget_exceeded = getattr(obj, "budget_exceeded", False)
        self.stats = getattr(obj, "stats", None) or Stats()


def as_lists(out: np.ndarray, failures: dict[int, Failure], budget: bool, stats: Stats) -> EmbeddingResult:
    """Lists from the call's (n, d) block, ``None`` for failed rows."""
    rows: list[list[float] | None] = out.tolist()
    for i in failures:
        rows[i] = None
    return EmbeddingResult(rows, failures, budget, stats)


def as_array(out: np.ndarray, failures: dict[int, Failure], budget: bool, stats: Stats) -> EmbeddingArray:
    """A view of the call's (n, d) block carrying its failures and stats."""
    arr = out.view(EmbeddingArray)
    arr.failures = failures
    arr.budget_exceeded = budget
    arr.stats = stats
    return arr
