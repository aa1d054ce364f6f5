"""Retrieval metrics from score vectors, with tied scores handled explicitly, and bootstrap confidence intervals.

Each metric takes one query's ``scores`` (one float per candidate, higher is better) and
the indices of its ``relevant`` candidates, and returns that query's value; average over
queries for the figure, and pass the per-query values to :func:`bootstrap_ci`.

Ties
    Candidates with equal scores have no order of their own, and a metric that broke the
    tie by index (as ``argsort`` does) would reward a model for where the relevant
    document happens to sit in the corpus. Two rules are offered:

    * ``ties="average"`` (the default): the expected value over every order of the tied
      candidates, each equally likely (McSherry & Najork, "Computing Information
      Retrieval Performance Measures Efficiently in the Presence of Tied Scores", ECIR 2008).
      A model scoring everything alike gets exactly the value of a random ranking.
    * ``ties="pessimistic"``: relevant candidates are placed after every irrelevant
      candidate they tie with (the worst order).

    Without ties both rules give the usual values.

Relevance is binary. Ranks are 1-based.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Sequence
from typing import Literal

import numpy as np

__all__ = [
    "Ties",
    "bootstrap_ci",
    "bootstrap_diff_ci",
    "ndcg_at_k",
    "recall_at_k",
    "reciprocal_rank",
    "success_at_k",
]

Ties = Literal["average", "pessimistic"]


def _groups(scores: np.ndarray, relevant: Collection[int]) -> list[tuple[int, int, int]]:
    """``(above, tied, relevant_tied)`` per distinct score among the relevant, best score first.

    ``above``: candidates scoring strictly higher; ``tied``: candidates with exactly that
    score (itself included); ``relevant_tied``: relevant candidates among those.
    """
    s = np.asarray(scores, dtype=np.float64)
    if s.ndim != 1:
        raise ValueError(f"scores must be one query's 1-d score vector, got shape {s.shape}")
    rel = np.fromiter(set(relevant), dtype=np.int64)
    if rel.size and (rel.min() < 0 or rel.max() >= s.size):
        raise IndexError(f"relevant index out of range for {s.size} candidates: {sorted(set(relevant))[:5]}...")
    if np.isnan(s).any():
        raise ValueError("scores contain NaN; a NaN cannot be ranked")
    out = []
    rel_scores = s[rel]
    for value in np.unique(rel_scores)[::-1]:
        above = int(np.count_nonzero(s > value))
        tied = int(np.count_nonzero(s == value))
        out.append((above, tied, int(np.count_nonzero(rel_scores == value))))
    return out


def _check(relevant: Collection[int], k: int | None = None) -> None:
    if not relevant:
        raise ValueError("a query needs at least one relevant candidate")
    if k is not None and k < 1:
        raise ValueError(f"k must be at least 1, got {k}")


def _found_in_top(above: int, tied: int, rel: int, k: int, ties: Ties) -> float:
    """Expected (or worst-case) number of a tie group's relevant candidates within the top ``k``."""
    if ties == "average":
        return rel * min(max(k - above, 0), tied) / tied
    return float(min(max(k - (above + tied - rel), 0), rel))


def recall_at_k(scores: np.ndarray, relevant: Collection[int], k: int, ties: Ties = "average") -> float:
    """Share of the relevant candidates that rank in the top ``k``."""
    _check(relevant, k)
    return sum(_found_in_top(a, t, r, k, ties) for a, t, r in _groups(scores, relevant)) / len(set(relevant))


def success_at_k(scores: np.ndarray, relevant: Collection[int], k: int, ties: Ties = "average") -> float:
    """Probability (0 or 1 without ties) that at least one relevant candidate ranks in the top ``k``.

    With one relevant candidate per query this equals :func:`recall_at_k`.
    """
    _check(relevant, k)
    above, tied, rel = _groups(scores, relevant)[0]  # the best relevant score decides
    if k <= above:
        return 0.0
    if ties == "pessimistic":
        return 1.0 if k >= above + tied - rel + 1 else 0.0
    # P(some relevant among the first k - above of the tied block) = 1 - C(t - r, n) / C(t, n)
    n = min(k - above, tied)
    return 1.0 - math.comb(tied - rel, n) / math.comb(tied, n)


def reciprocal_rank(scores: np.ndarray, relevant: Collection[int], ties: Ties = "average") -> float:
    """1 / rank of the first relevant candidate (average it over queries for MRR)."""
    _check(relevant)
    above, tied, rel = _groups(scores, relevant)[0]
    if ties == "pessimistic":
        return 1.0 / (above + tied - rel + 1)
    # The first relevant of the tied block sits at its j-th place with probability
    # C(t - j, r - 1) / C(t, r).
    total = math.comb(tied, rel)
    return sum(math.comb(tied - j, rel - 1) / total / (above + j) for j in range(1, tied - rel + 2))


def _discount(first: int, last: int) -> float:
    """Sum of 1 / log2(rank + 1) for ranks ``first..last`` (1-based, inclusive)."""
    return sum(1.0 / math.log2(p + 1) for p in range(first, last + 1))


def ndcg_at_k(scores: np.ndarray, relevant: Collection[int], k: int, ties: Ties = "average") -> float:
    """Normalised discounted cumulative gain over the top ``k``, binary gains."""
    _check(relevant, k)
    dcg = 0.0
    for above, tied, rel in _groups(scores, relevant):
        if above >= k:
            break
        if ties == "average":
            # Every tied place is equally likely to hold each relevant candidate.
            dcg += rel / tied * _discount(above + 1, min(above + tied, k))
        else:
            dcg += _discount(above + tied - rel + 1, min(above + tied, k))
    ideal = _discount(1, min(len(set(relevant)), k))
    return dcg / ideal


def bootstrap_ci(values: Sequence[float] | np.ndarray, *, confidence: float = 0.95, resamples: int = 2000,
                 seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of per-query ``values`` (seeded, so reruns agree)."""
    v = np.asarray(values, dtype=np.float64)
    if v.ndim != 1 or v.size == 0:
        raise ValueError("bootstrap_ci needs a non-empty 1-d array of per-query values")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be between 0 and 1, got {confidence}")
    rng = np.random.default_rng(seed)
    means = v[rng.integers(0, v.size, size=(resamples, v.size))].mean(axis=1)
    alpha = (1 - confidence) / 2
    low, high = np.quantile(means, [alpha, 1 - alpha])
    return float(low), float(high)


def bootstrap_diff_ci(a: Sequence[float] | np.ndarray, b: Sequence[float] | np.ndarray, *,
                      confidence: float = 0.95, resamples: int = 2000, seed: int = 0) -> tuple[float, float]:
    """Paired bootstrap interval of ``mean(a) - mean(b)`` over the same queries.

    An interval containing 0 means the two candidates are tied at this confidence.
    """
    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if x.shape != y.shape:
        raise ValueError(f"paired values need the same queries: shapes {x.shape} and {y.shape}")
    return bootstrap_ci(x - y, confidence=confidence, resamples=resamples, seed=seed)
