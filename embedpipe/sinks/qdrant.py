"""Qdrant: ``qdrant://host:6333?collection=docs`` (a server) or ``qdrant+local:///path?collection=docs``
(qdrant-client's local mode).

Local mode is a Python imitation of the server that qdrant-client ships, kept for tests
and small data; this sink uses only the client calls that both serve alike
(``collection_exists``, ``get_collection``, ``create_collection``, ``upsert``, ``delete``,
``retrieve``, ``count``). Batches go in with ``upsert(wait=True)``.

Qdrant point ids are unsigned integers or UUIDs, so a record's id maps to the UUID5 of
it (:func:`point_id`) and is kept whole in the payload (``id``), with ``content_hash``,
``model``, ``dimensions``, ``metadata`` (JSON) and ``text``. With the cosine metric Qdrant
stores vectors normalized; the read-back compares them so.

Options: ``collection`` (required), ``metric``, ``batch_size`` (default 256), ``store_text``,
``verify_sample``; for a server ``api_key`` (or the URL's password), ``https``, ``grpc``
(true: the gRPC port 6334).
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from embedpipe._urls import URL
from embedpipe.errors import ConfigurationError
from embedpipe.sinks.base import COMMON_OPTIONS, DatabaseSink, Rows, Stored, flag, required

#: the namespace of the UUID5s that stand for record ids
ID_NAMESPACE = uuid.UUID("6f1c1f6e-3b0e-5b8e-9a59-6d2f0b0e7e11")


def point_id(record_id: str) -> str:
    """The Qdrant point id of a record id: the same UUID5 every run."""
    return str(uuid.uuid5(ID_NAMESPACE, record_id))


def _qdrant() -> Any:
    try:
        import qdrant_client
    except ImportError as exc:
        raise ConfigurationError(f"the qdrant:// sink needs qdrant-client ({exc}); pip install 'embedpipe[qdrant]'") \
            from exc
    return qdrant_client


class QdrantSink(DatabaseSink):
    """Upsert vectors into a Qdrant collection."""

    def __init__(self, *, collection: str, path: str | None = None, host: str | None = None, port: int = 6333,
                 api_key: str | None = None, https: bool = False, grpc: bool = False, batch_size: int = 256,
                 metric: str = "cosine", store_text: bool = True, verify_sample: int | None = None) -> None:
        super().__init__(collection=collection, batch_size=batch_size, metric=metric, store_text=store_text,
                         verify_sample=verify_sample)
        if (path is None) == (host is None):
            raise ConfigurationError("a Qdrant sink takes a path (local mode) or a host")
        qdrant_client = _qdrant()
        from qdrant_client.http.exceptions import ResponseHandlingException, UnexpectedResponse

        self.library_errors = (UnexpectedResponse, ResponseHandlingException, ValueError, RuntimeError)
        self.path, self.host, self.port = path, host, port
        if path is not None:
            self.client = qdrant_client.QdrantClient(path=path)
        else:
            self.client = qdrant_client.QdrantClient(host=host, port=port, api_key=api_key, https=https,
                                                     prefer_grpc=grpc)

    @classmethod
    def from_url(cls, url: URL, **_: Any) -> QdrantSink:
        """The collection a ``qdrant://host:6333?collection=`` or ``qdrant+local:///path?collection=`` URL names."""
        common = cls.common_options
        if url.scheme == "qdrant+local":
            url.check_options((*COMMON_OPTIONS, "collection"), "sink")
            return cls(collection=required(url, "collection"), path=url.file_path("sink"), **common(url))
        url.check_options((*COMMON_OPTIONS, "collection", "api_key", "https", "grpc"), "sink")
        if not url.host:
            raise ConfigurationError(f"{url} names no Qdrant host; for local mode write qdrant+local:///path")
        return cls(collection=required(url, "collection"), host=url.host, port=url.port or 6333,
                   api_key=url.options.get("api_key") or url.password, https=flag(url, "https", False),
                   grpc=flag(url, "grpc", False), **common(url))

    def location(self) -> str:
        where = f"qdrant+local:///{self.path}" if self.path is not None else f"qdrant://{self.host}:{self.port}"
        return f"{where}?collection={self.collection}"

    def is_transient(self, exc: BaseException) -> bool:
        from qdrant_client.http.exceptions import ResponseHandlingException, UnexpectedResponse

        if isinstance(exc, ResponseHandlingException):  # the request never got an answer
            return True
        return isinstance(exc, UnexpectedResponse) and (exc.status_code == 429 or (exc.status_code or 0) >= 500)

    def _distance(self, metric: str) -> Any:
        from qdrant_client.models import Distance

        return {"cosine": Distance.COSINE, "l2": Distance.EUCLID, "ip": Distance.DOT}[metric]

    def stored_form(self, vector: np.ndarray) -> np.ndarray:
        if self.metric != "cosine":
            return vector
        norm = float(np.linalg.norm(vector))
        return vector / norm if norm else vector

    # ------------------------------------------------------------------ adapter methods
    def existing_schema(self) -> tuple[int | None, str] | None:
        if not self.client.collection_exists(self.collection):
            return None
        vectors = self.client.get_collection(self.collection).config.params.vectors
        if isinstance(vectors, dict):
            raise ConfigurationError(f"{self.location()} has named vectors ({', '.join(vectors)}); this sink "
                                     "writes one unnamed vector per point. Name another collection")
        metric = {self._distance(m): m for m in ("cosine", "l2", "ip")}.get(vectors.distance, str(vectors.distance))
        return int(vectors.size), metric

    def create(self, dims: int) -> None:
        from qdrant_client.models import VectorParams

        self.client.create_collection(self.collection,
                                      vectors_config=VectorParams(size=dims, distance=self._distance(self.metric)))

    def upsert(self, rows: Rows) -> None:
        from qdrant_client.models import Batch

        texts = rows.texts if rows.texts is not None else [None] * len(rows)
        payloads = [{"id": i, "content_hash": h, "model": rows.model, "dimensions": rows.dimensions, "metadata": m,
                     **({"text": t} if t is not None else {})}
                    for i, h, m, t in zip(rows.ids, rows.content_hashes, rows.metadata, texts, strict=True)]
        self.client.upsert(self.collection, wait=True, points=Batch(
            ids=[point_id(i) for i in rows.ids], vectors=rows.vectors.tolist(), payloads=payloads))

    def remove(self, ids: Sequence[str]) -> None:
        from qdrant_client.models import PointIdsList

        if self.client.collection_exists(self.collection):
            self.client.delete(self.collection, wait=True,
                               points_selector=PointIdsList(points=[point_id(i) for i in ids]))

    def fetch(self, ids: Sequence[str]) -> dict[str, Stored]:
        points = self.client.retrieve(self.collection, ids=[point_id(i) for i in ids], with_vectors=True,
                                      with_payload=["id", "content_hash"])
        return {str(p.payload["id"]): Stored(np.asarray(p.vector, dtype=np.float32), str(p.payload["content_hash"]))
                for p in points if p.payload}

    def pairs(self, text_field: str, batch_size: int) -> Iterator[tuple[list[str], np.ndarray]]:
        if not self.client.collection_exists(self.collection):
            raise ConfigurationError(f"{self.location()} does not exist")
        offset = None
        while True:
            points, offset = self.client.scroll(self.collection, limit=batch_size, offset=offset, with_vectors=True,
                                                with_payload=[text_field])
            keep = [p for p in points if p.payload and isinstance(p.payload.get(text_field), str)]
            if keep:
                yield ([str(p.payload[text_field]) for p in keep if p.payload],
                       np.asarray([p.vector for p in keep], dtype=np.float32))
            if offset is None:
                return

    def count_rows(self) -> int:
        if not self.client.collection_exists(self.collection):
            return 0
        return int(self.client.count(self.collection, exact=True).count)

    def drop(self) -> None:
        if self.client.collection_exists(self.collection):
            self.client.delete_collection(self.collection)

    def close(self) -> None:
        self.client.close()


__all__ = ["ID_NAMESPACE", "QdrantSink", "point_id"]
