"""The real database engines the database tests run against, and a native reader for each sink.

* pgvector: a private PostgreSQL 16 with the pgvector extension from the ``pgserver``
  package (as root, pgserver runs it as a system user ``pgserver`` that it creates).
* Chroma, LanceDB and milvus-lite 2.5: the real engines, in process (milvus-lite as a
  child server process it starts itself).
* Qdrant: qdrant-client's *local mode*, a Python imitation of the server. No Qdrant
  server binary is available here, so the Qdrant sink is tested only against that
  imitation; the sink keeps to the client calls both share.

Each reader opens the collection with the engine's own client, not through the sink, and
returns every row as ``{id: Row}``.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import tempfile
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

KINDS = ["pgvector", "chroma", "lancedb", "qdrant", "milvus"]

_MILVUS_READER = """
import json, sys, warnings
warnings.simplefilter("ignore")
from pymilvus import MilvusClient
client = MilvusClient(sys.argv[1])
rows = []
if client.has_collection(sys.argv[2]):
    client.load_collection(sys.argv[2])
    rows = client.query(sys.argv[2], filter="", limit=16384, output_fields=[
        "id", "vector", "content_hash", "model", "dimensions", "metadata", "text"])
client.close()
print(json.dumps([{**r, "vector": [float(x) for x in r["vector"]]} for r in rows]))
"""


@dataclass
class Row:
    vector: np.ndarray
    content_hash: str
    model: str
    dimensions: int
    metadata: dict[str, Any]
    text: str | None


@contextlib.contextmanager
def pgvector_server() -> Iterator[str]:
    """A private PostgreSQL 16 with pgvector; yields its URI (``postgresql://...?host=/socket/dir``)."""
    with warnings.catch_warnings():
        # pgserver reads platformdirs' runtime folder at import, which warns without XDG_RUNTIME_DIR.
        warnings.simplefilter("ignore")
        import pgserver

    # Not under pytest's tmp folder: that one is private to root, and as root pgserver runs
    # PostgreSQL as the user "pgserver", which must reach the data folder (and its socket).
    root = tempfile.mkdtemp(prefix="embedpipe-pg-")
    os.chmod(root, 0o755)
    server = pgserver.get_server(root, cleanup_mode="delete")
    try:
        yield str(server.get_uri())
    finally:
        server.cleanup()


def sink_url(kind: str, where: Path, name: str, pg_uri: str | None = None, **options: str) -> str:
    """The ``--out`` URL of a collection ``name`` for ``kind`` (files under ``where``)."""
    extra = "".join(f"&{k}={v}" for k, v in options.items())
    if kind == "pgvector":
        assert pg_uri is not None
        return f"{pg_uri}{'&' if '?' in pg_uri else '?'}table={name}{extra}"
    if kind == "chroma":
        return f"chroma:///{where}/chroma?collection={name}{extra}"
    if kind == "lancedb":
        return f"lancedb:///{where}/lancedb?table={name}{extra}"
    if kind == "qdrant":
        return f"qdrant+local:///{where}/qdrant?collection={name}{extra}"
    if kind == "milvus":
        return f"milvus:///{where}/milvus.db?collection={name}{extra}"
    raise ValueError(kind)


def read_all(kind: str, where: Path, name: str, pg_uri: str | None = None) -> dict[str, Row]:
    """Every row of the collection, read with the engine's own client."""
    if kind == "pgvector":
        import psycopg
        from pgvector.psycopg import register_vector

        with psycopg.connect(pg_uri or "") as conn:
            register_vector(conn)
            if conn.execute("SELECT to_regclass(%s)", (name,)).fetchone() == (None,):
                return {}
            return {i: Row(v.to_numpy(), h, m, d, md, t) for i, v, h, m, d, md, t in conn.execute(
                f'SELECT id, vector, content_hash, model, dimensions, metadata, text FROM "{name}"')}
    if kind == "chroma":
        import chromadb
        from chromadb.api.client import SharedSystemClient

        # chromadb keeps one client per path for the process, with the index in memory; another
        # process (a killed or resumed run) may have changed the files since: read them afresh.
        SharedSystemClient.clear_system_cache()
        client = chromadb.PersistentClient(path=str(where / "chroma"))
        if name not in [c.name for c in client.list_collections()]:
            return {}
        got = client.get_collection(name).get(include=["embeddings", "metadatas", "documents"])
        return {i: Row(np.asarray(v, dtype=np.float32), m["content_hash"], m["model"], m["dimensions"],
                       json.loads(m["metadata"]), d)
                for i, v, m, d in zip(got["ids"], got["embeddings"], got["metadatas"], got["documents"], strict=True)}
    if kind == "lancedb":
        import lancedb

        db = lancedb.connect(str(where / "lancedb"))
        if name not in db.list_tables().tables:
            return {}
        return {r["id"]: Row(np.asarray(r["vector"], dtype=np.float32), r["content_hash"], r["model"],
                             r["dimensions"], json.loads(r["metadata"]), r["text"])
                for r in db.open_table(name).to_arrow().to_pylist()}
    if kind == "qdrant":
        from qdrant_client import QdrantClient

        client = QdrantClient(path=str(where / "qdrant"))
        try:
            if not client.collection_exists(name):
                return {}
            points, _ = client.scroll(name, limit=1_000_000, with_vectors=True, with_payload=True)
            return {p.payload["id"]: Row(np.asarray(p.vector, dtype=np.float32), p.payload["content_hash"],
                                         p.payload["model"], p.payload["dimensions"],
                                         json.loads(p.payload["metadata"]), p.payload.get("text"))
                    for p in points if p.payload}
        finally:
            client.close()
    if kind == "milvus":
        # In a child process: milvus-lite keeps one server per file for the life of the process that
        # opened it, so a reader here would keep seeing the file as it was when first opened, and
        # would hold its lock against the next run.
        out = subprocess.run([sys.executable, "-c", _MILVUS_READER, str(where / "milvus.db"), name],
                             capture_output=True, text=True, timeout=60, check=True).stdout
        return {r["id"]: Row(np.asarray(r["vector"], dtype=np.float32), r["content_hash"], r["model"],
                             r["dimensions"], json.loads(r["metadata"]), r["text"]) for r in json.loads(out)}
    raise ValueError(kind)


@pytest.fixture(scope="session")
def pg_uri() -> Iterator[str]:
    """The URI of the session's private PostgreSQL 16 with pgvector."""
    with pgvector_server() as uri:
        yield uri


@pytest.fixture(params=KINDS)
def db_kind(request: pytest.FixtureRequest) -> str:
    """Each sink in turn: every sink test runs against all five engines."""
    return str(request.param)


@pytest.fixture
def db_engine(db_kind: str, request: pytest.FixtureRequest, tmp_path: Path) -> Engine:
    """The engine of ``db_kind``: its URL builder and its native reader, over ``tmp_path``."""
    uri = request.getfixturevalue("pg_uri") if db_kind == "pgvector" else None
    return Engine(db_kind, tmp_path, uri)


@dataclass
class Engine:
    kind: str
    where: Path
    pg_uri: str | None

    def url(self, name: str, **options: str) -> str:
        return sink_url(self.kind, self.where, name, self.pg_uri, **options)

    def rows(self, name: str) -> dict[str, Row]:
        return read_all(self.kind, self.where, name, self.pg_uri)
