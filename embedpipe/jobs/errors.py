"""Errors a job raises; each derives from :class:`embedpipe.EmbedPipeError`."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from embedpipe.errors import BudgetExceededError, ConfigurationError, EmbedPipeError

if TYPE_CHECKING:
    from embedpipe.jobs.runner import JobEstimate


class SourceError(EmbedPipeError):
    """A source cannot be read: unknown format, malformed row, missing id field."""


class JobConflictError(ConfigurationError):
    """The output was built with another model or dimensions; pass ``rebuild=True`` (``--rebuild``) to start over."""


class JobLockedError(EmbedPipeError):
    """Another process is running a job on the same state."""


class JobAbortedError(EmbedPipeError):
    """The provider failed every request of a chunk (outage, auth, quota): the run stopped, checkpointed.

    Nothing that failed this way went to the dead-letter queue; re-running continues.
    """


class BudgetRefusedError(BudgetExceededError):
    """The estimate for the uncached part of a run exceeds its budget; nothing was sent. ``estimate`` says why."""

    def __init__(self, message: str, estimate: JobEstimate, budget_usd: float) -> None:
        super().__init__(message, estimate_usd=estimate.cost_usd, budget_usd=budget_usd)
        self.estimate = estimate


class SinkVerificationError(EmbedPipeError):
    """Ids read back from a vector store after a run are missing or differ from what was written."""


class DamagedOutputError(EmbedPipeError):
    """A job's state file or an output part is unreadable or fails its checksums; ``embedpipe repair`` fixes it."""

    def __init__(self, message: str, path: Path | None = None) -> None:
        super().__init__(message)
        #: the damaged file
        self.path = path


__all__ = ["BudgetRefusedError", "DamagedOutputError", "JobAbortedError", "JobConflictError", "JobLockedError",
           "SinkVerificationError", "SourceError"]
