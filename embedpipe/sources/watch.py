"""Keep a sink in step with a PostgreSQL table: a trigger queues changed ids, ``NOTIFY`` wakes the watcher.

:func:`install_triggers` creates the change table ``embedpipe_changes`` (one row per
INSERT, UPDATE or DELETE: the table, the row's id, the operation) and a row trigger on
the source table that fills it and sends ``NOTIFY embedpipe_changes``, in the transaction
of the change: a change committed is a change queued, whether the watcher runs or not.

:func:`watch` runs the job once at start (catching up with whatever changed while it was
down), then waits on ``LISTEN`` (and polls, in case a notification was missed). When
changes are queued it runs the same incremental job again: the rows whose text changed
are embedded, the rows gone are deleted from the sink, and the queued changes it covered
are removed from the change table only after the run has committed. A crash at any point
leaves them queued, and the next start runs again.

Each wake-up re-reads the table and compares content hashes (nothing unchanged is
embedded or written): it suits tables that one incremental run reads in seconds.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from embedpipe._urls import parse_url
from embedpipe.errors import ConfigurationError
from embedpipe.sources.sql import PostgresSource

log = logging.getLogger("embedpipe.jobs")

#: the table of queued changes, and the channel the trigger notifies
CHANGES = "embedpipe_changes"

_INSTALL = """
CREATE TABLE IF NOT EXISTS embedpipe_changes (
    seq bigserial PRIMARY KEY, tbl text NOT NULL, id text, op text NOT NULL, at timestamptz NOT NULL DEFAULT now());
CREATE INDEX IF NOT EXISTS embedpipe_changes_tbl ON embedpipe_changes (tbl, seq);
CREATE OR REPLACE FUNCTION embedpipe_queue_change() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    rid text;
BEGIN
    IF TG_OP = 'DELETE' THEN rid := to_jsonb(OLD) ->> TG_ARGV[0]; ELSE rid := to_jsonb(NEW) ->> TG_ARGV[0]; END IF;
    INSERT INTO embedpipe_changes (tbl, id, op) VALUES (TG_RELID::regclass::text, rid, TG_OP);
    PERFORM pg_notify('embedpipe_changes', TG_RELID::regclass::text);
    RETURN NULL;
END $$;
"""


def _connect(source: PostgresSource) -> Any:
    import psycopg

    return psycopg.connect(source.dsn, autocommit=True)


def install_triggers(source: PostgresSource) -> None:
    """Create the change table and the trigger that queues ``source``'s changes (idempotent)."""
    from psycopg import sql

    table = sql.SQL(source.quote(source.table))
    with _connect(source) as conn, conn.transaction():
        conn.execute(_INSTALL)
        conn.execute(sql.SQL("DROP TRIGGER IF EXISTS embedpipe_changes ON {}").format(table))
        conn.execute(sql.SQL("CREATE TRIGGER embedpipe_changes AFTER INSERT OR UPDATE OR DELETE ON {} "
                             "FOR EACH ROW EXECUTE FUNCTION embedpipe_queue_change({})").format(
                                 table, sql.Literal(source.id_field)))


def _queued(conn: Any, source: PostgresSource) -> int | None:
    """The last queued change's number for ``source``'s table, or ``None`` when none is queued."""
    row = conn.execute(f"SELECT max(seq) FROM {CHANGES} WHERE tbl = %s::regclass::text",
                       (source.quote(source.table),)).fetchone()
    return None if row is None or row[0] is None else int(row[0])


def watch(source: str, *, out: str, model: str, install: bool = False, poll: float = 5.0,
          stop: threading.Event | None = None, on_run: Callable[[Any], None] | None = None,
          **run_options: Any) -> None:
    """Mirror the PostgreSQL table ``source`` (a source URL) into ``out`` until ``stop`` is set.

    ``install`` creates the change table and trigger first (:func:`install_triggers`);
    without them the watcher still catches up at start and every ``poll`` seconds finds
    nothing queued. ``run_options`` go to :func:`embedpipe.jobs.run` (``state``, ``cache``,
    ``dimensions``...); ``on_run`` receives each run's :class:`~embedpipe.jobs.JobResult`.
    """
    from embedpipe.jobs import run
    from embedpipe.registry import sources

    src = sources.from_url(parse_url(source, "source"))
    if not isinstance(src, PostgresSource):
        raise ConfigurationError(f"embedpipe watch follows PostgreSQL tables (postgresql://...?table=), not {src!r}")
    if install:
        install_triggers(src)
    stop = stop or threading.Event()
    with _connect(src) as conn:
        conn.execute(f"LISTEN {CHANGES}")
        has_queue = conn.execute("SELECT to_regclass(%s)", (CHANGES,)).fetchone() != (None,)
        if not has_queue:
            log.warning("embedpipe: no change table in %s: pass --install-triggers to follow changes as they "
                        "happen; until then only the run at start catches up", src.name)
        first = True
        while not stop.is_set():
            upto = _queued(conn, src) if has_queue else None
            if first or upto is not None:
                result = run(source, out=out, model=model, estimate_first=False, **run_options)
                if upto is not None:
                    conn.execute(f"DELETE FROM {CHANGES} WHERE tbl = %s::regclass::text AND seq <= %s",
                                 (src.quote(src.table), upto))
                log.info("embedpipe: %d written, %d deleted", result.written, result.deleted)
                if on_run is not None:
                    on_run(result)
                first = False
                continue  # changes made during the run are queued: look again at once
            # Wake on a notification, or after `poll` seconds in case one was missed.
            deadline = time.monotonic() + poll
            for _ in conn.notifies(timeout=max(0.0, deadline - time.monotonic()), stop_after=1):
                time.sleep(0.05)  # let a burst of changes land: one run covers them all
            if stop.is_set():
                return


__all__ = ["CHANGES", "install_triggers", "watch"]
