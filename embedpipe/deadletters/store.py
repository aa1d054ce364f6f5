"""A dead letter, and the seam every dead-letter store implements."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from embedpipe._urls import redact

if TYPE_CHECKING:
    from embedpipe.deadletters.retry import RetryOutcome

__all__ = ["DeadLetter", "DeadLetterStore"]


@dataclass(frozen=True)
class DeadLetter:
    """One input that could not be embedded.

    ``id`` names the item (a node id, a row key); ``ref_id`` the thing it came from (a
    document id). ``text`` is exactly what was sent to the model. ``metadata`` is shown
    to people; ``payload`` is the caller's own serialised item, to rebuild it on retry.
    ``attempts`` counts the calls that failed on it; ``time`` is the last failure's
    ``time.time()``.
    """

    id: str
    text: str
    reason: str
    ref_id: str | None = None
    metadata: Mapping[str, Any] = field(default_factory=dict)
    payload: str | None = None
    attempts: int = 1
    time: float = field(default_factory=time.time)


class DeadLetterStore:
    """Base class of dead-letter stores. Override ``add``, ``get``, ``all``, ``remove`` and ``clear``.

    ``add`` is an upsert: a letter whose ``id`` is already stored replaces it and adds
    to its ``attempts``. Reasons pass through :func:`embedpipe._urls.redact` on the way in.
    :meth:`settle` records what a retry did; override it to make that one transaction, or
    to deliver the recovered vectors somewhere first (a job writes them to its output).
    """

    #: True when calls never block on I/O (memory), so async twins call them directly
    non_blocking: bool = False

    def add(self, letters: Sequence[DeadLetter]) -> None:
        """Store ``letters``, merging with any stored under the same id."""
        raise NotImplementedError

    def get(self, ids: Sequence[str]) -> list[DeadLetter]:
        """The stored letters among ``ids``, in the order of ``ids``."""
        raise NotImplementedError

    def all(self) -> list[DeadLetter]:
        """Every stored letter, oldest first."""
        raise NotImplementedError

    def remove(self, ids: Sequence[str]) -> None:
        """Forget ``ids``; absent ids are ignored."""
        raise NotImplementedError

    def clear(self) -> None:
        """Forget every letter."""
        raise NotImplementedError

    def settle(self, outcome: RetryOutcome) -> None:
        """Record one retried batch: the recovered letters leave, the failed ones stay with their new reason."""
        self.remove([letter.id for letter, _ in outcome.recovered])
        self.add(outcome.failed)

    def close(self) -> None:
        """Release connections. Idempotent."""

    def __len__(self) -> int:
        return len(self.all())

    async def _run(self, fn: Any, *args: Any) -> Any:
        if self.non_blocking:
            return fn(*args)
        return await asyncio.to_thread(fn, *args)

    async def aadd(self, letters: Sequence[DeadLetter]) -> None:
        """Async twin of :meth:`add`."""
        await self._run(self.add, letters)

    async def aget(self, ids: Sequence[str]) -> list[DeadLetter]:
        """Async twin of :meth:`get`."""
        result: list[DeadLetter] = await self._run(self.get, ids)
        return result

    async def aall(self) -> list[DeadLetter]:
        """Async twin of :meth:`all`."""
        result: list[DeadLetter] = await self._run(self.all)
        return result

    async def aremove(self, ids: Sequence[str]) -> None:
        """Async twin of :meth:`remove`."""
        await self._run(self.remove, ids)

    async def asettle(self, outcome: RetryOutcome) -> None:
        """Async twin of :meth:`settle`."""
        await self._run(self.settle, outcome)

    @staticmethod
    def _clean(letter: DeadLetter) -> DeadLetter:
        return replace(letter, reason=redact(letter.reason), metadata=dict(letter.metadata))
