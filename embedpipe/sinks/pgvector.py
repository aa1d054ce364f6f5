"""PostgreSQL with pgvector: ``postgresql://user@host:5432/db?table=docs``.

The table is created if absent (``CREATE EXTENSION IF NOT EXISTS vector`` first), with an
HNSW index for the metric unless ``?index=none``::

    id text PRIMARY KEY, vector vector(N), content_hash text, model text, dimensions int,
    metadata jsonb, text text

Each batch is staged with a binary ``COPY`` into a temporary table and merged with
``INSERT ... ON CONFLICT (id) DO UPDATE`` in one transaction, so a replayed batch changes
nothing. A batch none of whose ids is in the table yet (a first load) is copied straight in,
in a transaction that first checks so. Read-back uses a binary cursor, so vectors come back
as the exact float32 written.

Options: ``table`` (required), ``schema``, ``metric`` (cosine, l2, ip), ``index`` (hnsw,
none), ``batch_size`` (rows per transaction, default 5000), ``store_text``,
``verify_sample``, and libpq's own :data:`LIBPQ_OPTIONS` (``sslmode``, ``host=/socket/dir``...).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from embedpipe._urls import URL, public_url
from embedpipe.errors import ConfigurationError
from embedpipe.sinks.base import COMMON_OPTIONS, DatabaseSink, Rows, SinkError, Stored, required

if TYPE_CHECKING:
    import psycopg

#: pgvector's operator class for each metric
OPCLASS = {"cosine": "vector_cosine_ops", "l2": "vector_l2_ops", "ip": "vector_ip_ops"}
#: pgvector 0.5-0.8 indexes vector columns of at most this many dimensions with HNSW
HNSW_MAX_DIMS = 2000
#: libpq's own URI options, passed through (``host=/socket/dir`` for a Unix socket)
LIBPQ_OPTIONS = ("host", "port", "sslmode", "sslrootcert", "connect_timeout", "application_name",
                 "target_session_attrs", "options")
_STAGE = "embedpipe_stage"


def _psycopg() -> Any:
    try:
        import pgvector.psycopg
        import psycopg
    except ImportError as exc:
        raise ConfigurationError(f"the postgresql:// sink needs psycopg and pgvector ({exc}); "
                                 "pip install 'embedpipe[pgvector]'") from exc
    return psycopg, pgvector.psycopg


def conninfo(url: URL, own: Sequence[str]) -> str:
    """The libpq connection URI of ``url``, less embedpipe's own options ``own``."""
    return url.without_options(*own).replace("postgres+psycopg://", "postgresql://", 1)


class PgVectorSink(DatabaseSink):
    """Upsert vectors into a PostgreSQL table with a pgvector column."""

    def __init__(self, dsn: str, *, table: str, schema: str | None = None, batch_size: int = 5000,
                 metric: str = "cosine", index: str = "hnsw", store_text: bool = True,
                 verify_sample: int | None = None) -> None:
        super().__init__(collection=table, batch_size=batch_size, metric=metric, store_text=store_text,
                         verify_sample=verify_sample)
        if index not in ("hnsw", "none"):
            raise ConfigurationError(f"index={index!r} for the postgresql:// sink; use hnsw or none")
        driver, _ = _psycopg()
        self.library_errors = (driver.Error,)
        self.dsn = dsn
        self.table = table
        self.schema = schema
        self.index = index
        self._conn: psycopg.Connection[Any] | None = None

    @classmethod
    def from_url(cls, url: URL, **_: Any) -> PgVectorSink:
        """The table ``postgresql://user@host/db?table=docs`` names (see the module for the options)."""
        own = (*COMMON_OPTIONS, "table", "schema", "index")
        url.check_options((*own, *LIBPQ_OPTIONS), "sink")
        return cls(conninfo(url, own), table=required(url, "table"), schema=url.options.get("schema") or None,
                   index=url.options.get("index", "hnsw"), **cls.common_options(url))

    # ------------------------------------------------------------------ connection
    def connection(self) -> psycopg.Connection[Any]:
        """The open connection, (re)connecting when there is none or the last one broke."""
        driver, pgv = _psycopg()
        if self._conn is None or self._conn.closed or self._conn.broken:
            if self._conn is not None:
                self._conn.close()
            conn: psycopg.Connection[Any] = driver.connect(self.dsn, autocommit=True)
            try:
                conn.execute("CREATE EXTENSION IF NOT EXISTS vector")
            except driver.Error as exc:
                conn.close()
                raise SinkError(f"{self.location()}: the pgvector extension is not available on this server "
                                f"({exc.sqlstate}: {exc}); install pgvector, or have a superuser run "
                                "CREATE EXTENSION vector") from exc
            pgv.register_vector(conn)
            self._conn = conn
        return self._conn

    def is_transient(self, exc: BaseException) -> bool:
        import psycopg.errors as e

        return isinstance(exc, (e.OperationalError, e.SerializationFailure, e.DeadlockDetected))

    def location(self) -> str:
        shown = public_url(self.dsn) or "postgresql://"
        return f"{shown}?table={self.qualified_name}"

    @property
    def qualified_name(self) -> str:
        return f"{self.schema}.{self.table}" if self.schema else self.table

    def _ident(self) -> Any:
        from psycopg import sql

        return sql.Identifier(self.schema, self.table) if self.schema else sql.Identifier(self.table)

    def _oid(self, conn: psycopg.Connection[Any]) -> int | None:
        row = conn.execute("SELECT to_regclass(%s)::oid", (self._ident().as_string(conn),)).fetchone()
        return None if row is None or row[0] is None else int(row[0])

    # ------------------------------------------------------------------ adapter methods
    def existing_schema(self) -> tuple[int, str] | None:
        conn = self.connection()
        oid = self._oid(conn)
        if oid is None:
            return None
        row = conn.execute("SELECT a.atttypmod, t.typname FROM pg_attribute a JOIN pg_type t ON t.oid = a.atttypid "
                           "WHERE a.attrelid = %s AND a.attname = 'vector' AND NOT a.attisdropped", (oid,)).fetchone()
        if row is None or row[1] != "vector" or row[0] < 1:
            raise ConfigurationError(f"{self.location()} exists but has no vector(N) column named 'vector'; it is "
                                     "not an embedpipe table. Name another table")
        opclasses = {r[0] for r in conn.execute(
            "SELECT opc.opcname FROM pg_index i JOIN pg_opclass opc ON opc.oid = ANY(i.indclass) "
            "WHERE i.indrelid = %s", (oid,))}
        metrics = [m for m, opc in OPCLASS.items() if opc in opclasses]
        # A table without a vector index answers any metric alike (exact scan): the job's fits.
        return int(row[0]), metrics[0] if len(metrics) == 1 else self.metric

    def create(self, dims: int) -> None:
        from psycopg import sql

        conn = self.connection()
        with conn.transaction():
            if self.schema:
                conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(self.schema)))
            conn.execute(sql.SQL(
                "CREATE TABLE IF NOT EXISTS {} (id text PRIMARY KEY, vector vector({}) NOT NULL, "
                "content_hash text NOT NULL, model text NOT NULL, dimensions integer NOT NULL, "
                "metadata jsonb NOT NULL, text text)").format(self._ident(), sql.Literal(dims)))
            if self.index == "hnsw":
                if dims > HNSW_MAX_DIMS:
                    raise ConfigurationError(f"pgvector's HNSW index takes at most {HNSW_MAX_DIMS} dimensions, "
                                             f"not {dims}; pass ?index=none (or fewer --dimensions)")
                conn.execute(sql.SQL("CREATE INDEX IF NOT EXISTS {} ON {} USING hnsw (vector {})").format(
                    sql.Identifier(f"{self.table}_vector_hnsw"), self._ident(), sql.SQL(OPCLASS[self.metric])))

    def upsert(self, rows: Rows) -> None:
        import psycopg.errors

        conn = self.connection()
        if len(set(rows.ids)) == len(rows.ids):
            try:
                with conn.transaction():
                    if not self._any_exist(conn, rows.ids):
                        # None of the ids is in the table (a first load, new records): COPY straight
                        # in, one write instead of the staging table's two.
                        self._copy(conn, self._ident(), rows, ("metadata", "jsonb"))
                        return
            except psycopg.errors.UniqueViolation:
                pass  # another writer inserted one of them meanwhile: merge instead
        self._merge(conn, rows)

    def _any_exist(self, conn: psycopg.Connection[Any], ids: Sequence[str]) -> bool:
        from psycopg import sql

        row = conn.execute(sql.SQL("SELECT EXISTS (SELECT 1 FROM {} WHERE id = ANY(%s))").format(self._ident()),
                           (list(ids),)).fetchone()
        return bool(row and row[0])

    def _copy(self, conn: psycopg.Connection[Any], target: Any, rows: Rows, metadata: tuple[str, str]) -> None:
        from psycopg import sql

        texts = rows.texts if rows.texts is not None else [None] * len(rows)
        with conn.cursor() as cur, cur.copy(sql.SQL(
                "COPY {} (id, vector, content_hash, model, dimensions, metadata, text) FROM STDIN (FORMAT BINARY)"
        ).format(target)) as copy:
            # jsonb's binary form is a version byte and the JSON text: written here as bytes, so the
            # metadata JSON goes in exactly as the job made it.
            copy.set_types(["text", "vector", "text", "text", "int4", "bytea" if metadata[1] == "jsonb" else "text",
                            "text"])
            for row in zip(rows.ids, rows.vectors, rows.content_hashes, [rows.model] * len(rows),
                           [rows.dimensions] * len(rows),
                           [b"\x01" + m.encode() for m in rows.metadata] if metadata[1] == "jsonb" else rows.metadata,
                           texts, strict=True):
                copy.write_row(row)

    def _merge(self, conn: psycopg.Connection[Any], rows: Rows) -> None:
        from psycopg import sql

        with conn.transaction():
            conn.execute(sql.SQL(
                "CREATE TEMP TABLE IF NOT EXISTS {} (id text, vector vector, content_hash text, model text, "
                "dimensions integer, metadata text, text text) ON COMMIT DELETE ROWS").format(
                    sql.Identifier(_STAGE)))
            self._copy(conn, sql.Identifier(_STAGE), rows, ("metadata", "text"))
            # Two rows of one id in a batch cannot both go through ON CONFLICT: keep one.
            conn.execute(sql.SQL(
                "INSERT INTO {} (id, vector, content_hash, model, dimensions, metadata, text) "
                "SELECT DISTINCT ON (id) id, vector, content_hash, model, dimensions, metadata::jsonb, text "
                "FROM {} ORDER BY id "
                "ON CONFLICT (id) DO UPDATE SET vector = EXCLUDED.vector, content_hash = EXCLUDED.content_hash, "
                "model = EXCLUDED.model, dimensions = EXCLUDED.dimensions, metadata = EXCLUDED.metadata, "
                "text = EXCLUDED.text").format(self._ident(), sql.Identifier(_STAGE)))

    def remove(self, ids: Sequence[str]) -> None:
        from psycopg import sql

        self.connection().execute(sql.SQL("DELETE FROM {} WHERE id = ANY(%s)").format(self._ident()), (list(ids),))

    def fetch(self, ids: Sequence[str]) -> dict[str, Stored]:
        from psycopg import sql

        conn = self.connection()
        with conn.cursor(binary=True) as cur:
            cur.execute(sql.SQL("SELECT id, vector, content_hash FROM {} WHERE id = ANY(%s)").format(self._ident()),
                        (list(ids),))
            return {i: Stored(np.asarray(v.to_numpy(), dtype=np.float32), h) for i, v, h in cur}

    def pairs(self, text_field: str, batch_size: int) -> Iterator[tuple[list[str], np.ndarray]]:
        from psycopg import sql

        driver, pgv = _psycopg()
        # A connection of its own: a named (server-side) cursor lives in a transaction.
        with driver.connect(self.dsn) as conn:
            pgv.register_vector(conn)
            conn.read_only = True
            with conn.cursor(name="embedpipe_pairs", binary=True) as cur:
                cur.itersize = batch_size
                cur.execute(sql.SQL("SELECT {}, vector FROM {} WHERE {} IS NOT NULL").format(
                    sql.Identifier(text_field), self._ident(), sql.Identifier(text_field)))
                while rows := cur.fetchmany(batch_size):
                    yield [str(t) for t, _ in rows], np.stack([v.to_numpy() for _, v in rows])

    def count_rows(self) -> int:
        from psycopg import sql

        conn = self.connection()
        if self._oid(conn) is None:
            return 0
        row = conn.execute(sql.SQL("SELECT count(*) FROM {}").format(self._ident())).fetchone()
        return int(row[0]) if row else 0

    def drop(self) -> None:
        from psycopg import sql

        self.connection().execute(sql.SQL("DROP TABLE IF EXISTS {}").format(self._ident()))

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None


__all__ = ["LIBPQ_OPTIONS", "PgVectorSink", "conninfo"]
