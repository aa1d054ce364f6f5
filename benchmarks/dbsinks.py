"""Vector-database sinks: vectors per second through ``embedpipe run`` against each database's own bulk path.

For each sink, N records of 384-d ``fake:384`` vectors go in three ways, into a fresh table
or collection each time, with the same index state on both sides:

* **by hand**: the vectors computed first (not timed), then the database's own bulk call with
  the same columns: binary ``COPY`` into the table for pgvector, ``merge_insert`` for LanceDB,
  ``collection.upsert`` for Chroma, ``upsert`` for Qdrant local mode and Milvus-lite, in batches
  of the sink's default size;
* **embedpipe, warm**: ``jobs.run(..., rebuild=True)`` whose vectors all come from a SQLite cache
  (the sink path, the job state and the cache read are timed, no embedding);
* **embedpipe, cold**: ``jobs.run`` with an empty cache, so the fake model's hashing and token
  counting are timed too.

pgvector runs on a private PostgreSQL 16 (pgserver) with ``?index=none`` on both sides (an HNSW
index is built the same way after either load). Qdrant's local mode is a Python imitation of
the server, so its figure says little about a real Qdrant.
"""

# The report writes ratios with the multiplication sign, as the other scenarios do.
# ruff: noqa: RUF001

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.scenario import Context, Result, Table, Unavailable

NAME = "dbsinks"
TITLE = "Vector-database sinks"
GOAL = "embedpipe run (vectors from the cache) ≥ 0.8× the database's own hand-written bulk path, per sink"
DIMS = 384


def _records(n: int) -> list[dict[str, Any]]:
    return [{"id": f"doc-{i:07d}", "text": f"record {i}: a short text of a few words, number {i * 7919 % 10007}",
             "topic": f"t{i % 7}"} for i in range(n)]


def _columns(records: list[dict[str, Any]]) -> tuple[np.ndarray, list[str], list[str]]:
    from embedpipe.jobs.records import content_hash, metadata_json
    from embedpipe.providers.fake import fake_vector

    vectors = np.stack([fake_vector(r["text"], DIMS) for r in records])
    return vectors, [content_hash(r["text"]).hex() for r in records], \
        [metadata_json({"topic": r["topic"]}) for r in records]


@contextlib.contextmanager
def _postgres() -> Iterator[str]:
    import os
    import tempfile
    import warnings

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import pgserver
    except ImportError as exc:
        raise Unavailable(f"pgserver is not installed ({exc})") from exc
    root = tempfile.mkdtemp(prefix="embedpipe-bench-pg-")
    os.chmod(root, 0o755)  # as root, pgserver runs PostgreSQL as the user "pgserver"
    server = pgserver.get_server(root, cleanup_mode="delete")
    try:
        yield str(server.get_uri())
    finally:
        server.cleanup()


# ------------------------------------------------------------------ the hand-written bulk paths
def _hand_pgvector(uri: str, table: str, records: list[dict[str, Any]]) -> float:
    import psycopg
    from pgvector.psycopg import register_vector
    from psycopg.types.json import Jsonb

    from embedpipe.sinks.pgvector import PgVectorSink

    vectors, hashes, metas = _columns(records)
    sink = PgVectorSink(uri, table=table, index="none")
    sink.prepare(DIMS)  # the same table, created the same way
    sink.close()
    with psycopg.connect(uri) as conn:
        register_vector(conn)
        start = time.perf_counter()
        with conn.cursor() as cur, cur.copy(f'COPY "{table}" (id, vector, content_hash, model, dimensions, '
                                            "metadata, text) FROM STDIN (FORMAT BINARY)") as copy:
            copy.set_types(["text", "vector", "text", "text", "int4", "jsonb", "text"])
            for r, v, h, m in zip(records, vectors, hashes, metas, strict=True):
                copy.write_row((r["id"], v, h, "fake:384", DIMS, Jsonb(json.loads(m)), r["text"]))
        conn.commit()
        return time.perf_counter() - start


def _hand_lancedb(path: Path, records: list[dict[str, Any]]) -> float:
    import pyarrow as pa

    from embedpipe.sinks.lancedb import LanceDBSink

    vectors, hashes, metas = _columns(records)
    sink = LanceDBSink(str(path), table="hand")
    sink.prepare(DIMS)
    table = sink.db.open_table("hand")
    start = time.perf_counter()
    for s in range(0, len(records), sink.batch_size):
        part = slice(s, s + sink.batch_size)
        n = len(records[part])
        data = pa.table({"id": [r["id"] for r in records[part]],
                         "vector": pa.FixedSizeListArray.from_arrays(pa.array(vectors[part].reshape(-1)), DIMS),
                         "content_hash": hashes[part], "model": ["fake:384"] * n,
                         "dimensions": pa.array([DIMS] * n, pa.int32()), "metadata": metas[part],
                         "text": [r["text"] for r in records[part]]}, schema=sink.schema(DIMS))
        table.merge_insert("id").when_matched_update_all().when_not_matched_insert_all().execute(data)
    return time.perf_counter() - start


def _hand_chroma(path: Path, records: list[dict[str, Any]]) -> float:
    from embedpipe.sinks.chroma import ChromaSink

    vectors, hashes, metas = _columns(records)
    sink = ChromaSink(collection="hand", path=str(path))
    sink.prepare(DIMS)
    col = sink.client.get_collection("hand", embedding_function=None)
    start = time.perf_counter()
    for s in range(0, len(records), sink.batch_size):
        part = slice(s, s + sink.batch_size)
        col.upsert(ids=[r["id"] for r in records[part]], embeddings=vectors[part],
                   documents=[r["text"] for r in records[part]],
                   metadatas=[{"content_hash": h, "model": "fake:384", "dimensions": DIMS, "metadata": m}
                              for h, m in zip(hashes[part], metas[part], strict=True)])
    return time.perf_counter() - start


def _hand_qdrant(path: Path, records: list[dict[str, Any]]) -> float:
    from qdrant_client.models import Batch

    from embedpipe.sinks.qdrant import QdrantSink, point_id

    vectors, hashes, metas = _columns(records)
    sink = QdrantSink(collection="hand", path=str(path))
    try:
        sink.prepare(DIMS)
        start = time.perf_counter()
        for s in range(0, len(records), sink.batch_size):
            part = records[s:s + sink.batch_size]
            sink.client.upsert("hand", wait=True, points=Batch(
                ids=[point_id(r["id"]) for r in part], vectors=vectors[s:s + sink.batch_size].tolist(),
                payloads=[{"id": r["id"], "content_hash": h, "model": "fake:384", "dimensions": DIMS, "metadata": m,
                           "text": r["text"]} for r, h, m in zip(part, hashes[s:s + len(part)],
                                                                 metas[s:s + len(part)], strict=True)]))
        return time.perf_counter() - start
    finally:
        sink.close()


def _hand_milvus(path: Path, records: list[dict[str, Any]]) -> float:
    from embedpipe.sinks.milvus import MilvusSink

    vectors, hashes, metas = _columns(records)
    sink = MilvusSink(str(path), collection="hand")
    try:
        sink.prepare(DIMS)
        sink.client.load_collection("hand")
        start = time.perf_counter()
        for s in range(0, len(records), sink.batch_size):
            part = records[s:s + sink.batch_size]
            sink.client.upsert("hand", [
                {"id": r["id"], "vector": v, "content_hash": h, "model": "fake:384", "dimensions": DIMS,
                 "metadata": m, "text": r["text"]}
                for r, v, h, m in zip(part, vectors[s:s + len(part)], hashes[s:s + len(part)],
                                      metas[s:s + len(part)], strict=True)])
        return time.perf_counter() - start
    finally:
        sink.close()


# ------------------------------------------------------------------ the embedpipe paths
def _embedpipe(records: list[dict[str, Any]], out: str, state: Path, cache: str) -> tuple[float, float]:
    """Seconds of a cold run (empty cache) and of a warm rebuild (every vector from the cache)."""
    from embedpipe import jobs

    start = time.perf_counter()
    jobs.run(records, model="fake:384", out=out, state=state, cache=cache, estimate_first=False)
    cold = time.perf_counter() - start
    start = time.perf_counter()
    result = jobs.run(records, model="fake:384", out=out, state=state, cache=cache, estimate_first=False,
                      rebuild=True)
    warm = time.perf_counter() - start
    assert result.embedded == 0 and result.written == len(records)
    return cold, warm


def run(ctx: Context) -> Result:
    n = 2_000 if ctx.quick else 100_000
    n = int(os.environ.get("EMBEDPIPE_BENCH_RECORDS", n))  # another size, to rerun a few sinks
    records = _records(n)
    scratch = ctx.scratch_dir(NAME)
    rows, data = [], {}
    sinks: list[tuple[str, Callable[[], tuple[float, str]]]] = []
    stack = contextlib.ExitStack()
    with stack:
        try:
            import pgvector  # noqa: F401
            import psycopg  # noqa: F401

            uri = stack.enter_context(_postgres())
            sinks.append(("pgvector (binary COPY)", lambda: (
                _hand_pgvector(uri, "hand", records), f"{uri}&table=docs&index=none")))
        except (ImportError, Unavailable) as exc:
            data["pgvector"] = f"not available: {exc}"
        with contextlib.suppress(ImportError):
            import lancedb  # noqa: F401

            sinks.append(("LanceDB (merge_insert)", lambda: (
                _hand_lancedb(scratch / "lancedb", records), f"lancedb:///{scratch}/lancedb?table=docs")))
        with contextlib.suppress(ImportError):
            import chromadb  # noqa: F401

            sinks.append(("Chroma (upsert)", lambda: (
                _hand_chroma(scratch / "chroma", records), f"chroma:///{scratch}/chroma?collection=docs")))
        # milvus-lite starts a server per file: seconds even for the quick run's records, so it is
        # measured in the full run only. Qdrant's local mode (a Python imitation of the server) is not
        # measured at all: it warns above 20,000 points, and at that size it was disk-bound here for
        # minutes; _hand_qdrant stays for EMBEDPIPE_BENCH_SINKS=Qdrant runs against small sizes.
        if os.environ.get("EMBEDPIPE_BENCH_SINKS", "").startswith("Qdrant"):
            sinks.append(("Qdrant local mode (upsert)", lambda: (
                _hand_qdrant(scratch / "qdrant-hand", records), f"qdrant+local:///{scratch}/qdrant?collection=docs")))
        if not ctx.quick:
            with contextlib.suppress(ImportError):
                import pymilvus  # noqa: F401

                sinks.append(("Milvus-lite (upsert)", lambda: (
                    _hand_milvus(scratch / "milvus-hand.db", records),
                    f"milvus:///{scratch}/milvus.db?collection=docs")))
        if os.environ.get("EMBEDPIPE_BENCH_SINKS"):  # e.g. "Qdrant,Milvus-lite": a subset, to rerun a few
            wanted = os.environ["EMBEDPIPE_BENCH_SINKS"].split(",")
            sinks = [(label, hand) for label, hand in sinks if label.split()[0] in wanted]
        if not sinks:
            raise Unavailable("no vector database library is installed")
        for label, hand in sinks:
            hand_s, url = hand()
            key = label.split()[0]
            cold_s, warm_s = _embedpipe(records, url, scratch / f"{key}.sqlite", f"sqlite:///{scratch}/{key}-cache.db")
            data[key] = {"n": n, "hand_s": hand_s, "embedpipe_warm_s": warm_s, "embedpipe_cold_s": cold_s}
            rows.append([label, f"{n / hand_s:,.0f}", f"{n / warm_s:,.0f}", f"{hand_s / warm_s:.2f}×",
                         f"{n / cold_s:,.0f}", f"{hand_s / cold_s:.2f}×"])
    ratios = [d["hand_s"] / d["embedpipe_warm_s"] for d in data.values() if isinstance(d, dict)]
    table = Table(f"{n:,} records × {DIMS}-d, vectors per second (ratio: embedpipe ÷ by hand)",
                  ["sink (hand-written path)", "by hand", "embedpipe, warm cache", "ratio", "embedpipe, cold",
                   "ratio"], rows,
                  note="by hand: vectors precomputed, only the database call timed; warm: every vector from the "
                       "SQLite cache (--rebuild), so the job state, cache reads and the sink are timed; cold: the "
                       "fake model's hashing and token counting as well.")
    worst = min(ratios)
    return Result(NAME, TITLE, GOAL, goal_met=worst >= 0.8,
                  headline=f"embedpipe run with vectors from the cache reaches {worst:.2f}× to {max(ratios):.2f}× "
                           "of each database's hand-written bulk path.",
                  tables=[table], data=data,
                  notes=["Milvus-lite is measured in the full run only; Qdrant's local mode not at all (see the "
                         "module).",
                         "Peak RSS from 100k to 1M records into pgvector was not measured."])


if __name__ == "__main__":
    import tempfile

    from benchmarks import report

    result = run(Context(quick=True, repo=Path(__file__).resolve().parents[1], plots_dir=Path(tempfile.mkdtemp())))
    print(result.headline)
    for t in result.tables:
        print(report.table(t))
