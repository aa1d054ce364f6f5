"""``POST /v1/ingest`` and its durable jobs, live: uvicorn on 127.0.0.1 in front of the OpenAI test server.

Every job writes real Parquet sinks; the counts are checked against what the sink holds and
what the test server billed. The restart test runs ``embedpipe serve`` as a subprocess and
kills it with SIGKILL mid-job; the Celery test runs the chunks on a worker subprocess with a
private redis-server as its broker.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pyarrow.parquet as pq
import pytest

pytest.importorskip("fastapi")

from tests.conftest import ROOT, PrivateRedis
from tests.openai_server import OpenAITestServer, expected_vector
from tests.serve_live import MODEL, LiveService, metric, settings_for

pytestmark = pytest.mark.timeout(120)

DIMS = 1536


@pytest.fixture(autouse=True)
def _api_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "sk-upstream")


@pytest.fixture
def upstream() -> Iterator[OpenAITestServer]:
    with OpenAITestServer(poison=("POISON-PILL",)) as server:
        yield server


def _records(corpus: list[dict[str, Any]], start: int, n: int) -> list[dict[str, Any]]:
    return [{"id": r["id"], "text": r["text"], "metadata": {"title": r["title"], "source": r["source"]}}
            for r in corpus[start:start + n]]


def _settings(upstream: OpenAITestServer, tmp_path: Path, **changes: Any) -> Any:
    sinks = {"docs": str(tmp_path / "docs"), "mirror": f"parquet:///{tmp_path / 'mirror'}"}
    changes.setdefault("ingest_chunk_size", 500)
    return settings_for(upstream.base_url, sinks=sinks, store=f"sqlite:///{tmp_path}/jobs/jobs.sqlite", **changes)


def _wait(url: str, job_id: str, states: tuple[str, ...] = ("succeeded",), timeout: float = 60,
          until: Any = None) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    status: dict[str, Any] = {}
    while time.monotonic() < deadline:
        status = httpx.get(f"{url}/v1/jobs/{job_id}", timeout=10).json()
        if until is not None and until(status):
            return status
        if status["state"] in states:
            return status
        if status["state"] in ("failed", "cancelled", "succeeded"):
            raise AssertionError(f"job {job_id} ended {status['state']}, not {states}: {status}")
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} still {status.get('state')} after {timeout}s: {status}")


def _rows(path: Path) -> list[dict[str, Any]]:
    return pq.read_table(path).to_pylist()


def _check_vectors(rows: list[dict[str, Any]], texts: dict[str, str], every: int = 97) -> None:
    for row in rows[::every]:
        assert row["vector"] == pytest.approx(expected_vector(texts[row["id"]], DIMS).tolist(), rel=1e-5, abs=1e-6)


def _ndjson(records: list[dict[str, Any]]) -> bytes:
    return b"".join(json.dumps(r).encode() + b"\n" for r in records)


def test_ingest_inline_and_ndjson_into_a_named_parquet_sink_and_a_repeat_is_all_cache_hits(
        upstream: OpenAITestServer, tmp_path: Path, corpus: list[dict[str, Any]]) -> None:
    first, second = _records(corpus, 0, 2000), _records(corpus, 2000, 2000)
    texts = {r["id"]: r["text"] for r in first + second}
    with LiveService(_settings(upstream, tmp_path)) as live:
        posted = httpx.post(f"{live.url}/v1/ingest", json={"model": MODEL, "sink": "docs", "records": first},
                            timeout=30)
        assert posted.status_code == 202, posted.text
        job = posted.json()["job_id"]
        assert posted.headers["location"] == f"/v1/jobs/{job}"
        done = _wait(live.url, job)
        assert done["counts"]["written"] == 2000 and done["counts"]["embedded"] == 2000
        assert done["tokens"] == upstream.ledger.billed_tokens > 0
        assert done["cost_usd"] == pytest.approx(done["tokens"] * 0.02 / 1e6)
        assert done["eta_s"] == 0.0

        nd = httpx.post(f"{live.url}/v1/ingest", params={"model": MODEL, "sink": "docs"}, content=_ndjson(second),
                        headers={"content-type": "application/x-ndjson"}, timeout=30)
        assert nd.status_code == 202, nd.text
        assert nd.json()["job_id"] != job  # another body into the same sink: another job
        assert _wait(live.url, nd.json()["job_id"])["counts"]["written"] == 2000
        rows = _rows(tmp_path / "docs")
        # The second ingest upserted next to the first: nothing it did not name was deleted.
        assert sorted(r["id"] for r in rows) == sorted(texts)
        by_id = {r["id"]: r for r in rows}
        assert json.loads(by_id[first[5]["id"]]["metadata"]) == first[5]["metadata"]
        assert json.loads(by_id[second[7]["id"]]["metadata"]) == second[7]["metadata"]
        _check_vectors(rows, texts)
        assert max(upstream.ledger.times_billed.values()) == 1  # (long sections are billed as their pieces)
        billed = upstream.ledger.billed_tokens

        again = httpx.post(f"{live.url}/v1/ingest", json={"model": MODEL, "sink": "mirror", "records": first},
                           timeout=30)
        repeat = _wait(live.url, again.json()["job_id"])
        assert repeat["counts"]["cached"] == 2000 and repeat["counts"]["embedded"] == 0
        assert repeat["tokens"] == 0 and upstream.ledger.billed_tokens == billed
        mirror = _rows(tmp_path / "mirror")
        assert len(mirror) == 2000
        _check_vectors(mirror, texts)

        listed = httpx.get(f"{live.url}/v1/jobs", timeout=10).json()["data"]
        assert {j["job_id"] for j in listed} == {job, nd.json()["job_id"], again.json()["job_id"]}
        text = httpx.get(f"{live.url}/metrics", timeout=10).text
        assert metric(text, "embedpipe_jobs_total", state="succeeded") == 3
        assert metric(text, "embedpipe_jobs_total", state="queued") == 3
        assert metric(text, "embedpipe_job_records_total") == 6000
        assert httpx.get(f"{live.url}/readyz", timeout=10).status_code == 200


def test_idempotency_key_and_what_is_refused(upstream: OpenAITestServer, tmp_path: Path) -> None:
    records = [{"id": f"r{i}", "text": f"record number {i}"} for i in range(20)]
    with LiveService(_settings(upstream, tmp_path, max_ingest_bytes=64 * 1024)) as live:
        url = f"{live.url}/v1/ingest"
        body = {"model": MODEL, "sink": "docs", "records": records}
        one = httpx.post(url, json=body, headers={"idempotency-key": "k-1"}, timeout=10)
        two = httpx.post(url, json=body, headers={"idempotency-key": "k-1"}, timeout=10)
        assert one.status_code == two.status_code == 202
        assert one.json()["job_id"] == two.json()["job_id"]
        _wait(live.url, one.json()["job_id"])
        # Once done, the same key still answers the same job (not a re-run).
        three = httpx.post(url, json=body, headers={"idempotency-key": "k-1"}, timeout=10)
        assert three.json() == {**one.json(), "state": "succeeded"}
        other = httpx.post(url, json={**body, "records": records[:3]}, headers={"idempotency-key": "k-1"})
        assert other.status_code == 422 and "Idempotency-Key" in other.json()["error"]["message"]

        unknown = httpx.post(url, json={**body, "sink": "nope"})
        assert unknown.status_code == 404 and "'nope' is not configured" in unknown.json()["error"]["message"]
        for path in (str(tmp_path / "elsewhere"), "../docs", "parquet:///tmp/x", "sqlite:///x.db"):
            refused = httpx.post(url, json={**body, "sink": path})
            assert refused.status_code == 400, path
            assert refused.json()["error"]["code"] == "sink_not_allowed"
        nd = httpx.post(url, params={"model": MODEL, "sink": "/tmp/x"}, content=b'{"id": "a", "text": "b"}\n',
                        headers={"content-type": "application/x-ndjson"})
        assert nd.status_code == 400 and nd.json()["error"]["code"] == "sink_not_allowed"
        assert not (tmp_path / "elsewhere").exists()
        model = httpx.post(url, json={**body, "model": "gpt-9"})
        assert model.status_code == 404 and model.json()["error"]["param"] == "model"
        bad = httpx.post(url, json={**body, "records": [records[0], {"id": "x", "text": ""}]})
        assert bad.status_code == 400 and "records[1].text" in bad.json()["error"]["message"]
        extra = httpx.post(url, json={**body, "records": [{"id": "x", "text": "t", "vector": [1]}]})
        assert extra.status_code == 400 and "'vector'" in extra.json()["error"]["message"]
        line = httpx.post(url, params={"model": MODEL, "sink": "docs"}, content=b'{"id": "a", "text": "b"}\n{oops\n',
                          headers={"content-type": "application/x-ndjson"})
        assert line.status_code == 400 and "line 2" in line.json()["error"]["message"]
        big = httpx.post(url, json={**body, "records": [{"id": "x", "text": "y" * 70_000}]})
        assert big.status_code == 413
        assert httpx.get(f"{live.url}/v1/jobs/0000000000000000").status_code == 404
        stored = list((tmp_path / "jobs" / "ingest").glob("*.jsonl"))
        assert len(stored) == 1  # only the accepted body was stored


def test_ingest_is_off_without_sinks(upstream: OpenAITestServer) -> None:
    with LiveService(settings_for(upstream.base_url)) as live:
        got = httpx.post(f"{live.url}/v1/ingest", json={"model": MODEL, "sink": "docs", "records": []})
        assert got.status_code == 404 and got.json()["error"]["code"] == "ingest_disabled"


def test_cancel_a_running_and_a_queued_job_then_resume(upstream: OpenAITestServer, tmp_path: Path) -> None:
    upstream.control.configure(latency=0.15)
    records = [{"id": f"c{i}", "text": f"cancel me {i}"} for i in range(1000)]
    with LiveService(_settings(upstream, tmp_path, ingest_chunk_size=50)) as live:
        url = f"{live.url}/v1/ingest"
        running = httpx.post(url, json={"model": MODEL, "sink": "docs", "records": records}).json()["job_id"]
        queued = httpx.post(url, json={"model": MODEL, "sink": "mirror", "records": records[:10]}).json()["job_id"]
        _wait(live.url, running, until=lambda s: s["counts"]["written"] >= 100)
        assert httpx.get(f"{live.url}/v1/jobs/{queued}").json()["state"] == "queued"
        gone = httpx.post(f"{live.url}/v1/jobs/{queued}/cancel")
        assert gone.status_code == 200 and gone.json()["state"] == "cancelled"
        asked = httpx.post(f"{live.url}/v1/jobs/{running}/cancel")
        assert asked.status_code == 202 and asked.json()["cancel_requested"]
        stopped = _wait(live.url, running, states=("cancelled",))
        assert 100 <= stopped["counts"]["written"] < 1000
        time.sleep(0.5)
        assert httpx.get(f"{live.url}/v1/jobs/{queued}").json()["state"] == "cancelled"  # never ran
        assert not (tmp_path / "mirror").exists()
        # Ingesting the same body again resumes the job: what was written stays, the rest is embedded.
        upstream.control.configure(latency=0.0)
        again = httpx.post(url, json={"model": MODEL, "sink": "docs", "records": records})
        assert again.json()["job_id"] == running
        done = _wait(live.url, running)
        assert done["counts"]["unchanged"] == stopped["counts"]["written"]
        assert len(_rows(tmp_path / "docs")) == 1000
        assert max(upstream.ledger.times_billed.values()) == 1
        text = httpx.get(f"{live.url}/metrics").text
        assert metric(text, "embedpipe_jobs_total", state="cancelled") == 2


def test_dead_letters_and_deleting_records(upstream: OpenAITestServer, tmp_path: Path) -> None:
    records = [{"id": f"d{i}", "text": f"text {i}" + (" POISON-PILL" if i in (3, 7) else "")} for i in range(40)]
    with LiveService(_settings(upstream, tmp_path)) as live:
        job = httpx.post(f"{live.url}/v1/ingest", json={"model": MODEL, "sink": "docs", "records": records}).json()
        done = _wait(live.url, job["job_id"])
        assert done["counts"]["dead_letters"] == 2 and done["counts"]["written"] == 38
        letters = httpx.get(f"{live.url}/v1/jobs/{job['job_id']}/dead-letters").json()["data"]
        assert sorted(d["id"] for d in letters) == ["d3", "d7"]
        assert all("POISON-PILL" in d["text"] and d["reason"] for d in letters)

        deleted = httpx.request("DELETE", f"{live.url}/v1/sinks/docs/records", json={"ids": ["d0", "d1", "zz"]})
        assert deleted.status_code == 200 and deleted.json() == {"sink": "docs", "deleted": 2}
        assert sorted(r["id"] for r in _rows(tmp_path / "docs")) == sorted(
            r["id"] for r in records if r["id"] not in ("d0", "d1", "d3", "d7"))
        assert httpx.request("DELETE", f"{live.url}/v1/sinks/x:y/records", json={"ids": ["a"]}).status_code == 400
        assert httpx.request("DELETE", f"{live.url}/v1/sinks/docs/records", json={"ids": []}).status_code == 400


def test_a_stopping_service_gives_its_job_back_and_the_next_one_resumes_it(upstream: OpenAITestServer,
                                                                         tmp_path: Path) -> None:
    upstream.control.configure(latency=0.1)
    records = [{"id": f"s{i}", "text": f"stop and go {i}"} for i in range(600)]
    settings = _settings(upstream, tmp_path, ingest_chunk_size=50)
    with LiveService(settings) as live:
        job = httpx.post(f"{live.url}/v1/ingest", json={"model": MODEL, "sink": "docs", "records": records}).json()
        mid = _wait(live.url, job["job_id"], until=lambda s: s["counts"]["written"] >= 100)
    assert mid["counts"]["written"] < 600
    upstream.control.configure(latency=0.0)
    with LiveService(settings) as live:
        # Given back at shutdown, not left leased: the next service takes it at once, not after job_lease_s.
        done = _wait(live.url, job["job_id"], timeout=20)
    assert done["attempts"] == 2 and done["counts"]["unchanged"] >= 100
    assert sorted(r["id"] for r in _rows(tmp_path / "docs")) == sorted(r["id"] for r in records)
    assert max(upstream.ledger.times_billed.values()) == 1


def test_keys_guard_the_job_routes_and_a_budgeted_key_cannot_ingest(upstream: OpenAITestServer,
                                                                    tmp_path: Path) -> None:
    from embedpipe.serve import key_store_from

    keys = f"sqlite:///{tmp_path}/keys.db"
    store = key_store_from(keys)
    plain, budgeted = store.add("ingest"), store.add("metered", budget_usd=1.0)
    store.close()
    body = {"model": MODEL, "sink": "docs", "records": [{"id": "k1", "text": "keyed"}]}
    with LiveService(_settings(upstream, tmp_path, keys=keys)) as live:
        assert httpx.post(f"{live.url}/v1/ingest", json=body).status_code == 401
        assert httpx.get(f"{live.url}/v1/jobs").status_code == 401
        refused = httpx.post(f"{live.url}/v1/ingest", json=body, headers={"authorization": f"Bearer {budgeted}"})
        assert refused.status_code == 403 and refused.json()["error"]["code"] == "budget_key_cannot_ingest"
        auth = {"authorization": f"Bearer {plain}"}
        job = httpx.post(f"{live.url}/v1/ingest", json=body, headers=auth).json()["job_id"]
        deadline = time.monotonic() + 20
        while httpx.get(f"{live.url}/v1/jobs/{job}", headers=auth).json()["state"] != "succeeded":
            assert time.monotonic() < deadline
            time.sleep(0.05)
    assert upstream.ledger.billed_tokens > 0


# ------------------------------------------------------------------ kill -9 and restart
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _serve(config: Path, port: int, log: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OPENAI_API_KEY": "sk-upstream", "HF_HUB_OFFLINE": "1"}
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    with log.open("ab") as out:
        proc = subprocess.Popen([sys.executable, "-m", "embedpipe.cli", "serve", "--config", str(config), "--port",
                                 str(port)], env=env, stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"embedpipe serve exited: {log.read_text()[-3000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=1).status_code == 200:
                return proc
        except httpx.TransportError:
            time.sleep(0.1)
    proc.kill()
    raise AssertionError(f"embedpipe serve did not come up: {log.read_text()[-3000:]}")


def test_kill_9_mid_job_then_a_restarted_service_finishes_it_once(upstream: OpenAITestServer, tmp_path: Path,
                                                                  corpus: list[dict[str, Any]]) -> None:
    upstream.control.configure(latency=0.05)
    # Sections short enough to be sent whole: a longer one is split into windows, and its vector (the
    # windows' mean) is cached once every window is in, so a kill between its windows bills those again.
    records = [r for r in _records(corpus, 0, 4362) if len(r["text"]) < 8000][:2000]
    assert len(records) == 2000
    config = tmp_path / "serve.toml"
    config.write_text(f"""
[models.{MODEL}]
spec = "openai:{MODEL}"
base_url = "{upstream.base_url}"

[cache]
url = "sqlite:///{tmp_path}/cache.db"

[sinks.docs]
url = "{tmp_path}/docs"

[store]
url = "sqlite:///{tmp_path}/jobs.sqlite"

[server]
ingest_chunk_size = 100
job_lease_s = 1.5
""")
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    log = tmp_path / "serve.log"
    proc = _serve(config, port, log)
    try:
        job = httpx.post(f"{base}/v1/ingest", json={"model": MODEL, "sink": "docs", "records": records},
                         timeout=30).json()["job_id"]
        mid = _wait(base, job, until=lambda s: s["counts"]["written"] >= 400)
        # Kill while the service's requests are held upstream (where a kill mostly finds a service that
        # embeds): each response that did arrive is in the cache by then. A response the provider billed
        # but the process did not live to cache would be billed again: that gap is the provider's.
        upstream.control.set_fault_rate("stall", 1.0)
        deadline = time.monotonic() + 10
        while upstream.ledger.stalls < 1 and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(0.5)
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        upstream.control.configure(fault_rates={})
        assert mid["counts"]["written"] < 2000, "the job ended before the kill"
        proc = _serve(config, port, log)
        done = _wait(base, job)
    finally:
        proc.kill()
        proc.wait(10)
    rows = _rows(tmp_path / "docs")
    assert sorted(r["id"] for r in rows) == sorted(r["id"] for r in records), "every record written once"
    _check_vectors(rows, {r["id"]: r["text"] for r in records})
    twice = sorted(t[:40] for t, n in upstream.ledger.times_billed.items() if n > 1)
    assert not twice, f"billed = unique, but {len(twice)} texts were billed again: {twice[:5]}"
    assert done["attempts"] == 2 and done["counts"]["unchanged"] >= mid["counts"]["written"]


# ------------------------------------------------------------------ Celery
def test_with_a_broker_the_ingest_runs_on_a_celery_worker(upstream: OpenAITestServer, tmp_path: Path,
                                                          corpus: list[dict[str, Any]]) -> None:
    from tests.test_distributed import Worker, workers

    broker = PrivateRedis(tmp_path)
    broker.start()
    records = _records(corpus, 0, 2000)
    try:
        with workers(Worker(broker.url, tmp_path, "ingest", concurrency=2)) as (worker,), \
                LiveService(_settings(upstream, tmp_path, cache=f"sqlite:///{tmp_path}/cache.db",
                                      job_workers=f"celery+{broker.url}")) as live:
            job = httpx.post(f"{live.url}/v1/ingest", json={"model": MODEL, "sink": "docs", "records": records},
                             timeout=30).json()["job_id"]
            done = _wait(live.url, job, timeout=90)
            assert done["counts"]["written"] == 2000 and done["tokens"] == upstream.ledger.billed_tokens
            log = worker.log.read_text()
            assert log.count("succeeded") >= 4, log[-2000:]  # its chunks (500 records each) ran on the worker
    finally:
        broker.kill()
    rows = _rows(tmp_path / "docs")
    assert sorted(r["id"] for r in rows) == sorted(r["id"] for r in records)
    _check_vectors(rows, {r["id"]: r["text"] for r in records})
    assert max(upstream.ledger.times_billed.values()) == 1


def test_the_config_names_sinks_store_and_workers(tmp_path: Path) -> None:
    from embedpipe.errors import ConfigurationError
    from embedpipe.serve import load_settings

    deployed = load_settings(ROOT / "deploy" / "serve.toml")
    assert deployed.sinks == {"docs": "/data/vectors/docs"}
    assert deployed.store == "sqlite:////data/jobs.sqlite" and deployed.job_workers == "celery+redis://redis:6379/0"
    assert load_settings(ROOT / "deploy" / "serve.toml", job_workers="celery+redis://other:6379/0").job_workers \
        == "celery+redis://other:6379/0"
    for text, message in (('[sinks.docs]\npath = "/x"\n', "[sinks.docs] takes url"),
                          ('[sinks."a/b"]\nurl = "/x"\n', "a sink name is"),
                          ('[workers]\nurl = "redis://q:6379/0"\n', "prefixed celery+"),
                          ('[server]\njob_lease_s = 0\n', "job_lease_s")):
        bad = tmp_path / "bad.toml"
        bad.write_text(text)
        with pytest.raises(ConfigurationError, match=re.escape(message)):
            load_settings(bad)


def test_the_command_line_takes_a_store_and_celery_workers(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from embedpipe.cli import main

    bad = CliRunner().invoke(main, ["serve", "--model", f"openai:{MODEL}", "--workers", "redis://q:6379/0"])
    assert bad.exit_code == 2 and "prefixed celery+" in bad.output
    config = tmp_path / "serve.toml"
    config.write_text(f'[sinks.docs]\nurl = "{tmp_path}/docs"\n')
    wrong = CliRunner().invoke(main, ["serve", "--model", f"openai:{MODEL}", "--store", "redis://q:6379/0",
                                      "--config", str(config), "--port", "1"])
    assert wrong.exit_code == 2 and "keeps its jobs in SQLite" in wrong.output
