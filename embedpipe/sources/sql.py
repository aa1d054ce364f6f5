"""SQL tables as sources: PostgreSQL, MySQL/MariaDB and SQLite, read through a streaming cursor.

``postgresql://user@host/db?table=docs&id_field=id&text_field=body&metadata=title,url&where=lang='en'``,
the same with ``mysql://`` (or ``mariadb://``), and ``sqlite:///path.db?table=docs``.

* ``table`` (required; ``schema.table`` for PostgreSQL), ``id_field`` and ``text_field``
  (the CLI's ``--id-field``/``--text-field``, which the URL overrides), ``metadata``
  (columns kept as metadata, comma-separated; default every other column), ``where`` (a
  SQL condition, inserted as written: it is the table owner's own text, not user input).
* Rows stream through a server-side cursor (psycopg's named cursor, PyMySQL's ``SSCursor``,
  SQLite's lazy cursor), ``fetch_rows`` at a time (default 2000): memory stays bounded
  whatever the table's size.
* A NULL id is an error (a job needs stable ids). A NULL or empty text becomes an empty
  record, which the job sends to the dead-letter queue, as with file sources.
"""

from __future__ import annotations

import contextlib
import difflib
import sqlite3
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from embedpipe._urls import URL, redact_url
from embedpipe.errors import ConfigurationError
from embedpipe.jobs.errors import SourceError
from embedpipe.jobs.records import Record
from embedpipe.jobs.sources import Source

#: options every SQL source URL takes
SQL_OPTIONS = ("table", "id_field", "text_field", "metadata", "where", "fetch_rows")
DEFAULT_FETCH_ROWS = 2000


class SQLSource(Source):
    """Base class of SQL-table sources. Override :meth:`connect`, :meth:`quote` and :meth:`stream`."""

    #: what the database is called in messages
    engine = "SQL"

    def __init__(self, *, table: str, id_field: str = "id", text_field: str = "text",
                 metadata: Sequence[str] | None = None, where: str | None = None,
                 fetch_rows: int = DEFAULT_FETCH_ROWS, location: str = "") -> None:
        if not table:
            raise ConfigurationError(f"a {self.engine} source needs a table (?table=NAME)")
        self.table = table
        self.id_field = id_field
        self.text_field = text_field
        self.metadata = list(metadata) if metadata is not None else None
        self.where = where
        self.fetch_rows = fetch_rows
        self.name = f"{location}?table={table}" if location else table

    @staticmethod
    def options_of(url: URL, id_field: str, text_field: str, extra: Sequence[str] = ()) -> dict[str, Any]:
        """The keyword arguments the :data:`SQL_OPTIONS` of ``url`` give (``id_field``/``text_field``: defaults)."""
        url.check_options((*SQL_OPTIONS, *extra), "source")
        opts = url.options
        rows = opts.get("fetch_rows", str(DEFAULT_FETCH_ROWS))
        if not rows.isdigit() or int(rows) < 1:
            raise ConfigurationError(f"fetch_rows={rows!r} in the source URL {url} must be a positive integer")
        metadata = opts.get("metadata")
        return {"table": opts.get("table", ""), "id_field": opts.get("id_field") or id_field,
                "text_field": opts.get("text_field") or text_field,
                "metadata": None if metadata is None else [c.strip() for c in metadata.split(",") if c.strip()],
                "where": opts.get("where") or None, "fetch_rows": int(rows)}

    # ------------------------------------------------------------------ dialect
    def connect(self) -> Any:
        """A new DB-API connection."""
        raise NotImplementedError

    def quote(self, name: str) -> str:
        """``name`` as a quoted identifier (``schema.table`` quoted part by part)."""
        return ".".join('"' + part.replace('"', '""') + '"' for part in name.split("."))

    def stream(self, conn: Any, query: str) -> Iterator[Sequence[Any]]:
        """The rows of ``query``, read ``fetch_rows`` at a time through a server-side cursor."""
        raise NotImplementedError

    def errors(self) -> tuple[type[BaseException], ...]:
        """The driver's exception types, mapped to :class:`SourceError`."""
        raise NotImplementedError

    # ------------------------------------------------------------------ shared
    def _from(self) -> str:
        return f"FROM {self.quote(self.table)}" + (f" WHERE {self.where}" if self.where else "")

    def columns(self, conn: Any) -> list[str]:
        """The table's column names."""
        cur = conn.cursor()
        try:
            cur.execute(f"SELECT * FROM {self.quote(self.table)} WHERE 1 = 0")
            return [d[0] for d in cur.description]
        finally:
            cur.close()

    def select_list(self, columns: Sequence[str]) -> list[str]:
        """The columns read: id, text, then the metadata ones; raises naming a column the table lacks."""
        for what, col in (("id", self.id_field), ("text", self.text_field), *(("metadata", c) for c in
                                                                              (self.metadata or []))):
            if col not in columns:
                close = difflib.get_close_matches(col, columns, n=1)
                hint = f"; did you mean {close[0]!r}?" if close else ""
                option = {"id": "--id-field", "text": "--text-field"}.get(what, "?metadata=")
                raise SourceError(f"{self.name}: no {what} column {col!r} (columns: {', '.join(columns)}){hint} "
                                  f"Choose it with {option}")
        rest = self.metadata if self.metadata is not None else \
            [c for c in columns if c not in (self.id_field, self.text_field)]
        return [self.id_field, self.text_field, *rest]

    def record(self, row: Sequence[Any], names: Sequence[str]) -> Record:
        """The record of one row (id, text, metadata columns)."""
        rid, text = row[0], row[1]
        if rid is None:
            raise SourceError(f"{self.name}: a row has a NULL {self.id_field!r}; every row needs an id")
        if isinstance(text, (bytes, bytearray, memoryview)):
            text = bytes(text).decode("utf-8", "replace")
        metadata = dict(zip(names[2:], row[2:], strict=True))
        return Record(str(rid), "" if text is None else text if isinstance(text, str) else str(text), metadata)

    def rows_query(self, conn: Any) -> tuple[str, list[str]]:
        names = self.select_list(self.columns(conn))
        return f"SELECT {', '.join(self.quote(c) for c in names)} {self._from()}", names

    def __iter__(self) -> Iterator[Record]:
        with self._mapped():
            conn = self.connect()
            try:
                query, names = self.rows_query(conn)
                for row in self.stream(conn, query):
                    yield self.record(row, names)
            finally:
                conn.close()

    def count(self) -> int | None:
        with self._mapped():
            conn = self.connect()
            try:
                cur = conn.cursor()
                cur.execute(f"SELECT count(*) {self._from()}")
                return int(cur.fetchone()[0])
            finally:
                conn.close()

    @contextlib.contextmanager
    def _mapped(self) -> Iterator[None]:
        try:
            yield
        except self.errors() as exc:
            raise SourceError(f"{self.name}: {type(exc).__name__}: {exc}") from exc


# ------------------------------------------------------------------ PostgreSQL
class PostgresSource(SQLSource):
    """A PostgreSQL table or view, read with psycopg 3 through a named (server-side) cursor."""

    engine = "PostgreSQL"

    def __init__(self, dsn: str, **options: Any) -> None:
        from embedpipe._urls import public_url

        super().__init__(location=public_url(dsn) or "postgresql://", **options)
        self.dsn = dsn

    @classmethod
    def from_url(cls, url: URL, *, id_field: str = "id", text_field: str = "text") -> PostgresSource:
        """The table ``postgresql://user@host/db?table=docs&text_field=body`` names (see the module)."""
        from embedpipe.sinks.pgvector import LIBPQ_OPTIONS

        options = cls.options_of(url, id_field, text_field, LIBPQ_OPTIONS)
        return cls(url.without_options(*SQL_OPTIONS), **options)

    def connect(self) -> Any:
        try:
            import psycopg
        except ImportError as exc:
            raise ConfigurationError(f"a postgresql:// source needs psycopg ({exc}); "
                                     "pip install 'embedpipe[pgvector]'") from exc
        conn = psycopg.connect(self.dsn)
        conn.read_only = True
        return conn

    def stream(self, conn: Any, query: str) -> Iterator[Sequence[Any]]:
        with conn.cursor(name="embedpipe_source") as cur:
            cur.itersize = self.fetch_rows
            cur.execute(query)
            yield from cur

    def errors(self) -> tuple[type[BaseException], ...]:
        import psycopg

        return (psycopg.Error,)


# ------------------------------------------------------------------ MySQL / MariaDB
class MySQLSource(SQLSource):
    """A MySQL or MariaDB table, read with PyMySQL through an unbuffered ``SSCursor``."""

    engine = "MySQL"

    def __init__(self, *, host: str = "localhost", port: int = 3306, user: str | None = None,
                 password: str | None = None, database: str | None = None, unix_socket: str | None = None,
                 **options: Any) -> None:
        where = f"mysql://{host}:{port}/{database or ''}"
        super().__init__(location=where, **options)
        self.connect_args = {"host": host, "port": port, "user": user, "password": password or "",
                             "database": database, "unix_socket": unix_socket, "charset": "utf8mb4"}

    @classmethod
    def from_url(cls, url: URL, *, id_field: str = "id", text_field: str = "text") -> MySQLSource:
        """The table ``mysql://user:password@host:3306/db?table=docs`` names (``mariadb://`` alike)."""
        options = cls.options_of(url, id_field, text_field, ("unix_socket",))
        if not url.path:
            raise ConfigurationError(f"the source URL {redact_url(url.raw)} names no database: "
                                     "mysql://user@host/DATABASE?table=...")
        return cls(host=url.host or "localhost", port=url.port or 3306, user=url.username, password=url.password,
                   database=url.path, unix_socket=url.options.get("unix_socket"), **options)

    def quote(self, name: str) -> str:
        return ".".join("`" + part.replace("`", "``") + "`" for part in name.split("."))

    def connect(self) -> Any:
        try:
            import pymysql
        except ImportError as exc:
            raise ConfigurationError(f"a mysql:// source needs PyMySQL ({exc}); pip install 'embedpipe[mysql]'") \
                from exc
        return pymysql.connect(**{k: v for k, v in self.connect_args.items() if v is not None})

    def stream(self, conn: Any, query: str) -> Iterator[Sequence[Any]]:
        import pymysql.cursors

        cur = conn.cursor(pymysql.cursors.SSCursor)
        try:
            cur.execute(query)
            while rows := cur.fetchmany(self.fetch_rows):
                yield from rows
        finally:
            cur.close()

    def errors(self) -> tuple[type[BaseException], ...]:
        import pymysql

        return (pymysql.Error,)


# ------------------------------------------------------------------ SQLite
class SQLiteSource(SQLSource):
    """A table of an SQLite file, opened read-only."""

    engine = "SQLite"

    def __init__(self, path: str, **options: Any) -> None:
        super().__init__(location=f"sqlite:///{path}", **options)
        self.path = Path(path)

    @classmethod
    def from_url(cls, url: URL, *, id_field: str = "id", text_field: str = "text") -> SQLiteSource:
        """The table ``sqlite:///relative.db?table=docs`` or ``sqlite:////absolute.db?table=docs`` names."""
        options = cls.options_of(url, id_field, text_field)
        return cls(url.file_path("source"), **options)

    def connect(self) -> Any:
        if not self.path.exists():
            raise SourceError(f"source {self.path} does not exist")
        return sqlite3.connect(f"{self.path.resolve().as_uri()}?mode=ro", uri=True)

    def stream(self, conn: Any, query: str) -> Iterator[Sequence[Any]]:
        cur = conn.execute(query)
        cur.arraysize = self.fetch_rows
        while rows := cur.fetchmany():
            yield from rows

    def errors(self) -> tuple[type[BaseException], ...]:
        return (sqlite3.Error,)


__all__ = ["MySQLSource", "PostgresSource", "SQLSource", "SQLiteSource"]
