"""The spend budget of one pipeline: refuse before sending what would cross ``budget_usd``."""

from __future__ import annotations

import threading

from embedpipe.cost import cost_of
from embedpipe.errors import BudgetExceededError


class Budget:
    """Spent and reserved USD against an optional limit; thread-safe.

    A request reserves its estimated cost before it is sent and releases it when it is done;
    what the provider bills is spent. ``check`` refuses (raises
    :class:`~embedpipe.errors.BudgetExceededError`) when an estimate does not fit what is
    neither spent nor reserved.
    """

    def __init__(self, limit_usd: float | None, price_per_1m: float | None) -> None:
        self.limit_usd = limit_usd
        self.price_per_1m = price_per_1m
        self._spent = 0.0
        self._reserved = 0.0
        self._lock = threading.Lock()

    @property
    def spent_usd(self) -> float:
        return self._spent

    @property
    def remaining_usd(self) -> float | None:
        """What is left of the limit (``None`` without one)."""
        if self.limit_usd is None:
            return None
        return max(0.0, self.limit_usd - self._spent)

    def cost(self, tokens: int) -> float:
        return cost_of(tokens, self.price_per_1m) or 0.0

    def check(self, tokens: int) -> None:
        """Raise unless ``tokens`` more fit the budget."""
        if self.limit_usd is None:
            return
        est = self.cost(tokens)
        with self._lock:
            left = self.limit_usd - self._spent - self._reserved
            spent = self._spent
        if est > left + 1e-12:
            raise BudgetExceededError(
                f"embedding {tokens:,} tokens would cost ${est:.6f}, but only ${max(left, 0):.6f} of the "
                f"${self.limit_usd:.6f} budget is left (spent ${spent:.6f}); nothing was sent",
                estimate_usd=est, spent_usd=spent, budget_usd=self.limit_usd)

    def check_usd(self, usd: float, what: str) -> None:
        """Raise unless ``usd`` more (the cost of ``what``, e.g. transcribing 90 s of audio) fit the budget."""
        if self.limit_usd is None:
            return
        with self._lock:
            left = self.limit_usd - self._spent - self._reserved
            spent = self._spent
        if usd > left + 1e-12:
            raise BudgetExceededError(
                f"{what} would cost ${usd:.6f}, but only ${max(left, 0):.6f} of the ${self.limit_usd:.6f} budget "
                f"is left (spent ${spent:.6f}); nothing was sent", estimate_usd=usd, spent_usd=spent,
                budget_usd=self.limit_usd)

    def reserve(self, tokens: int) -> float:
        """Hold the estimated cost of ``tokens``; returns the amount to :meth:`release`."""
        amount = self.cost(tokens)
        with self._lock:
            self._reserved += amount
        return amount

    def release(self, amount: float) -> None:
        with self._lock:
            self._reserved -= amount

    def spend(self, usd: float) -> None:
        with self._lock:
            self._spent += usd


__all__ = ["Budget"]
