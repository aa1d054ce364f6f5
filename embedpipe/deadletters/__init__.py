"""Dead letters: inputs that failed to embed for good, kept with their reason so they can be retried.

A run that embeds with ``errors="collect"`` finishes whatever some inputs do; the inputs
that failed (after retries) become :class:`DeadLetter` records in a store instead of
being lost. :func:`retry` re-embeds them later; the LlamaIndex transform and the jobs'
``dlq retry`` both use it.

Stores are chosen by URL (:data:`embedpipe.registry.dead_letter_stores`): ``memory://``
(this process only, the default) or ``sqlite:///relative.db`` / ``sqlite:////absolute.db``
(a plain path also names a SQLite file). A SQLite store is safe for several processes.
A job keeps its queue in its own state file (``OUT/_state.sqlite``), in the same table.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

from embedpipe import registry
from embedpipe._urls import redact_url
from embedpipe.deadletters.memory import MemoryDeadLetterStore
from embedpipe.deadletters.retry import RetryOutcome, aretry, is_record_fault, retry, sort_out
from embedpipe.deadletters.sqlite import SQLiteDeadLetterStore
from embedpipe.deadletters.store import DeadLetter, DeadLetterStore
from embedpipe.errors import ConfigurationError

if TYPE_CHECKING:
    from embedpipe.pipeline import EmbeddingPipeline

__all__ = [
    "DeadLetter",
    "DeadLetterStore",
    "MemoryDeadLetterStore",
    "RetryOutcome",
    "SQLiteDeadLetterStore",
    "aretry",
    "aretry_dead_letters",
    "dead_letter_store_from",
    "is_record_fault",
    "retry",
    "retry_dead_letters",
    "sort_out",
]


def dead_letter_store_from(spec: str | os.PathLike[str] | DeadLetterStore | None) -> DeadLetterStore:
    """The store a ``dead_letter`` option names: ``None``/``memory://``, ``sqlite:///path.db``, a path, or a store."""
    if spec is None:
        return MemoryDeadLetterStore()
    if isinstance(spec, DeadLetterStore):
        return spec
    if isinstance(spec, os.PathLike):
        return SQLiteDeadLetterStore(spec)
    if not isinstance(spec, str):
        raise ConfigurationError(f"dead_letter must be a URL, a path or a DeadLetterStore, not {type(spec).__name__}")
    if "://" not in spec:
        return SQLiteDeadLetterStore(spec)
    store = registry.dead_letter_stores.from_url(spec)
    if not isinstance(store, DeadLetterStore):
        raise ConfigurationError(f"the dead-letter store factory for {redact_url(spec)!r} returned "
                                 f"{type(store).__name__}, not a DeadLetterStore")
    return store


def retry_dead_letters(store: DeadLetterStore, pipeline: EmbeddingPipeline, ids: Sequence[str] | None = None, *,
                       secrets: Iterable[str | None] = ()) -> list[tuple[DeadLetter, list[float]]]:
    """Re-embed stored letters (all, or ``ids``); return ``(letter, vector)`` for each success (see :func:`retry`)."""
    return retry(store, pipeline, ids, secrets=secrets).recovered


async def aretry_dead_letters(store: DeadLetterStore, pipeline: EmbeddingPipeline,
                              ids: Sequence[str] | None = None, *,
                              secrets: Iterable[str | None] = ()) -> list[tuple[DeadLetter, list[float]]]:
    """Async twin of :func:`retry_dead_letters`."""
    return (await aretry(store, pipeline, ids, secrets=secrets)).recovered
