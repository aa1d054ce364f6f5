"""Hardening I, the engine's side, against the test server's fault shapes: one wrong-dimension answer,
NaN rows that keep their valid neighbours, texts that always come back invalid, and keys echoed back."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from embedpipe import EmbeddingPipeline
from embedpipe.errors import DimensionMismatchError, EmbeddingFailedError
from tests.openai_server import OpenAITestServer, expected_vector

MODEL = "text-embedding-3-small"
KEY = "sk-proj-Secret0123456789abcdefXYZ"


async def no_sleep(seconds: float) -> None:
    await asyncio.sleep(0)


def pipe_for(server: OpenAITestServer, **kw: Any) -> EmbeddingPipeline:
    kw.setdefault("cache", "memory://")
    kw.setdefault("sleep", no_sleep)
    return EmbeddingPipeline(f"openai:{MODEL}", base_url=server.base_url, api_key=kw.pop("api_key", "sk-test"), **kw)


def test_one_1535_d_answer_is_retried_not_fatal(openai_server: OpenAITestServer) -> None:
    texts = [f"text {i}" for i in range(50)]
    with pipe_for(openai_server) as pipe:
        openai_server.control.fail_next("wrong_dims_all")
        out = pipe.embed(texts)
    assert all(len(v) == 1536 for v in out) and out.stats.retries == 1


def test_consistently_wrong_dimensions_are_a_dimension_mismatch(openai_server: OpenAITestServer) -> None:
    with pipe_for(openai_server) as pipe:
        openai_server.control.fail_next("wrong_dims_all", times=10)
        with pytest.raises(DimensionMismatchError, match="1535-d"):
            pipe.embed(["a"])
    assert openai_server.ledger.requests_ok == 3  # gave up after three answers, not six retries


def test_nan_in_one_percent_of_rows_keeps_the_valid_rows(openai_server: OpenAITestServer) -> None:
    texts = [f"sentence number {i} of the call" for i in range(300)]
    openai_server.control.configure(nan_rows=0.01)
    with pipe_for(openai_server, batch_size=300) as pipe:
        out = pipe.embed(texts)
    assert not out.failures
    for t, v in zip(texts, out, strict=True):
        assert v == pytest.approx(expected_vector(t, 1536).tolist(), abs=1e-6)
    billed = sum(openai_server.ledger.times_billed.values())
    # Valid rows are kept: only the NaN rows go again (about 1% per round), not the whole 300.
    assert billed < 330, billed


def test_a_text_that_always_comes_back_invalid_fails_alone(openai_server: OpenAITestServer) -> None:
    texts = [f"row {i}" for i in range(40)] + ["always CORRUPTED row"]
    openai_server.control.configure(corrupt=("CORRUPTED",))
    with pipe_for(openai_server, errors="collect", max_retries=3) as pipe:
        out = pipe.embed(texts)
    assert list(out.failures) == [40] and out.failures[40].kind == "invalid_response"
    assert sum(openai_server.ledger.times_billed.values()) == 40 + 4  # the 40 once; the bad one 1 + 3 retries


def test_an_echoed_key_never_shows_in_exceptions_or_failures(openai_server: OpenAITestServer) -> None:
    with pipe_for(openai_server, api_key=KEY, max_retries=0) as pipe:
        openai_server.control.fail_next("echo_auth")
        with pytest.raises(EmbeddingFailedError) as exc:
            pipe.embed(["hello"])
        assert KEY not in str(exc.value) and KEY not in repr(exc.value.failures)
        assert KEY[8:20] not in str(exc.value)
        openai_server.control.fail_next("echo_auth")
        out = pipe.embed(["again"], errors="collect")
        assert KEY not in str(out.failures[0])


def test_an_echoed_key_never_reaches_the_cli_output(openai_server: OpenAITestServer, tmp_path: Path) -> None:
    src = tmp_path / "src.jsonl"
    src.write_text('{"id": "a", "text": "alpha"}\n{"id": "b", "text": "beta"}\n')
    openai_server.control.configure(echo_auth_status=401)
    openai_server.control.fail_next("echo_auth", times=20)
    env = {"OPENAI_API_KEY": KEY, "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"}
    done = subprocess.run([sys.executable, "-m", "embedpipe.cli", "run", str(src), "--model", f"openai:{MODEL}",
                           "--base-url", openai_server.base_url, "--out", str(tmp_path / "out"),
                           "--cache", f"sqlite:///{tmp_path}/c.db", "--no-estimate"],
                          capture_output=True, text=True, env=env, timeout=120, cwd=Path(__file__).parents[1])
    assert done.returncode != 0
    assert KEY not in done.stdout + done.stderr
    assert "401" in done.stdout + done.stderr
