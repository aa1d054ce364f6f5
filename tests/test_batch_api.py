"""Batch API runs against the test server's /v1/files and /v1/batches, driven through the openai SDK by embedpipe.

Real parts: the OpenAI-compatible test server (its batch lifecycle on a fast clock and its
ledger in dollars), a SQLite cache and job store, the JSONL sink, and for the kill test the
``embedpipe run --batch-api`` command line in a subprocess.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from embedpipe import jobs
from embedpipe.errors import ConfigurationError
from tests.openai_server import OpenAITestServer, cl100k_encoding, expected_vector, running_server

ROOT = Path(__file__).resolve().parent.parent
MODEL = "text-embedding-3-small"
PRICE = 0.02  # USD per 1M tokens, the list price; the Batch API bills half
FAST = {"batch_validating_s": 0.05, "batch_in_progress_s": 0.4, "batch_finalizing_s": 0.05}


@pytest.fixture
def server() -> Iterator[OpenAITestServer]:
    with running_server(**FAST) as srv:
        yield srv


def corpus(path: Path, texts: list[str]) -> Path:
    path.write_text("".join(json.dumps({"id": f"d{i}", "text": t}) + "\n" for i, t in enumerate(texts)))
    return path


def texts_of(n: int, tag: str = "doc") -> list[str]:
    return [f"{tag} {i}: the batch pipeline embeds this text at half price" for i in range(n)]


def tokens(texts: list[str]) -> int:
    enc = cl100k_encoding()
    return sum(len(enc.encode_ordinary(t)) for t in set(texts))


def vectors(out: Path) -> dict[str, np.ndarray]:
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    return {r["id"]: np.asarray(r["vector"], dtype=np.float32) for r in rows}


def assert_exact(out: Path, texts: list[str], skip: frozenset[str] = frozenset()) -> None:
    got = vectors(out)
    for i, text in enumerate(texts):
        if text in skip:
            assert f"d{i}" not in got
            continue
        assert np.array_equal(got[f"d{i}"], expected_vector(text, 1536)), f"d{i}"


def options(max_inputs: int = 1000) -> jobs.BatchOptions:
    return jobs.BatchOptions(limits=jobs.BatchLimits(max_inputs=max_inputs), poll_initial_s=0.05, poll_max_s=0.1)


def run(tmp: Path, server: OpenAITestServer, src: Path, **kw: Any) -> jobs.JobResult:
    kw.setdefault("batch_api", options())
    return jobs.run(str(src), out=str(tmp / "out.jsonl"), model=f"openai:{MODEL}", base_url=server.base_url,
                    api_key="test-key", cache=f"sqlite:///{tmp}/cache.db", max_retries=1, **kw)


def test_batch_run_bills_half_price_and_is_exact(tmp_path: Path, server: OpenAITestServer) -> None:
    texts = texts_of(250)
    src = corpus(tmp_path / "docs.jsonl", texts + texts[:20])  # repeated texts are sent once
    result = run(tmp_path, server, src, batch_api=options(max_inputs=100), batch_size=40)
    led = server.ledger
    assert led.batches_created == 3 and led.files_uploaded == 3  # 250 texts, at most 100 a batch
    assert set(led.batch_submissions.values()) == {1} and len(led.batch_submissions) == 250
    assert led.batch_billed_tokens == led.billed_tokens == tokens(texts)  # nothing went direct
    assert led.billed_usd == pytest.approx(tokens(texts) * PRICE / 2 / 1e6)
    assert result.cost_usd == pytest.approx(led.billed_usd) and result.embedded == 0
    assert [b.status for b in result.batches] == ["completed"] * 3
    assert sum(b.cached for b in result.batches) == 250
    assert_exact(tmp_path / "out.jsonl", texts + texts[:20])
    # A second run finds everything done: no new batch, nothing billed.
    again = run(tmp_path, server, src)
    assert again.unchanged == 270 and server.ledger.batches_created == 3 and again.batches == ()


def test_estimate_shows_both_prices_and_budget_uses_the_batch_price(tmp_path: Path,
                                                                    server: OpenAITestServer) -> None:
    texts = texts_of(40)
    src = corpus(tmp_path / "docs.jsonl", texts)
    est = jobs.estimate(str(src), model=f"openai:{MODEL}", base_url=server.base_url, api_key="k",
                        cache=f"sqlite:///{tmp_path}/cache.db")
    assert est.cost_usd == pytest.approx(tokens(texts) * PRICE / 1e6)
    assert est.batch_cost_usd == pytest.approx(est.cost_usd / 2) and est.batch_window == "24h"
    budget = est.cost_usd * 0.75  # enough at the batch price, not at the direct one
    with pytest.raises(jobs.BudgetRefusedError):
        run(tmp_path, server, src, budget_usd=budget, batch_api=None)
    result = run(tmp_path, server, src, budget_usd=budget)
    assert result.records == 40 and server.ledger.billed_usd <= budget


def test_expired_batch_keeps_its_done_half_and_replans_the_rest(tmp_path: Path, server: OpenAITestServer) -> None:
    texts = texts_of(200)
    src = corpus(tmp_path / "docs.jsonl", texts)
    server.control.script_batches("expired@0.5")
    result = run(tmp_path, server, src, batch_size=10)  # 20 lines: 10 done before the window ran out
    led = server.ledger
    first, second = result.batches
    assert (first.status, first.completed, first.failed, first.cached) == ("expired", 10, 10, 100)
    assert (second.status, second.inputs) == ("completed", 100)
    # The expired half went into the second batch; the done half was never sent again.
    assert sorted(Counter(led.batch_submissions.values()).items()) == [(1, 100), (2, 100)]
    assert led.batches_created == 2 and set(led.times_billed.values()) == {1}
    assert led.billed_tokens == led.batch_billed_tokens == tokens(texts)  # the expired half was billed once
    assert led.billed_usd == pytest.approx(tokens(texts) * PRICE / 2 / 1e6)
    assert_exact(tmp_path / "out.jsonl", texts)


def test_cancelled_batch_keeps_its_done_part(tmp_path: Path, server: OpenAITestServer) -> None:
    texts = texts_of(120)
    src = corpus(tmp_path / "docs.jsonl", texts)
    server.control.script_batches("cancelled@0.25")
    result = run(tmp_path, server, src, batch_size=10)
    assert [b.status for b in result.batches] == ["cancelled", "completed"]
    assert result.batches[0].cached == 30 and result.batches[1].inputs == 90
    led = server.ledger
    assert set(led.times_billed.values()) == {1} and led.billed_tokens == led.batch_billed_tokens
    assert_exact(tmp_path / "out.jsonl", texts)


def test_error_file_lines_go_to_the_normal_api_or_dead_letters(tmp_path: Path, server: OpenAITestServer) -> None:
    texts = texts_of(60)
    texts[3] += " FLAKY"     # its line fails with a 500 in the batch; the normal API embeds it
    texts[25] += " POISON"   # its line fails with a 400 in the batch, and directly: a dead letter
    texts[47] += " NANROW"   # comes back with a NaN (in the batch and directly): validated out, dead-lettered
    server.control.configure(batch_line_errors=["FLAKY"], poison=["POISON"], corrupt=["NANROW"])
    src = corpus(tmp_path / "docs.jsonl", texts)
    result = run(tmp_path, server, src, batch_size=10)
    (batch,) = result.batches
    assert (batch.status, batch.completed, batch.failed) == ("completed", 4, 2)
    assert batch.cached == 39  # 4 good lines of 10, one NaN row among them
    assert result.dead_letters == 2
    assert_exact(tmp_path / "out.jsonl", texts, skip=frozenset({texts[25], texts[47]}))
    led = server.ledger
    direct = led.billed_tokens - led.batch_billed_tokens
    # The 500 line's ten texts went direct, each billed once; the good lines' texts only in their batch.
    assert direct > 0 and all(led.times_billed[t] == 1 for t in texts if t not in (texts[25], texts[47]))
    assert led.batch_submissions[texts[3]] == 1 and server.ledger.batches_created == 1


def test_azure_batch_run(tmp_path: Path, server: OpenAITestServer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_API_VERSION", "2024-10-21")
    texts = texts_of(30)
    src = corpus(tmp_path / "docs.jsonl", texts)
    result = jobs.run(str(src), out=str(tmp_path / "out.jsonl"), model=f"azure:{MODEL}",
                      base_url=server.url, api_key="azure-key", cache=f"sqlite:///{tmp_path}/cache.db",
                      batch_api=options())
    assert [b.status for b in result.batches] == ["completed"]
    assert server.ledger.billed_usd == pytest.approx(tokens(texts) * PRICE / 2 / 1e6)
    assert_exact(tmp_path / "out.jsonl", texts)


def test_refused_without_a_batch_api(tmp_path: Path) -> None:
    src = corpus(tmp_path / "docs.jsonl", texts_of(3))
    with pytest.raises(ConfigurationError, match="openai: and azure:"):
        jobs.run(str(src), out=str(tmp_path / "out.jsonl"), model="fake:8", batch_api=True)


def test_sigkill_while_batches_run_then_resume(tmp_path: Path) -> None:
    texts = texts_of(300)
    src = corpus(tmp_path / "docs.jsonl", texts)
    with running_server(batch_validating_s=0.05, batch_in_progress_s=4.0, batch_finalizing_s=0.05) as server:
        cmd = [sys.executable, "-m", "embedpipe.cli", "run", str(src), "--out", str(tmp_path / "out.jsonl"),
               "--model", f"openai:{MODEL}", "--base-url", server.base_url, "--cache",
               f"sqlite:///{tmp_path}/cache.db", "--batch-api", "--batch-inputs", "100", "--batch-poll-max", "0.1",
               "--batch-size", "20", "--no-progress"]
        env = {**os.environ, "OPENAI_API_KEY": "test-key", "HF_HUB_OFFLINE": "1",
               "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
        proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and proc.poll() is None:
                led = server.ledger
                if led.batches_created == 3 and "in_progress" in led.batch_statuses.values():
                    break
                time.sleep(0.05)
            assert proc.poll() is None, proc.communicate()[1].decode()[-2000:]
            proc.send_signal(signal.SIGKILL)
            proc.wait(10)
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.communicate()
        before = server.ledger
        assert before.batches_created == 3 and before.billed_tokens < tokens(texts)  # killed mid-way
        done = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, timeout=60)
        assert done.returncode == 0, done.stderr.decode()[-2000:]
        led = server.ledger
    assert led.batches_created == 3 and set(led.batch_submissions.values()) == {1}  # re-attached, none twice
    assert set(led.times_billed.values()) == {1} and len(led.times_billed) == 300
    assert led.batch_billed_tokens == led.billed_tokens == tokens(texts)
    assert led.billed_usd == pytest.approx(tokens(texts) * PRICE / 2 / 1e6)
    assert_exact(tmp_path / "out.jsonl", texts)
    assert b"batch batch_" in done.stdout and b"completed" in done.stdout  # the summary, each batch
    assert b"in_progress" in done.stderr or b"completed" in done.stderr  # the progress lines
    listed = subprocess.run([sys.executable, "-m", "embedpipe.cli", "batches", "--out", str(tmp_path / "out.jsonl")],
                            env=env, cwd=ROOT, capture_output=True, timeout=30)
    assert listed.returncode == 0 and listed.stdout.decode().count(" completed ") == 3, listed.stdout


def test_an_expired_batch_with_nothing_done_is_planned_again(tmp_path: Path, server: OpenAITestServer) -> None:
    texts = texts_of(30)
    src = corpus(tmp_path / "docs.jsonl", texts)
    server.control.script_batches("expired@0")  # one line, the same file contents planned again
    result = run(tmp_path, server, src)
    assert [(b.status, b.inputs) for b in result.batches] == [("expired", 30), ("completed", 30)]
    assert set(server.ledger.times_billed.values()) == {1}
    assert_exact(tmp_path / "out.jsonl", texts)


def test_a_failed_batch_goes_to_the_normal_api(tmp_path: Path, server: OpenAITestServer) -> None:
    texts = texts_of(30)
    src = corpus(tmp_path / "docs.jsonl", texts)
    server.control.script_batches("failed")
    result = run(tmp_path, server, src)
    assert [b.status for b in result.batches] == ["failed"] and server.ledger.batches_created == 1
    led = server.ledger
    assert led.batch_billed_tokens == 0 and led.billed_usd == pytest.approx(tokens(texts) * PRICE / 1e6)
    assert result.embedded == 30
    assert_exact(tmp_path / "out.jsonl", texts)


class Interrupted(BaseException):
    """Stands for the process dying at a poll (KeyboardInterrupt would also stop pytest)."""


def test_a_batch_created_but_not_recorded_is_found_not_created_again(tmp_path: Path,
                                                                      server: OpenAITestServer) -> None:
    texts = texts_of(40)
    src = corpus(tmp_path / "docs.jsonl", texts)

    def die(seconds: float) -> None:
        raise Interrupted

    with pytest.raises(Interrupted):
        run(tmp_path, server, src, batch_api=jobs.BatchOptions(poll_initial_s=0.05, poll_max_s=0.1, sleep=die))
    # What a kill right after batches.create() leaves: the file id recorded, the batch id not yet.
    import sqlite3

    with sqlite3.connect(tmp_path / "out.jsonl.state.sqlite") as db:
        (state, batch_id), = db.execute("SELECT state, batch_id FROM batch_files").fetchall()
        assert state == "submitted" and batch_id.startswith("batch_")
        db.execute("UPDATE batch_files SET state='submitting', batch_id=NULL, batch_status=NULL")
    result = run(tmp_path, server, src)
    assert server.ledger.batches_created == 1 and result.batches[0].batch_id == batch_id
    assert set(server.ledger.times_billed.values()) == {1}
    assert_exact(tmp_path / "out.jsonl", texts)


def test_estimate_command_shows_the_batch_price(tmp_path: Path, server: OpenAITestServer) -> None:
    from click.testing import CliRunner

    from embedpipe.cli import main

    src = corpus(tmp_path / "docs.jsonl", texts_of(10))
    out = CliRunner().invoke(main, ["estimate", str(src), "--model", f"openai:{MODEL}", "--base-url",
                                    server.base_url, "--cache", "memory://"], env={"OPENAI_API_KEY": "k"})
    assert out.exit_code == 0, out.output
    line = next(x for x in out.output.splitlines() if "batch cost" in x)
    assert "$0.01 per 1M tokens" in line and "within 24h" in line


def test_voyage_is_refused_before_anything_is_sent(tmp_path: Path) -> None:
    pytest.importorskip("voyageai")
    src = corpus(tmp_path / "docs.jsonl", texts_of(3))
    with pytest.raises(ConfigurationError, match="Voyage's batch endpoint has no client in its SDK"):
        jobs.run(str(src), out=str(tmp_path / "out.jsonl"), model="voyage:voyage-3.5", api_key="vk",
                 batch_api=True)
    assert not (tmp_path / "out.jsonl").exists()


def test_an_older_state_file_gains_the_batch_tables(tmp_path: Path) -> None:
    import sqlite3

    from embedpipe.jobs.batch_api import BatchLedger

    path = tmp_path / "_state.sqlite"
    jobs.SQLiteJobStore(path).close()
    with sqlite3.connect(path) as db:
        db.execute("DROP TABLE batch_items")
        db.execute("DROP TABLE batch_files")
    with jobs.SQLiteJobStore(path) as store:
        ledger = BatchLedger(store, "job")
        ledger.add("p1", 1, "openai:m", 1, 5, 100, [("r0", 0, "k1", 5)])
        assert ledger.covered() == set() and ledger.items("p1") == {"r0": [("k1", 5)]}
        assert ledger.drop_unsent() == 1
