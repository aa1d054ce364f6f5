"""Chunked jobs (``--chunking naive|late --splitter stable --split-tokens N``): documents in, chunk rows out.

With the real MiniLM model, real JSONL sources, the Parquet sink and the SQLite job store.
"""

from __future__ import annotations

import itertools
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner

from embedpipe import EmbeddingPipeline, jobs
from embedpipe.chunking import StableSplitter
from embedpipe.errors import ConfigurationError
from embedpipe.jobs.chunked import ChunkedSource, embed_entries, job_source, record_batches
from embedpipe.jobs.records import Entry
from embedpipe.jobs.sources import IterableSource
from tests.test_jobs import read_output, write_jsonl

os.environ.setdefault("HF_HUB_OFFLINE", "1")
TOKENS = 48


def _docs(corpus: list[dict[str, str]], n: int = 4) -> list[dict[str, Any]]:
    """``n`` pydocs sections long enough to make several chunks, as job records."""
    picked = [s for s in corpus if 2500 < len(s["text"]) < 5000][:n]
    return [{"id": s["id"], "text": s["text"], "title": s["title"]} for s in picked]


def _run(src: Path, out: Path, local_provider: Any, mode: str, **kw: Any) -> jobs.JobResult:
    return jobs.run(src, out=out, model=local_provider, cache=f"sqlite:///{out.parent}/cache-{mode}.db",
                    chunking=mode, split_tokens=TOKENS, chunk_size=8, **kw)


def test_options_are_checked_and_enter_the_job_id(tmp_path: Path) -> None:
    base = jobs.JobSpec.from_options("docs.jsonl", tmp_path / "out", model="fake:8")
    naive = base.replace(options={"chunking": "naive"})
    assert len({base.job_id, naive.job_id, base.replace(options={"chunking": "late"}).job_id,
                base.replace(options={"chunking": "naive", "split_tokens": 64}).job_id}) == 4
    assert naive.job_id == base.replace(options={"chunking": "naive", "split_tokens": 128}).job_id  # the default
    assert jobs.JobSpec.from_json(naive.to_json()) == naive
    with pytest.raises(ConfigurationError, match="chunking='sliding'"):
        jobs.JobSpec.from_options("docs.jsonl", tmp_path, model="fake:8", chunking="sliding")
    with pytest.raises(ConfigurationError, match="split_tokens=1 "):
        jobs.JobSpec.from_options("docs.jsonl", tmp_path, model="fake:8", chunking="late", split_tokens=1)
    with pytest.raises(ConfigurationError, match="need chunking"):
        jobs.JobSpec.from_options("docs.jsonl", tmp_path, model="fake:8", split_tokens=64)


def test_late_chunking_needs_a_local_model_before_anything_is_read(tmp_path: Path) -> None:
    src = write_jsonl(tmp_path / "docs.jsonl", [{"id": "a", "text": "One. Two."}])
    with pytest.raises(ConfigurationError, match="local transformer model"):
        jobs.run(src, out=tmp_path / "out", model="fake:8", chunking="late", cache="none")


def test_batches_never_split_a_document(corpus: list[dict[str, str]]) -> None:
    docs = _docs(corpus)
    src = ChunkedSource(IterableSource(docs), splitter=StableSplitter(chunk_size=TOKENS))
    batches = list(record_batches(src, 5))
    parents = [[r.metadata["parent_id"] for r in b] for b in batches]
    for a, b in itertools.pairwise(parents):
        assert a[-1] != b[0]
    assert sum(map(len, batches)) == len(list(src))


def test_naive_job_writes_a_row_per_chunk_and_an_edit_re_embeds_only_its_chunks(
        tmp_path: Path, local_provider: Any, corpus: list[dict[str, str]]) -> None:
    docs = _docs(corpus)
    src, out = write_jsonl(tmp_path / "docs.jsonl", docs), tmp_path / "out"
    first = _run(src, out, local_provider, "naive")
    splitter = StableSplitter(chunk_size=TOKENS)
    spans = {d["id"]: splitter.split_spans(d["text"]) for d in docs}
    rows = read_output(out)
    assert first.records == len(rows) == sum(map(len, spans.values())) > 3 * len(docs)
    by_doc: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        by_doc.setdefault(row["metadata"]["parent_id"], []).append(row)
    pipe = EmbeddingPipeline(local_provider)
    for doc in docs:
        chunks = sorted(by_doc[doc["id"]], key=lambda r: r["metadata"]["chunk_index"])
        assert [(r["metadata"]["chunk_start"], r["metadata"]["chunk_end"]) for r in chunks] == spans[doc["id"]]
        assert all(r["id"].startswith(doc["id"] + "#") and r["metadata"]["title"] == doc["title"] for r in chunks)
    row = rows[0]
    text = next(d["text"] for d in docs if d["id"] == row["metadata"]["parent_id"])
    want = pipe.embed_array([text[row["metadata"]["chunk_start"]:row["metadata"]["chunk_end"]]])[0]
    assert np.allclose(np.asarray(row["vector"]), want, atol=1e-5)  # the chunk's text embedded alone

    # Insert a sentence into the middle of one document: only the chunks next to it are new.
    edited = [dict(d) for d in docs]
    text = edited[2]["text"]
    mid = text.find(". ", len(text) // 2) + 2
    edited[2]["text"] = text[:mid] + "An inserted sentence about nothing in particular. " + text[mid:]
    write_jsonl(src, edited)
    second = _run(src, out, local_provider, "naive")
    assert 1 <= second.written <= 3
    assert second.embedded == second.written  # chunk texts seen before come from the store, not the model
    assert second.deleted == second.written - (len(splitter.split_spans(edited[2]["text"])) - len(spans[docs[2]["id"]]))
    assert len(read_output(out)) == sum(len(splitter.split_spans(d["text"])) for d in edited)


def test_late_job_pools_from_the_document_and_re_embeds_an_edited_document_whole(
        tmp_path: Path, local_provider: Any, corpus: list[dict[str, str]]) -> None:
    docs = _docs(corpus, 4)
    src, out = write_jsonl(tmp_path / "docs.jsonl", docs), tmp_path / "out"
    first = _run(src, out, local_provider, "late")
    rows = read_output(out)
    assert first.records == len(rows) and first.dead_letters == 0
    pipe = EmbeddingPipeline(local_provider)
    for doc in docs:
        chunks = sorted((r for r in rows if r["metadata"]["parent_id"] == doc["id"]),
                        key=lambda r: r["metadata"]["chunk_index"])
        spans = [(r["metadata"]["chunk_start"], r["metadata"]["chunk_end"]) for r in chunks]
        want = pipe.embed_chunks(doc["text"], spans, mode="late")  # from the real document, whitespace and all
        got = np.asarray([r["vector"] for r in chunks])
        assert np.allclose(got, want, atol=1e-4)
        naive = pipe.embed_chunks(doc["text"], spans, mode="naive")
        assert not np.allclose(got, naive, atol=1e-2)

    # Re-running changes nothing; editing one document re-embeds all of its chunks, and only its.
    assert _run(src, out, local_provider, "late").written == 0
    edited = [dict(d) for d in docs]
    edited[1]["text"] = edited[1]["text"].replace(".", ". Indeed.", 1)
    write_jsonl(src, edited)
    third = _run(src, out, local_provider, "late")
    n_edited = len(StableSplitter(chunk_size=TOKENS).split_spans(edited[1]["text"]))
    assert third.written == n_edited
    assert third.deleted == len([r for r in rows if r["metadata"]["parent_id"] == docs[1]["id"]])
    with pytest.raises(ConfigurationError, match="chunking='late'"):  # a chunk alone would get a naive vector
        jobs.retry_dead_letters(out)


def test_late_vectors_need_every_chunk_of_a_document(tmp_path: Path, local_provider: Any,
                                                     corpus: list[dict[str, str]]) -> None:
    spec = jobs.JobSpec.from_options(tmp_path / "x.jsonl", tmp_path / "out", model=local_provider, chunking="late")
    src = ChunkedSource(IterableSource(_docs(corpus, 2)), mode="late", splitter=StableSplitter(chunk_size=TOKENS))
    records = list(src)
    first = records[0].metadata["parent_id"]
    partial = [Entry.of(r) for r in records
               if not (r.metadata["parent_id"] == first and r.metadata["chunk_index"] == 1)]
    with EmbeddingPipeline(local_provider) as pipe:
        arr = embed_entries(spec, pipe, partial)
    broken = {i for i, e in enumerate(partial) if e.record.metadata["parent_id"] == first}
    assert set(arr.failures) == broken
    assert "all" in str(arr.failures[min(broken)]) and arr.failures[min(broken)].record_fault
    assert np.isfinite(np.asarray(arr)[[i for i in range(len(partial)) if i not in broken]]).all()


def test_cli_run_takes_the_chunking_options(tmp_path: Path, corpus: list[dict[str, str]]) -> None:
    from embedpipe.cli import main

    src = write_jsonl(tmp_path / "docs.jsonl", _docs(corpus, 2))
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["run", str(src), "--out", str(out), "--model", "fake:16", "--cache", "none",
                                       "--chunking", "naive", "--splitter", "stable", "--split-tokens", "64"])
    assert result.exit_code == 0, result.output
    rows = read_output(out)
    spec = jobs.JobSpec.from_options(src, out, model="fake:16", chunking="naive", splitter="stable", split_tokens=64)
    assert len(rows) == sum(1 for _ in job_source(spec)) > 2
    assert json.loads(json.dumps(rows[0]["metadata"]))["parent_id"]
