"""SQLite file cache: WAL, safe for several processes, TTL and LRU size limit."""

from __future__ import annotations

import contextlib
import os
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

from embedpipe import _sqlite
from embedpipe._urls import URL
from embedpipe.cache.base import CacheBackend, CacheStats, url_options
from embedpipe.owners import dead_here

_SCHEMA = """
CREATE TABLE IF NOT EXISTS entries (
    key TEXT PRIMARY KEY,
    value BLOB NOT NULL,
    created REAL NOT NULL,
    accessed REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS entries_accessed ON entries(accessed);
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
INSERT OR IGNORE INTO meta VALUES ('bytes', 0), ('entries', 0);
-- Short claims: which process is embedding a key right now (single-flight across processes).
CREATE TABLE IF NOT EXISTS claims (key TEXT PRIMARY KEY, owner TEXT NOT NULL, expires REAL NOT NULL);
-- Triggers keep the size current inside each writer's own transaction, so a size
-- check is one row read even with many processes writing, never a full scan.
CREATE TRIGGER IF NOT EXISTS entries_ins AFTER INSERT ON entries BEGIN
    UPDATE meta SET value = value + length(NEW.value) + length(NEW.key) WHERE name = 'bytes';
    UPDATE meta SET value = value + 1 WHERE name = 'entries';
END;
CREATE TRIGGER IF NOT EXISTS entries_del AFTER DELETE ON entries BEGIN
    UPDATE meta SET value = value - length(OLD.value) - length(OLD.key) WHERE name = 'bytes';
    UPDATE meta SET value = value - 1 WHERE name = 'entries';
END;
CREATE TRIGGER IF NOT EXISTS entries_upd AFTER UPDATE OF value ON entries BEGIN
    UPDATE meta SET value = value + length(NEW.value) - length(OLD.value) WHERE name = 'bytes';
END;
"""

# Recency of hits is buffered and written in batches: a cache hit must stay a read,
# never a write transaction that serialises readers across processes.
_TOUCH_BATCH = 2000
_TOUCH_SECONDS = 30.0
_SQL_VARS = 900  # below SQLite's historical 999 bound-parameter limit


class SQLiteCache(CacheBackend):
    """A cache in one SQLite file (``sqlite:///relative.db`` or ``sqlite:////absolute.db``)."""

    library_errors = (sqlite3.Error, OSError)

    scheme = "sqlite"

    def __init__(self, path: str | os.PathLike[str], *, ttl: float | None = None,
                 max_bytes: int | None = None, namespace: str | None = None,
                 timeout: float = 30.0) -> None:
        super().__init__()
        self.path = Path(path).expanduser()
        self.ttl = ttl
        self.max_bytes = max_bytes
        self.namespace = namespace
        self.timeout = timeout
        self._init()

    @classmethod
    def from_url(cls, url: URL) -> SQLiteCache:
        """The cache ``sqlite:///relative.db`` or ``sqlite:////absolute.db`` names (options: ttl, max_bytes...)."""
        opts = url_options(url, ("ttl", "max_bytes", "namespace", "timeout"))
        return cls(url.file_path("SQLite cache"), **opts)

    def _init(self) -> None:
        self._local = threading.local()
        self._conns: list[sqlite3.Connection] = []
        self._lock = threading.Lock()
        self._touched: dict[str, float] = {}
        self._last_flush = time.monotonic()
        self._closed = False
        self._write(lambda c: c.executescript(_SCHEMA), script=True)

    def _conn(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            if self._closed:
                raise RuntimeError(f"SQLite cache {self.path} is closed")
            # WAL is a property of the file: the first connection sets it for all.
            conn = _sqlite.connect(self.path, timeout=self.timeout, wal=not self._conns)
            self._local.conn = conn
            with self._lock:
                self._conns.append(conn)
        return conn

    def _write(self, fn: object, script: bool = False) -> None:
        conn = self._conn()
        if script:
            with _sqlite.mapped_errors(self.path, self.timeout):
                fn(conn)  # type: ignore[operator]  # executescript manages its own transaction
            return
        with _sqlite.transaction(conn, self.path, self.timeout):
            fn(conn)  # type: ignore[operator]

    def get_many(self, keys: Sequence[str]) -> list[bytes | None]:
        if not keys:
            return []
        conn = self._conn()
        found: dict[str, bytes] = {}
        cutoff = time.time() - self.ttl if self.ttl else None
        unique = list(dict.fromkeys(keys))
        for start in range(0, len(unique), _SQL_VARS):
            chunk = unique[start:start + _SQL_VARS]
            marks = ",".join("?" * len(chunk))
            if cutoff is None:
                rows = conn.execute(f"SELECT key, value FROM entries WHERE key IN ({marks})", chunk)
            else:
                rows = conn.execute(
                    f"SELECT key, value FROM entries WHERE key IN ({marks}) AND created > ?", (*chunk, cutoff))
            found.update(rows)
        out = [found.get(k) for k in keys]
        self._count(out)
        if found and self.max_bytes is not None:
            self._touch(found)
        return out

    def _touch(self, keys: object) -> None:
        now = time.time()
        with self._lock:
            for key in keys:  # type: ignore[attr-defined]
                self._touched[key] = now
            due = (len(self._touched) >= _TOUCH_BATCH
                   or time.monotonic() - self._last_flush > _TOUCH_SECONDS)
        if due:
            self._flush_touches()

    def _pop_touches(self) -> list[tuple[float, str]]:
        with self._lock:
            pending = [(t, k) for k, t in self._touched.items()]
            self._touched.clear()
            self._last_flush = time.monotonic()
        return pending

    def _flush_touches(self) -> None:
        pending = self._pop_touches()
        if pending:
            self._write(lambda c: c.executemany("UPDATE entries SET accessed=? WHERE key=?", pending))

    def set_many(self, items: Sequence[tuple[str, bytes]]) -> None:
        if not items:
            return
        now = time.time()
        rows = [(k, sqlite3.Binary(v), now, now) for k, v in items]
        pending = self._pop_touches()

        def write(c: sqlite3.Connection) -> None:
            c.executemany(
                "INSERT INTO entries(key, value, created, accessed) VALUES (?,?,?,?) "
                "ON CONFLICT(key) DO UPDATE SET value=excluded.value, created=excluded.created, "
                "accessed=excluded.accessed", rows)
            if pending:
                c.executemany("UPDATE entries SET accessed=? WHERE key=?", pending)
            if self.max_bytes is not None:
                self._evict(c)

        self._write(write)

    def _evict(self, c: sqlite3.Connection) -> int:
        assert self.max_bytes is not None
        removed = 0
        while True:
            total, count = self._size(c)
            if total <= self.max_bytes or count == 0:
                return removed
            avg = max(1, total // count)
            # Evict down to 90% so that a full cache does not evict on every write.
            n = max(1, (total - int(self.max_bytes * 0.9)) // avg)
            c.execute("DELETE FROM entries WHERE key IN "
                      "(SELECT key FROM entries ORDER BY accessed LIMIT ?)", (n,))
            removed += n

    @staticmethod
    def _size(c: sqlite3.Connection) -> tuple[int, int]:
        meta = dict(c.execute("SELECT name, value FROM meta"))
        return int(meta.get("bytes", 0)), int(meta.get("entries", 0))

    def delete(self, keys: Sequence[str]) -> None:
        ks = list(keys)

        def write(c: sqlite3.Connection) -> None:
            for start in range(0, len(ks), _SQL_VARS):
                chunk = ks[start:start + _SQL_VARS]
                c.execute(f"DELETE FROM entries WHERE key IN ({','.join('?' * len(chunk))})", chunk)

        if ks:
            self._write(write)

    supports_claims = True

    def claim(self, keys: Sequence[str], owner: str, ttl: float) -> list[bool]:
        if not keys:
            return []
        now = time.time()
        held: dict[str, str] = {}

        def write(c: sqlite3.Connection) -> None:
            for start in range(0, len(keys), 400):
                part = list(keys[start:start + 400])
                marks = ",".join("?" * len(part))
                c.execute(f"DELETE FROM claims WHERE key IN ({marks}) AND expires < ?", [*part, now])
                c.executemany("INSERT OR IGNORE INTO claims VALUES (?, ?, ?)", [(k, owner, now + ttl) for k in part])
                rows = c.execute(f"SELECT key, owner FROM claims WHERE key IN ({marks})", part).fetchall()
                # A holder on this host whose process is gone embeds nothing: take its claim now.
                dead = {o for _, o in rows if o != owner and dead_here(o)}
                if dead:
                    c.executemany("UPDATE claims SET owner = ?, expires = ? WHERE key = ? AND owner = ?",
                                  [(owner, now + ttl, k, o) for k, o in rows if o in dead])
                    rows = c.execute(f"SELECT key, owner FROM claims WHERE key IN ({marks})", part).fetchall()
                held.update(rows)

        self._write(write)
        return [held.get(k) == owner for k in keys]

    def release(self, keys: Sequence[str], owner: str) -> None:
        if not keys:
            return

        def write(c: sqlite3.Connection) -> None:
            c.executemany("DELETE FROM claims WHERE key = ? AND owner = ?", [(k, owner) for k in keys])

        self._write(write)

    def yield_keys(self, prefix: str | None = None) -> Iterator[str]:
        conn = self._conn()
        last = ""
        # Keyset pagination: no cursor stays open across yields, so writers never wait on us.
        while True:
            if prefix:
                rows = conn.execute("SELECT key FROM entries WHERE key > ? AND substr(key, 1, ?) = ? "
                                    "ORDER BY key LIMIT 1000", (last, len(prefix), prefix)).fetchall()
            else:
                rows = conn.execute("SELECT key FROM entries WHERE key > ? ORDER BY key LIMIT 1000",
                                    (last,)).fetchall()
            if not rows:
                return
            for (key,) in rows:
                yield key
            last = rows[-1][0]

    def clear(self) -> None:
        self._pop_touches()
        self._write(lambda c: c.execute("DELETE FROM entries"))

    def prune(self) -> int:
        removed = 0
        self._flush_touches()

        def write(c: sqlite3.Connection) -> None:
            nonlocal removed
            if self.ttl:
                removed += c.execute("DELETE FROM entries WHERE created <= ?",
                                     (time.time() - self.ttl,)).rowcount
            if self.max_bytes is not None:
                removed += self._evict(c)

        self._write(write)
        if removed:
            # Deleting rows leaves free pages in the file: give them back to the disk. VACUUM needs the
            # database to itself; if another process is using it, the space is reused by later writes instead.
            with contextlib.suppress(sqlite3.OperationalError):
                conn = self._conn()
                conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
                conn.execute("VACUUM")
                conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        return removed

    def stats(self) -> CacheStats:
        total, count = self._size(self._conn())
        return CacheStats("sqlite", count, total, self._hits, self._misses, self._errors)

    def file_size(self) -> int:
        """Bytes on disk: the database file plus its WAL."""
        return sum(p.stat().st_size for p in (self.path, Path(f"{self.path}-wal")) if p.exists())

    def close(self) -> None:
        if self._closed:
            return
        with contextlib.suppress(sqlite3.Error):
            self._flush_touches()
        self._closed = True
        with self._lock:
            conns, self._conns = self._conns, []
        for conn in conns:
            _sqlite.close(conn)
        self._local = threading.local()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()

    def __getstate__(self) -> dict[str, object]:
        return {"path": self.path, "ttl": self.ttl, "max_bytes": self.max_bytes,
                "namespace": self.namespace, "timeout": self.timeout,
                "_hits": 0, "_misses": 0, "_errors": 0}

    def __setstate__(self, state: dict[str, object]) -> None:
        self.__dict__.update(state)
        self._init()
