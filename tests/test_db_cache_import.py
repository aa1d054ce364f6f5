"""Warming a cache from an existing vector database: ``import_cache(cache, URL)`` and ``embedpipe cache import URL``.

Every engine of tests/db_engines.py (pgvector on pgserver, Chroma, LanceDB, milvus-lite in
process, Qdrant in qdrant-client's local mode, a Python imitation of the server).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from embedpipe import jobs
from embedpipe.cache import SQLiteCache
from embedpipe.cli import main
from embedpipe.errors import ConfigurationError, DimensionMismatchError
from tests.db_engines import Engine
from tests.openai_server import OpenAITestServer
from tests.test_jobs import DIMS, MODEL, make_records, openai_args


@pytest.fixture
def filled(db_engine: Engine, openai_server: OpenAITestServer, tmp_path: Path) -> str:
    """A collection that a run of :data:`MODEL` on the test server filled with 20 records; its URL."""
    url = db_engine.url(f"warm_{tmp_path.name[-12:].replace('-', '_')}")
    result = jobs.run(make_records(20), out=url, state=tmp_path / "s.sqlite",
                      **openai_args(openai_server, tmp_path, cache="memory://"))
    assert result.written == 20
    return url


def test_a_cache_warmed_from_a_vector_database_bills_nothing_on_the_next_run(
        filled: str, openai_server: OpenAITestServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")  # the sample check embeds 3 texts with the model
    with SQLiteCache(tmp_path / "warm.db") as warm:
        assert jobs.import_cache(warm, filled, model=MODEL, dimensions=DIMS, base_url=openai_server.base_url) == 20
    assert openai_server.ledger.requests_total == 2  # the run that filled it, and the sample check
    openai_server.control.reset_ledger()
    result = jobs.run(make_records(20), out=tmp_path / "out",
                      **openai_args(openai_server, tmp_path, cache=f"sqlite:///{tmp_path}/warm.db"))
    assert (result.cached, result.embedded) == (20, 0)
    assert openai_server.ledger.requests_total == 0


def test_vectors_another_model_made_are_refused_before_anything_is_imported(
        filled: str, tmp_path: Path) -> None:
    # fake:32 can embed the sample (no key needed) and makes other vectors than the server did.
    with SQLiteCache(tmp_path / "warm.db") as warm:
        with pytest.raises(ConfigurationError, match=r"not what fake:32 makes.*nothing was imported"):
            jobs.import_cache(warm, filled, model="fake:32")
        assert warm.stats().entries == 0
        with pytest.raises(DimensionMismatchError, match="32-dimensional vectors; fake:16 makes 16"):
            jobs.import_cache(warm, filled, model="fake:16")
        assert warm.stats().entries == 0


def test_the_cli_imports_from_a_database_url(filled: str, openai_server: OpenAITestServer, tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["cache", "import", filled, "--cache", f"sqlite:///{tmp_path}/cli.db",
                                       "--model", MODEL, "--dimensions", str(DIMS), "--base-url",
                                       openai_server.base_url], env={"OPENAI_API_KEY": "sk-test"})
    assert result.exit_code == 0, result.output
    assert "20 vectors imported" in result.output
    with SQLiteCache(tmp_path / "cli.db") as cache:
        assert cache.stats().entries == 20
