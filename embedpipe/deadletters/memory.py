"""Dead letters in a dict (``memory://``): this process only."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import replace

from embedpipe._urls import URL
from embedpipe.deadletters.store import DeadLetter, DeadLetterStore

__all__ = ["MemoryDeadLetterStore"]


class MemoryDeadLetterStore(DeadLetterStore):
    """Letters in a dict (``memory://``). A pickled copy carries its letters; the copy's additions stay there."""

    non_blocking = True

    def __init__(self) -> None:
        self._letters: dict[str, DeadLetter] = {}
        self._lock = threading.Lock()

    @classmethod
    def from_url(cls, url: URL) -> MemoryDeadLetterStore:
        """The store ``memory://`` names (it takes no options)."""
        url.check_options((), "dead-letter store")
        return cls()

    def add(self, letters: Sequence[DeadLetter]) -> None:
        with self._lock:
            for letter in letters:
                old = self._letters.pop(letter.id, None)
                attempts = letter.attempts + (old.attempts if old else 0)
                self._letters[letter.id] = replace(self._clean(letter), attempts=attempts)

    def get(self, ids: Sequence[str]) -> list[DeadLetter]:
        with self._lock:
            return [self._letters[i] for i in ids if i in self._letters]

    def all(self) -> list[DeadLetter]:
        with self._lock:
            return sorted(self._letters.values(), key=lambda d: d.time)

    def remove(self, ids: Sequence[str]) -> None:
        with self._lock:
            for i in ids:
                self._letters.pop(i, None)

    def clear(self) -> None:
        with self._lock:
            self._letters.clear()

    def __len__(self) -> int:
        return len(self._letters)

    def __getstate__(self) -> dict[str, object]:
        return {"_letters": dict(self._letters)}

    def __setstate__(self, state: dict[str, object]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return "MemoryDeadLetterStore()"
