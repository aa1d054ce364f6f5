"""Distributed runs on Celery: real brokers (Redis, RabbitMQ), worker subprocesses, the OpenAI-compatible test server.

Every fault test checks that each record is written exactly once with its exact vector and
that upstream billed each text at most once more than the texts in flight at the kill
(with the cache shared by workers, in practice exactly once). Brokers and ledgers the tests
kill are private redis-servers on free ports, never the shared one.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest

from embedpipe import distributed, jobs
from embedpipe.distributed.celery import make_app
from tests.conftest import ROOT, PrivateRedis
from tests.openai_server import OpenAITestServer, expected_vector
from tests.test_jobs import DIMS, MODEL, make_records, write_jsonl

pytestmark = pytest.mark.timeout(240)

AMQP = "amqp://guest:guest@127.0.0.1:5672//"


def _amqp_up() -> bool:
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", 5672), timeout=1):
        return True
    return False


class Worker:
    """``celery -A embedpipe.distributed.celery worker`` in a subprocess of its own process group."""

    def __init__(self, broker: str, tmp: Path, name: str, *, concurrency: int = 2, pool: str = "prefork",
                 app: str = "embedpipe.distributed.celery", extra_env: dict[str, str] | None = None) -> None:
        self.name = f"{name}@{socket.gethostname()}"
        self.log = tmp / f"worker-{name}.log"
        env = {**os.environ, "EMBEDPIPE_BROKER_URL": broker, "OPENAI_API_KEY": "sk-test",
               "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", **(extra_env or {})}
        cmd = [sys.executable, "-m", "celery", "-A", app, "worker", "-n", self.name, "-c", str(concurrency),
               "--pool", pool, "--loglevel", "INFO", "--without-gossip", "--without-mingle", "--without-heartbeat"]
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)

    def wait_ready(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if b"ready." in self.log.read_bytes():
                return
            if self.proc.poll() is not None:
                raise RuntimeError(f"worker {self.name} exited: {self.log.read_text()[-3000:]}")
            time.sleep(0.1)
        raise RuntimeError(f"worker {self.name} not ready after {timeout}s: {self.log.read_text()[-3000:]}")

    def children(self) -> list[int]:
        out = subprocess.run(["pgrep", "-P", str(self.proc.pid)], capture_output=True, text=True).stdout
        return [int(p) for p in out.split()]

    def kill(self, sig: int = signal.SIGKILL) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(30)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.kill(signal.SIGTERM)
            if self.proc.poll() is None:
                self.kill(signal.SIGKILL)


@contextlib.contextmanager
def workers(*ws: Worker) -> Iterator[tuple[Worker, ...]]:
    try:
        for w in ws:
            w.wait_ready()
        yield ws
    finally:
        for w in ws:
            w.stop()


@pytest.fixture
def broker(private_redis: PrivateRedis) -> PrivateRedis:
    """A private Redis (conftest's): the Celery broker and the jobs' ledger (the tests may kill it)."""
    return private_redis


def _spec(server: OpenAITestServer, tmp_path: Path, records: list[dict[str, Any]], **kw: Any) -> jobs.JobSpec:
    src = write_jsonl(tmp_path / "src.jsonl", records)
    options: dict[str, Any] = {"model": MODEL, "dimensions": DIMS, "base_url": server.base_url,
                               "cache": f"sqlite:///{tmp_path}/cache.db", "chunk_size": 10, **kw}
    return jobs.JobSpec.from_options(src, tmp_path / "out", **options)


def assert_exactly_once(out: Path, records: list[dict[str, Any]]) -> None:
    rows = pq.read_table(out).to_pylist()
    ids = [r["id"] for r in rows]
    assert sorted(ids) == sorted(r["id"] for r in records), "every record written exactly once"
    by_id = {r["id"]: r for r in rows}
    for rec in records:
        assert by_id[rec["id"]]["vector"] == pytest.approx(expected_vector(rec["text"], DIMS).tolist(),
                                                         rel=1e-5, abs=1e-6)


def test_two_workers_on_redis_embed_a_job_once_and_a_resubmission_bills_nothing(
        openai_server: OpenAITestServer, broker: PrivateRedis, tmp_path: Path) -> None:
    records = make_records(60)
    spec = _spec(openai_server, tmp_path, records)
    app = make_app(broker.url)
    seen: list[jobs.JobProgress] = []
    with workers(Worker(broker.url, tmp_path, "a", concurrency=2), Worker(broker.url, tmp_path, "b", pool="threads")):
        result = distributed.submit(spec, app=app, progress=seen.append).wait(120)
        assert (result.records, result.written, result.embedded, result.exit_code) == (60, 60, 60, 0)
        assert set(openai_server.ledger.times_billed.values()) == {1}
        assert seen and seen[-1].records == 60
        assert_exactly_once(tmp_path / "out", records)
        requests = openai_server.ledger.requests_total

        again = distributed.submit(spec, app=app).wait(60)  # the same spec: the same job, nothing left to do
    assert (again.unchanged, again.embedded, again.written) == (60, 0, 0)
    assert openai_server.ledger.requests_total == requests


def test_rabbitmq_broker_and_a_killed_worker_taken_over_by_another(openai_server: OpenAITestServer,
                                                                     broker: PrivateRedis, tmp_path: Path) -> None:
    if not _amqp_up():
        if os.environ.get("CI"):
            pytest.fail("RabbitMQ is not reachable on 127.0.0.1:5672")
        pytest.skip("RabbitMQ is not reachable on 127.0.0.1:5672")
    openai_server.control.configure(latency=0.4)
    records = make_records(80)
    spec = _spec(openai_server, tmp_path, records)
    queue = f"embedpipe-test-{os.getpid()}-{time.monotonic_ns()}"
    app = make_app(AMQP, broker.url, task_default_queue=queue)
    env = {"EMBEDPIPE_TEST_QUEUE": queue}
    first = Worker(AMQP, tmp_path, "first", concurrency=2, app="tests.celery_app", extra_env=env)
    second = Worker(AMQP, tmp_path, "second", concurrency=2, app="tests.celery_app", extra_env=env)
    with workers(first, second):
        job = distributed.submit(spec, app=app)
        deadline = time.monotonic() + 60
        while job.progress().records < 20 and time.monotonic() < deadline:
            time.sleep(0.05)
        first.kill()  # the whole worker, mid-job: RabbitMQ requeues its unacknowledged chunks at once
        killed_at = time.monotonic()
        result = job.wait(180)
        took = time.monotonic() - killed_at
    assert result.written + result.unchanged == 80 and result.exit_code == 0
    assert_exactly_once(tmp_path / "out", records)
    billed = openai_server.ledger.times_billed
    assert len(billed) == 80 and sum(billed.values()) <= 80 + 2 * 10  # at most the killed worker's chunks in flight
    assert took < 90


def test_a_pool_child_killed_mid_chunk_is_redone_without_billing_twice(openai_server: OpenAITestServer,
                                                                      broker: PrivateRedis, tmp_path: Path) -> None:
    openai_server.control.configure(latency=0.5)
    records = make_records(40)
    spec = _spec(openai_server, tmp_path, records)
    app = make_app(broker.url)
    with workers(Worker(broker.url, tmp_path, "w", concurrency=2)) as (w,):
        job = distributed.submit(spec, app=app)
        deadline = time.monotonic() + 30
        while openai_server.ledger.requests_total == 0 and time.monotonic() < deadline:
            time.sleep(0.02)
        for pid in w.children():  # SIGKILL the pool children mid-request; the main process requeues
            os.kill(pid, signal.SIGKILL)
        result = job.wait(180)
    assert result.exit_code == 0
    assert_exactly_once(tmp_path / "out", records)
    billed = openai_server.ledger.times_billed
    assert len(billed) == 40 and sum(billed.values()) <= 40 + 2 * 10


def test_a_poison_chunk_that_kills_its_worker_is_bisected_and_dead_lettered(openai_server: OpenAITestServer,
                                                                           broker: PrivateRedis,
                                                                           tmp_path: Path) -> None:
    records = make_records(20)
    records[7]["text"] = "KILL-THE-WORKER " + records[7]["text"]
    spec = _spec(openai_server, tmp_path, records, chunk_size=20)
    app = make_app(broker.url)
    with workers(Worker(broker.url, tmp_path, "p", concurrency=1, app="tests.celery_app")):
        result = distributed.submit(spec, app=app).wait(200)
    assert result.exit_code == 3 and result.dead_letters_total == 1
    (letter,) = jobs.dead_letters(tmp_path / "out")
    assert letter.id == records[7]["id"] and "stopped its worker" in letter.reason
    rest = [r for i, r in enumerate(records) if i != 7]
    assert_exactly_once(tmp_path / "out", rest)


def test_one_budget_for_all_workers(openai_server: OpenAITestServer, broker: PrivateRedis, tmp_path: Path) -> None:
    records = make_records(100)
    # text-embedding-3-small costs $0.02 per 1M tokens; each record is ~20 tokens: 100 records ≈ $0.00004.
    spec = _spec(openai_server, tmp_path, records, budget_usd=0.00002, price_per_1m_tokens=0.02)
    app = make_app(broker.url)
    with workers(Worker(broker.url, tmp_path, "a", concurrency=2), Worker(broker.url, tmp_path, "b", concurrency=2)):
        result = distributed.submit(spec, app=app, estimate_first=False).wait(120)
    assert result.budget_exceeded and result.exit_code == 4
    spent = openai_server.ledger.billed_tokens * 0.02 / 1e6
    assert spent <= 0.00002 + 1e-12 and 0 < result.written < 100


def test_the_broker_restarted_mid_job(openai_server: OpenAITestServer, broker: PrivateRedis, tmp_path: Path) -> None:
    openai_server.control.configure(latency=0.2)
    records = make_records(50)
    spec = _spec(openai_server, tmp_path, records)
    app = make_app(broker.url)
    with workers(Worker(broker.url, tmp_path, "r", concurrency=2)):
        job = distributed.submit(spec, app=app)
        deadline = time.monotonic() + 30
        while job.progress().records < 10 and time.monotonic() < deadline:
            time.sleep(0.05)
        broker.kill()  # the queue and the ledger go away (this Redis keeps nothing on disk) ...
        time.sleep(1)
        broker.start()  # ... and come back empty: the submitter's store knows what was committed, and republishes
        result = job.wait(180)
    assert result.exit_code == 0
    assert_exactly_once(tmp_path / "out", records)
    assert set(openai_server.ledger.times_billed.values()) == {1}  # the shared cache served what was paid for


def test_sigterm_mid_chunk_finishes_the_chunk_and_another_worker_does_the_rest(
        openai_server: OpenAITestServer, broker: PrivateRedis, tmp_path: Path) -> None:
    openai_server.control.configure(latency=0.3)
    records = make_records(60)
    spec = _spec(openai_server, tmp_path, records)
    app = make_app(broker.url)
    with workers(Worker(broker.url, tmp_path, "t", concurrency=1)) as (first,):
        job = distributed.submit(spec, app=app)
        deadline = time.monotonic() + 30
        while openai_server.ledger.requests_total == 0 and time.monotonic() < deadline:
            time.sleep(0.02)
        first.proc.send_signal(signal.SIGTERM)  # warm shutdown: the running chunk is finished and committed
        first.proc.wait(60)
        with workers(Worker(broker.url, tmp_path, "u", concurrency=2)):
            result = job.wait(120)
    assert result.exit_code == 0
    assert_exactly_once(tmp_path / "out", records)
    assert set(openai_server.ledger.times_billed.values()) == {1}


def test_a_chunk_that_outlives_the_visibility_timeout_is_not_billed_twice(
        openai_server: OpenAITestServer, broker: PrivateRedis, tmp_path: Path) -> None:
    # kombu restores unacknowledged messages older than the visibility timeout (1 s here, scanned every 1 s):
    # a chunk that takes 4 s is redelivered while it runs.
    openai_server.control.configure(latency=4.0)
    records = make_records(20)
    spec = _spec(openai_server, tmp_path, records)
    app = make_app(broker.url)
    env = {"EMBEDPIPE_TEST_VISIBILITY": "1"}
    ws = [Worker(broker.url, tmp_path, f"v{i}", concurrency=1, app="tests.celery_app", extra_env=env)
          for i in range(3)]
    with workers(*ws):  # two busy with the two chunks, one idle to take a redelivered copy
        result = distributed.submit(spec, app=app).wait(150)
    assert result.exit_code == 0
    logs = "".join(w.log.read_text() for w in ws)
    assert "retry: Retry in" in logs, "a copy was redelivered while its chunk ran, and backed off"
    assert_exactly_once(tmp_path / "out", records)
    assert set(openai_server.ledger.times_billed.values()) == {1}  # the redelivered copies found a live lease


def test_the_command_line_runs_on_workers_and_lists_the_job(openai_server: OpenAITestServer, broker: PrivateRedis,
                                                            tmp_path: Path) -> None:
    from click.testing import CliRunner

    from embedpipe.cli import main

    records = make_records(30)
    src = write_jsonl(tmp_path / "src.jsonl", records)
    out = tmp_path / "out"
    exe = str(Path(sys.executable).parent / "embedpipe")
    log = tmp_path / "cli-worker.log"
    env = {**os.environ, "OPENAI_API_KEY": "sk-test", "PYTHONPATH": str(ROOT)}
    with log.open("wb") as f:
        proc = subprocess.Popen([exe, "worker", "--broker", broker.url, "-c", "1", "--pool", "solo", "-n",
                                 f"cli@{socket.gethostname()}"], env=env, stdout=f, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while b"ready." not in log.read_bytes() and time.monotonic() < deadline:
            assert proc.poll() is None, log.read_text()
            time.sleep(0.1)
        runner = CliRunner()
        res = runner.invoke(main, ["run", str(src), "--model", MODEL, "--dimensions", str(DIMS), "--base-url",
                                   openai_server.base_url, "--cache", f"sqlite:///{tmp_path}/cache.db",
                                   "--chunk-size", "10", "--out", str(out), "--workers", f"celery+{broker.url}",
                                   "--no-progress"], env={"OPENAI_API_KEY": "sk-test"})
        assert res.exit_code == 0, res.output
        assert "30 records; 30 written" in res.output
        assert_exactly_once(out, records)
        listing = runner.invoke(main, ["jobs", "list", "--store", broker.url])
        job_id = jobs.JobSpec.from_options(src, out, model=MODEL, dimensions=DIMS, base_url=openai_server.base_url,
                                           cache=f"sqlite:///{tmp_path}/cache.db", chunk_size=10).job_id
        assert listing.exit_code == 0 and job_id in listing.output and "3 done" in listing.output
        status = runner.invoke(main, ["jobs", "status", job_id, "--store", broker.url])
        assert status.exit_code == 0 and "3 done" in status.output
        bad = runner.invoke(main, ["run", str(src), "--model", MODEL, "--out", str(out), "--workers", broker.url])
        assert bad.exit_code == 2 and "prefixed celery+" in bad.output
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(30)


def test_a_whole_worker_killed_on_redis_is_taken_over_after_the_visibility_timeout(
        openai_server: OpenAITestServer, broker: PrivateRedis, tmp_path: Path) -> None:
    openai_server.control.configure(latency=0.4)
    records = make_records(80)
    spec = _spec(openai_server, tmp_path, records)
    app = make_app(broker.url)
    env = {"EMBEDPIPE_TEST_VISIBILITY": "3"}  # the shipped 100 s, shortened: recovery is that plus one scan
    first = Worker(broker.url, tmp_path, "k1", concurrency=2, app="tests.celery_app", extra_env=env)
    second = Worker(broker.url, tmp_path, "k2", concurrency=1, app="tests.celery_app", extra_env=env)
    with workers(first, second):
        job = distributed.submit(spec, app=app)
        deadline = time.monotonic() + 60
        while job.progress().records < 20 and time.monotonic() < deadline:
            time.sleep(0.05)
        first.kill()  # the main process and its pool: its unacknowledged chunks wait for the visibility timeout
        result = job.wait(180)
    assert result.written + result.unchanged == 80 and result.exit_code == 0
    assert_exactly_once(tmp_path / "out", records)
    billed = openai_server.ledger.times_billed
    assert len(billed) == 80 and sum(billed.values()) <= 80 + 2 * 10


def test_workers_fail_closed_when_the_shared_limiter_is_down(openai_server: OpenAITestServer, broker: PrivateRedis,
                                                            tmp_path: Path) -> None:
    limiter = PrivateRedis(tmp_path / "limiter")
    (tmp_path / "limiter").mkdir()
    limiter.start()
    try:
        openai_server.control.configure(latency=0.5)
        records = make_records(200)
        spec = _spec(openai_server, tmp_path, records, tpm=5_000_000, rpm=100_000,
                     rate_limiter=f"{limiter.url}?key=shared&on_error=raise")
        app = make_app(broker.url)
        with workers(Worker(broker.url, tmp_path, "f", concurrency=2)):
            job = distributed.submit(spec, app=app)
            deadline = time.monotonic() + 60
            while job.progress().records < 10 and time.monotonic() < deadline:
                time.sleep(0.05)
            limiter.kill()
            time.sleep(1.5)  # what was in flight finishes; nothing new may start without the shared limit
            sent = openai_server.ledger.requests_total
            time.sleep(4)
            assert openai_server.ledger.requests_total == sent, "a worker spent without the shared limiter"
            assert job.progress().records < 200  # the job was paused, not finished
            limiter.start()  # back: the workers' retries go on
            result = job.wait(120)
    finally:
        limiter.kill()
    assert result.exit_code == 0
    assert_exactly_once(tmp_path / "out", records)
    assert set(openai_server.ledger.times_billed.values()) == {1}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _scrape(port: int) -> str:
    import httpx

    return httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text


def _sample(text: str, name: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_metrics_ports_of_a_run_and_of_a_prefork_worker(openai_server: OpenAITestServer, broker: PrivateRedis,
                                                        tmp_path: Path) -> None:
    from click.testing import CliRunner

    from embedpipe.cli import main

    records = make_records(30)
    src = write_jsonl(tmp_path / "src.jsonl", records)
    port = _free_port()
    res = CliRunner().invoke(main, ["run", str(src), "--model", MODEL, "--dimensions", str(DIMS), "--base-url",
                                    openai_server.base_url, "--cache", f"sqlite:///{tmp_path}/a.db", "--out",
                                    str(tmp_path / "a"), "--no-progress", "--metrics-port", str(port)],
                             env={"OPENAI_API_KEY": "sk-test"})
    assert res.exit_code == 0, res.output
    assert _sample(_scrape(port), "embedpipe_cache_misses_total") == 30

    wport = _free_port()
    exe = str(Path(sys.executable).parent / "embedpipe")
    log = tmp_path / "metrics-worker.log"
    env = {**os.environ, "OPENAI_API_KEY": "sk-test", "PYTHONPATH": str(ROOT)}
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    with log.open("wb") as f:
        proc = subprocess.Popen([exe, "worker", "--broker", broker.url, "-c", "2", "--pool", "prefork",
                                 "--metrics-port", str(wport), "-n", f"m@{socket.gethostname()}"], env=env,
                                stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while b"ready." not in log.read_bytes() and time.monotonic() < deadline:
            assert proc.poll() is None, log.read_text()
            time.sleep(0.1)
        spec = _spec(openai_server, tmp_path, records, cache=f"sqlite:///{tmp_path}/b.db")
        assert distributed.submit(spec, app=make_app(broker.url)).wait(120).exit_code == 0
        text = _scrape(wport)  # both pool processes' counts, added up
        assert _sample(text, "embedpipe_cache_misses_total") == 30
        assert _sample(text, "embedpipe_tokens_total") > 0
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(30)


def test_a_chunk_that_keeps_failing_in_its_worker_is_retried_bisected_and_its_bad_record_dead_lettered(
        openai_server: OpenAITestServer, broker: PrivateRedis, tmp_path: Path) -> None:
    records = make_records(8)
    records[5]["text"] = "SINK-FAILS " + records[5]["text"]
    spec = _spec(openai_server, tmp_path, records, chunk_size=8)
    app = make_app(broker.url)
    env = {"EMBEDPIPE_TEST_SINK_FAILS": "SINK-FAILS"}
    with workers(Worker(broker.url, tmp_path, "s", concurrency=1, app="tests.celery_app", extra_env=env)):
        result = distributed.submit(spec, app=app).wait(150)  # the message is never dropped: the job ends
    assert result.exit_code == 3 and result.dead_letters_total == 1
    (letter,) = jobs.dead_letters(tmp_path / "out")
    assert letter.id == records[5]["id"] and "OSError: the test sink cannot write" in letter.reason
    assert_exactly_once(tmp_path / "out", [r for i, r in enumerate(records) if i != 5])
    assert set(openai_server.ledger.times_billed.values()) == {1}  # retries came from the cache
