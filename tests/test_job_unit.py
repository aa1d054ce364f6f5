"""The job unit (JobSpec, JobStore, plan_chunks / process_chunk / finish_job) that every driver runs.

Against the OpenAI-compatible test server, whose ledger says what was billed, and the
real SQLite job store.
"""

from __future__ import annotations

import json
import pickle
import shutil
import sqlite3
import threading
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from embedpipe import EmbeddingPipeline, PipelineConfig, jobs
from embedpipe.errors import ConfigurationError
from embedpipe.jobs.state import SCHEMA_VERSION
from embedpipe.jobs.unit import job_pipeline, open_store
from embedpipe.providers.fake import fake_vector
from tests.openai_server import OpenAITestServer
from tests.test_jobs import DIMS, assert_mirrors, make_records, openai_args, write_jsonl

FIXTURE = Path(__file__).parent / "data" / "state_v1"


def _spec(server: OpenAITestServer, tmp_path: Path, **kw: object) -> jobs.JobSpec:
    args = openai_args(server, tmp_path)
    args.pop("api_key")
    return jobs.JobSpec.from_options(write_jsonl(tmp_path / "src.jsonl", make_records(30)), tmp_path / "out",
                                     chunk_size=10, **{**args, **kw})


# ------------------------------------------------------------------ serialisable configuration
def test_config_and_spec_round_trip_through_json_without_keys_or_passwords(tmp_path: Path,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "sk-envsecret")
    config = PipelineConfig(model="openai:text-embedding-3-small", cache="redis://:cachepw@cache.example:6379/0",
                            rate_limiter="redis://user:limitpw@limits.example/1", rpm=500, dimensions=256,
                            base_url="https://proxy:proxypw@llm.example/v1")
    spec = jobs.JobSpec(source="postgresql://reader:srcpw@db.example/app?table=docs", sink=str(tmp_path / "out"),
                        pipeline=config, chunk_size=500, budget_usd=12.5, delete_missing=False,
                        state="sqlite:///state.sqlite", options={"text_field": "body"})
    text = spec.to_json()
    for secret in ("cachepw", "limitpw", "proxypw", "srcpw", "sk-envsecret"):
        assert secret not in text
    back = jobs.JobSpec.from_json(text)
    assert back.pipeline.cache == "redis://cache.example:6379/0" and back.pipeline.rpm == 500
    assert back.source == "postgresql://reader@db.example/app?table=docs"
    assert (back.chunk_size, back.budget_usd, back.delete_missing, back.option("text_field")) == \
        (500, 12.5, False, "body")
    assert back.job_id == spec.job_id  # the id does not depend on a password
    assert jobs.JobSpec.from_json(back.to_json()) == back
    assert PipelineConfig.from_json(config.to_json()) == back.pipeline

    # What defines the output changes the id; how it is run does not.
    assert spec.replace(chunk_size=10, budget_usd=None).job_id == spec.job_id
    assert spec.replace(pipeline=config.replace(dimensions=512)).job_id != spec.job_id
    assert spec.replace(sink=str(tmp_path / "elsewhere")).job_id != spec.job_id

    with pytest.raises(ConfigurationError, match=r"pipeline\.hooks"):
        spec.replace(pipeline=config.replace(hooks=(print,))).to_json()
    with pytest.raises(ConfigurationError, match="unknown job option 'chunksize'"):
        jobs.JobSpec.from_options("a.jsonl", "out", model="fake:8", chunksize=3)
    with pytest.raises(ConfigurationError, match="unknown JobSpec field"):
        jobs.JobSpec.from_json(json.dumps({**json.loads(text), "api_key": "x"}))


def test_a_pickled_pipeline_carries_only_an_explicit_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "sk-from-env")
    implicit = EmbeddingPipeline("openai:text-embedding-3-small", cache=None)
    explicit = EmbeddingPipeline("openai:text-embedding-3-small", cache=None, api_key="sk-explicit")
    try:
        assert b"sk-from-env" not in pickle.dumps(implicit)
        assert b"sk-explicit" in pickle.dumps(explicit)  # LlamaIndex's num_workers needs it in the worker
        spec = jobs.JobSpec(source="a.jsonl", sink="out", pipeline=explicit.config)
        assert b"sk-explicit" not in pickle.dumps(spec) and "sk-explicit" not in spec.to_json()
    finally:
        implicit.close()
        explicit.close()


# ------------------------------------------------------------------ the steps
def test_process_chunk_twice_writes_once_and_bills_once(openai_server: OpenAITestServer, tmp_path: Path) -> None:
    spec = _spec(openai_server, tmp_path)
    sink = jobs.sink_from(spec.sink)
    with open_store(spec, sink) as store:
        chunks = list(jobs.plan_chunks(spec, store, sink=sink))
        assert [len(c.records) for c in chunks] == [10, 10, 10]
        first = jobs.process_chunk(spec, chunks[0], store=store, sink=sink)
        assert (first.status, first.written, first.embedded) == ("done", 10, 10)
        billed = dict(openai_server.ledger.times_billed)
        parts = sorted(p.name for p in (tmp_path / "out").glob("_parts/part-*"))

        # A second delivery of the same chunk, in this process or from its JSON in another one.
        again = jobs.process_chunk(spec, jobs.Chunk.from_dict(json.loads(json.dumps(chunks[0].to_dict()))),
                                   store=store, sink=sink)
        assert again.status == "skipped" and again.written == 0
        assert dict(openai_server.ledger.times_billed) == billed
        assert sorted(p.name for p in (tmp_path / "out").glob("_parts/part-*")) == parts

        for chunk in chunks[1:]:
            assert jobs.process_chunk(spec, chunk, store=store, sink=sink).status == "done"
        result = jobs.finish_job(spec, store, sink=sink)
    assert (result.records, result.written, result.embedded, result.exit_code) == (30, 30, 30, 0)
    assert set(openai_server.ledger.times_billed.values()) == {1}
    assert_mirrors(tmp_path / "out", make_records(30), dims=DIMS)


def test_a_crash_after_the_requests_rebills_nothing_and_commits_once(openai_server: OpenAITestServer,
                                                                    tmp_path: Path) -> None:
    spec = _spec(openai_server, tmp_path)
    sink = jobs.sink_from(spec.sink)
    with open_store(spec, sink) as store:
        chunk = next(jobs.plan_chunks(spec, store, sink=sink))
        # The worker paid for the chunk (the cache holds it), then died before writing: its lease is held.
        with job_pipeline(spec, sink=sink) as pipe:
            pipe.embed_array([e.record.text for e in chunk.records])
        sent = openai_server.ledger.requests_total
        assert store.acquire_lease(chunk.chunk_id, chunk.gen, "dead-worker", ttl=0.2) == 1
        blocked = jobs.process_chunk(spec, chunk, store=store, sink=sink, owner="second")
        assert blocked.status == "leased" and openai_server.ledger.requests_total == sent
        threading.Event().wait(0.3)  # the dead worker's lease runs out
        redone = jobs.process_chunk(spec, chunk, store=store, sink=sink, owner="second")
    assert (redone.status, redone.attempt, redone.written, redone.embedded, redone.cached) == ("done", 2, 10, 0, 10)
    assert set(openai_server.ledger.times_billed.values()) == {1} and openai_server.ledger.requests_total == sent


def test_the_store_orders_chunks_so_a_late_commit_never_replaces_a_newer_version(tmp_path: Path) -> None:
    records = make_records(4)
    newer = {**records[1], "text": "the second version of doc 1"}
    src = write_jsonl(tmp_path / "src.jsonl", [*records, newer])  # doc-00001 twice: the later one wins
    spec = jobs.JobSpec.from_options(src, tmp_path / "out", model="fake:8", cache="memory://", chunk_size=4)
    sink = jobs.sink_from(spec.sink)
    with open_store(spec, sink) as store:
        first, second = jobs.plan_chunks(spec, store, sink=sink)
        assert jobs.process_chunk(spec, second, store=store, sink=sink).status == "done"
        assert jobs.process_chunk(spec, first, store=store, sink=sink).status == "done"  # committed out of order
        jobs.finish_job(spec, store, sink=sink)
    rows = {r["id"]: r for r in pq.read_table(tmp_path / "out").to_pylist()}
    assert len(rows) == 4 and rows["doc-00001"]["vector"] == pytest.approx(fake_vector(newer["text"], 8).tolist())


# ------------------------------------------------------------------ the state of an older embedpipe
def test_a_state_file_written_before_the_job_unit_migrates_and_the_job_resumes(tmp_path: Path) -> None:
    out = tmp_path / "out"
    shutil.copytree(FIXTURE, out, ignore=shutil.ignore_patterns("README.md"))
    old = sqlite3.connect(out / "_state.sqlite")
    assert "schema_version" not in dict(old.execute("SELECT name, value FROM meta").fetchall())
    assert not old.execute("SELECT name FROM sqlite_master WHERE name='chunks'").fetchall()
    old.close()
    # The records that run read (see tests/data/state_v1/README.md): doc5 is empty.
    records = [{"id": f"doc{i}", "text": "" if i == 5 else f"text number {i} about things", "n": i}
               for i in range(30)]
    src = tmp_path / "src.jsonl"
    src.write_text("".join(json.dumps({"id": r["id"], "text": r["text"], "metadata": {"n": r["n"]}}) + "\n"
                           for r in records))

    result = jobs.run(src, model="fake:8", out=out, cache=None, chunk_size=10)
    # The 19 committed records stay as they are; the 10 the interrupted run never committed are embedded.
    assert (result.records, result.unchanged, result.embedded, result.written) == (30, 19, 10, 10)
    assert result.dead_letters_total == 1 and result.dead_letters == 0 and result.exit_code == 0  # an old letter
    db = sqlite3.connect(out / "_state.sqlite")
    assert dict(db.execute("SELECT name, value FROM meta").fetchall())["schema_version"] == str(SCHEMA_VERSION)
    assert [r[0] for r in db.execute("SELECT status FROM runs ORDER BY gen")] == ["error", "done"]
    db.close()
    rows = {r["id"]: r for r in pq.read_table(out).to_pylist()}
    assert set(rows) == {r["id"] for r in records if r["text"]}
    # Its parts were written in the flat layout (directly in the folder): they moved under _parts/.
    assert not list(out.glob("part-*")) and (out / "data").is_symlink() and len(rows) == len(pq.read_table(out))
    for r in records:
        if r["text"]:
            assert rows[r["id"]]["vector"] == pytest.approx(fake_vector(r["text"], 8).tolist())
    again = jobs.run(src, model="fake:8", out=out, cache=None, chunk_size=10)
    assert (again.embedded, again.unchanged) == (0, 29)


# ------------------------------------------------------------------ a run's progress and its patience
def test_progress_advances_per_request_and_says_when_it_waits(openai_server: OpenAITestServer,
                                                              tmp_path: Path) -> None:
    openai_server.control.fail_next("rate_limit", times=1)  # one 429 (retry-after 50 ms) on the way
    seen: list[jobs.JobProgress] = []
    src = write_jsonl(tmp_path / "src.jsonl", make_records(40))
    args = openai_args(openai_server, tmp_path, chunk_size=40, batch_size=5, max_concurrency=1)
    result = jobs.run(src, out=tmp_path / "out", progress=seen.append, **args)
    assert result.written == 40
    during = [p.records for p in seen if p.records < 40]
    assert len(during) >= 4 and during == sorted(during)  # the one chunk shows its requests coming back
    assert any(p.waiting and "429" in p.waiting for p in seen)
    assert seen[-1].records == 40


def test_jobs_ride_out_longer_429_storms_than_the_library() -> None:
    spec = jobs.JobSpec.from_options("a.jsonl", "out", model="fake:8")
    assert spec.pipeline.max_rate_limit_wait == 900.0 and PipelineConfig().max_rate_limit_wait == 300.0
    assert jobs.JobSpec.from_options("a.jsonl", "out", model="fake:8",
                                     max_rate_limit_wait=60).pipeline.max_rate_limit_wait == 60
