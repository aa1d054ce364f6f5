"""LanceDB: ``lancedb:///path?table=docs`` (a dataset folder, in process).

Each batch is an Arrow table merged with ``merge_insert("id")`` (update when matched,
insert when not), so a replayed batch changes nothing. Every merge is a new table
version; :meth:`LanceDBSink.compact` runs ``optimize()`` at the end of a run to fold them
and prune the old ones. The vector column is a ``fixed_size_list<float32>[N]``; LanceDB
stores no metric with a table (it is chosen per query or index), so ``?metric=`` is not
checked against it. No ANN index is built: LanceDB searches exactly without one, and an
IVF index needs training rows that a first run may not have.

Options: ``table`` (required), ``batch_size`` (default 10000), ``store_text``, ``verify_sample``.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from embedpipe._urls import URL
from embedpipe.errors import ConfigurationError
from embedpipe.sinks.base import COMMON_OPTIONS, DatabaseSink, Rows, Stored, required

if TYPE_CHECKING:
    import pyarrow as pa

    from embedpipe.jobs.state import JobState


def _lancedb() -> Any:
    try:
        import lancedb
    except ImportError as exc:
        raise ConfigurationError(f"the lancedb:// sink needs lancedb ({exc}); pip install 'embedpipe[lancedb]'") \
            from exc
    return lancedb


def sql_strings(values: Sequence[str]) -> str:
    """``values`` as a SQL list of string literals (quotes doubled): LanceDB filters are SQL text."""
    return ", ".join("'" + v.replace("'", "''") + "'" for v in values)


class LanceDBSink(DatabaseSink):
    """Merge vectors into a LanceDB table by id."""

    # LanceDB raises plain Python errors: OSError for I/O, RuntimeError/ValueError from its Rust core.
    library_errors = (OSError, RuntimeError, ValueError)

    def __init__(self, path: str, *, table: str, batch_size: int = 10_000, metric: str = "cosine",
                 store_text: bool = True, verify_sample: int | None = None) -> None:
        super().__init__(collection=table, batch_size=batch_size, metric=metric, store_text=store_text,
                         verify_sample=verify_sample)
        self.path = path
        self.db = _lancedb().connect(path)
        self._table: Any = None

    @classmethod
    def from_url(cls, url: URL, **_: Any) -> LanceDBSink:
        """The table ``lancedb:///path?table=docs`` names."""
        url.check_options((*COMMON_OPTIONS, "table"), "sink")
        return cls(url.file_path("sink"), table=required(url, "table"), **cls.common_options(url))

    def location(self) -> str:
        return f"lancedb:///{self.path}?table={self.collection}"

    def is_transient(self, exc: BaseException) -> bool:
        # A concurrent commit to the same table: Lance retries inside, and once more here is cheap.
        return isinstance(exc, RuntimeError) and "conflict" in str(exc).lower()

    def schema(self, dims: int) -> pa.Schema:
        import pyarrow as pa

        return pa.schema([("id", pa.string()), ("vector", pa.list_(pa.float32(), dims)),
                          ("content_hash", pa.string()), ("model", pa.string()), ("dimensions", pa.int32()),
                          ("metadata", pa.string()), ("text", pa.string())])

    def _get(self) -> Any:
        if self._table is None:
            if self.collection not in self.db.list_tables().tables:
                return None
            self._table = self.db.open_table(self.collection)
        return self._table

    # ------------------------------------------------------------------ adapter methods
    def existing_schema(self) -> tuple[int | None, str] | None:
        table = self._get()
        if table is None:
            return None
        names = table.schema.names
        if "vector" not in names or "id" not in names:
            raise ConfigurationError(f"{self.location()} exists without id and vector columns ({names}); it is not "
                                     "an embedpipe table. Name another table")
        return int(table.schema.field("vector").type.list_size), self.metric

    def create(self, dims: int) -> None:
        self._table = self.db.create_table(self.collection, schema=self.schema(dims), exist_ok=True)

    def upsert(self, rows: Rows) -> None:
        import pyarrow as pa

        n = len(rows)
        flat = pa.array(rows.vectors.reshape(-1), type=pa.float32())
        data = pa.Table.from_arrays([
            pa.array(rows.ids, pa.string()), pa.FixedSizeListArray.from_arrays(flat, rows.dimensions),
            pa.array(rows.content_hashes, pa.string()), pa.array([rows.model] * n, pa.string()),
            pa.array(np.full(n, rows.dimensions, dtype=np.int32), pa.int32()), pa.array(rows.metadata, pa.string()),
            pa.array(rows.texts if rows.texts is not None else [None] * n, pa.string())],
            schema=self.schema(rows.dimensions))
        self._get().merge_insert("id").when_matched_update_all().when_not_matched_insert_all().execute(data)

    def remove(self, ids: Sequence[str]) -> None:
        table = self._get()
        if table is not None:
            table.delete(f"id IN ({sql_strings(ids)})")

    def fetch(self, ids: Sequence[str]) -> dict[str, Stored]:
        table = self._get()
        if table is None:
            return {}
        got = (table.search().where(f"id IN ({sql_strings(ids)})").select(["id", "vector", "content_hash"])
               .limit(len(ids)).to_arrow())
        return {r["id"]: Stored(np.asarray(r["vector"], dtype=np.float32), r["content_hash"])
                for r in got.to_pylist()}

    def pairs(self, text_field: str, batch_size: int) -> Iterator[tuple[list[str], np.ndarray]]:
        table = self._get()
        if table is None:
            raise ConfigurationError(f"{self.location()} does not exist")
        if text_field not in table.schema.names:
            raise ConfigurationError(f"{self.location()} has no {text_field!r} column ({table.schema.names})")
        for offset in range(0, table.count_rows(), batch_size):
            got = table.search().select([text_field, "vector"]).offset(offset).limit(batch_size).to_arrow()
            texts = got.column(text_field).to_pylist()
            keep = [i for i, t in enumerate(texts) if isinstance(t, str)]
            vectors = np.asarray(got.column("vector").to_pylist(), dtype=np.float32)
            if keep:
                yield [texts[i] for i in keep], vectors[keep]

    def count_rows(self) -> int:
        table = self._get()
        return 0 if table is None else int(table.count_rows())

    def drop(self) -> None:
        if self._get() is not None:
            self.db.drop_table(self.collection)
        self._table = None

    def compact(self, state: JobState) -> None:
        table = self._get()
        if table is not None:
            self.call(table.optimize)


__all__ = ["LanceDBSink", "sql_strings"]
