"""Dead letters: inputs that failed to embed for good, kept with their reason so they can be retried.

A run that embeds with ``errors="collect"`` finishes whatever some inputs do; the inputs
that failed (after retries) become :class:`DeadLetter` records in a store instead of
being lost. :func:`retry_dead_letters` re-embeds them later and hands back the ones that
now succeed.

Stores are chosen by URL, like caches: ``memory://`` (this process only, the default) or
``sqlite:///relative.db`` / ``sqlite:////absolute.db`` (a plain path also names a SQLite
file). A SQLite store is safe for several processes at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import sqlite3
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from embedpipe.errors import ConfigurationError

if TYPE_CHECKING:
    from embedpipe.pipeline import EmbeddingPipeline, EmbeddingResult

__all__ = [
    "DeadLetter",
    "DeadLetterStore",
    "MemoryDeadLetterStore",
    "SQLiteDeadLetterStore",
    "aretry_dead_letters",
    "dead_letter_store_from",
    "redact",
    "retry_dead_letters",
]


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


# API keys must never reach a store: error messages sometimes quote them.
_SECRET_PATTERNS = (
    (re.compile(r"sk-[A-Za-z0-9_\-*]{8,}"), "sk-***"),
    (re.compile(r"(?i)(bearer\s+)[A-Za-z0-9._~+/=\-]+"), r"\1***"),
    (re.compile(r"(?i)((?:api[_-]?key|access[_-]?token|secret|password)[\"']?\s*[=:]\s*[\"']?)[^\s\"'&,;]+"),
     r"\1***"),
)


def redact(text: str, secrets: Iterable[str | None] = ()) -> str:
    """``text`` with the given ``secrets`` and anything shaped like an API key replaced by ``***``."""
    for secret in secrets:
        if secret and len(secret) >= 4:
            text = text.replace(secret, "***")
    for pattern, repl in _SECRET_PATTERNS:
        text = pattern.sub(repl, text)
    return text


class DeadLetterStore:
    """Base class of dead-letter stores. Override ``add``, ``get``, ``all``, ``remove`` and ``clear``.

    ``add`` is an upsert: a letter whose ``id`` is already stored replaces it and adds
    to its ``attempts``. Reasons are passed through :func:`redact` on the way in.
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

    @staticmethod
    def _clean(letter: DeadLetter) -> DeadLetter:
        return replace(letter, reason=redact(letter.reason), metadata=dict(letter.metadata))


class MemoryDeadLetterStore(DeadLetterStore):
    """Letters in a dict (``memory://``). A pickled copy carries its letters; the copy's additions stay there."""

    non_blocking = True

    def __init__(self) -> None:
        self._letters: dict[str, DeadLetter] = {}
        self._lock = threading.Lock()

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


#: the table both this store and the jobs state (which writes letters in its own
#: transactions, atomically with record status) keep dead letters in
DEAD_LETTER_SCHEMA = """
CREATE TABLE IF NOT EXISTS dead_letters (
    id TEXT PRIMARY KEY,
    ref_id TEXT,
    text TEXT NOT NULL,
    metadata TEXT NOT NULL,
    payload TEXT,
    reason TEXT NOT NULL,
    attempts INTEGER NOT NULL,
    time REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS dead_letters_ref ON dead_letters(ref_id);
"""
DEAD_LETTER_COLUMNS = "id, ref_id, text, metadata, payload, reason, attempts, time"
_SQL_VARS = 900  # below SQLite's historical 999 bound-parameter limit


class SQLiteDeadLetterStore(DeadLetterStore):
    """Letters in one SQLite file (``sqlite:///relative.db`` or ``sqlite:////absolute.db``); WAL, multi-process safe."""

    def __init__(self, path: str | os.PathLike[str], *, timeout: float = 30.0) -> None:
        self.path = Path(path).expanduser()
        self.timeout = timeout
        self._open()

    def _open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._conn: sqlite3.Connection | None = sqlite3.connect(
            self.path, timeout=self.timeout, isolation_level=None, check_same_thread=False)
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute(f"PRAGMA busy_timeout={int(self.timeout * 1000)}")
        self._conn.executescript(DEAD_LETTER_SCHEMA)

    def _db(self) -> sqlite3.Connection:
        if self._conn is None:
            raise RuntimeError(f"dead-letter store {self.path} is closed")
        return self._conn

    @staticmethod
    def _row(letter: DeadLetter) -> tuple[Any, ...]:
        return (letter.id, letter.ref_id, letter.text, json.dumps(dict(letter.metadata), sort_keys=True, default=str),
                letter.payload, letter.reason, letter.attempts, letter.time)

    @staticmethod
    def _letter(row: Sequence[Any]) -> DeadLetter:
        return DeadLetter(id=row[0], ref_id=row[1], text=row[2], metadata=json.loads(row[3]), payload=row[4],
                          reason=row[5], attempts=int(row[6]), time=float(row[7]))

    def add(self, letters: Sequence[DeadLetter]) -> None:
        if not letters:
            return
        rows = [self._row(self._clean(letter)) for letter in letters]
        with self._lock:
            db = self._db()
            # BEGIN IMMEDIATE takes the write lock up front, so two processes never deadlock upgrading.
            db.execute("BEGIN IMMEDIATE")
            try:
                db.executemany(
                    f"INSERT INTO dead_letters({DEAD_LETTER_COLUMNS}) VALUES (?,?,?,?,?,?,?,?) "
                    "ON CONFLICT(id) DO UPDATE SET "
                    "ref_id=excluded.ref_id, text=excluded.text, metadata=excluded.metadata, "
                    "payload=excluded.payload, reason=excluded.reason, "
                    "attempts=dead_letters.attempts + excluded.attempts, time=excluded.time", rows)
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")

    def get(self, ids: Sequence[str]) -> list[DeadLetter]:
        found: dict[str, DeadLetter] = {}
        ids = list(ids)
        with self._lock:
            for start in range(0, len(ids), _SQL_VARS):
                chunk = ids[start:start + _SQL_VARS]
                marks = ",".join("?" * len(chunk))
                for row in self._db().execute(
                        f"SELECT {DEAD_LETTER_COLUMNS} FROM dead_letters WHERE id IN ({marks})", chunk):
                    found[row[0]] = self._letter(row)
        return [found[i] for i in ids if i in found]

    def all(self) -> list[DeadLetter]:
        with self._lock:
            rows = self._db().execute(f"SELECT {DEAD_LETTER_COLUMNS} FROM dead_letters ORDER BY time, id").fetchall()
        return [self._letter(r) for r in rows]

    def remove(self, ids: Sequence[str]) -> None:
        ids = list(ids)
        with self._lock:
            for start in range(0, len(ids), _SQL_VARS):
                chunk = ids[start:start + _SQL_VARS]
                self._db().execute(f"DELETE FROM dead_letters WHERE id IN ({','.join('?' * len(chunk))})", chunk)

    def clear(self) -> None:
        with self._lock:
            self._db().execute("DELETE FROM dead_letters")

    def __len__(self) -> int:
        with self._lock:
            return int(self._db().execute("SELECT count(*) FROM dead_letters").fetchone()[0])

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()

    def __getstate__(self) -> dict[str, object]:
        return {"path": self.path, "timeout": self.timeout}

    def __setstate__(self, state: dict[str, object]) -> None:
        self.__dict__.update(state)
        self._open()

    def __repr__(self) -> str:
        return f"SQLiteDeadLetterStore({str(self.path)!r})"


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
    parts = urlsplit(spec)
    scheme = parts.scheme.lower()
    if scheme == "memory":
        return MemoryDeadLetterStore()
    if scheme == "sqlite":
        # SQLAlchemy's convention, as for caches: sqlite:///rel.db is relative, sqlite:////abs.db absolute.
        path = parts.path[1:] if parts.path.startswith("/") else parts.path
        if parts.netloc or not path:
            raise ConfigurationError(f"{spec!r}: use sqlite:///relative.db or sqlite:////absolute.db")
        return SQLiteDeadLetterStore(path)
    raise ConfigurationError(f"unknown dead-letter URL scheme {scheme!r} in {spec!r}; use memory:// or sqlite:///path.db")


# -- retry ---------------------------------------------------------------------------------------
def _sort_out(letters: Sequence[DeadLetter], result: EmbeddingResult,
              secrets: Iterable[str | None]) -> tuple[list[tuple[DeadLetter, list[float]]], list[DeadLetter]]:
    recovered: list[tuple[DeadLetter, list[float]]] = []
    failed: list[DeadLetter] = []
    now = time.time()
    secrets = list(secrets)
    for i, letter in enumerate(letters):
        vector = result[i]
        if vector is None:
            reason = redact(str(result.failures.get(i, "not embedded")), secrets)
            failed.append(replace(letter, reason=reason, attempts=1, time=now))
        else:
            recovered.append((letter, vector))
    return recovered, failed


def retry_dead_letters(store: DeadLetterStore, pipeline: EmbeddingPipeline, ids: Sequence[str] | None = None, *,
                       secrets: Iterable[str | None] = ()) -> list[tuple[DeadLetter, list[float]]]:
    """Re-embed stored letters (all, or ``ids``); return ``(letter, vector)`` for each success.

    Successes leave the store; failures stay, with the new reason and one more attempt.
    The caller stores the vectors (the store keeps only what is needed to try again).
    """
    letters = store.all() if ids is None else store.get(ids)
    if not letters:
        return []
    result = pipeline.embed([d.text for d in letters], errors="collect")
    recovered, failed = _sort_out(letters, result, secrets)
    store.remove([d.id for d, _ in recovered])
    store.add(failed)
    return recovered


async def aretry_dead_letters(store: DeadLetterStore, pipeline: EmbeddingPipeline,
                              ids: Sequence[str] | None = None, *,
                              secrets: Iterable[str | None] = ()) -> list[tuple[DeadLetter, list[float]]]:
    """Async twin of :func:`retry_dead_letters`."""
    letters = await store.aall() if ids is None else await store.aget(ids)
    if not letters:
        return []
    result = await pipeline.aembed([d.text for d in letters], errors="collect")
    recovered, failed = _sort_out(letters, result, secrets)
    await store.aremove([d.id for d, _ in recovered])
    await store.aadd(failed)
    return recovered
