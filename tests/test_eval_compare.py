"""``embedpipe.eval.compare`` and ``embedpipe eval``: outputs, schema, queries from titles, cache reuse."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from embedpipe.errors import ConfigurationError
from embedpipe.eval import compare, parse_candidate

DOCS = [
    {"id": f"d{i}", "title": title, "text": f"{title}\n\n{body}"}
    for i, (title, body) in enumerate([
        ("Reading files", "Open a file with open(). Read it with read(). Close it when done."),
        ("Sorting lists", "Call sorted() on a list. The key argument picks what to compare."),
        ("Regular expressions", "The re module matches patterns. Use re.search to find one."),
        ("Dates and times", "The datetime module holds dates. timedelta measures spans."),
        ("Threads", "The threading module runs code at once. A Lock guards shared state."),
        ("JSON", "json.dumps writes JSON text. json.loads reads it back into objects."),
    ])
]


@pytest.fixture
def docs_file(tmp_path: Path) -> Path:
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps(d) + "\n" for d in DOCS), encoding="utf-8")
    return path


def test_parse_candidate_reads_matryoshka_dims() -> None:
    assert parse_candidate("openai:text-embedding-3-small@256") == ("openai:text-embedding-3-small", 256)
    assert parse_candidate("local:all-MiniLM-L6-v2") == ("local:all-MiniLM-L6-v2", None)
    with pytest.raises(ConfigurationError, match="provider:name"):
        parse_candidate("all-MiniLM-L6-v2")


def test_compare_writes_report_json_and_plots_and_a_second_run_embeds_nothing(docs_file: Path,
                                                                              tmp_path: Path) -> None:
    cache = f"sqlite:///{tmp_path / 'cache.db'}"
    out = tmp_path / "eval"
    first = compare(docs_file, models=["fake:64", "fake:64@16"], chunking=["none", "naive"], cache=cache,
                    out=out, split_tokens=8, resamples=200)
    assert first.embedded > 0
    data = json.loads((out / "results.json").read_text())
    assert [(c["model"], c["chunking"]) for c in data["candidates"]] == [
        ("fake:64", "none"), ("fake:64", "naive"), ("fake:64@16", "none"), ("fake:64@16", "naive")]
    cand = data["candidates"][0]
    for key in ("model", "dimensions", "chunking", "recall@1", "recall@5", "recall@10", "mrr", "ndcg@10", "ci95",
                "latency", "bytes_per_vector", "cost"):
        assert key in cand
    assert data["candidates"][2]["dimensions"] == 16
    assert cand["bytes_per_vector"]["float32"] == 256
    assert cand["cost"]["corpus_usd"] == 0.0
    assert 0 <= cand["ci95"]["recall@10"][0] <= cand["recall@10"] <= cand["ci95"]["recall@10"][1] <= 1
    assert data["queries"]["built_from_documents"] and data["queries"]["count"] == len(DOCS)
    report = (out / "report.md").read_text()
    assert "No queries were given" in report and "## Recommendation" in report and "**Use " in report
    assert (out / "recall_vs_cost.png").stat().st_size > 0 and (out / "recall_vs_dims.png").is_file()
    # Every embedding went through the cache: the same eval again embeds nothing.
    second = compare(docs_file, models=["fake:64", "fake:64@16"], chunking=["none", "naive"], cache=cache,
                     out=out, split_tokens=8, resamples=200)
    assert second.embedded == 0
    assert [c["recall@10"] for c in second.candidates] == [c["recall@10"] for c in data["candidates"]]
    assert all(c["latency"].get("from_previous_run") for c in second.candidates)
    # One more model: only that one embeds.
    third = compare(docs_file, models=["fake:64", "fake:32"], cache=cache, out=tmp_path / "eval3",
                    resamples=200)
    assert [c["embedded"] for c in third.candidates] == [0, len(DOCS) * 2]  # documents and title queries


def test_queries_file_and_its_errors(docs_file: Path, tmp_path: Path) -> None:
    queries = tmp_path / "q.jsonl"
    queries.write_text(json.dumps({"query": "how do I sort", "relevant": ["d1"]}) + "\n", encoding="utf-8")
    report = compare(docs_file, models=["fake:32"], queries=queries, cache=None, resamples=100)
    assert report.results["queries"]["count"] == 1 and not report.results["queries"]["built_from_documents"]
    queries.write_text(json.dumps({"query": "x", "relevant": ["nope"]}) + "\n", encoding="utf-8")
    with pytest.raises(ConfigurationError, match=r"q.jsonl:1: relevant ids not among"):
        compare(docs_file, models=["fake:32"], queries=queries, cache=None)
    queries.write_text('{"query": ""}\n', encoding="utf-8")
    with pytest.raises(ConfigurationError, match="non-empty"):
        compare(docs_file, models=["fake:32"], queries=queries, cache=None)
    with pytest.raises(ConfigurationError, match="chunking"):
        compare(docs_file, models=["fake:32"], chunking=["eager"], cache=None)


def test_late_chunking_candidate_on_the_local_model_reuses_its_cache(docs_file: Path, tmp_path: Path,
                                                                      local_provider: Any) -> None:
    cache = f"sqlite:///{tmp_path / 'cache.db'}"
    first = compare(docs_file, models=["local:all-MiniLM-L6-v2@128"], chunking=["late"], cache=cache,
                    split_tokens=8, resamples=100)
    assert first.embedded > 0 and first.candidates[0]["dimensions"] == 128
    again = compare(docs_file, models=["local:all-MiniLM-L6-v2@128"], chunking=["late"], cache=cache,
                    split_tokens=8, resamples=100)
    assert again.embedded == 0
    assert again.candidates[0]["recall@10"] == first.candidates[0]["recall@10"]


def test_cli_eval_runs_compare(docs_file: Path, tmp_path: Path) -> None:
    from click.testing import CliRunner

    from embedpipe.cli import main

    out = tmp_path / "cli-eval"
    result = CliRunner().invoke(main, ["eval", str(docs_file), "--models", "fake:32", "fake:32@8",
                                       "--cache", f"sqlite:///{tmp_path / 'c.db'}", "--out", str(out),
                                       "--resamples", "100"])
    assert result.exit_code == 0, result.output
    assert len(json.loads((out / "results.json").read_text())["candidates"]) == 2
    assert "report.md" in result.output
