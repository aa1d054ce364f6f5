"""Retry dead letters: one implementation for every store, with a sync and an async driver.

Both drivers run the same steps, as tenacity's do: take the letters from the store, embed
their texts a batch at a time with ``errors="collect"``, sort the results out
(:func:`sort_out`, shared), and hand each batch's :class:`RetryOutcome` to the store's
``settle``. A store settles as it must: a plain store drops the recovered letters and
updates the failed ones; a job's queue writes the recovered vectors to the job's output
and commits both in one transaction. Letters the budget stopped are left as they were.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from embedpipe._urls import redact
from embedpipe.deadletters.store import DeadLetter, DeadLetterStore
from embedpipe.errors import BudgetExceededError, Failure

if TYPE_CHECKING:
    from embedpipe.pipeline import EmbeddingPipeline, EmbeddingResult

_NOT_EMBEDDED = Failure("provider", message="not embedded")

__all__ = ["RetryOutcome", "aretry", "is_record_fault", "retry", "sort_out"]


@dataclass
class RetryOutcome:
    """What retrying some letters did."""

    #: letters embedded this time, with their vectors
    recovered: list[tuple[DeadLetter, list[float]]] = field(default_factory=list)
    #: letters that failed again: the new reason, ``attempts=1`` (the store adds it to the count)
    failed: list[DeadLetter] = field(default_factory=list)
    #: letters not tried, or refused, because the budget was reached; they stay as they were
    skipped: list[DeadLetter] = field(default_factory=list)
    budget_exceeded: bool = False
    #: texts the provider embedded for this outcome (0 with failures: the provider may be down)
    embedded: int = 0
    #: the failed letters whose failure is not the input's own (the API, the network, the account),
    #: decided from the :class:`~embedpipe.errors.Failure` kind when they failed
    transient: list[DeadLetter] = field(default_factory=list)

    @property
    def outage(self) -> bool:
        """Whether the failures look like an outage: the provider embedded nothing, and two or more letters
        (or every one) failed for a reason other than the input itself."""
        transient = len(self.transient)
        return self.embedded == 0 and (transient >= 2 or transient == len(self.failed) + len(self.recovered) > 0)

    def merge(self, other: RetryOutcome) -> None:
        """Add ``other``'s letters and counts to this outcome."""
        self.recovered += other.recovered
        self.failed += other.failed
        self.skipped += other.skipped
        self.budget_exceeded = self.budget_exceeded or other.budget_exceeded
        self.embedded += other.embedded
        self.transient += other.transient


def is_record_fault(failure: Failure) -> bool:
    """Whether a failure lies in the input itself (empty, not UTF-8, rejected by the server), not the API or
    the account: the :class:`~embedpipe.errors.Failure` kind says."""
    return failure.record_fault


def sort_out(letters: Sequence[DeadLetter], result: EmbeddingResult | None, *, embedded: int = 0,
             secrets: Iterable[str | None] = ()) -> RetryOutcome:
    """Sort ``letters`` by what one embed call made of them (``result=None``: the budget refused the call)."""
    if result is None:
        return RetryOutcome(skipped=list(letters), budget_exceeded=True)
    outcome = RetryOutcome(budget_exceeded=bool(result.budget_exceeded), embedded=embedded)
    now = time.time()
    secrets = list(secrets)
    for i, letter in enumerate(letters):
        vector = result[i]
        if vector is not None:
            outcome.recovered.append((letter, vector))
            continue
        failure = result.failures.get(i, _NOT_EMBEDDED)
        if failure.kind == "budget":
            outcome.skipped.append(letter)
            outcome.budget_exceeded = True
        else:
            again = replace(letter, reason=redact(str(failure), secrets), attempts=1, time=now)
            outcome.failed.append(again)
            if not failure.record_fault:
                outcome.transient.append(again)
    return outcome


class _Retrying:
    """The decisions a retry makes, shared by both drivers, which only embed and settle."""

    def __init__(self, letters: Sequence[DeadLetter], pipeline: EmbeddingPipeline, secrets: Iterable[str | None],
                 batch_size: int | None) -> None:
        self.letters = letters
        self.pipeline = pipeline
        self.secrets = list(secrets)
        self.step = batch_size or len(letters) or 1
        self.total = RetryOutcome()

    def batches(self) -> Iterator[list[str]]:
        """The texts of each batch to embed; after the budget stops, the rest are skipped."""
        for start in range(0, len(self.letters), self.step):
            batch = self.letters[start:start + self.step]
            if self.total.budget_exceeded:
                self.total.skipped += batch
                continue
            self._batch = batch
            yield [d.text for d in batch]

    def outcome(self, result: EmbeddingResult | None) -> RetryOutcome:
        """Sort out the current batch (``result=None``: the budget refused the call) and count it."""
        outcome = sort_out(self._batch, result, embedded=result.stats.embedded if result is not None else 0,
                           secrets=self.secrets)
        self.total.merge(outcome)
        return outcome


def retry(store: DeadLetterStore, pipeline: EmbeddingPipeline, ids: Sequence[str] | None = None, *,
          secrets: Iterable[str | None] = (), batch_size: int | None = None) -> RetryOutcome:
    """Re-embed the stored letters (all, or ``ids``), ``batch_size`` at a time, settling each batch in the store.

    Stops at the budget: the letters not yet tried are in ``skipped``, unchanged in the store.
    """
    run = _Retrying(store.all() if ids is None else store.get(ids), pipeline, secrets, batch_size)
    for texts in run.batches():
        result = None
        with contextlib.suppress(BudgetExceededError):  # the estimate did not fit what is left: nothing was sent
            result = pipeline.embed(texts, errors="collect")
        store.settle(run.outcome(result))
    return run.total


async def aretry(store: DeadLetterStore, pipeline: EmbeddingPipeline, ids: Sequence[str] | None = None, *,
                 secrets: Iterable[str | None] = (), batch_size: int | None = None) -> RetryOutcome:
    """Async twin of :func:`retry`."""
    run = _Retrying(await store.aall() if ids is None else await store.aget(ids), pipeline, secrets, batch_size)
    for texts in run.batches():
        result = None
        with contextlib.suppress(BudgetExceededError):
            result = await pipeline.aembed(texts, errors="collect")
        await store.asettle(run.outcome(result))
    return run.total
