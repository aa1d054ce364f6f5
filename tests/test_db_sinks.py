"""Vector-database sinks against the real engines (see tests/db_engines.py for which are real).

pgvector runs on a private PostgreSQL 16 (pgserver); Chroma, LanceDB and milvus-lite run
in process; Qdrant runs in qdrant-client's local mode, which is a Python imitation of the
Qdrant server (no server binary is available here), so those tests check the sink's use
of the client API, not a real Qdrant server.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from embedpipe import jobs, registry
from embedpipe.jobs import SinkVerificationError
from embedpipe.jobs.records import Entry, Record, content_hash
from embedpipe.providers.fake import fake_vector
from embedpipe.sinks import CollectionMismatchError, DatabaseSink, SinkError
from tests.db_engines import Engine, Row
from tests.openai_server import OpenAITestServer, expected_vector
from tests.test_jobs import DIMS, MODEL, make_records, write_jsonl

ROOT = Path(__file__).resolve().parent.parent
FAKE = "fake:16"


def name() -> str:
    return f"docs_{uuid.uuid4().hex[:10]}"


def sink_of(url: str) -> DatabaseSink:
    sink = registry.sinks.from_url(url)
    assert isinstance(sink, DatabaseSink)
    return sink


def assert_mirrors(rows: dict[str, Row], records: list[dict[str, Any]], *, vector: Any = None,
                   model: str = FAKE, dims: int = 16) -> None:
    """The collection holds every record once, with its exact vector, content hash, model, metadata and text."""
    vector = vector or (lambda text: fake_vector(text, dims))
    assert sorted(rows) == sorted(r["id"] for r in records)
    for rec in records:
        row = rows[rec["id"]]
        np.testing.assert_allclose(row.vector, vector(rec["text"]), rtol=1e-6, atol=1e-6)
        assert row.content_hash == content_hash(rec["text"]).hex()
        assert (row.model, row.dimensions) == (model, dims)
        assert row.metadata == {k: v for k, v in rec.items() if k not in ("id", "text")}
        assert row.text == rec["text"]


def test_a_run_mirrors_the_source_and_a_rerun_applies_edits_and_deletes(db_engine: Engine, tmp_path: Path) -> None:
    records = make_records(300)
    table = name()
    sink = sink_of(db_engine.url(table, batch_size="64"))
    state = tmp_path / "state.sqlite"
    result = jobs.run(records, model=FAKE, out=sink, state=state, cache="memory://", chunk_size=100)
    assert (result.written, result.exit_code) == (300, 0)
    assert sink.verified == sink.verify_sample == 32  # a sample was read back and matched
    assert_mirrors(db_engine.rows(table), records)

    edited = [dict(r, text=r["text"] + " (edited)") if i < 10 else r for i, r in enumerate(records[:-5])]
    edited += make_records(5, prefix="new")
    sink = sink_of(db_engine.url(table, batch_size="64"))
    again = jobs.run(edited, model=FAKE, out=sink, state=state, cache="memory://", chunk_size=100)
    assert (again.written, again.deleted, again.unchanged) == (15, 5, 285)
    assert_mirrors(db_engine.rows(table), edited)


def test_a_metadata_only_change_is_rewritten_with_the_cached_vector(db_engine: Engine, tmp_path: Path) -> None:
    records = make_records(20)
    table, cache = name(), f"sqlite:///{tmp_path}/cache.db"
    jobs.run(records, model=FAKE, out=db_engine.url(table), state=tmp_path / "s.sqlite", cache=cache)
    relabelled = [dict(r, topic="changed") if i % 2 else r for i, r in enumerate(records)]
    again = jobs.run(relabelled, model=FAKE, out=db_engine.url(table), state=tmp_path / "s.sqlite", cache=cache)
    assert (again.written, again.embedded, again.cached) == (10, 0, 10)
    assert_mirrors(db_engine.rows(table), relabelled)


def test_a_dimension_mismatch_is_a_configuration_error_and_writes_nothing(db_engine: Engine, tmp_path: Path) -> None:
    table = name()
    first = make_records(10)
    jobs.run(first, model=FAKE, out=db_engine.url(table), state=tmp_path / "a.sqlite", cache="memory://")
    with pytest.raises(CollectionMismatchError, match=r"16-dimensional.*8-dimensional.*nothing was written"):
        jobs.run(make_records(10, prefix="other"), model="fake:8", out=db_engine.url(table),
                 state=tmp_path / "b.sqlite", cache="memory://")
    assert_mirrors(db_engine.rows(table), first)


def test_a_metric_mismatch_is_refused_where_the_engine_records_the_metric(db_engine: Engine, tmp_path: Path) -> None:
    if db_engine.kind == "lancedb":
        pytest.skip("LanceDB keeps no metric with a table (it is chosen per query)")
    table = name()
    first = make_records(5)
    jobs.run(first, model=FAKE, out=db_engine.url(table), state=tmp_path / "a.sqlite", cache="memory://")
    with pytest.raises(CollectionMismatchError, match="cosine metric, not l2"):
        jobs.run(make_records(5, prefix="x"), model=FAKE, out=db_engine.url(table, metric="l2"),
                 state=tmp_path / "b.sqlite", cache="memory://")
    assert_mirrors(db_engine.rows(table), first)


def test_read_back_finds_a_vector_that_differs_from_what_was_written(db_engine: Engine) -> None:
    sink = sink_of(db_engine.url(name()))
    try:
        entries = [Entry.of(Record(f"r{i}", f"text {i}", {})) for i in range(4)]
        vectors = np.stack([fake_vector(e.record.text, 16) for e in entries])
        sink.write(entries, vectors, FAKE)
        sample = list(zip(entries, vectors, strict=True))
        sink.verify(sample)
        # Another writer replaces r1's vector (and r2's row goes): the read-back must notice both.
        sink.write([entries[1]], fake_vector("something else", 16)[None, :], FAKE)
        sink.delete(["r2"])
        with pytest.raises(SinkVerificationError, match=r"1 missing \['r2'\], 1 with another vector.*\['r1'\]"):
            sink.verify(sample)
    finally:
        sink.close()


def test_a_rebuild_drops_the_collection_and_starts_over(db_engine: Engine, tmp_path: Path) -> None:
    table = name()
    jobs.run(make_records(10), model=FAKE, out=db_engine.url(table), state=tmp_path / "s.sqlite", cache="memory://")
    small = make_records(4, prefix="rebuilt")
    result = jobs.run(small, model="fake:8", out=db_engine.url(table), state=tmp_path / "s.sqlite", cache="memory://",
                      rebuild=True)
    assert result.written == 4
    assert_mirrors(db_engine.rows(table), small, dims=8, model="fake:8")


def test_a_collection_emptied_behind_the_jobs_back_is_written_again(db_engine: Engine, tmp_path: Path) -> None:
    records = make_records(12)
    table = name()
    jobs.run(records, model=FAKE, out=db_engine.url(table), state=tmp_path / "s.sqlite", cache="memory://")
    sink = sink_of(db_engine.url(table))
    sink.reset()
    sink.close()
    result = jobs.run(records, model=FAKE, out=db_engine.url(table), state=tmp_path / "s.sqlite", cache="memory://")
    assert result.written == 12
    assert_mirrors(db_engine.rows(table), records)


# ------------------------------------------------------------------ killed mid-run, then resumed
def _state_rows(path: Path) -> int:
    if not path.exists():
        return 0
    try:
        with sqlite3.connect(path, timeout=5) as db:
            return int(db.execute("SELECT count(*) FROM records").fetchone()[0])
    except sqlite3.OperationalError:
        return 0  # the schema is not there yet


def test_sigkill_mid_run_then_resume_writes_every_record_exactly_once_and_applies_deletes(
        db_engine: Engine, tmp_path: Path) -> None:
    # No shared cache: a killed run's single-flight claims in one would hold the resumed run up for
    # their whole TTL, and what is tested here is the sink (re-embedding is free on this server).
    table = name()
    first = make_records(40, prefix="old")
    records = first[10:] + make_records(300)  # 10 records leave the source
    state = tmp_path / "state.sqlite"
    env = {**os.environ, "OPENAI_API_KEY": "sk-test", "HF_HUB_OFFLINE": "1", "XDG_STATE_HOME": str(tmp_path)}
    with OpenAITestServer(latency=0.1) as server:
        def cmd(src: Path) -> list[str]:
            return [sys.executable, "-m", "embedpipe.cli", "run", str(src), "--model", MODEL, "--dimensions",
                    str(DIMS), "--out", db_engine.url(table, batch_size="16"), "--state", str(state), "--base-url",
                    server.base_url, "--cache", "memory://", "--chunk-size", "20",
                    "--batch-size", "10", "--max-concurrency", "1", "--no-estimate"]

        done = jobs.run(first, model=MODEL, dimensions=DIMS, out=db_engine.url(table), state=state, cache="memory://",
                        base_url=server.base_url, api_key="sk-test")
        assert done.exit_code == 0
        src = write_jsonl(tmp_path / "src.jsonl", records)
        proc = subprocess.Popen(cmd(src), env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 90
        while _state_rows(state) < len(first) + 40:  # two chunks of the new records committed: mid-run
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the run made no progress"
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=30)
        assert proc.returncode == -signal.SIGKILL
        at_kill = db_engine.rows(table)
        assert len(set(at_kill) & {r["id"] for r in records}) < len(records), "the kill landed after the run"
        assert set(at_kill) >= {r["id"] for r in first[:10]}, "the deletes ran before the kill"

        again = subprocess.run(cmd(src), env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert again.returncode == 0, again.stdout + again.stderr
    assert_mirrors(db_engine.rows(table), records, vector=lambda t: expected_vector(t, DIMS), model=MODEL, dims=DIMS)


# ------------------------------------------------------------------ pgvector: errors mapped in one place
def test_pgvector_reconnects_and_retries_when_its_connection_is_killed(pg_uri: str) -> None:
    import psycopg

    table = name()
    sink = sink_of(f"{pg_uri}&table={table}")
    try:
        entries = [Entry.of(Record(f"r{i}", f"text {i}", {})) for i in range(6)]
        vectors = np.stack([fake_vector(e.record.text, 16) for e in entries])
        sink.write(entries[:3], vectors[:3], FAKE)
        pid = sink.connection().info.backend_pid
        with psycopg.connect(pg_uri, autocommit=True) as admin:
            assert admin.execute("SELECT pg_terminate_backend(%s)", (pid,)).fetchone() == (True,)
        sink.write(entries[3:], vectors[3:], FAKE)  # the first try fails on the dead connection; the retry passes
        assert sink.connection().info.backend_pid != pid
        sink.verify(list(zip(entries, vectors, strict=True)))
    finally:
        sink.close()


def test_pgvector_maps_a_refused_statement_to_a_sink_error_without_retrying(pg_uri: str) -> None:
    import psycopg

    table = name()
    sink = sink_of(f"{pg_uri}&table={table}")
    try:
        entries = [Entry.of(Record("r", "text", {}))]
        sink.write(entries, fake_vector("text", 16)[None, :], FAKE)
        with psycopg.connect(pg_uri, autocommit=True) as admin:
            admin.execute(f'ALTER TABLE "{table}" ADD CONSTRAINT short_ids CHECK (length(id) < 3)')
        started = time.monotonic()
        with pytest.raises(SinkError, match=r"refused the call.*short_ids"):
            sink.write([Entry.of(Record("long-id", "text", {}))], fake_vector("text", 16)[None, :], FAKE)
        assert time.monotonic() - started < 1.0, "a refused statement was retried"
    finally:
        sink.close()


def test_pgvector_a_table_that_alters_vectors_fails_the_cli_run_with_exit_1(pg_uri: str,
                                                                            tmp_path: Path) -> None:
    import psycopg
    from click.testing import CliRunner

    from embedpipe.cli import main

    table = name()
    sink = sink_of(f"{pg_uri}&table={table}")
    sink.prepare(16)
    sink.close()
    with psycopg.connect(pg_uri, autocommit=True) as admin:
        # A trigger that corrupts what is stored: the run's read-back must catch it.
        admin.execute("CREATE FUNCTION scramble() RETURNS trigger AS $$ BEGIN NEW.vector := "
                      "array_fill(0.5, ARRAY[16])::vector; RETURN NEW; END $$ LANGUAGE plpgsql")
        admin.execute(f'CREATE TRIGGER scramble BEFORE INSERT OR UPDATE ON "{table}" FOR EACH ROW '
                      "EXECUTE FUNCTION scramble()")
    src = write_jsonl(tmp_path / "src.jsonl", make_records(20))
    result = CliRunner().invoke(main, ["run", str(src), "--model", FAKE, "--out", f"{pg_uri}&table={table}",
                                       "--state", str(tmp_path / "s.sqlite"), "--cache", "memory://"])
    assert result.exit_code == 1, result.output
    assert "read-back of 20 ids" in result.output and "20 with another vector" in result.output


def test_pgvector_without_state_keeps_one_in_the_user_state_folder(pg_uri: str, tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "xdg"))
    table = name()
    url = f"{pg_uri}&table={table}"
    result = jobs.run(make_records(5), model=FAKE, out=url, cache="memory://")
    assert Path(result.state).parent == tmp_path / "xdg" / "embedpipe" / "jobs"
    assert table in Path(result.state).name
    again = jobs.run(make_records(5), model=FAKE, out=url, cache="memory://")
    assert (again.unchanged, again.state) == (5, result.state)
