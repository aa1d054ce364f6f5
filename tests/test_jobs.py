"""Durable jobs through the Python API (embedpipe.jobs): sources, sinks, state, incremental runs, vector stores.

The scenarios that involve the command line and killed processes are in test_cli.py; the
helpers here are shared with it.
"""

from __future__ import annotations

import csv
import gzip
import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from embedpipe import jobs
from embedpipe.cache import SQLiteCache
from embedpipe.errors import ConfigurationError, DimensionMismatchError
from embedpipe.jobs.records import content_hash
from embedpipe.jobs.state import JobState
from embedpipe.providers.fake import fake_vector
from tests.openai_server import OpenAITestServer, expected_vector

MODEL = "openai:text-embedding-3-small"
DIMS = 32
PRICE = 0.02  # text-embedding-3-small, USD per 1M tokens (embedpipe.cost)

WORDS = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta", "iota", "kappa", "lambda", "mu",
         "nu", "xi", "omicron", "pi", "rho", "sigma", "tau", "upsilon", "phi", "chi", "psi", "omega"]


# ------------------------------------------------------------------ helpers (shared with test_cli.py)
def make_records(n: int, prefix: str = "doc", start: int = 0) -> list[dict[str, Any]]:
    """``n`` records with distinct texts of a few dozen tokens and one metadata field."""
    out = []
    for i in range(start, start + n):
        words = " ".join(WORDS[(i * 7 + k) % len(WORDS)] for k in range(8 + i % 13))
        out.append({"id": f"{prefix}-{i:05d}", "text": f"{prefix} record {i}: {words}.", "topic": WORDS[i % 5]})
    return out


def write_jsonl(path: Path, records: Iterable[Mapping[str, Any]]) -> Path:
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    return path


def read_output(out: Path) -> list[dict[str, Any]]:
    """The rows of a Parquet output folder or a JSONL output file, as dicts (metadata parsed)."""
    if out.suffix == ".jsonl":
        rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    else:
        rows = pq.read_table(out).to_pylist()
        for row in rows:
            row["metadata"] = json.loads(row["metadata"])
    return rows


def assert_mirrors(out: Path, records: Sequence[Mapping[str, Any]], *, dims: int = DIMS,
                   vector: Any = None, model: str = MODEL) -> None:
    """The output holds every record exactly once, with its exact vector, content hash and metadata."""
    vector = vector or (lambda text: expected_vector(text, dims))
    rows = read_output(out)
    ids = [r["id"] for r in rows]
    assert len(ids) == len(set(ids)), "an id is in the output twice"
    assert sorted(ids) == sorted(r["id"] for r in records)
    by_id = {r["id"]: r for r in rows}
    for rec in records:
        row = by_id[rec["id"]]
        np.testing.assert_allclose(np.asarray(row["vector"], dtype=np.float32), vector(rec["text"]),
                                   rtol=1e-6, atol=1e-7)
        assert row["content_hash"] == content_hash(rec["text"]).hex()
        assert row["model"] == model and row["dimensions"] == dims
        assert row["metadata"] == {k: v for k, v in rec.items() if k not in ("id", "text")}


def openai_args(server: OpenAITestServer, tmp_path: Path, **kw: Any) -> dict[str, Any]:
    """Keyword arguments of a job against the test server, with an explicit cache in ``tmp_path``."""
    args: dict[str, Any] = {"model": MODEL, "dimensions": DIMS, "base_url": server.base_url, "api_key": "sk-test",
                            "cache": f"sqlite:///{tmp_path}/cache.db"}
    args.update(kw)
    return args


# ------------------------------------------------------------------ sources
def test_every_source_format_yields_id_text_and_metadata(tmp_path: Path) -> None:
    records = make_records(30)
    write_jsonl(tmp_path / "a.jsonl", records)
    with gzip.open(tmp_path / "a.jsonl.gz", "wt", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    with open(tmp_path / "a.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, ["id", "text", "topic"])
        writer.writeheader()
        writer.writerows(records)
    pq.write_table(pa.Table.from_pylist(records), tmp_path / "a.parquet")
    docs = tmp_path / "docs"
    (docs / "sub").mkdir(parents=True)
    (docs / "one.txt").write_text("first file", encoding="utf-8")
    (docs / "sub" / "two.md").write_text("# second", encoding="utf-8")
    (docs / "skip.bin").write_text("not text", encoding="utf-8")

    for name in ("a.jsonl", "a.jsonl.gz", "a.csv", "a.parquet"):
        got = list(jobs.source_from(tmp_path / name))
        assert [(r.id, r.text, r.metadata) for r in got] == [(r["id"], r["text"], {"topic": r["topic"]})
                                                            for r in records], name
    assert [(r.id, r.text) for r in jobs.source_from(docs)] == [("one.txt", "first file"), ("sub/two.md", "# second")]
    renamed = [{"key": r["id"], "body": r["text"]} for r in records[:3]]
    got = list(jobs.source_from(renamed, id_field="key", text_field="body"))
    assert [r.id for r in got] == [r["id"] for r in records[:3]]

    with pytest.raises(jobs.SourceError, match="no 'uid' field"):
        list(jobs.source_from(tmp_path / "a.jsonl", id_field="uid"))


def test_a_misspelt_text_field_stops_every_source_format_naming_the_fields(tmp_path: Path) -> None:
    records = make_records(30)
    write_jsonl(tmp_path / "a.jsonl", records)
    with open(tmp_path / "a.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, ["id", "text", "topic"])
        writer.writeheader()
        writer.writerows(records)
    pq.write_table(pa.Table.from_pylist(records), tmp_path / "a.parquet")
    for source in (tmp_path / "a.jsonl", tmp_path / "a.csv", tmp_path / "a.parquet", records):
        with pytest.raises(jobs.SourceError, match=r"no 'txt' field \(fields seen: id, text, topic\); "
                                                   r"did you mean --text-field text\?"):
            next(iter(jobs.source_from(source, text_field="txt")))
    with pytest.raises(jobs.SourceError, match="choose the text field with --text-field"):
        next(iter(jobs.source_from(records, text_field="content_body")))


def test_a_few_records_without_text_are_still_dead_letters(tmp_path: Path) -> None:
    records: list[dict[str, Any]] = make_records(10)
    records[3] = {"id": records[3]["id"], "topic": "no text"}
    src = write_jsonl(tmp_path / "src.jsonl", records)
    got = list(jobs.source_from(src))
    assert [r.text for r in got].count("") == 1
    result = jobs.run(src, model="fake:8", out=tmp_path / "out", cache=None)
    assert result.dead_letters == 1 and result.written == 9


def test_a_folder_of_text_files_is_embedded_with_relative_paths_as_ids(tmp_path: Path) -> None:
    docs = tmp_path / "docs"
    (docs / "guide").mkdir(parents=True)
    (docs / "a.md").write_text("alpha", encoding="utf-8")
    (docs / "guide" / "b.txt").write_text("beta", encoding="utf-8")
    out = tmp_path / "out"
    result = jobs.run(docs, model="fake:8", out=out, cache="memory://")
    assert result.exit_code == 0
    assert_mirrors(out, [{"id": "a.md", "text": "alpha"}, {"id": "guide/b.txt", "text": "beta"}], dims=8,
                   vector=lambda t: fake_vector(t, 8), model="fake:8")


# ------------------------------------------------------------------ incremental runs, in-process
def test_rerun_embeds_changes_only_updates_metadata_in_place_and_mirrors_the_source(
        tmp_path: Path, openai_server: OpenAITestServer) -> None:
    records = make_records(90)
    src = write_jsonl(tmp_path / "src.jsonl", records)
    out = tmp_path / "out"
    first = jobs.run(src, out=out, chunk_size=25, **openai_args(openai_server, tmp_path))
    assert first.exit_code == 0 and first.written == 90 and first.embedded == 90
    assert_mirrors(out, records)

    # Metadata-only changes rewrite rows from the output itself: not even a cache read is needed.
    for r in records[:3]:
        r["topic"] = "changed"
    records[4]["extra"] = [1, 2]
    write_jsonl(src, records)
    (tmp_path / "cache.db").unlink()  # prove it: no cache, no billing
    openai_server.control.reset_ledger()
    second = jobs.run(src, out=out, chunk_size=25, **openai_args(openai_server, tmp_path))
    assert (second.metadata_updated, second.written, second.unchanged) == (4, 0, 86)
    assert openai_server.ledger.requests_total == 0
    assert_mirrors(out, records)
    assert len(list(out.glob("data/part-*.parquet"))) == 1, "small parts were merged"

    third = jobs.run(src, out=out, chunk_size=25, **openai_args(openai_server, tmp_path))
    assert (third.unchanged, third.written, third.tokens) == (90, 0, 0)


def test_jsonl_output_recovers_a_torn_line_and_unpointed_rows(tmp_path: Path) -> None:
    records = make_records(40)
    src = write_jsonl(tmp_path / "src.jsonl", records)
    out = tmp_path / "vectors.jsonl"
    args = {"model": "fake:8", "out": out, "cache": f"sqlite:///{tmp_path}/c.db", "chunk_size": 15}
    assert jobs.run(src, **args).exit_code == 0
    check = {"dims": 8, "vector": lambda t: fake_vector(t, 8), "model": "fake:8"}
    assert_mirrors(out, records, **check)
    # What a crash leaves: a complete line the state never committed, then half a line.
    good = out.read_text(encoding="utf-8").splitlines()[0]
    with open(out, "a", encoding="utf-8") as f:
        f.write(good + "\n" + good[: len(good) // 2])
    records[0]["text"] = "a new text for the first record"
    write_jsonl(src, records[:-1])
    result = jobs.run(src, **args)
    assert (result.written, result.deleted) == (1, 1)
    assert_mirrors(out, records[:-1], **check)


def test_parts_the_state_does_not_point_to_are_dropped_and_lost_parts_redone(tmp_path: Path) -> None:
    records = make_records(60)
    src = write_jsonl(tmp_path / "src.jsonl", records)
    out = tmp_path / "out"
    args = {"model": "fake:8", "out": out, "cache": f"sqlite:///{tmp_path}/c.db", "chunk_size": 20}
    check = {"dims": 8, "vector": lambda t: fake_vector(t, 8), "model": "fake:8"}
    jobs.run(src, **args)
    # A part written but never committed (killed between the rename and the commit), and a
    # temporary file a killed write left: neither may reach the output.
    (part,) = out.glob("_parts/part-*.parquet")
    table = pq.read_table(part)
    pq.write_table(table.slice(0, 5), out / "_parts" / "part-00000000T000000-deadbeef-00001.parquet")
    (out / "_parts" / "_tmp-abc.part").write_bytes(b"PAR1 half")
    assert pq.read_table(out).num_rows == 60  # readers see neither: only a publish shows parts
    assert jobs.run(src, **args).exit_code == 0
    assert_mirrors(out, records, **check)
    assert not list(out.glob("_parts/_tmp-*")) and len(list(out.glob("_parts/part-*"))) == 1

    (part,) = out.glob("_parts/part-*.parquet")
    part.unlink()  # a part the user deleted: its records are embedded again (from the cache)
    result = jobs.run(src, **args)
    assert result.written == 60 and result.embedded == 0
    assert_mirrors(out, records, **check)


def test_an_outage_stops_the_run_without_dead_letters_and_a_rerun_carries_on(
        tmp_path: Path, openai_server: OpenAITestServer) -> None:
    records = make_records(50)
    src = write_jsonl(tmp_path / "src.jsonl", records)
    out = tmp_path / "out"
    openai_server.control.configure(quota_exhausted=True)
    with pytest.raises(jobs.JobAbortedError, match=r"insufficient_quota|exceeded your current quota"):
        jobs.run(src, out=out, chunk_size=20, **openai_args(openai_server, tmp_path))
    assert jobs.dead_letters(out) == []
    openai_server.control.configure(quota_exhausted=False)
    assert jobs.run(src, out=out, chunk_size=20, **openai_args(openai_server, tmp_path)).exit_code == 0
    assert_mirrors(out, records)


def test_another_model_is_refused_unless_rebuild(tmp_path: Path) -> None:
    src = write_jsonl(tmp_path / "src.jsonl", make_records(10))
    out = tmp_path / "out"
    jobs.run(src, model="fake:8", out=out, cache="memory://")
    with pytest.raises(jobs.JobConflictError, match=r"fake:8 at 8 dimensions.*fake:16.*--rebuild"):
        jobs.run(src, model="fake:16", out=out, cache="memory://")
    with pytest.raises(jobs.JobConflictError):
        jobs.estimate(src, model="fake:16", out=out, cache="memory://")
    result = jobs.run(src, model="fake:16", out=out, cache="memory://", rebuild=True)
    assert result.written == 10
    assert {r["dimensions"] for r in read_output(out)} == {16}


def test_one_job_at_a_time(tmp_path: Path) -> None:
    out = tmp_path / "out"
    holder = JobState(out / "_state.sqlite")
    holder.lock()
    try:
        with pytest.raises(jobs.JobLockedError):
            jobs.run(write_jsonl(tmp_path / "s.jsonl", make_records(3)), model="fake:8", out=out, cache="memory://")
    finally:
        holder.close()


def test_progress_reports_records_hits_and_cost(tmp_path: Path) -> None:
    src = write_jsonl(tmp_path / "src.jsonl", make_records(50))
    seen: list[jobs.JobProgress] = []
    estimates: list[jobs.JobEstimate] = []
    jobs.run(src, model="fake:8", out=tmp_path / "out", cache="memory://", chunk_size=10, progress=seen.append,
             on_estimate=estimates.append)
    counts = [p.records for p in seen]
    assert counts == sorted(counts) and counts[-1] == 50  # advances per request and per chunk, never back
    assert {10, 20, 30, 40, 50} <= set(counts)  # every settled chunk is reported
    assert all(p.total == 50 for p in seen) and estimates[0].records == 50
    assert seen[-1].embedded == 50 and seen[-1].cost_usd == 0.0 and seen[-1].hit_share == 0.0


# ------------------------------------------------------------------ cache export and import
def test_cache_export_import_and_warming_from_vectors_made_elsewhere(
        tmp_path: Path, openai_server: OpenAITestServer) -> None:
    records = make_records(30)
    src = write_jsonl(tmp_path / "src.jsonl", records)
    jobs.run(src, out=tmp_path / "out", **openai_args(openai_server, tmp_path))
    exported = tmp_path / "vectors.parquet"
    with SQLiteCache(tmp_path / "cache.db") as cache:
        assert jobs.export_cache(cache, exported) == (30, 0)
    with SQLiteCache(tmp_path / "copy.db") as copy:
        assert jobs.import_cache(copy, exported) == 30
    est = jobs.estimate(src, **openai_args(openai_server, tmp_path, cache=f"sqlite:///{tmp_path}/copy.db"))
    assert (est.cached, est.to_send, est.tokens) == (30, 0, 0)

    # Vectors computed by another tool: text and vector columns, keyed for the model named.
    fresh = make_records(20, prefix="ext")
    table = pa.table({"text": [r["text"] for r in fresh],
                      "vector": [expected_vector(r["text"], DIMS).tolist() for r in fresh]})
    pq.write_table(table, tmp_path / "elsewhere.parquet")
    with SQLiteCache(tmp_path / "warm.db") as warm:
        n = jobs.import_cache(warm, tmp_path / "elsewhere.parquet", model=MODEL, dimensions=DIMS,
                              base_url=openai_server.base_url)
    assert n == 20
    openai_server.control.reset_ledger()
    out = tmp_path / "warm-out"
    result = jobs.run(write_jsonl(tmp_path / "ext.jsonl", fresh), out=out,
                      **openai_args(openai_server, tmp_path, cache=f"sqlite:///{tmp_path}/warm.db"))
    assert result.cached == 20 and openai_server.ledger.requests_total == 0
    assert_mirrors(out, fresh)


# ------------------------------------------------------------------ vector stores
def test_llamaindex_store_gets_nodes_with_vectors_deletes_and_a_dimension_check(tmp_path: Path) -> None:
    from llama_index.core.vector_stores import SimpleVectorStore

    records = make_records(25)
    src = write_jsonl(tmp_path / "src.jsonl", records)
    store = SimpleVectorStore()
    args = {"model": "fake:8", "cache": "memory://", "state": tmp_path / "state.sqlite", "chunk_size": 10}
    with pytest.warns(UserWarning, match="get_nodes.*skipped"):
        assert jobs.run(src, out=store, **args).exit_code == 0
    assert set(store.data.embedding_dict) == {r["id"] for r in records}
    for r in records:
        np.testing.assert_allclose(store.data.embedding_dict[r["id"]], fake_vector(r["text"], 8), rtol=1e-6)
    write_jsonl(src, records[:-2])
    with pytest.warns(UserWarning, match="get_nodes.*skipped"):  # the job's sample is read back after every run
        result = jobs.run(src, out=store, **args)
    assert result.deleted == 2 and set(store.data.embedding_dict) == {r["id"] for r in records[:-2]}

    other = SimpleVectorStore()
    other.data.embedding_dict["x"] = [0.0] * 4
    with pytest.raises(DimensionMismatchError, match=r"4-dimensional.*8-dimensional"):
        jobs.run(src, out=other, **{**args, "state": tmp_path / "other.sqlite"})
    assert set(other.data.embedding_dict) == {"x"}


def test_langchain_store_is_filled_from_the_jobs_cache_without_embedding_twice(tmp_path: Path) -> None:
    from langchain_core.vectorstores import InMemoryVectorStore

    from langchain_embedpipe import EmbedPipeEmbeddings

    records = make_records(25)
    src = write_jsonl(tmp_path / "src.jsonl", records)
    embeddings = EmbedPipeEmbeddings(model="fake:8", cache=f"sqlite:///{tmp_path}/c.db")
    store = InMemoryVectorStore(embeddings)
    # No cache given: the job uses the store's embeddings' cache, so add_documents only reads it.
    result = jobs.run(src, model="fake:8", out=store, state=tmp_path / "state.sqlite", chunk_size=10)
    assert result.exit_code == 0 and result.embedded == 25
    assert embeddings.stats.embedded == 0 and embeddings.stats.hits == 25
    for r in records:
        np.testing.assert_allclose(store.store[r["id"]]["vector"], fake_vector(r["text"], 8), rtol=1e-6)
        assert store.store[r["id"]]["metadata"] == {"topic": r["topic"]}

    wrong = InMemoryVectorStore(EmbedPipeEmbeddings(model="fake:16", cache="memory://"))
    with pytest.raises(ConfigurationError, match="not the job's model"):
        jobs.run(src, model="fake:8", out=wrong, state=tmp_path / "wrong.sqlite", cache="memory://")
    assert not wrong.store
    embeddings.close()


def test_state_keeps_records_and_dead_letters_but_never_the_api_key(tmp_path: Path,
                                                                    openai_server: OpenAITestServer) -> None:
    secret = "sk-live-" + "Zq9" * 12
    openai_server.control.configure(poison=("POISON",))
    records = [*make_records(20), {"id": "bad", "text": "POISON pill", "topic": "x"}]
    src = write_jsonl(tmp_path / "src.jsonl", records)
    out = tmp_path / "out"
    result = jobs.run(src, out=out, **openai_args(openai_server, tmp_path, api_key=secret))
    assert result.exit_code == 3
    (letter,) = jobs.dead_letters(out)
    assert (letter.id, letter.text, dict(letter.metadata)) == ("bad", "POISON pill", {"topic": "x"})
    assert "HTTP 400" in letter.reason
    for f in out.rglob("*"):
        if f.is_file():
            assert secret.encode() not in f.read_bytes(), f.name
    # The queue is readable by the core's own dead-letter store.
    from embedpipe.deadletter import SQLiteDeadLetterStore

    store = SQLiteDeadLetterStore(out / "_state.sqlite")
    assert [d.id for d in store.all()] == ["bad"]
    store.close()


def test_pipeline_of_a_job_batches_to_fill_concurrency() -> None:
    from embedpipe.jobs.unit import job_pipeline

    spec = jobs.JobSpec.from_options("src.jsonl", "out", model="fake:8", cache="memory://", chunk_size=400,
                                     max_concurrency=8)
    pipe = job_pipeline(spec)
    assert pipe.batch_size == 100 and pipe.errors == "collect"
    pipe.close()
