"""Former home of the dead-letter store, kept so imports of ``embedpipe.deadletter`` go on working.

Everything lives in :mod:`embedpipe.deadletters`; :func:`redact` in :mod:`embedpipe._urls`.
"""

from __future__ import annotations

from embedpipe._urls import redact
from embedpipe.deadletters import (
    DeadLetter,
    DeadLetterStore,
    MemoryDeadLetterStore,
    SQLiteDeadLetterStore,
    aretry_dead_letters,
    dead_letter_store_from,
    retry_dead_letters,
)
from embedpipe.deadletters.sqlite import DEAD_LETTER_COLUMNS, DEAD_LETTER_SCHEMA

__all__ = [
    "DEAD_LETTER_COLUMNS",
    "DEAD_LETTER_SCHEMA",
    "DeadLetter",
    "DeadLetterStore",
    "MemoryDeadLetterStore",
    "SQLiteDeadLetterStore",
    "aretry_dead_letters",
    "dead_letter_store_from",
    "redact",
    "retry_dead_letters",
]
