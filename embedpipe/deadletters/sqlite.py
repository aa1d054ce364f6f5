"""Dead letters in one SQLite file (``sqlite:///relative.db``, ``sqlite:////absolute.db``), safe for several processes.

The table is shared: a job keeps its queue in its state file, in this same table and
shape, written in the job's own transactions (atomically with its records).
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from embedpipe import _sqlite
from embedpipe._urls import URL
from embedpipe.deadletters.store import DeadLetter, DeadLetterStore
from embedpipe.errors import ConfigurationError

if TYPE_CHECKING:
    from embedpipe.deadletters.retry import RetryOutcome

__all__ = ["DEAD_LETTER_COLUMNS", "DEAD_LETTER_SCHEMA", "SQLiteDeadLetterStore", "letter_from_row", "letter_row",
           "select_letters"]

#: the table this store and a job's state keep dead letters in
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
_UPSERT = (f"INSERT INTO dead_letters({DEAD_LETTER_COLUMNS}) VALUES (?,?,?,?,?,?,?,?) "
           "ON CONFLICT(id) DO UPDATE SET "
           "ref_id=excluded.ref_id, text=excluded.text, metadata=excluded.metadata, "
           "payload=excluded.payload, reason=excluded.reason, "
           "attempts=dead_letters.attempts + excluded.attempts, time=excluded.time")
_SQL_VARS = 900  # below SQLite's historical 999 bound-parameter limit


def letter_row(letter: DeadLetter) -> tuple[Any, ...]:
    """The ``dead_letters`` row of ``letter``, in :data:`DEAD_LETTER_COLUMNS` order."""
    return (letter.id, letter.ref_id, letter.text, json.dumps(dict(letter.metadata), sort_keys=True, default=str),
            letter.payload, letter.reason, letter.attempts, letter.time)


def letter_from_row(row: Sequence[Any]) -> DeadLetter:
    """The letter a ``dead_letters`` row (in :data:`DEAD_LETTER_COLUMNS` order) holds."""
    return DeadLetter(id=row[0], ref_id=row[1], text=row[2], metadata=json.loads(row[3]), payload=row[4],
                      reason=row[5], attempts=int(row[6]), time=float(row[7]))


def _chunks(ids: Sequence[str]) -> Iterator[Sequence[str]]:
    for start in range(0, len(ids), _SQL_VARS):
        yield ids[start:start + _SQL_VARS]


def select_letters(db: sqlite3.Connection, ids: Sequence[str] | None = None) -> list[DeadLetter]:
    """The letters in ``db`` (all, or those among ``ids``), oldest first."""
    order = "ORDER BY time, id"
    if ids is None:
        rows = db.execute(f"SELECT {DEAD_LETTER_COLUMNS} FROM dead_letters {order}").fetchall()
    else:
        rows = []
        for chunk in _chunks(list(ids)):
            rows += db.execute(f"SELECT {DEAD_LETTER_COLUMNS} FROM dead_letters WHERE id IN "
                               f"({','.join('?' * len(chunk))}) {order}", chunk).fetchall()
        rows.sort(key=lambda r: (r[7], r[0]))
    return [letter_from_row(r) for r in rows]


class SQLiteDeadLetterStore(DeadLetterStore):
    """Letters in one SQLite file (``sqlite:///relative.db`` or ``sqlite:////absolute.db``); WAL, multi-process safe."""

    def __init__(self, path: str | os.PathLike[str], *, timeout: float = 30.0) -> None:
        self.path = Path(path).expanduser()
        self.timeout = timeout
        self._open()

    @classmethod
    def from_url(cls, url: URL) -> SQLiteDeadLetterStore:
        """The store ``sqlite:///relative.db`` or ``sqlite:////absolute.db`` names (option: ``timeout`` in seconds)."""
        url.check_options(("timeout",), "dead-letter store")
        return cls(url.file_path("dead-letter store"), **_timeout(url))

    def _open(self) -> None:
        self._lock = threading.Lock()
        self._conn: sqlite3.Connection | None = _sqlite.connect(self.path, timeout=self.timeout, synchronous=None)
        with _sqlite.mapped_errors(self.path, self.timeout):
            self._conn.executescript(DEAD_LETTER_SCHEMA)

    def _db(self) -> sqlite3.Connection:
        if self._conn is None:
            raise RuntimeError(f"dead-letter store {self.path} is closed")
        return self._conn

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        with self._lock, _sqlite.transaction(self._db(), self.path, self.timeout) as db:
            yield db

    def add(self, letters: Sequence[DeadLetter]) -> None:
        if letters:
            rows = [letter_row(self._clean(letter)) for letter in letters]
            with self._transaction() as db:
                db.executemany(_UPSERT, rows)

    def get(self, ids: Sequence[str]) -> list[DeadLetter]:
        with self._lock:
            found = {d.id: d for d in select_letters(self._db(), list(ids))}
        return [found[i] for i in ids if i in found]

    def all(self) -> list[DeadLetter]:
        with self._lock:
            return select_letters(self._db())

    def remove(self, ids: Sequence[str]) -> None:
        with self._transaction() as db:
            for chunk in _chunks(list(ids)):
                db.execute(f"DELETE FROM dead_letters WHERE id IN ({','.join('?' * len(chunk))})", chunk)

    def clear(self) -> None:
        with self._transaction() as db:
            db.execute("DELETE FROM dead_letters")

    def settle(self, outcome: RetryOutcome) -> None:
        """Remove the recovered letters and update the failed ones in one transaction."""
        ids = [letter.id for letter, _ in outcome.recovered]
        rows = [letter_row(self._clean(letter)) for letter in outcome.failed]
        with self._transaction() as db:
            for chunk in _chunks(ids):
                db.execute(f"DELETE FROM dead_letters WHERE id IN ({','.join('?' * len(chunk))})", chunk)
            db.executemany(_UPSERT, rows)

    def __len__(self) -> int:
        with self._lock:
            return int(self._db().execute("SELECT count(*) FROM dead_letters").fetchone()[0])

    def close(self) -> None:
        with self._lock:
            _sqlite.close(self._conn)
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


def _timeout(url: URL) -> dict[str, float]:
    if "timeout" not in url.options:
        return {}
    try:
        value = float(url.options["timeout"])
    except ValueError:
        value = -1.0
    if value <= 0:
        raise ConfigurationError(f"timeout={url.options['timeout']!r} in {url} must be a positive number of seconds")
    return {"timeout": value}
