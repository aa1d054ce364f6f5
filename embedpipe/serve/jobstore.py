"""The service's registry of ingest jobs: one SQLite table of specs, states, leases and idempotency keys.

>>> reg = IngestRegistry(":memory:")
>>> job, queued = reg.submit("0123456789abcdef", '{"source": "..."}', records=3, sink="docs", model="small")
>>> job.state
'queued'
>>> reg.lease_next("host:1", ttl=30).job_id
'0123456789abcdef'

A job is a :class:`~embedpipe.jobs.JobSpec` (its JSON) and a state: ``queued``, ``running``,
``succeeded``, ``failed`` or ``cancelled``. A worker loop leases the oldest queued job, or a
running one whose lease (``heartbeat`` older than the lease's time) ran out because its
worker died, and renews the lease while it works. The job's own progress lives in its
job store (the sink's ``_state.sqlite``), so a job leased again resumes from there.

A hand-written table rather than a queue library: the jobs must survive ``kill -9`` on one
host with no broker (SQLite's ``BEGIN IMMEDIATE`` gives the atomic lease), and with a broker
the chunks go to Celery while this table keeps the job's state.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from embedpipe import _sqlite
from embedpipe.errors import EmbedPipeError

__all__ = ["JOB_STATES", "TERMINAL_STATES", "IdempotencyConflictError", "IngestJob", "IngestRegistry"]

JOB_STATES = ("queued", "running", "succeeded", "failed", "cancelled")
TERMINAL_STATES = frozenset({"succeeded", "failed", "cancelled"})
_COLUMNS = ("job_id, spec, state, sink, model, records, created, started, finished, owner, heartbeat, attempts, "
            "gens, cancel, error, result, body_hash")


class IdempotencyConflictError(EmbedPipeError):
    """An ``Idempotency-Key`` already used for another body."""


@dataclass(frozen=True)
class IngestJob:
    """One row of the registry."""

    job_id: str
    spec: str
    state: str
    sink: str
    model: str
    records: int
    created: float
    started: float | None
    finished: float | None
    owner: str | None
    heartbeat: float | None
    attempts: int
    gens: tuple[int, ...]
    cancel: bool
    error: str | None
    result: dict[str, Any] | None
    body_hash: str


def _row(r: Any) -> IngestJob:
    return IngestJob(job_id=r[0], spec=r[1], state=r[2], sink=r[3], model=r[4], records=int(r[5]), created=r[6],
                     started=r[7], finished=r[8], owner=r[9], heartbeat=r[10], attempts=int(r[11]),
                     gens=tuple(json.loads(r[12] or "[]")), cancel=bool(r[13]), error=r[14],
                     result=json.loads(r[15]) if r[15] else None, body_hash=r[16] or "")


class IngestRegistry:
    """Ingest jobs in the SQLite file at ``path`` (``":memory:"`` for a test); safe across threads and processes."""

    def __init__(self, path: str | Path) -> None:
        self.path = str(path)
        if self.path != ":memory:":
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        self._conn = _sqlite.connect(self.path, timeout=30.0, wal=self.path != ":memory:")
        self._lock = threading.Lock()
        with self._lock, _sqlite.transaction(self._conn, self.path):
            self._conn.execute(
                "CREATE TABLE IF NOT EXISTS ingest_jobs (job_id TEXT PRIMARY KEY, spec TEXT NOT NULL, "
                "state TEXT NOT NULL, sink TEXT NOT NULL, model TEXT NOT NULL, records INTEGER NOT NULL, "
                "created REAL NOT NULL, started REAL, finished REAL, owner TEXT, heartbeat REAL, "
                "attempts INTEGER NOT NULL DEFAULT 0, gens TEXT NOT NULL DEFAULT '[]', "
                "cancel INTEGER NOT NULL DEFAULT 0, error TEXT, result TEXT, body_hash TEXT)")
            self._conn.execute("CREATE INDEX IF NOT EXISTS ingest_jobs_state ON ingest_jobs (state, created)")
            self._conn.execute("CREATE TABLE IF NOT EXISTS ingest_idempotency (key TEXT PRIMARY KEY, "
                               "job_id TEXT NOT NULL, body_hash TEXT NOT NULL, created REAL NOT NULL)")

    def _one(self, sql: str, args: tuple[Any, ...]) -> IngestJob | None:
        row = self._conn.execute(f"SELECT {_COLUMNS} FROM ingest_jobs WHERE {sql}", args).fetchone()
        return None if row is None else _row(row)

    # ------------------------------------------------------------------ submitting
    def submit(self, job_id: str, spec: str, *, records: int, sink: str, model: str, body_hash: str = "",
               idempotency_key: str | None = None) -> tuple[IngestJob, bool]:
        """Queue the job, or answer the one it already is: ``(job, queued now)``.

        The same job submitted again while queued or running is answered as it is; once it
        ended, it is queued again (a re-run: what it wrote counts as unchanged). A known
        ``idempotency_key`` answers its job as it is, or raises
        :class:`IdempotencyConflictError` when it came with another body.
        """
        now = time.time()
        with self._lock, _sqlite.transaction(self._conn, self.path):
            if idempotency_key is not None:
                known = self._conn.execute("SELECT job_id, body_hash FROM ingest_idempotency WHERE key = ?",
                                           (idempotency_key,)).fetchone()
                if known is not None:
                    if known[1] != body_hash:
                        raise IdempotencyConflictError(
                            f"the Idempotency-Key {idempotency_key!r} was used for another body (job {known[0]})")
                    found = self._one("job_id = ?", (known[0],))
                    if found is not None:
                        return found, False
            job = self._one("job_id = ?", (job_id,))
            queued = job is None or job.state in TERMINAL_STATES
            if job is None:
                self._conn.execute("INSERT INTO ingest_jobs (job_id, spec, state, sink, model, records, created, "
                                   "body_hash) VALUES (?, ?, 'queued', ?, ?, ?, ?, ?)",
                                   (job_id, spec, sink, model, records, now, body_hash))
            elif job.state in TERMINAL_STATES:
                self._conn.execute("UPDATE ingest_jobs SET state = 'queued', spec = ?, cancel = 0, error = NULL, "
                                   "finished = NULL, owner = NULL, heartbeat = NULL, created = ? WHERE job_id = ?",
                                   (spec, now, job_id))
            if idempotency_key is not None:
                self._conn.execute("INSERT OR REPLACE INTO ingest_idempotency VALUES (?, ?, ?, ?)",
                                   (idempotency_key, job_id, body_hash, now))
            found = self._one("job_id = ?", (job_id,))
        assert found is not None
        return found, queued

    # ------------------------------------------------------------------ reading
    def get(self, job_id: str) -> IngestJob | None:
        with self._lock:
            return self._one("job_id = ?", (job_id,))

    def list(self, state: str | None = None, limit: int = 100) -> list[IngestJob]:
        """The newest jobs first (``state`` filters)."""
        where, args = ("state = ?", (state,)) if state else ("1 = 1", ())
        with self._lock:
            rows = self._conn.execute(f"SELECT {_COLUMNS} FROM ingest_jobs WHERE {where} ORDER BY created DESC "
                                      "LIMIT ?", (*args, limit)).fetchall()
        return [_row(r) for r in rows]

    def counts(self) -> dict[str, int]:
        """Jobs by state (every state present, at zero when none)."""
        with self._lock:
            rows = self._conn.execute("SELECT state, COUNT(*) FROM ingest_jobs GROUP BY state").fetchall()
        return {**dict.fromkeys(JOB_STATES, 0), **{s: int(n) for s, n in rows}}

    def ping(self) -> None:
        """Raise unless the registry answers a read."""
        with self._lock:
            self._conn.execute("SELECT COUNT(*) FROM ingest_jobs").fetchone()

    # ------------------------------------------------------------------ the worker's side
    def lease_next(self, owner: str, ttl: float) -> IngestJob | None:
        """Lease the oldest queued job, or a running one whose lease ran out (its worker died); ``None`` if none."""
        now = time.time()
        with self._lock, _sqlite.transaction(self._conn, self.path):
            job = self._one("state = 'queued' OR (state = 'running' AND (heartbeat IS NULL OR heartbeat < ?)) "
                            "ORDER BY created LIMIT 1", (now - ttl,))
            if job is None:
                return None
            self._conn.execute("UPDATE ingest_jobs SET state = 'running', owner = ?, heartbeat = ?, "
                               "started = COALESCE(started, ?), attempts = attempts + 1 WHERE job_id = ?",
                               (owner, now, now, job.job_id))
            return self._one("job_id = ?", (job.job_id,))

    def heartbeat(self, job_id: str, owner: str) -> tuple[bool, bool]:
        """Renew the lease: ``(still ours, cancel requested)``."""
        with self._lock, _sqlite.transaction(self._conn, self.path):
            done = self._conn.execute("UPDATE ingest_jobs SET heartbeat = ? WHERE job_id = ? AND owner = ? AND "
                                      "state = 'running'", (time.time(), job_id, owner)).rowcount
            row = self._conn.execute("SELECT cancel FROM ingest_jobs WHERE job_id = ?", (job_id,)).fetchone()
        return bool(done), bool(row and row[0])

    def cancel_requested(self, job_id: str) -> bool:
        with self._lock:
            row = self._conn.execute("SELECT cancel FROM ingest_jobs WHERE job_id = ?", (job_id,)).fetchone()
        return bool(row and row[0])

    def idempotent(self, key: str) -> tuple[str, str] | None:
        """The ``(job_id, body_hash)`` an ``Idempotency-Key`` was first used for, or ``None``."""
        with self._lock:
            row = self._conn.execute("SELECT job_id, body_hash FROM ingest_idempotency WHERE key = ?",
                                     (key,)).fetchone()
        return None if row is None else (str(row[0]), str(row[1]))

    def add_gen(self, job_id: str, gen: int) -> None:
        """Note that run ``gen`` of the job store belongs to this job."""
        with self._lock, _sqlite.transaction(self._conn, self.path):
            row = self._conn.execute("SELECT gens FROM ingest_jobs WHERE job_id = ?", (job_id,)).fetchone()
            gens = json.loads(row[0]) if row else []
            if gen not in gens:
                self._conn.execute("UPDATE ingest_jobs SET gens = ? WHERE job_id = ?",
                                   (json.dumps([*gens, gen]), job_id))

    def release(self, job_id: str, owner: str) -> None:
        """Give a leased job back to the queue (it could not run here now)."""
        with self._lock, _sqlite.transaction(self._conn, self.path):
            self._conn.execute("UPDATE ingest_jobs SET state = 'queued', owner = NULL, heartbeat = NULL "
                               "WHERE job_id = ? AND owner = ? AND state = 'running'", (job_id, owner))

    def finish(self, job_id: str, owner: str, state: str, *, error: str | None = None,
               result: dict[str, Any] | None = None) -> bool:
        """End the job in ``state`` if ``owner`` still holds it; whether it did."""
        assert state in TERMINAL_STATES
        with self._lock, _sqlite.transaction(self._conn, self.path):
            return bool(self._conn.execute(
                "UPDATE ingest_jobs SET state = ?, finished = ?, error = ?, result = ?, owner = NULL "
                "WHERE job_id = ? AND owner = ? AND state = 'running'",
                (state, time.time(), error, json.dumps(result) if result is not None else None, job_id,
                 owner)).rowcount)

    def cancel(self, job_id: str) -> IngestJob | None:
        """Cancel: a queued job at once, a running one at its worker's next chunk; an ended one stays as it is."""
        with self._lock, _sqlite.transaction(self._conn, self.path):
            job = self._one("job_id = ?", (job_id,))
            if job is None:
                return None
            if job.state == "queued":
                self._conn.execute("UPDATE ingest_jobs SET state = 'cancelled', cancel = 1, finished = ? "
                                   "WHERE job_id = ?", (time.time(), job_id))
            elif job.state == "running":
                self._conn.execute("UPDATE ingest_jobs SET cancel = 1 WHERE job_id = ?", (job_id,))
            return self._one("job_id = ?", (job_id,))

    def close(self) -> None:
        _sqlite.close(self._conn)
