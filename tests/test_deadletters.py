"""embedpipe.deadletters: the one retry, driven sync and async, through a plain store and through a job's queue.

The LlamaIndex transform's use of it is exercised in test_llamaindex.py and the CLI's
`dlq retry` in test_cli.py; here the retry itself runs against the OpenAI-compatible test
server (tests/openai_server.py) with real memory and SQLite stores and a real job state.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest

from embedpipe import EmbeddingPipeline, jobs
from embedpipe.deadletters import (
    DeadLetter,
    DeadLetterStore,
    RetryOutcome,
    aretry,
    dead_letter_store_from,
    retry,
    sort_out,
)
from embedpipe.errors import Failure
from embedpipe.pipeline import EmbeddingResult
from tests.openai_server import OpenAITestServer, expected_vector
from tests.test_jobs import make_records, openai_args, write_jsonl

MODEL = "openai:text-embedding-3-small"
DIMS = 32


def _pipeline(server: OpenAITestServer, **kw: object) -> EmbeddingPipeline:
    return EmbeddingPipeline(MODEL, dimensions=DIMS, base_url=server.base_url, api_key="sk-test",
                             cache="memory://", max_retries=0, **kw)  # type: ignore[arg-type]


def _letters() -> list[DeadLetter]:
    texts = ["first text to retry", "a POISON text", "third text to retry"]
    return [DeadLetter(id=f"n{i}", text=t, reason="HTTP 503 earlier", ref_id="doc", metadata={"i": i},
                       time=float(i)) for i, t in enumerate(texts)]


@pytest.fixture(params=["memory", "sqlite"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> DeadLetterStore:
    return dead_letter_store_from("memory://" if request.param == "memory" else f"sqlite:///{tmp_path}/dl.db")


@pytest.mark.parametrize("driver", ["sync", "async"])
def test_retry_recovers_what_now_embeds_and_keeps_what_fails_again(
        driver: str, store: DeadLetterStore, openai_server: OpenAITestServer) -> None:
    openai_server.control.configure(poison=("POISON",))
    store.add(_letters())
    pipe = _pipeline(openai_server)
    outcome = (retry(store, pipe, batch_size=2) if driver == "sync"
               else asyncio.run(aretry(store, pipe, batch_size=2)))
    assert sorted(d.id for d, _ in outcome.recovered) == ["n0", "n2"]
    for letter, vector in outcome.recovered:
        np.testing.assert_allclose(vector, expected_vector(letter.text, DIMS), rtol=1e-6)
    assert [d.id for d in outcome.failed] == ["n1"] and not outcome.skipped and not outcome.budget_exceeded
    (left,) = store.all()
    assert (left.id, left.attempts, left.ref_id, dict(left.metadata)) == ("n1", 2, "doc", {"i": 1})
    assert "HTTP 400" in left.reason
    # Only the named ids are retried.
    openai_server.control.configure(poison=())
    assert retry(store, pipe, ["missing"]).recovered == []
    assert [d.id for d, _ in retry(store, pipe, ["n1"]).recovered] == ["n1"] and len(store) == 0
    pipe.close()
    store.close()


def test_the_budget_stops_a_retry_and_leaves_untried_letters_as_they_were(
        store: DeadLetterStore, openai_server: OpenAITestServer) -> None:
    store.add(_letters())
    pipe = _pipeline(openai_server, budget_usd=0.0)
    outcome = retry(store, pipe, batch_size=1)
    assert outcome.budget_exceeded and outcome.recovered == [] and outcome.failed == []
    assert sorted(d.id for d in outcome.skipped) == ["n0", "n1", "n2"]
    assert openai_server.ledger.requests_total == 0
    assert [(d.id, d.attempts, d.reason) for d in store.all()] == \
        [(d.id, 1, "HTTP 503 earlier") for d in _letters()]
    pipe.close()
    store.close()


def test_sort_out_redacts_new_reasons_and_branches_on_failure_kinds() -> None:
    letters = _letters()
    auth = Failure("provider", 401, False, "HTTP 401 for key sk-live-ABCDEFGHIJKLMNOP1234 (account acct-secret-42)")
    result = EmbeddingResult([[0.5, 0.5], None, None],
                             failures={1: auth, 2: Failure("budget", message="budget exceeded: $0.01 left")})
    outcome = sort_out(letters, result, embedded=1, secrets=["acct-secret-42"])
    assert [d.id for d, _ in outcome.recovered] == ["n0"] and [d.id for d in outcome.skipped] == ["n2"]
    (failed,) = outcome.failed
    assert failed.reason == "HTTP 401 for key sk-*** (account ***)" and failed.attempts == 1
    assert outcome.transient == [failed]  # decided by kind, never by the message text
    assert outcome.budget_exceeded and not outcome.outage
    assert RetryOutcome(failed=[failed, failed], transient=[failed, failed], embedded=0).outage
    empty = failed.__class__(id="x", text="", reason="input is empty")
    assert not RetryOutcome(failed=[empty]).outage
    rejected = sort_out(letters[:1], EmbeddingResult([None], failures={0: Failure("rejected", 400, False, "x")}))
    assert rejected.failed and not rejected.transient


def test_a_jobs_retry_writes_recovered_records_into_the_output_through_the_same_retry(
        tmp_path: Path, openai_server: OpenAITestServer) -> None:
    openai_server.control.configure(poison=("POISON",))
    records = [*make_records(10), {"id": "bad-1", "text": "POISON one", "topic": "x"},
               {"id": "bad-2", "text": "POISON two", "topic": "y"}]
    src = write_jsonl(tmp_path / "src.jsonl", records)
    out = tmp_path / "out"
    assert jobs.run(src, out=out, **openai_args(openai_server, tmp_path)).dead_letters == 2

    # An outage during the retry (every request refused, nothing embedded) stops it and costs no attempt.
    openai_server.control.configure(poison=(), quota_exhausted=True)
    with pytest.raises(jobs.JobAbortedError, match="retry stopped"):
        jobs.retry_dead_letters(out, cache=f"sqlite:///{tmp_path}/cache.db", max_retries=0)
    assert {d.id: d.attempts for d in jobs.dead_letters(out)} == {"bad-1": 1, "bad-2": 1}

    openai_server.control.configure(quota_exhausted=False)
    result = jobs.retry_dead_letters(out, cache=f"sqlite:///{tmp_path}/cache.db")
    assert (result.recovered, result.failed, result.remaining, result.exit_code) == (2, 0, 0, 0)
    import pyarrow.parquet as pq

    rows = {r["id"]: r for r in pq.read_table(out).to_pylist()}
    assert set(rows) == {r["id"] for r in records}
    np.testing.assert_allclose(rows["bad-2"]["vector"], expected_vector("POISON two", DIMS), rtol=1e-6)
