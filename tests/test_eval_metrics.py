"""Retrieval metrics against hand-computed cases, ties included, and the bootstrap intervals."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest

from embedpipe.eval import (
    bootstrap_ci,
    bootstrap_diff_ci,
    ndcg_at_k,
    recall_at_k,
    reciprocal_rank,
    success_at_k,
)

# Scores for 6 candidates; ranking without ties: 2, 0, 4, 1, 5, 3
DISTINCT = np.array([0.9, 0.5, 0.95, 0.1, 0.7, 0.3])


def test_no_ties_matches_the_textbook_values() -> None:
    assert recall_at_k(DISTINCT, {0, 5}, 1) == 0.0
    assert recall_at_k(DISTINCT, {0, 5}, 2) == 0.5          # 0 is 2nd
    assert recall_at_k(DISTINCT, {0, 5}, 5) == 1.0          # 5 is 5th
    assert success_at_k(DISTINCT, {0, 5}, 2) == 1.0
    assert success_at_k(DISTINCT, {1}, 3) == 0.0            # 1 is 4th
    assert reciprocal_rank(DISTINCT, {1, 3}) == 1 / 4
    # nDCG@5 for relevant {0, 5} at ranks 2 and 5: (1/log2 3 + 1/log2 6) / (1 + 1/log2 3)
    expected = (1 / math.log2(3) + 1 / math.log2(6)) / (1 + 1 / math.log2(3))
    assert ndcg_at_k(DISTINCT, {0, 5}, 5) == pytest.approx(expected)
    assert ndcg_at_k(DISTINCT, {0, 5}, 4) == pytest.approx((1 / math.log2(3)) / (1 + 1 / math.log2(3)))
    assert ndcg_at_k(DISTINCT, {2}, 10) == 1.0
    for ties in ("average", "pessimistic"):
        assert reciprocal_rank(DISTINCT, {4}, ties=ties) == 1 / 3


# Candidate 0 is relevant and ties with 1, 2, 3 for first place; 4 and 5 score lower.
TIED = np.array([0.8, 0.8, 0.8, 0.8, 0.2, 0.1])


def test_ties_average_is_the_expected_value_over_orders() -> None:
    # Relevant 0 is equally likely at ranks 1..4.
    assert recall_at_k(TIED, {0}, 1) == pytest.approx(1 / 4)
    assert recall_at_k(TIED, {0}, 2) == pytest.approx(2 / 4)
    assert recall_at_k(TIED, {0}, 4) == 1.0
    assert reciprocal_rank(TIED, {0}) == pytest.approx((1 + 1 / 2 + 1 / 3 + 1 / 4) / 4)
    assert ndcg_at_k(TIED, {0}, 2) == pytest.approx((1 + 1 / math.log2(3)) / 4)
    # Two relevant (0, 1) in the block of 4: P(at least one in the first 1) = 2/4,
    # in the first 2 = 1 - C(2,2)/C(4,2) = 5/6.
    assert success_at_k(TIED, {0, 1}, 1) == pytest.approx(1 / 2)
    assert success_at_k(TIED, {0, 1}, 2) == pytest.approx(5 / 6)
    # First relevant of 2 among 4 tied: at place 1 w.p. 1/2, 2 w.p. 1/3, 3 w.p. 1/6.
    assert reciprocal_rank(TIED, {0, 1}) == pytest.approx(1 / 2 + 1 / 3 / 2 + 1 / 6 / 3)


def test_ties_pessimistic_puts_relevant_last_in_the_block() -> None:
    assert recall_at_k(TIED, {0}, 3, ties="pessimistic") == 0.0
    assert recall_at_k(TIED, {0}, 4, ties="pessimistic") == 1.0
    assert reciprocal_rank(TIED, {0}, ties="pessimistic") == 1 / 4
    assert success_at_k(TIED, {0, 1}, 2, ties="pessimistic") == 0.0
    assert success_at_k(TIED, {0, 1}, 3, ties="pessimistic") == 1.0
    assert ndcg_at_k(TIED, {0, 1}, 4, ties="pessimistic") == pytest.approx(
        (1 / math.log2(4) + 1 / math.log2(5)) / (1 + 1 / math.log2(3)))


def test_constant_scores_give_a_random_ranking_not_an_index_order() -> None:
    flat = np.zeros(10)
    assert recall_at_k(flat, {0}, 5) == pytest.approx(0.5)
    assert recall_at_k(flat, {9}, 5) == pytest.approx(0.5)
    assert ndcg_at_k(flat, {0}, 10) == pytest.approx(ndcg_at_k(flat, {9}, 10))


def test_average_ties_equal_a_monte_carlo_over_tie_orders() -> None:
    rng = random.Random(0)
    scores = np.array([3, 2, 2, 2, 2, 2, 1, 1, 0, 0], dtype=float)
    relevant = {2, 5, 7}
    k = 4
    totals = np.zeros(4)
    trials = 20000
    for _ in range(trials):
        order = sorted(range(10), key=lambda i: (-scores[i], rng.random()))
        ranks = sorted(order.index(i) + 1 for i in relevant)
        totals += [sum(r <= k for r in ranks) / 3, ranks[0] <= k, 1 / ranks[0],
                   sum(1 / math.log2(r + 1) for r in ranks if r <= k) / sum(1 / math.log2(p + 1) for p in (1, 2, 3))]
    mc = totals / trials
    exact = [recall_at_k(scores, relevant, k), success_at_k(scores, relevant, k),
             reciprocal_rank(scores, relevant), ndcg_at_k(scores, relevant, k)]
    assert exact == pytest.approx(mc.tolist(), abs=0.01)


def test_bad_input_is_named() -> None:
    with pytest.raises(ValueError, match="at least one relevant"):
        recall_at_k(DISTINCT, set(), 5)
    with pytest.raises(ValueError, match="k must be"):
        ndcg_at_k(DISTINCT, {0}, 0)
    with pytest.raises(IndexError, match="out of range"):
        reciprocal_rank(DISTINCT, {6})
    with pytest.raises(ValueError, match="NaN"):
        recall_at_k(np.array([np.nan, 1.0]), {0}, 1)
    with pytest.raises(ValueError, match="1-d"):
        recall_at_k(np.zeros((2, 2)), {0}, 1)


def test_bootstrap_interval_is_seeded_and_covers_the_mean() -> None:
    values = np.random.default_rng(1).random(200) < 0.6
    low, high = bootstrap_ci(values)
    assert (low, high) == bootstrap_ci(values)
    assert low < values.mean() < high
    # Normal approximation of a proportion's 95% interval: +-1.96 * sqrt(p(1-p)/n)
    half = 1.96 * math.sqrt(values.mean() * (1 - values.mean()) / values.size)
    assert high - low == pytest.approx(2 * half, rel=0.15)
    assert bootstrap_ci([1.0, 1.0, 1.0]) == (1.0, 1.0)
    with pytest.raises(ValueError, match="non-empty"):
        bootstrap_ci([])


def test_paired_difference_interval_flags_ties() -> None:
    rng = np.random.default_rng(2)
    a = (rng.random(300) < 0.7).astype(float)
    same = a.copy()
    same[:3] = 1 - same[:3]  # three queries differ: a tie
    low, high = bootstrap_diff_ci(a, same)
    assert low <= 0 <= high
    better = np.ones(300)
    low, high = bootstrap_diff_ci(better, a)
    assert low > 0
    with pytest.raises(ValueError, match="same queries"):
        bootstrap_diff_ci(a, a[:10])
