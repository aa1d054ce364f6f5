"""SQLite files shared by several processes: WAL, ``BEGIN IMMEDIATE`` write transactions, a busy timeout.

The cache, the dead-letter store and the job state all open their files here, so they
agree on how SQLite is used:

- WAL lets readers go on while one process writes;
- every write is a ``BEGIN IMMEDIATE`` transaction, which takes the write lock up front:
  two writers that both began reading can never deadlock upgrading their locks, and
  ``busy_timeout`` makes the loser wait instead of failing at once;
- errors a user can act on (a full disk, a lock held past the timeout) become
  :class:`SQLiteStorageError` naming the file, still an :class:`sqlite3.OperationalError`
  for code that catches that.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
from collections.abc import Iterator
from pathlib import Path

from embedpipe.errors import EmbedPipeError

__all__ = ["SQLiteStorageError", "close", "connect", "mapped_errors", "transaction"]

_MEMORY = ":memory:"
# SQLite's result codes (sqlite.org/rescode.html); sqlite3 names them only from Python 3.11.
_SQLITE_BUSY = 5
_SQLITE_FULL = 13


class SQLiteStorageError(sqlite3.OperationalError, EmbedPipeError):
    """A SQLite file cannot be written (disk full, locked past the timeout); the message names the file."""

    def __init__(self, message: str, path: str | os.PathLike[str] | None = None) -> None:
        super().__init__(message)
        self.path = None if path is None else Path(path)


def connect(path: str | os.PathLike[str], *, timeout: float = 30.0, wal: bool = True,
            synchronous: str | None = "NORMAL", create: bool = True) -> sqlite3.Connection:
    """A connection in autocommit mode (transactions are explicit, see :func:`transaction`), usable from any thread.

    ``wal`` switches the file to WAL (persistent, so readers need not); ``synchronous``
    ``"NORMAL"`` in WAL mode survives a killed process, and a power cut can lose only the
    last commits. ``create`` makes the parent folder.
    """
    memory = str(path) == _MEMORY
    if create and not memory:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
    with mapped_errors(path, timeout):
        conn = sqlite3.connect(path, timeout=timeout, isolation_level=None, check_same_thread=False)
        try:
            conn.execute(f"PRAGMA busy_timeout={int(timeout * 1000)}")
            if wal and not memory:
                conn.execute("PRAGMA journal_mode=WAL")
            if synchronous is not None:
                conn.execute(f"PRAGMA synchronous={synchronous}")
        except BaseException:
            close(conn)
            raise
    return conn


@contextlib.contextmanager
def transaction(conn: sqlite3.Connection, path: str | os.PathLike[str] | None = None,
                timeout: float | None = None) -> Iterator[sqlite3.Connection]:
    """One write transaction (``BEGIN IMMEDIATE``): all of it commits, or none of it."""
    with mapped_errors(path, timeout):
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield conn
        except BaseException:
            with contextlib.suppress(sqlite3.Error):  # a failed COMMIT may have rolled back already
                conn.execute("ROLLBACK")
            raise
        try:
            conn.execute("COMMIT")
        except BaseException:
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
            raise


def close(conn: sqlite3.Connection | None) -> None:
    """Close ``conn``, ignoring errors (a connection closed twice, a database gone): safe in ``__del__``."""
    if conn is not None:
        with contextlib.suppress(sqlite3.Error):
            conn.close()


@contextlib.contextmanager
def mapped_errors(path: str | os.PathLike[str] | None, timeout: float | None = None) -> Iterator[None]:
    """Turn the SQLite errors a user can act on into :class:`SQLiteStorageError` naming ``path``."""
    try:
        yield
    except SQLiteStorageError:
        raise
    except sqlite3.OperationalError as exc:
        mapped = _mapped(exc, path, timeout)
        if mapped is None:
            raise
        raise mapped from exc


def _mapped(exc: sqlite3.OperationalError, path: str | os.PathLike[str] | None,
            timeout: float | None) -> SQLiteStorageError | None:
    where = "an in-memory database" if path is None or str(path) == _MEMORY else str(path)
    text = str(exc).lower()
    # The primary code is the low byte of an extended one (SQLITE_BUSY_SNAPSHOT is BUSY | 2 << 8).
    code = (getattr(exc, "sqlite_errorcode", None) or 0) & 0xFF
    if "database or disk is full" in text or code == _SQLITE_FULL:
        return SQLiteStorageError(f"cannot write {where}: the disk is full (SQLite: {exc}); free space, or "
                                  "move the file elsewhere", path)
    if "database is locked" in text or code == _SQLITE_BUSY:
        waited = f" for {timeout:g}s" if timeout is not None else ""
        return SQLiteStorageError(f"{where} is locked: another process held its write lock{waited} "
                                  f"(SQLite: {exc}); retry, or raise the timeout", path)
    return None
