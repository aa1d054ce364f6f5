"""SQL sources against real databases: the machine's PostgreSQL 15 and MariaDB, and SQLite files.

One test body runs against all three. PostgreSQL and MariaDB are the services of the
machine (``$EMBEDPIPE_TEST_PG``, default ``postgresql://postgres@127.0.0.1:5432/test``;
``$EMBEDPIPE_TEST_MYSQL``, default ``mysql://root@127.0.0.1:3306/test``); outside CI an
unreachable one skips, in CI it fails.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest

from embedpipe import jobs
from embedpipe.errors import ConfigurationError
from embedpipe.jobs import SourceError
from embedpipe.jobs.records import content_hash
from embedpipe.jobs.sources import source_from
from embedpipe.providers.fake import fake_vector

PG = os.environ.get("EMBEDPIPE_TEST_PG", "postgresql://postgres@127.0.0.1:5432/test")
MYSQL = os.environ.get("EMBEDPIPE_TEST_MYSQL", "mysql://root@127.0.0.1:3306/test")
ROWS = [(1, "first text", "a", 10), (2, None, "b", 20), (3, "", "c", 30), (4, "fourth text", "d", 40),
        (5, "fifth text", "e", 50)]


def _unreachable(reason: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(reason)
    pytest.skip(reason)


@dataclass
class Database:
    """One database kind: its source URL base and a way to run SQL in it."""

    kind: str
    base: str  #: the URL without options
    execute: Any

    def url(self, table: str, **options: str) -> str:
        query = "&".join(f"{k}={v}" for k, v in {"table": table, **options}.items())
        return f"{self.base}?{query}"


@contextlib.contextmanager
def _postgres() -> Iterator[Database]:
    import psycopg

    try:
        conn = psycopg.connect(PG, autocommit=True, connect_timeout=3)
    except psycopg.OperationalError as exc:
        _unreachable(f"PostgreSQL is not reachable at {PG}: {exc}")
    with conn:
        yield Database("postgresql", PG, lambda sql, args=(): conn.execute(sql.replace("?", "%s"), args))


@contextlib.contextmanager
def _mysql() -> Iterator[Database]:
    import pymysql

    try:
        conn = pymysql.connect(host="127.0.0.1", user="root", password="", database="test", autocommit=True,
                               connect_timeout=3)
    except pymysql.err.OperationalError as exc:
        _unreachable(f"MariaDB/MySQL is not reachable at {MYSQL}: {exc}")

    def execute(sql: str, args: Any = ()) -> None:
        with conn.cursor() as cur:
            cur.execute(sql.replace("?", "%s").replace('"', "`"), args)

    try:
        yield Database("mysql", MYSQL, execute)
    finally:
        conn.close()


@contextlib.contextmanager
def _sqlite(path: Path) -> Iterator[Database]:
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        yield Database("sqlite", f"sqlite:///{path}", conn.execute)
    finally:
        conn.close()


@pytest.fixture(params=["postgresql", "mysql", "sqlite"])
def db(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Database]:
    """Each database in turn."""
    opened = {"postgresql": _postgres, "mysql": _mysql}.get(request.param)
    with opened() if opened else _sqlite(tmp_path / "src.db") as database:
        yield database


@pytest.fixture
def table(db: Database) -> Iterator[str]:
    """A table of :data:`ROWS` (id, body, title, rank), dropped afterwards."""
    name = f"docs_{uuid.uuid4().hex[:10]}"
    db.execute(f'CREATE TABLE "{name}" (id integer PRIMARY KEY, body text, title varchar(20), "rank" integer)')
    for row in ROWS:
        db.execute(f'INSERT INTO "{name}" VALUES (?, ?, ?, ?)', row)
    yield name
    db.execute(f'DROP TABLE "{name}"')


def test_a_table_is_embedded_with_null_and_empty_texts_dead_lettered(db: Database, table: str,
                                                                    tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = jobs.run(db.url(table, text_field="body"), model="fake:8", out=out, cache="memory://")
    assert (result.records, result.written, result.dead_letters, result.exit_code) == (5, 3, 2, 3)
    assert sorted(letter.id for letter in jobs.dead_letters(out)) == ["2", "3"]
    rows = {r["id"]: r for r in pq.read_table(out).to_pylist()}
    assert sorted(rows) == ["1", "4", "5"]
    for rid, text, title, rank in ROWS:
        if text:
            row = rows[str(rid)]
            np.testing.assert_array_equal(np.asarray(row["vector"], dtype=np.float32), fake_vector(text, 8))
            assert row["content_hash"] == content_hash(text).hex()
            assert row["metadata"] == f'{{"rank":{rank},"title":"{title}"}}'
    # Run again after a change in the table: only that row is embedded, a deleted row leaves.
    db.execute(f'UPDATE "{table}" SET body = ? WHERE id = 4', ("fourth text, edited",))
    db.execute(f'DELETE FROM "{table}" WHERE id = 5')
    again = jobs.run(db.url(table, text_field="body"), model="fake:8", out=out, cache="memory://")
    assert (again.written, again.deleted, again.unchanged) == (1, 1, 1)


def test_metadata_columns_and_where_narrow_what_is_read(db: Database, table: str) -> None:
    source = source_from(db.url(table, text_field="body", metadata="title", where='"rank" >= 30'.replace(
        '"', "`" if db.kind == "mysql" else '"')))
    records = list(source)
    assert [(r.id, r.text, r.metadata) for r in records] == [
        ("3", "", {"title": "c"}), ("4", "fourth text", {"title": "d"}), ("5", "fifth text", {"title": "e"})]
    assert source.count() == 3


def test_the_cli_field_options_apply_and_the_url_overrides_them(db: Database, table: str) -> None:
    assert next(iter(source_from(db.url(table), text_field="body"))).text == "first text"
    assert next(iter(source_from(db.url(table, id_field="title", text_field="body"), id_field="id"))).id == "a"


def test_a_misspelt_column_is_named_with_a_suggestion_before_anything_is_read(db: Database, table: str) -> None:
    with pytest.raises(SourceError, match=r"no text column 'bdy'.*did you mean 'body'\?"):
        next(iter(source_from(db.url(table, text_field="bdy"))))
    with pytest.raises(SourceError, match=r"no metadata column 'titel'.*did you mean 'title'\?"):
        next(iter(source_from(db.url(table, text_field="body", metadata="titel"))))


def test_an_unknown_option_is_refused_naming_the_known_ones(db: Database, table: str) -> None:
    with pytest.raises(ConfigurationError, match=r"unknown option.*text_column.*takes"):
        source_from(db.url(table, text_column="body"))


def test_postgresql_reads_through_a_server_side_cursor_a_batch_at_a_time() -> None:
    import psycopg

    with _postgres() as db:
        name = f"big_{uuid.uuid4().hex[:10]}"
        db.execute(f"CREATE TABLE {name} AS SELECT g AS id, repeat('x', 100) || g AS text "
                   "FROM generate_series(1, 20000) g")
        try:
            source = source_from(db.url(name, fetch_rows="500"))
            rows = iter(source)
            first = [next(rows) for _ in range(10)]
            assert [r.id for r in first] == [str(i) for i in range(1, 11)]
            with psycopg.connect(PG, autocommit=True) as watcher:
                last = watcher.execute(
                    "SELECT query FROM pg_stat_activity WHERE state = 'idle in transaction' AND query LIKE %s",
                    ("%embedpipe_source%",)).fetchall()
            # The source's session is inside its transaction, its last statement a FETCH of one batch
            # from the named cursor: the rest of the table is still on the server.
            assert [q for (q,) in last] == ["FETCH FORWARD 500 FROM \"embedpipe_source\""]
            assert sum(1 for _ in rows) == 20000 - 10
        finally:
            db.execute(f"DROP TABLE {name}")


def test_mysql_streams_with_an_unbuffered_cursor() -> None:
    with _mysql() as db:
        name = f"big_{uuid.uuid4().hex[:10]}"
        db.execute(f"CREATE TABLE {name} (id integer PRIMARY KEY, text text)")
        db.execute(f"INSERT INTO {name} SELECT seq, CONCAT('row ', seq, REPEAT(' x', 1000)) FROM seq_1_to_5000")
        with contextlib.ExitStack() as stack:
            stack.callback(db.execute, f"DROP TABLE {name}")
            source = source_from(db.url(name, fetch_rows="100"))
            rows = iter(source)
            stack.callback(rows.close)  # before the DROP: an open unbuffered read holds the table
            assert next(rows).text.startswith("row 1 x")
            # Unbuffered: the SELECT (10 MB) is still being sent by the server while the first rows are used.
            import pymysql

            watcher = pymysql.connect(host="127.0.0.1", user="root", password="", database="test")
            try:
                with watcher.cursor() as cur:
                    cur.execute("SELECT count(*) FROM information_schema.processlist WHERE info LIKE %s "
                                "AND id <> CONNECTION_ID()", (f"SELECT%FROM `{name}`%",))
                    assert cur.fetchone() == (1,)
            finally:
                watcher.close()
            assert sum(1 for _ in rows) == 4999
