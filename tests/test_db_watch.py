"""``embedpipe watch``: a real watcher process follows a PostgreSQL table into a pgvector table.

Both tables live in the session's private PostgreSQL 16 (pgserver). Rows are inserted,
updated and deleted while the watcher runs; it is killed (SIGKILL), more rows change,
and a restarted watcher catches up from the change table.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg
import pytest

from embedpipe.jobs.records import content_hash

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def admin(pg_uri: str) -> Iterator[psycopg.Connection]:  # type: ignore[type-arg]
    with psycopg.connect(pg_uri, autocommit=True) as conn:
        yield conn


def _wait(check: Callable[[], bool], what: str, proc: subprocess.Popen[bytes] | None, seconds: float = 30) -> float:
    started = time.monotonic()
    while not check():
        if proc is not None:
            assert proc.poll() is None, proc.communicate()
        assert time.monotonic() - started < seconds, f"{what} not within {seconds}s"
        time.sleep(0.1)
    return time.monotonic() - started


def test_watch_mirrors_inserts_updates_and_deletes_and_catches_up_after_a_kill(
        pg_uri: str, admin: psycopg.Connection, tmp_path: Path) -> None:  # type: ignore[type-arg]
    src, dst = f"src_{uuid.uuid4().hex[:8]}", f"dst_{uuid.uuid4().hex[:8]}"
    admin.execute(f"CREATE TABLE {src} (id integer PRIMARY KEY, body text)")
    admin.execute(f"INSERT INTO {src} SELECT g, 'row ' || g FROM generate_series(1, 20) g")

    def mirrored() -> bool:
        want = {str(i): content_hash(b).hex() for i, b in admin.execute(f"SELECT id, body FROM {src}")}
        if admin.execute("SELECT to_regclass(%s)", (dst,)).fetchone() == (None,):
            return False
        have = dict(admin.execute(f"SELECT id, content_hash FROM {dst}").fetchall())
        return have == want

    cmd = [sys.executable, "-m", "embedpipe.cli", "watch", f"{pg_uri}&table={src}&text_field=body",
           "--out", f"{pg_uri}&table={dst}", "--model", "fake:16", "--state", str(tmp_path / "state.sqlite"),
           "--cache", "memory://", "--install-triggers", "--poll", "1"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        _wait(mirrored, "the first catch-up", proc, 60)
        admin.execute(f"INSERT INTO {src} VALUES (21, 'row 21'), (22, 'row 22')")
        admin.execute(f"UPDATE {src} SET body = body || ' (edited)' WHERE id IN (3, 4)")
        admin.execute(f"DELETE FROM {src} WHERE id IN (5, 6)")
        took = _wait(mirrored, "inserts, updates and deletes", proc)
        assert took < 10
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=30)

        # Changes while no watcher runs are queued by the trigger.
        admin.execute(f"INSERT INTO {src} VALUES (23, 'row 23')")
        admin.execute(f"UPDATE {src} SET body = 'rewritten' WHERE id = 7")
        admin.execute(f"DELETE FROM {src} WHERE id = 8")
        queued = admin.execute("SELECT op, id FROM embedpipe_changes WHERE tbl = %s ORDER BY seq",
                               (src,)).fetchall()
        assert queued[-3:] == [("INSERT", "23"), ("UPDATE", "7"), ("DELETE", "8")]
        assert not mirrored()

        proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        _wait(mirrored, "the catch-up after the restart", proc, 60)
        _wait(lambda: admin.execute("SELECT count(*) FROM embedpipe_changes WHERE tbl = %s",
                                    (src,)).fetchone() == (0,), "the queue to drain", proc)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
        assert proc.returncode == 0, err
        assert b"written" in err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
        admin.execute(f"DROP TABLE IF EXISTS {src}, {dst}")
