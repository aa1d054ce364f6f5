"""A job's durable state: one SQLite file beside the output (``OUT/_state.sqlite``) or where you say.

It holds, per record id, the content and metadata hashes last written, the status
(``done`` or ``dead``), failed attempts, where the live output row is (``loc``) and the
run generation that last read the record from the source (``seen``: records a finished
run did not see are gone from the source). The dead-letter queue lives in the same file,
in the table and shape :class:`embedpipe.deadletters.SQLiteDeadLetterStore` reads, and is
written in the same transaction as the records it concerns. It stores records, never API
keys: every reason passes through :func:`embedpipe._urls.redact` on the way in.

The job-store registry (:data:`embedpipe.registry.job_stores`) opens it by URL:
``sqlite:///relative/_state.sqlite`` or ``sqlite:////absolute/_state.sqlite``.
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np

from embedpipe import _sqlite, registry
from embedpipe._urls import URL, redact, redact_url
from embedpipe.deadletters import DeadLetter
from embedpipe.deadletters.sqlite import DEAD_LETTER_COLUMNS, DEAD_LETTER_SCHEMA, select_letters
from embedpipe.errors import ConfigurationError
from embedpipe.jobs.errors import DamagedOutputError, JobConflictError, JobLockedError
from embedpipe.jobs.records import Entry, Record, text_of
from embedpipe.owners import dead_here

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS records (
    id TEXT PRIMARY KEY,
    content_hash BLOB NOT NULL,
    meta_hash BLOB NOT NULL,
    status TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    loc,
    seen INTEGER NOT NULL,
    updated REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS records_loc ON records(loc);
CREATE INDEX IF NOT EXISTS records_seen ON records(seen);
CREATE TABLE IF NOT EXISTS pending_metadata (id TEXT PRIMARY KEY, metadata TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS chunks (
    chunk_id TEXT PRIMARY KEY,
    gen INTEGER NOT NULL,
    status TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    lease_owner TEXT,
    lease_until REAL,
    records INTEGER NOT NULL DEFAULT 0,
    updated REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS samples (
    id TEXT PRIMARY KEY,
    priority REAL NOT NULL,
    text TEXT NOT NULL,
    metadata TEXT NOT NULL,
    content_hash BLOB NOT NULL,
    vector BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS runs (
    gen INTEGER PRIMARY KEY,
    started REAL NOT NULL,
    finished REAL,
    status TEXT NOT NULL,
    records INTEGER NOT NULL DEFAULT 0,
    embedded INTEGER NOT NULL DEFAULT 0,
    cached INTEGER NOT NULL DEFAULT 0,
    tokens INTEGER NOT NULL DEFAULT 0,
    cost_usd REAL,
    dead INTEGER NOT NULL DEFAULT 0
);
""" + DEAD_LETTER_SCHEMA + """
-- The Batch API's bookkeeping (embedpipe.jobs.batch_api): each input file, its file and batch ids and
-- status, and the cache keys of each of its lines. New tables only: older files gain them on open.
CREATE TABLE IF NOT EXISTS batch_files (
    plan_id TEXT PRIMARY KEY,
    job_id TEXT NOT NULL,
    gen INTEGER NOT NULL,
    model TEXT NOT NULL,
    requests INTEGER NOT NULL,
    inputs INTEGER NOT NULL,
    tokens INTEGER NOT NULL,
    bytes INTEGER NOT NULL,
    state TEXT NOT NULL,
    file_id TEXT,
    batch_id TEXT,
    batch_status TEXT,
    output_file_id TEXT,
    error_file_id TEXT,
    completed INTEGER NOT NULL DEFAULT 0,
    failed INTEGER NOT NULL DEFAULT 0,
    cached INTEGER NOT NULL DEFAULT 0,
    created REAL NOT NULL,
    updated REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS batch_files_state ON batch_files(state);
CREATE TABLE IF NOT EXISTS batch_items (
    plan_id TEXT NOT NULL,
    custom_id TEXT NOT NULL,
    position INTEGER NOT NULL,
    key TEXT NOT NULL,
    tokens INTEGER NOT NULL,
    PRIMARY KEY (plan_id, custom_id, position)
);
CREATE INDEX IF NOT EXISTS batch_items_key ON batch_items(key);
"""
_SQL_VARS = 900  # below SQLite's historical 999 bound-parameter limit
#: the state file's layout. 1: before the job unit. 2 adds chunk states and leases, the read-back
#: sample, per-run counts and the chunk order of each record; a version-1 file migrates in place.
SCHEMA_VERSION = 2
_ADDED_COLUMNS = {
    "runs": {name: "INTEGER NOT NULL DEFAULT 0"
             for name in ("planned", "written", "unchanged", "metadata_updated", "deleted", "requests")},
    "records": {"seq": "INTEGER NOT NULL DEFAULT 0"},
}
#: per-run counters that chunk commits add to
RUN_COUNTERS = ("records", "written", "unchanged", "metadata_updated", "embedded", "cached", "tokens", "requests",
                "dead", "deleted")


def _damaged(path: Path, detail: str) -> DamagedOutputError:
    return DamagedOutputError(
        f"the job state {path} is damaged ({detail}); run `embedpipe repair --out {path.parent}` (or --state "
        f"{path}) to rebuild it from the output's readable parts", path)


def _check_integrity(db: sqlite3.Connection, path: Path) -> None:
    """``PRAGMA quick_check`` on an existing state file: a damaged one is refused, naming the repair command."""
    rows = db.execute("PRAGMA quick_check").fetchall()
    problems = [str(r[0]) for r in rows if str(r[0]).lower() != "ok"]
    if problems:
        raise _damaged(path, "; ".join(problems[:3]))


def _migrate(db: sqlite3.Connection) -> None:
    """Bring an older state file to :data:`SCHEMA_VERSION` (new tables come from the schema script)."""
    for table, columns in _ADDED_COLUMNS.items():
        have = {row[1] for row in db.execute(f"PRAGMA table_info({table})")}
        for name, decl in columns.items():
            if name not in have:
                db.execute(f"ALTER TABLE {table} ADD COLUMN {name} {decl}")
    db.execute("INSERT INTO meta(name, value) VALUES ('schema_version', ?) ON CONFLICT(name) DO UPDATE SET "
               "value=excluded.value", (str(SCHEMA_VERSION),))


@dataclass(frozen=True, slots=True)
class StoredRecord:
    """What the state knows of one record."""

    content_hash: bytes
    meta_hash: bytes
    status: str
    loc: Any


@dataclass(frozen=True, slots=True)
class Written:
    """A record whose row the sink has written, and where the row is."""

    entry: Entry
    loc: Any


@dataclass(frozen=True, slots=True)
class Failed:
    """A record that failed for good, with its reason."""

    entry: Entry
    reason: str


#: a read-back candidate: (priority, entry, vector); the lowest priorities form a uniform sample
Sample = tuple[float, Entry, Any]


@dataclass(frozen=True)
class RunStats:
    """One run's line in the history."""

    gen: int
    started: float
    finished: float | None
    status: str
    records: int
    embedded: int
    cached: int
    tokens: int
    cost_usd: float | None
    dead: int


def _chunks(items: Sequence[Any], size: int = _SQL_VARS) -> Iterator[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


class SQLiteJobStore:
    """A :class:`~embedpipe.jobs.JobStore` in one SQLite file (``OUT/_state.sqlite`` by default).

    ``readonly=True`` never creates or writes it (for estimates and listings); ``path=None``
    is an empty store in memory. Threads of one process may share it: write transactions
    are serialised, and :attr:`write_lock` lets a caller make a sink write and its commit
    one step.
    """

    def __init__(self, path: str | os.PathLike[str] | None, *, readonly: bool = False,
                 secrets: Iterable[str | None] = (), timeout: float = 30.0) -> None:
        self.path = Path(path) if path is not None else Path(":memory:")
        self.readonly = readonly
        self.secrets = [s for s in secrets if s]
        self._lock_file: IO[bytes] | None = None
        self.timeout = timeout
        self._mutex = threading.RLock()
        #: held by :func:`~embedpipe.jobs.process_chunk` around a sink write and its commit
        self.write_lock = threading.RLock()
        if readonly or path is None:
            if path is None or not self.path.exists():
                # An absent state is an empty one: an in-memory database with the schema.
                self._db = _sqlite.connect(":memory:", timeout=timeout, synchronous=None)
                self._db.executescript(_SCHEMA)
                _migrate(self._db)
                return
            # A plain connection that this object never writes through: "mode=ro" cannot open a
            # WAL database whose -shm file is gone.
            self._db = _sqlite.connect(self.path, timeout=timeout, wal=False, synchronous=None, create=False)
        else:
            # synchronous=NORMAL: a power cut can lose the last commits, which only makes a
            # re-run redo (from the cache) what the sink already holds.
            try:
                self._db = _sqlite.connect(self.path, timeout=timeout)
                _check_integrity(self._db, self.path)
                with _sqlite.mapped_errors(self.path, timeout):
                    self._db.executescript(_SCHEMA)
            except sqlite3.DatabaseError as exc:
                if isinstance(exc, sqlite3.OperationalError) and "locked" in str(exc):
                    raise
                raise _damaged(self.path, str(exc)) from exc
            with self.transaction() as db:
                _migrate(db)

    @classmethod
    def from_url(cls, url: URL, *, readonly: bool = False, secrets: Iterable[str | None] = ()) -> SQLiteJobStore:
        """The state ``sqlite:///relative/_state.sqlite`` or ``sqlite:////absolute/_state.sqlite`` names.

        Option: ``timeout`` (seconds to wait for another process's write lock, default 30).
        """
        url.check_options(("timeout",), "job store")
        try:
            timeout = float(url.options.get("timeout", 30.0))
        except ValueError:
            timeout = -1.0
        if timeout <= 0:
            raise ConfigurationError(f"timeout={url.options['timeout']!r} in {url} must be a positive number of "
                                     "seconds")
        return cls(url.file_path("job store"), readonly=readonly, secrets=secrets, timeout=timeout)

    # ------------------------------------------------------------------ lifecycle
    def lock(self) -> None:
        """Take the job's lock (``<state>.lock``) or raise :class:`JobLockedError`. The OS frees it if we die."""
        if self._lock_file is not None:
            return
        lock_path = Path(f"{self.path}.lock")
        f = open(lock_path, "a+b")  # noqa: SIM115  # held open for the lock's lifetime
        try:
            _try_lock(f)
        except OSError:
            f.close()
            raise JobLockedError(f"another embedpipe job is running on {self.path} "
                                 f"(lock {lock_path} is held); wait for it or stop it") from None
        self._lock_file = f

    def close(self) -> None:
        """Close the database and release the lock. Idempotent."""
        _sqlite.close(self._db)
        if self._lock_file is not None:
            self._lock_file.close()
            self._lock_file = None

    def __enter__(self) -> SQLiteJobStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextlib.contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """One write transaction (``BEGIN IMMEDIATE``): all of it lands, or none."""
        with self._mutex, _sqlite.transaction(self._db, self.path, self.timeout) as db:
            yield db

    # ------------------------------------------------------------------ meta
    def get(self, name: str) -> str | None:
        """A value of the meta table."""
        row = self._db.execute("SELECT value FROM meta WHERE name=?", (name,)).fetchone()
        return None if row is None else str(row[0])

    def set_meta(self, db: sqlite3.Connection, **values: Any) -> None:
        """Set meta values inside a transaction (``None`` deletes)."""
        for name, value in values.items():
            if value is None:
                db.execute("DELETE FROM meta WHERE name=?", (name,))
            else:
                db.execute("INSERT INTO meta(name, value) VALUES (?, ?) ON CONFLICT(name) DO UPDATE SET "
                           "value=excluded.value", (name, str(value)))

    def check_model(self, spec: str, dimensions: int | None) -> None:
        """Refuse when the output holds vectors of another model or length (``dimensions=None``: not yet known)."""
        old_spec, old_dims = self.get("model"), self.get("dimensions")
        if old_spec is None or not self.count():
            return
        if old_spec != spec or (dimensions is not None and old_dims is not None and int(old_dims) != dimensions):
            was = f"{old_spec}" + (f" at {old_dims} dimensions" if old_dims else "")
            now = f"{spec}" + (f" at {dimensions} dimensions" if dimensions else "")
            raise JobConflictError(
                f"the output at {self.get('sink') or self.path.parent} holds vectors of {was}; this run asks for "
                f"{now}. Mixing them would make the vectors incomparable: pass --rebuild (rebuild=True) to "
                "re-embed everything, or choose another --out")

    # ------------------------------------------------------------------ runs
    def begin_run(self) -> int:
        """Start a run; return its generation (one more than any before)."""
        with self.transaction() as db:
            row = db.execute("SELECT coalesce(max(gen), 0) FROM runs").fetchone()
            gen = int(row[0]) + 1
            db.execute("INSERT INTO runs(gen, started, status) VALUES (?, ?, 'running')", (gen, time.time()))
        return gen

    def end_run(self, gen: int, status: str, **counts: Any) -> None:
        """Record how a run ended (``counts`` are added to its counters)."""
        with self.transaction() as db:
            db.execute("UPDATE runs SET finished=?, status=? WHERE gen=?", (time.time(), status, gen))
            if counts:
                self.add_counts(db, gen, counts)

    def runs(self) -> list[RunStats]:
        """Every run, oldest first."""
        rows = self._db.execute("SELECT gen, started, finished, status, records, embedded, cached, tokens, "
                                "cost_usd, dead FROM runs ORDER BY gen").fetchall()
        return [RunStats(*row) for row in rows]

    def run_counts(self, gen: int) -> dict[str, Any]:
        """Run ``gen``'s counters (:data:`RUN_COUNTERS`, ``cost_usd``, ``status``, ``planned``, times)."""
        names = (*RUN_COUNTERS, "cost_usd", "status", "planned", "started", "finished")
        row = self._db.execute(f"SELECT {', '.join(names)} FROM runs WHERE gen=?", (gen,)).fetchone()
        if row is None:
            raise ConfigurationError(f"the job store at {self.path} has no run {gen}")
        return dict(zip(names, row, strict=True))

    def add_counts(self, db: sqlite3.Connection, gen: int, counts: dict[str, Any]) -> None:
        """Inside a transaction: add ``counts`` (names of :data:`RUN_COUNTERS`, ``cost_usd``) to run ``gen``."""
        bad = set(counts) - {*RUN_COUNTERS, "cost_usd"}
        if bad:
            raise ValueError(f"unknown run counters {sorted(bad)}")
        sets = ", ".join(f"{k}=coalesce({k}, 0) + ?" for k in counts)
        db.execute(f"UPDATE runs SET {sets} WHERE gen=?", (*counts.values(), gen))

    def mark_planned(self, gen: int) -> None:
        """Note that run ``gen`` read the whole source: what it did not see is gone from it."""
        with self.transaction() as db:
            db.execute("UPDATE runs SET planned=1 WHERE gen=?", (gen,))

    def latest_run(self) -> int | None:
        """The newest run's generation, or ``None`` before the first."""
        row = self._db.execute("SELECT max(gen) FROM runs").fetchone()
        return None if row is None or row[0] is None else int(row[0])

    # ------------------------------------------------------------------ records
    def count(self, status: str | None = None) -> int:
        """How many records the state holds (with ``status``, if given)."""
        if status is None:
            return int(self._db.execute("SELECT count(*) FROM records").fetchone()[0])
        return int(self._db.execute("SELECT count(*) FROM records WHERE status=?", (status,)).fetchone()[0])

    def lookup(self, ids: Sequence[str]) -> dict[str, StoredRecord]:
        """What the state holds for ``ids`` (absent ids are left out)."""
        found: dict[str, StoredRecord] = {}
        for chunk in _chunks(ids):
            rows = self._db.execute(
                f"SELECT id, content_hash, meta_hash, status, loc FROM records WHERE id IN "
                f"({','.join('?' * len(chunk))})", chunk)
            for rid, chash, mhash, status, loc in rows:
                found[rid] = StoredRecord(bytes(chash), bytes(mhash), status, loc)
        return found

    def mark_seen(self, ids: Sequence[str], gen: int) -> None:
        """Note that run ``gen`` read ``ids`` from the source (absent ids are ignored)."""
        with self.transaction() as db:
            for chunk in _chunks(ids):
                db.execute(f"UPDATE records SET seen=? WHERE id IN ({','.join('?' * len(chunk))})", (gen, *chunk))

    def update_metadata(self, updates: Sequence[tuple[str, bytes, str]]) -> None:
        """Queue new metadata ``(id, meta_hash, json)`` for rows whose text did not change.

        The sink applies them when it compacts, without re-embedding.
        """
        if not updates:
            return
        with self.transaction() as db:
            db.executemany("UPDATE records SET meta_hash=?, updated=? WHERE id=?",
                           [(mhash, time.time(), rid) for rid, mhash, _ in updates])
            db.executemany("INSERT INTO pending_metadata(id, metadata) VALUES (?, ?) ON CONFLICT(id) DO UPDATE "
                           "SET metadata=excluded.metadata", [(rid, js) for rid, _, js in updates])

    def commit(self, gen: int, written: Sequence[Written], failed: Sequence[Failed],
               meta: dict[str, Any] | None = None, *, chunk_id: str | None = None, seq: int | None = None,
               counts: dict[str, Any] | None = None, samples: Sequence[Sample] = (), sample_size: int = 0) -> None:
        """Record one chunk's outcome in one transaction: rows written, records dead-lettered, sink meta,
        and, with a ``chunk_id``, the chunk as done (its lease released), the run's ``counts`` and the
        chunk's candidates for the read-back ``samples`` (the ``sample_size`` of lowest priority are kept).

        Call it only after the sink's write is durable: then a crash between the two only
        leaves rows the state does not point to, which compaction drops. ``seq`` orders chunks
        (:attr:`Chunk.seq <embedpipe.jobs.Chunk.seq>`): a record committed out of order never replaces
        the version a later chunk committed.
        """
        now = time.time()
        with self.transaction() as db:
            if chunk_id is not None:
                row = db.execute("SELECT status FROM chunks WHERE chunk_id=?", (chunk_id,)).fetchone()
                if row is not None and row[0] == "done":
                    return  # committed already (a second copy of the chunk): nothing is written twice
            if written:
                db.executemany(
                    "INSERT INTO records(id, content_hash, meta_hash, status, attempts, loc, seen, updated, seq) "
                    "VALUES (?, ?, ?, 'done', 0, ?, ?, ?, ?) ON CONFLICT(id) DO UPDATE SET "
                    "content_hash=excluded.content_hash, meta_hash=excluded.meta_hash, status='done', attempts=0, "
                    "loc=excluded.loc, seen=excluded.seen, updated=excluded.updated, seq=excluded.seq"
                    + ("" if seq is None else " WHERE excluded.seq >= records.seq"),
                    [(w.entry.record.id, w.entry.content_hash, w.entry.meta_hash, w.loc, gen, now, seq or 0)
                     for w in written])
                ids = [w.entry.record.id for w in written]
                for chunk in _chunks(ids):
                    marks = ",".join("?" * len(chunk))
                    db.execute(f"DELETE FROM dead_letters WHERE id IN ({marks})", chunk)
                    db.execute(f"DELETE FROM pending_metadata WHERE id IN ({marks})", chunk)
            if failed:
                # A dead record has no live row: its old version (if any) leaves the output at compaction.
                db.executemany(
                    "INSERT INTO records(id, content_hash, meta_hash, status, attempts, loc, seen, updated) "
                    "VALUES (?, ?, ?, 'dead', 1, NULL, ?, ?) ON CONFLICT(id) DO UPDATE SET "
                    "content_hash=excluded.content_hash, meta_hash=excluded.meta_hash, status='dead', "
                    "attempts=records.attempts + 1, loc=NULL, seen=excluded.seen, updated=excluded.updated",
                    [(f.entry.record.id, f.entry.content_hash, f.entry.meta_hash, gen, now) for f in failed])
                db.executemany(
                    f"INSERT INTO dead_letters({DEAD_LETTER_COLUMNS}) VALUES (?, NULL, ?, ?, NULL, ?, 1, ?) "
                    "ON CONFLICT(id) DO UPDATE SET text=excluded.text, metadata=excluded.metadata, "
                    "reason=excluded.reason, attempts=dead_letters.attempts + 1, time=excluded.time",
                    [(f.entry.record.id, text_of(f.entry.record), f.entry.metadata_json,
                      redact(str(f.reason), self.secrets), now) for f in failed])
                for chunk in _chunks([f.entry.record.id for f in failed]):
                    db.execute(f"DELETE FROM pending_metadata WHERE id IN ({','.join('?' * len(chunk))})", chunk)
            if meta:
                self.set_meta(db, **meta)
            if counts:
                self.add_counts(db, gen, counts)
            if samples and sample_size:
                db.executemany(
                    "INSERT INTO samples(id, priority, text, metadata, content_hash, vector) VALUES (?, ?, ?, ?, ?, ?) "
                    "ON CONFLICT(id) DO UPDATE SET priority=excluded.priority, text=excluded.text, "
                    "metadata=excluded.metadata, content_hash=excluded.content_hash, vector=excluded.vector",
                    [(e.record.id, p, e.record.text, e.metadata_json, e.content_hash,
                      np.asarray(v, dtype="<f4").tobytes()) for p, e, v in samples])
                db.execute("DELETE FROM samples WHERE id NOT IN (SELECT id FROM samples ORDER BY priority LIMIT ?)",
                           (sample_size,))
            if chunk_id is not None:
                db.execute(
                    "INSERT INTO chunks(chunk_id, gen, status, attempts, records, updated) VALUES (?, ?, 'done', 0, ?, "
                    "?) ON CONFLICT(chunk_id) DO UPDATE SET status='done', gen=excluded.gen, lease_owner=NULL, "
                    "lease_until=NULL, records=excluded.records, updated=excluded.updated",
                    (chunk_id, gen, len(written) + len(failed), now))

    # ------------------------------------------------------------------ chunks and leases
    def chunk_status(self, chunk_id: str) -> str | None:
        """``"done"``, ``"running"`` (someone holds or held its lease) or ``None`` (never started)."""
        row = self._db.execute("SELECT status FROM chunks WHERE chunk_id=?", (chunk_id,)).fetchone()
        return None if row is None else str(row[0])

    def acquire_lease(self, chunk_id: str, gen: int, owner: str, ttl: float) -> int | None:
        """Take the chunk's lease for ``ttl`` seconds and count one attempt; return the attempt number.

        ``None``: the chunk is done, or another owner holds a live lease (back off: it is being worked on).
        """
        now = time.time()
        with self.transaction() as db:
            row = db.execute("SELECT status, lease_owner, lease_until, attempts FROM chunks WHERE chunk_id=?",
                             (chunk_id,)).fetchone()
            if row is not None:
                status, holder, until, attempts = row
                live = holder not in (None, owner) and until is not None and until > now and not dead_here(holder)
                if status == "done" or live:
                    return None
                db.execute("UPDATE chunks SET status='running', lease_owner=?, lease_until=?, attempts=attempts + 1, "
                           "gen=?, updated=? WHERE chunk_id=?", (owner, now + ttl, gen, now, chunk_id))
                return int(attempts) + 1
            db.execute("INSERT INTO chunks(chunk_id, gen, status, attempts, lease_owner, lease_until, updated) "
                       "VALUES (?, ?, 'running', 1, ?, ?, ?)", (chunk_id, gen, owner, now + ttl, now))
            return 1

    def renew_lease(self, chunk_id: str, owner: str, ttl: float) -> bool:
        """Extend a lease ``owner`` holds; ``False`` when it lost it (expired and taken, or the chunk is done)."""
        with self.transaction() as db:
            cur = db.execute("UPDATE chunks SET lease_until=? WHERE chunk_id=? AND lease_owner=? AND status='running'",
                             (time.time() + ttl, chunk_id, owner))
            return cur.rowcount == 1

    def release_lease(self, chunk_id: str, owner: str) -> None:
        """Give a lease up without committing (the chunk stopped: budget, outage, shutdown)."""
        with self.transaction() as db:
            db.execute("UPDATE chunks SET lease_owner=NULL, lease_until=NULL WHERE chunk_id=? AND lease_owner=?",
                       (chunk_id, owner))

    def chunk_counts(self, gen: int | None = None) -> dict[str, int]:
        """Chunks per status (of run ``gen``, or all)."""
        if gen is None:
            rows = self._db.execute("SELECT status, count(*) FROM chunks GROUP BY status")
        else:
            rows = self._db.execute("SELECT status, count(*) FROM chunks WHERE gen=? GROUP BY status", (gen,))
        return {str(k): int(v) for k, v in rows}

    # ------------------------------------------------------------------ the read-back sample
    def samples(self) -> list[tuple[Entry, np.ndarray]]:
        """The written records kept for the sink's read-back check, with their vectors."""
        out: list[tuple[Entry, np.ndarray]] = []
        for rid, text, metadata, chash, blob in self._db.execute(
                "SELECT s.id, s.text, s.metadata, s.content_hash, s.vector FROM samples s JOIN records r "
                "ON r.id = s.id AND r.content_hash = s.content_hash AND r.status = 'done' ORDER BY s.priority"):
            entry = Entry.of(Record(rid, text, json.loads(metadata)))
            if entry.content_hash == bytes(chash):
                out.append((entry, np.frombuffer(blob, dtype="<f4").copy()))
        return out

    def gone(self, gen: int, limit: int = 1000) -> list[str]:
        """Up to ``limit`` ids that run ``gen`` did not see in the source."""
        rows = self._db.execute("SELECT id FROM records WHERE seen < ? LIMIT ?", (gen, limit)).fetchall()
        return [r[0] for r in rows]

    def forget(self, ids: Sequence[str]) -> None:
        """Drop ``ids`` from the state and the dead-letter queue."""
        with self.transaction() as db:
            for chunk in _chunks(ids):
                marks = ",".join("?" * len(chunk))
                for table in ("records", "dead_letters", "pending_metadata"):
                    db.execute(f"DELETE FROM {table} WHERE id IN ({marks})", chunk)

    def forget_locs(self, locs: Sequence[Any]) -> int:
        """Drop the records whose rows were at ``locs`` (a part that vanished): the next run redoes them."""
        removed = 0
        with self.transaction() as db:
            for chunk in _chunks(locs):
                marks = ",".join("?" * len(chunk))
                db.execute(f"DELETE FROM pending_metadata WHERE id IN (SELECT id FROM records WHERE loc IN ({marks}))",
                           chunk)
                removed += db.execute(f"DELETE FROM records WHERE loc IN ({marks})", chunk).rowcount
        return removed

    def forget_written(self) -> int:
        """Drop every record that has a row in the output (the output was lost): the next run redoes them."""
        with self.transaction() as db:
            db.execute("DELETE FROM pending_metadata")
            return int(db.execute("DELETE FROM records WHERE loc IS NOT NULL").rowcount)

    def reset(self) -> None:
        """Forget every record, dead letter and the model (``--rebuild``); the run history stays."""
        with self.transaction() as db:
            for table in ("records", "dead_letters", "pending_metadata"):
                db.execute(f"DELETE FROM {table}")
            db.execute("DELETE FROM meta WHERE name NOT IN ('sink')")

    # ------------------------------------------------------------------ where rows are (for sinks)
    def locs(self) -> list[Any]:
        """Every distinct loc that live rows are at."""
        return [r[0] for r in self._db.execute("SELECT DISTINCT loc FROM records WHERE loc IS NOT NULL")]

    def loc_counts(self) -> dict[Any, int]:
        """Live rows per loc."""
        return dict(self._db.execute("SELECT loc, count(*) FROM records WHERE loc IS NOT NULL GROUP BY loc"))

    def ids_at(self, loc: Any) -> set[str]:
        """The ids whose live row is at ``loc`` (one part: bounded by the part's size)."""
        return {r[0] for r in self._db.execute("SELECT id FROM records WHERE loc=?", (loc,))}

    def ids_in_range(self, start: int, stop: int) -> dict[int, str]:
        """``loc -> id`` for integer locs in ``[start, stop)`` (JSONL line numbers)."""
        rows = self._db.execute("SELECT loc, id FROM records WHERE loc >= ? AND loc < ?", (start, stop))
        return {int(loc): rid for loc, rid in rows}

    def pending_metadata_locs(self) -> set[Any]:
        """The locs that hold rows with queued metadata updates."""
        return {r[0] for r in self._db.execute(
            "SELECT DISTINCT r.loc FROM pending_metadata p JOIN records r ON r.id = p.id WHERE r.loc IS NOT NULL")}

    def pending_metadata(self, ids: Sequence[str]) -> dict[str, str]:
        """Queued metadata JSON for those of ``ids`` that have some."""
        out: dict[str, str] = {}
        for chunk in _chunks(ids):
            out.update(self._db.execute(
                f"SELECT id, metadata FROM pending_metadata WHERE id IN ({','.join('?' * len(chunk))})", chunk))
        return out

    def clear_pending_metadata(self) -> None:
        """Forget queued metadata (after compaction applied it)."""
        with self.transaction() as db:
            db.execute("DELETE FROM pending_metadata")

    def move(self, db: sqlite3.Connection, moves: Sequence[tuple[Any, str]]) -> None:
        """Inside a transaction: set the loc of each ``(new_loc, id)``."""
        db.executemany("UPDATE records SET loc=? WHERE id=?", moves)

    # ------------------------------------------------------------------ dead letters
    def dead_letters(self, ids: Sequence[str] | None = None) -> list[DeadLetter]:
        """The dead letters (all, or those among ``ids``), oldest first."""
        return select_letters(self._db, None if ids is None else list(ids))

    def dead_letter_count(self) -> int:
        """How many letters the queue holds."""
        return int(self._db.execute("SELECT count(*) FROM dead_letters").fetchone()[0])

    def purge(self, ids: Sequence[str] | None = None) -> int:
        """Drop letters (all, or ``ids``) and their records: a later run tries them again if still in the source."""
        with self.transaction() as db:
            if ids is None:
                n = db.execute("DELETE FROM dead_letters").rowcount
                db.execute("DELETE FROM records WHERE status='dead'")
                return int(n)
            n = 0
            for chunk in _chunks(list(ids)):
                marks = ",".join("?" * len(chunk))
                n += db.execute(f"DELETE FROM dead_letters WHERE id IN ({marks})", chunk).rowcount
                db.execute(f"DELETE FROM records WHERE status='dead' AND id IN ({marks})", chunk)
            return n


def job_store_from(spec: str | os.PathLike[str] | SQLiteJobStore, *, readonly: bool = False,
                   secrets: Iterable[str | None] = ()) -> SQLiteJobStore:
    """The job state ``spec`` names: a path, a URL (a scheme of :data:`embedpipe.registry.job_stores`,
    ``sqlite:///relative/_state.sqlite``), or a state (returned as is)."""
    if isinstance(spec, SQLiteJobStore):
        return spec
    if isinstance(spec, str) and "://" in spec:
        store = registry.job_stores.from_url(spec, readonly=readonly, secrets=secrets)
        if not isinstance(store, SQLiteJobStore):
            raise ConfigurationError(f"the job store factory for {redact_url(spec)!r} returned "
                                     f"{type(store).__name__}, not a JobState")
        return store
    if not isinstance(spec, (str, os.PathLike)):
        raise ConfigurationError(f"a job store is a path, a URL or a JobState, not {type(spec).__name__}")
    return SQLiteJobStore(spec, readonly=readonly, secrets=secrets)


def _try_lock(f: IO[bytes]) -> None:
    try:
        import fcntl
    except ImportError:  # Windows
        import msvcrt

        msvcrt.locking(f.fileno(), msvcrt.LK_NBLCK, 1)  # type: ignore[attr-defined,unused-ignore]
        return
    fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)


#: the name this store had before the job unit; kept for code that imports it
JobState = SQLiteJobStore

__all__ = ["SCHEMA_VERSION", "Failed", "JobState", "RunStats", "SQLiteJobStore", "Sample", "StoredRecord",
           "Written", "job_store_from"]
