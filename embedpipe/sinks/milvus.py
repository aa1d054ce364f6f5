"""Milvus: ``milvus:///path.db?collection=docs`` (milvus-lite, in a local file) or
``milvus://host:19530?collection=docs`` (a Milvus server).

The collection is created with the schema ``id VARCHAR primary key, vector FLOAT_VECTOR(N),
content_hash, model, dimensions INT32, metadata VARCHAR (JSON), text VARCHAR`` and an
``AUTOINDEX`` on the vector for the metric (the server builds HNSW; milvus-lite, which
has no HNSW, a flat index). Batches go in with ``MilvusClient.upsert``.

Milvus caps a VARCHAR at 65,535 bytes: a longer text is stored cut to that length at a
character boundary (the vector is the whole text's); metadata JSON that long is an error.

Options: ``collection`` (required), ``metric``, ``batch_size`` (default 1000), ``store_text``,
``verify_sample``; for a server ``token`` (or the URL's user:password), ``secure``, ``db``.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from embedpipe._urls import URL
from embedpipe.errors import ConfigurationError
from embedpipe.sinks.base import COMMON_OPTIONS, DatabaseSink, Rows, SinkError, Stored, flag, required

#: Milvus's largest VARCHAR, in bytes
VARCHAR_MAX = 65_535
_METRIC = {"cosine": "COSINE", "l2": "L2", "ip": "IP"}


def _pymilvus() -> Any:
    try:
        import pymilvus
    except ImportError as exc:
        raise ConfigurationError(f"the milvus:// sink needs pymilvus ({exc}); pip install 'embedpipe[milvus]'") \
            from exc
    return pymilvus


def cut_utf8(text: str, limit: int = VARCHAR_MAX) -> str:
    """``text`` cut to at most ``limit`` UTF-8 bytes, never inside a character."""
    data = text.encode("utf-8", "surrogatepass")
    return text if len(data) <= limit else data[:limit].decode("utf-8", "ignore")


class MilvusSink(DatabaseSink):
    """Upsert vectors into a Milvus collection."""

    def __init__(self, uri: str, *, collection: str, token: str | None = None, db: str | None = None,
                 batch_size: int = 1000, metric: str = "cosine", store_text: bool = True,
                 verify_sample: int | None = None) -> None:
        super().__init__(collection=collection, batch_size=batch_size, metric=metric, store_text=store_text,
                         verify_sample=verify_sample)
        pymilvus = _pymilvus()
        self.library_errors = (pymilvus.MilvusException,)
        self.uri = uri
        kwargs: dict[str, Any] = {}
        if token:
            kwargs["token"] = token
        if db:
            kwargs["db_name"] = db
        self.client = self._connect(pymilvus, uri, kwargs)
        self._loaded = False

    def _connect(self, pymilvus: Any, uri: str, kwargs: dict[str, Any]) -> Any:
        from tenacity import Retrying, retry_if_exception_type, stop_after_attempt, stop_after_delay, wait_fixed

        local = "://" not in uri
        # After a crash, the killed run's milvus-lite server holds the file until it notices its
        # parent is gone (a few seconds): opening the file again is worth retrying a while.
        retrying = Retrying(stop=stop_after_delay(30) if local else stop_after_attempt(1), wait=wait_fixed(0.5),
                            retry=retry_if_exception_type(pymilvus.exceptions.ConnectionConfigException), reraise=True)
        try:
            return retrying(pymilvus.MilvusClient, uri, **kwargs)
        except pymilvus.MilvusException as exc:
            raise SinkError(f"{self.location()} could not be opened: {exc}") from exc

    @classmethod
    def from_url(cls, url: URL, **_: Any) -> MilvusSink:
        """The collection ``milvus:///path.db?collection=`` or ``milvus://host:19530?collection=`` names."""
        url.check_options((*COMMON_OPTIONS, "collection", "token", "secure", "db"), "sink")
        common = cls.common_options(url)
        collection = required(url, "collection")
        if not url.host:
            return cls(url.file_path("sink"), collection=collection, **common)
        scheme = "https" if flag(url, "secure", False) else "http"
        token = url.options.get("token") or (f"{url.username}:{url.password}" if url.username else None)
        return cls(f"{scheme}://{url.host}:{url.port or 19530}", collection=collection, token=token,
                   db=url.options.get("db"), **common)

    def location(self) -> str:
        where = f"milvus://{self.uri.partition('://')[2]}" if "://" in self.uri else f"milvus:///{self.uri}"
        return f"{where}?collection={self.collection}"

    def is_transient(self, exc: BaseException) -> bool:
        from pymilvus.exceptions import MilvusUnavailableException

        return isinstance(exc, MilvusUnavailableException)

    def _ensure_loaded(self) -> None:
        if not self._loaded:
            self.client.load_collection(self.collection)
            self._loaded = True

    def _exists(self) -> bool:
        return bool(self.client.has_collection(self.collection))

    # ------------------------------------------------------------------ adapter methods
    def existing_schema(self) -> tuple[int | None, str] | None:
        if not self._exists():
            return None
        fields = {f["name"]: f for f in self.client.describe_collection(self.collection)["fields"]}
        if "vector" not in fields or "id" not in fields:
            raise ConfigurationError(f"{self.location()} has no id and vector fields ({', '.join(fields)}); it is "
                                     "not an embedpipe collection. Name another collection")
        dims = int(fields["vector"]["params"]["dim"])
        metric = self.metric
        if "vector" in self.client.list_indexes(self.collection, field_name="vector"):
            found = str(self.client.describe_index(self.collection, "vector").get("metric_type", "")).upper()
            metric = {v: k for k, v in _METRIC.items()}.get(found, found.lower())
        return dims, metric

    def create(self, dims: int) -> None:
        from pymilvus import DataType, MilvusClient

        schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
        schema.add_field("id", DataType.VARCHAR, is_primary=True, max_length=VARCHAR_MAX)
        schema.add_field("vector", DataType.FLOAT_VECTOR, dim=dims)
        schema.add_field("content_hash", DataType.VARCHAR, max_length=64)
        schema.add_field("model", DataType.VARCHAR, max_length=1024)
        schema.add_field("dimensions", DataType.INT32)
        schema.add_field("metadata", DataType.VARCHAR, max_length=VARCHAR_MAX)
        schema.add_field("text", DataType.VARCHAR, max_length=VARCHAR_MAX)
        index = self.client.prepare_index_params()
        index.add_index(field_name="vector", index_type="AUTOINDEX", metric_type=_METRIC[self.metric])
        self.client.create_collection(self.collection, schema=schema, index_params=index)
        self._loaded = False

    def upsert(self, rows: Rows) -> None:
        self._ensure_loaded()
        texts = rows.texts if rows.texts is not None else [""] * len(rows)
        data = []
        for i, v, h, m, t in zip(rows.ids, rows.vectors, rows.content_hashes, rows.metadata, texts, strict=True):
            if len(m.encode("utf-8", "surrogatepass")) > VARCHAR_MAX:
                raise SinkError(f"{self.location()}: the metadata of {i!r} is over {VARCHAR_MAX} bytes of JSON, "
                                "Milvus's VARCHAR limit")
            data.append({"id": i, "vector": v, "content_hash": h, "model": rows.model, "dimensions": rows.dimensions,
                         "metadata": m, "text": cut_utf8(t)})
        self.client.upsert(self.collection, data)

    def remove(self, ids: Sequence[str]) -> None:
        if self._exists():
            self._ensure_loaded()
            # A filter, not ids=: pymilvus builds the same expression but without quoting the ids.
            self.client.delete(self.collection, filter=f"id in {json.dumps(list(ids))}")

    def fetch(self, ids: Sequence[str]) -> dict[str, Stored]:
        if not self._exists():
            return {}
        self._ensure_loaded()
        got = self.client.query(self.collection, filter=f"id in {json.dumps(list(ids))}",
                                output_fields=["id", "vector", "content_hash"])
        return {r["id"]: Stored(np.asarray(r["vector"], dtype=np.float32), r["content_hash"]) for r in got}

    def pairs(self, text_field: str, batch_size: int) -> Iterator[tuple[list[str], np.ndarray]]:
        if not self._exists():
            raise ConfigurationError(f"{self.location()} does not exist")
        self._ensure_loaded()
        it = self.client.query_iterator(self.collection, batch_size=batch_size, output_fields=[text_field, "vector"])
        try:
            while rows := it.next():
                # A text cut at Milvus's VARCHAR limit is not the text its vector was made from.
                keep = [r for r in rows if isinstance(r.get(text_field), str)
                        and len(r[text_field].encode("utf-8", "surrogatepass")) < VARCHAR_MAX]
                if keep:
                    yield [r[text_field] for r in keep], np.asarray([r["vector"] for r in keep], dtype=np.float32)
        finally:
            it.close()

    def count_rows(self) -> int:
        if not self._exists():
            return 0
        self._ensure_loaded()
        got = self.client.query(self.collection, filter="", output_fields=["count(*)"])
        return int(got[0]["count(*)"]) if got else 0

    def drop(self) -> None:
        if self._exists():
            self.client.drop_collection(self.collection)
        self._loaded = False

    def close(self) -> None:
        self.client.close()
        if "://" not in self.uri:
            # milvus-lite keeps the file's server (and its lock) for the life of the process unless told.
            from milvus_lite.server_manager import server_manager_instance

            server_manager_instance.release_server(self.uri)


__all__ = ["MilvusSink", "cut_utf8"]
