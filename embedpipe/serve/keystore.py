"""API keys of the service, kept as SHA-256 hashes in SQLite, Redis or PostgreSQL, chosen by URL.

>>> store = key_store_from("sqlite:///:memory:")
>>> key = store.add("team-a", rpm=600)
>>> store.lookup(key).name
'team-a'
>>> store.lookup("sk-wrong") is None
True

Only the hash of a key is stored; a lookup hashes the presented key, finds the record by its
hash and compares the two digests with :func:`hmac.compare_digest`. Each record carries the
key's own ``rpm``, ``tpm`` and ``budget_usd`` and what it has spent, which :meth:`KeyStore.spend`
adds to atomically in the store, so every worker and host sees one total.

URLs (:data:`embedpipe.registry.key_stores`): ``sqlite:///keys.db``, ``redis://host:6379/0``
(``?prefix=`` names the key space, default ``embedpipe:serve``), ``postgresql://user@host/db``
(psycopg 3; ``?table=`` default ``embedpipe_serve_keys``).
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import threading
import time
from dataclasses import dataclass
from typing import Any

from embedpipe import _sqlite
from embedpipe._urls import URL, parse_url, redact_url
from embedpipe.errors import ConfigurationError, EmbedPipeError

__all__ = ["KeyRecord", "KeyStore", "KeyStoreError", "PostgresKeyStore", "RedisKeyStore", "SQLiteKeyStore",
           "generate_key", "hash_key", "key_store_from"]

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,127}$")
_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")


class KeyStoreError(EmbedPipeError):
    """The key store could not be reached, or refused an operation (a duplicate name, an unknown key)."""


def hash_key(key: str) -> str:
    """The SHA-256 hex digest of an API key: what the store keeps instead of the key."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def generate_key() -> str:
    """A new random API key, ``ep-`` and 43 URL-safe characters (256 bits)."""
    return "ep-" + secrets.token_urlsafe(32)


@dataclass(frozen=True)
class KeyRecord:
    """One key: its name, the hash, its limits and what it has spent (never the key itself)."""

    name: str
    key_hash: str
    rpm: int | None = None
    tpm: int | None = None
    budget_usd: float | None = None
    spent_usd: float = 0.0
    created: float = 0.0
    revoked: bool = False

    @property
    def label(self) -> str:
        """The short hash prefix that names this key in metrics and logs."""
        return self.key_hash[:8]

    @property
    def remaining_usd(self) -> float | None:
        return None if self.budget_usd is None else max(0.0, self.budget_usd - self.spent_usd)


def _check(name: str, rpm: int | None, tpm: int | None, budget_usd: float | None) -> None:
    if not isinstance(name, str) or not _NAME.match(name):
        raise ConfigurationError(f"key name {name!r} must be 1-128 letters, digits or ._@- (starting with a letter "
                                 "or digit)")
    for what, value in (("rpm", rpm), ("tpm", tpm)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ConfigurationError(f"{what}={value!r} for key {name!r} must be a positive integer")
    if budget_usd is not None and not budget_usd >= 0:
        raise ConfigurationError(f"budget_usd={budget_usd!r} for key {name!r} must be >= 0")


class KeyStore:
    """Where the service's keys live. Subclasses override the five storage methods; the rest is shared."""

    def add(self, name: str, *, key: str | None = None, rpm: int | None = None, tpm: int | None = None,
            budget_usd: float | None = None) -> str:
        """Store a new key named ``name`` and return it (generated when ``key`` is ``None``)."""
        _check(name, rpm, tpm, budget_usd)
        if key is not None and len(key) < 16:
            raise ConfigurationError(f"the key for {name!r} is too short: use at least 16 characters, or let "
                                     "embedpipe generate one")
        key = key or generate_key()
        self._insert(KeyRecord(name, hash_key(key), rpm, tpm, budget_usd, 0.0, time.time()))
        return key

    def lookup(self, key: str) -> KeyRecord | None:
        """The live record of ``key``, or ``None`` when it is unknown or revoked."""
        digest = hash_key(key)
        record = self._by_hash(digest)
        if record is None or record.revoked or not hmac.compare_digest(record.key_hash, digest):
            return None
        return record

    def _insert(self, record: KeyRecord) -> None:
        raise NotImplementedError

    def _by_hash(self, key_hash: str) -> KeyRecord | None:
        raise NotImplementedError

    def list(self) -> list[KeyRecord]:
        """Every key, revoked ones included, by name."""
        raise NotImplementedError

    def revoke(self, name: str) -> None:
        """Refuse the key named ``name`` from now on; :class:`KeyStoreError` when there is none."""
        raise NotImplementedError

    def spend(self, key_hash: str, usd: float) -> float:
        """Add ``usd`` to what the key has spent, atomically; return the new total."""
        raise NotImplementedError

    def ping(self) -> None:
        """Raise :class:`KeyStoreError` unless the store answers (for ``/readyz``)."""
        self.list()

    def close(self) -> None:
        """Release connections."""


# ------------------------------------------------------------------ SQLite
_COLUMNS = "name, key_hash, rpm, tpm, budget_usd, spent_usd, created, revoked"


def _row(row: Any) -> KeyRecord:
    name, key_hash, rpm, tpm, budget, spent, created, revoked = row
    return KeyRecord(name, key_hash, rpm, tpm, budget, float(spent), float(created), bool(revoked))


class SQLiteKeyStore(KeyStore):
    """Keys in a SQLite file (one host; WAL lets several workers share it)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._conn = _sqlite.connect(path)
        self._lock = threading.Lock()
        with self._lock, _sqlite.transaction(self._conn):
            self._conn.execute(
                "CREATE TABLE IF NOT EXISTS keys (name TEXT PRIMARY KEY, key_hash TEXT NOT NULL UNIQUE, "
                "rpm INTEGER, tpm INTEGER, budget_usd REAL, spent_usd REAL NOT NULL DEFAULT 0, "
                "created REAL NOT NULL, revoked INTEGER NOT NULL DEFAULT 0)")

    @classmethod
    def from_url(cls, url: URL) -> SQLiteKeyStore:
        return cls(url.file_path("key store"))

    def _insert(self, record: KeyRecord) -> None:
        import sqlite3

        try:
            with self._lock, _sqlite.transaction(self._conn):
                self._conn.execute(f"INSERT INTO keys ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, 0)",
                                   (record.name, record.key_hash, record.rpm, record.tpm, record.budget_usd,
                                    record.spent_usd, record.created))
        except sqlite3.IntegrityError:
            raise KeyStoreError(f"a key named {record.name!r} already exists (revoke it first, or pick another "
                                "name)") from None

    def _by_hash(self, key_hash: str) -> KeyRecord | None:
        with self._lock:
            row = self._conn.execute(f"SELECT {_COLUMNS} FROM keys WHERE key_hash = ?", (key_hash,)).fetchone()
        return None if row is None else _row(row)

    def list(self) -> list[KeyRecord]:
        with self._lock:
            rows = self._conn.execute(f"SELECT {_COLUMNS} FROM keys ORDER BY name").fetchall()
        return [_row(r) for r in rows]

    def revoke(self, name: str) -> None:
        with self._lock, _sqlite.transaction(self._conn):
            done = self._conn.execute("UPDATE keys SET revoked = 1 WHERE name = ?", (name,)).rowcount
        if not done:
            raise KeyStoreError(f"no key named {name!r}")

    def spend(self, key_hash: str, usd: float) -> float:
        with self._lock, _sqlite.transaction(self._conn):
            row = self._conn.execute("UPDATE keys SET spent_usd = spent_usd + ? WHERE key_hash = ? "
                                     "RETURNING spent_usd", (usd, key_hash)).fetchone()
        if row is None:
            raise KeyStoreError("spend on an unknown key")
        return float(row[0])

    def close(self) -> None:
        _sqlite.close(self._conn)


# ------------------------------------------------------------------ Redis
class RedisKeyStore(KeyStore):
    """Keys in Redis: a hash per key under ``{prefix}:key:{hash}`` and a name index ``{prefix}:names``."""

    def __init__(self, url: str, *, prefix: str = "embedpipe:serve") -> None:
        try:
            import redis
        except ImportError as exc:
            raise ConfigurationError("a Redis key store needs redis-py: pip install 'embedpipe[redis]'") from exc
        self.url = url
        self.prefix = prefix
        self._errors: tuple[type[Exception], ...] = (redis.RedisError,)
        self._client = redis.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=5)

    @classmethod
    def from_url(cls, url: URL) -> RedisKeyStore:
        raw = url.raw
        prefix = url.options.get("prefix", "embedpipe:serve")
        if "prefix" in url.options:
            from urllib.parse import urlencode, urlsplit, urlunsplit

            parts = urlsplit(raw)
            rest = {k: v for k, v in url.options.items() if k != "prefix"}
            raw = urlunsplit((parts.scheme, parts.netloc, parts.path, urlencode(rest), parts.fragment))
        return cls(raw, prefix=prefix)

    def _call(self, fn: Any, *args: Any) -> Any:
        try:
            return fn(*args)
        except self._errors as exc:
            raise KeyStoreError(f"the key store at {redact_url(self.url)} failed: {exc}") from exc

    def _record(self, data: dict[bytes, bytes]) -> KeyRecord | None:
        if not data:
            return None
        d = {k.decode(): v.decode() for k, v in data.items()}

        def num(name: str, kind: Any) -> Any:
            return kind(d[name]) if d.get(name, "") != "" else None

        return KeyRecord(d["name"], d["key_hash"], num("rpm", int), num("tpm", int), num("budget_usd", float),
                         float(d.get("spent_usd", 0) or 0), float(d.get("created", 0) or 0), d.get("revoked") == "1")

    def _insert(self, record: KeyRecord) -> None:
        names = f"{self.prefix}:names"
        if not self._call(self._client.hsetnx, names, record.name, record.key_hash):
            raise KeyStoreError(f"a key named {record.name!r} already exists (revoke it first, or pick another name)")
        fields: dict[Any, Any] = {"name": record.name, "key_hash": record.key_hash, "rpm": record.rpm or "",
                  "tpm": record.tpm or "", "budget_usd": "" if record.budget_usd is None else record.budget_usd,
                  "spent_usd": 0, "created": record.created, "revoked": 0}
        key = f"{self.prefix}:key:{record.key_hash}"
        self._call(lambda: self._client.hset(key, mapping=fields))

    def _by_hash(self, key_hash: str) -> KeyRecord | None:
        return self._record(self._call(self._client.hgetall, f"{self.prefix}:key:{key_hash}"))

    def list(self) -> list[KeyRecord]:
        hashes = self._call(self._client.hgetall, f"{self.prefix}:names")
        records = [self._by_hash(h.decode()) for _, h in sorted(hashes.items())]
        return [r for r in records if r is not None]

    def revoke(self, name: str) -> None:
        digest = self._call(self._client.hget, f"{self.prefix}:names", name)
        if digest is None:
            raise KeyStoreError(f"no key named {name!r}")
        self._call(self._client.hset, f"{self.prefix}:key:{digest.decode()}", "revoked", 1)

    def spend(self, key_hash: str, usd: float) -> float:
        return float(self._call(self._client.hincrbyfloat, f"{self.prefix}:key:{key_hash}", "spent_usd", usd))

    def ping(self) -> None:
        self._call(self._client.ping)

    def close(self) -> None:
        self._client.close()


# ------------------------------------------------------------------ PostgreSQL
class PostgresKeyStore(KeyStore):
    """Keys in a PostgreSQL table (psycopg 3), for services on several hosts."""

    def __init__(self, dsn: str, *, table: str = "embedpipe_serve_keys") -> None:
        try:
            import psycopg
        except ImportError as exc:
            raise ConfigurationError("a PostgreSQL key store needs psycopg 3: pip install 'embedpipe[serve]'") \
                from exc
        if not _IDENT.match(table):
            raise ConfigurationError(f"table={table!r} is not a plain SQL identifier")
        self.dsn = dsn
        self.table = table
        self._psycopg = psycopg
        self._lock = threading.Lock()
        self._conn: Any = None
        self._execute(f"CREATE TABLE IF NOT EXISTS {table} (name TEXT PRIMARY KEY, key_hash TEXT NOT NULL UNIQUE, "
                      "rpm INTEGER, tpm INTEGER, budget_usd DOUBLE PRECISION, spent_usd DOUBLE PRECISION NOT NULL "
                      "DEFAULT 0, created DOUBLE PRECISION NOT NULL, revoked BOOLEAN NOT NULL DEFAULT FALSE)")

    @classmethod
    def from_url(cls, url: URL) -> PostgresKeyStore:
        from urllib.parse import urlencode, urlsplit, urlunsplit

        parts = urlsplit(url.raw)
        rest = {k: v for k, v in url.options.items() if k != "table"}
        scheme = "postgresql" if parts.scheme.startswith("postgres") else parts.scheme
        dsn = urlunsplit((scheme, parts.netloc, parts.path, urlencode(rest), ""))
        return cls(dsn, table=url.options.get("table", "embedpipe_serve_keys"))

    def _execute(self, sql: str, params: tuple[Any, ...] = (), fetch: str = "") -> Any:
        psycopg = self._psycopg
        with self._lock:
            try:
                if self._conn is None or self._conn.closed:
                    self._conn = psycopg.connect(self.dsn, autocommit=True, connect_timeout=5)
                cur = self._conn.execute(sql, params)
                if fetch == "one":
                    return cur.fetchone()
                if fetch == "all":
                    return cur.fetchall()
                return cur.rowcount
            except psycopg.errors.UniqueViolation:
                raise
            except psycopg.Error as exc:
                if self._conn is not None and self._conn.broken:
                    self._conn = None
                raise KeyStoreError(f"the key store at {redact_url(self.dsn)} failed: {exc}") from exc

    def _insert(self, record: KeyRecord) -> None:
        try:
            self._execute(f"INSERT INTO {self.table} ({_COLUMNS}) VALUES (%s, %s, %s, %s, %s, %s, %s, FALSE)",
                          (record.name, record.key_hash, record.rpm, record.tpm, record.budget_usd,
                           record.spent_usd, record.created))
        except self._psycopg.errors.UniqueViolation:
            raise KeyStoreError(f"a key named {record.name!r} already exists (revoke it first, or pick another "
                                "name)") from None

    def _by_hash(self, key_hash: str) -> KeyRecord | None:
        row = self._execute(f"SELECT {_COLUMNS} FROM {self.table} WHERE key_hash = %s", (key_hash,), "one")
        return None if row is None else _row(row)

    def list(self) -> list[KeyRecord]:
        return [_row(r) for r in self._execute(f"SELECT {_COLUMNS} FROM {self.table} ORDER BY name", (), "all")]

    def revoke(self, name: str) -> None:
        if not self._execute(f"UPDATE {self.table} SET revoked = TRUE WHERE name = %s", (name,)):
            raise KeyStoreError(f"no key named {name!r}")

    def spend(self, key_hash: str, usd: float) -> float:
        row = self._execute(f"UPDATE {self.table} SET spent_usd = spent_usd + %s WHERE key_hash = %s "
                            "RETURNING spent_usd", (usd, key_hash), "one")
        if row is None:
            raise KeyStoreError("spend on an unknown key")
        return float(row[0])

    def ping(self) -> None:
        self._execute("SELECT 1", (), "one")

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None


def key_store_from(url: str) -> KeyStore:
    """The key store ``url`` names (the schemes of :data:`embedpipe.registry.key_stores`)."""
    from embedpipe import registry

    parsed = parse_url(url, "key store")
    store = registry.key_stores.from_url(parsed)
    if not isinstance(store, KeyStore):
        raise ConfigurationError(f"the key store factory for {redact_url(url)!r} returned {type(store).__name__}")
    return store
