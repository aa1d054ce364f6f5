"""embedpipe._sqlite: WAL, BEGIN IMMEDIATE and clear errors, on real files with two connections."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from embedpipe import _sqlite
from embedpipe._sqlite import SQLiteStorageError
from embedpipe.errors import EmbedPipeError


def _table(path: Path) -> sqlite3.Connection:
    conn = _sqlite.connect(path, timeout=0.05)
    conn.execute("CREATE TABLE IF NOT EXISTS t (k TEXT PRIMARY KEY, v INTEGER)")
    return conn


def test_connect_makes_the_folder_and_switches_the_file_to_wal(tmp_path: Path) -> None:
    path = tmp_path / "a" / "b" / "db.sqlite"
    conn = _table(path)
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert conn.execute("PRAGMA synchronous").fetchone()[0] == 1  # NORMAL
    assert conn.execute("PRAGMA busy_timeout").fetchone()[0] == 50
    assert conn.isolation_level is None  # autocommit: transactions are explicit
    # WAL is the file's: a connection that does not ask for it still gets it.
    other = _sqlite.connect(path, wal=False, synchronous=None, create=False)
    assert other.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    _sqlite.close(other)
    _sqlite.close(conn)
    _sqlite.close(conn)  # twice: harmless
    _sqlite.close(None)


def test_begin_immediate_takes_the_write_lock_up_front_while_readers_go_on(tmp_path: Path) -> None:
    path = tmp_path / "db.sqlite"
    first, second, reader = _table(path), _table(path), _table(path)
    with _sqlite.transaction(first, path, 0.05) as db:
        db.execute("INSERT INTO t VALUES ('a', 1)")
        # The second writer cannot even begin: the lock is held from BEGIN, not from the first write.
        with pytest.raises(SQLiteStorageError) as info, _sqlite.transaction(second, path, 0.05):
            pytest.fail("a second write transaction began while the first held the lock")
        assert str(path) in str(info.value) and "locked" in str(info.value)
        assert isinstance(info.value, sqlite3.OperationalError) and isinstance(info.value, EmbedPipeError)
        assert info.value.path == path
        # WAL: a reader is not blocked, and sees only what is committed.
        assert reader.execute("SELECT count(*) FROM t").fetchone()[0] == 0
    assert reader.execute("SELECT v FROM t WHERE k='a'").fetchone()[0] == 1
    with _sqlite.transaction(second, path) as db:  # free again
        db.execute("UPDATE t SET v = 2 WHERE k = 'a'")
    assert reader.execute("SELECT v FROM t WHERE k='a'").fetchone()[0] == 2
    for conn in (first, second, reader):
        _sqlite.close(conn)


def test_a_failed_transaction_rolls_back_whole(tmp_path: Path) -> None:
    path = tmp_path / "db.sqlite"
    conn, other = _table(path), _table(path)
    with pytest.raises(RuntimeError), _sqlite.transaction(conn, path) as db:
        db.execute("INSERT INTO t VALUES ('a', 1)")
        db.execute("INSERT INTO t VALUES ('b', 2)")
        raise RuntimeError("boom")
    assert other.execute("SELECT count(*) FROM t").fetchone()[0] == 0
    with _sqlite.transaction(other, path) as db:  # the lock was released
        db.execute("INSERT INTO t VALUES ('c', 3)")
    with pytest.raises(sqlite3.IntegrityError), _sqlite.transaction(conn, path) as db:
        db.execute("INSERT INTO t VALUES ('d', 4)")
        db.execute("INSERT INTO t VALUES ('c', 5)")  # duplicate key: not one of the mapped errors
    assert [r[0] for r in other.execute("SELECT k FROM t")] == ["c"]
    _sqlite.close(conn)
    _sqlite.close(other)


def test_a_full_database_is_a_clear_error_naming_the_file(tmp_path: Path) -> None:
    path = tmp_path / "full.sqlite"
    conn = _table(path)
    # A real SQLITE_FULL: SQLite refuses to grow the file past max_page_count, as on a full disk.
    pages = conn.execute("PRAGMA page_count").fetchone()[0]
    conn.execute(f"PRAGMA max_page_count={pages + 1}")
    with pytest.raises(SQLiteStorageError) as info, _sqlite.transaction(conn, path) as db:
        db.executemany("INSERT INTO t VALUES (?, ?)", [(f"k{i}" * 50, i) for i in range(2000)])
    message = str(info.value)
    assert str(path) in message and "disk is full" in message
    assert isinstance(info.value, sqlite3.OperationalError)
    assert conn.execute("SELECT count(*) FROM t").fetchone()[0] == 0  # rolled back
    _sqlite.close(conn)


def test_memory_databases_open_without_a_file(tmp_path: Path) -> None:
    conn = _sqlite.connect(":memory:", synchronous=None)
    conn.execute("CREATE TABLE t (k)")
    with _sqlite.transaction(conn) as db:
        db.execute("INSERT INTO t VALUES (1)")
    assert conn.execute("SELECT count(*) FROM t").fetchone()[0] == 1
    assert not (tmp_path / ":memory:").exists()
    _sqlite.close(conn)
