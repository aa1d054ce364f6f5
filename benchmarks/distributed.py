"""Distributed runs: 1, 2 and 4 Celery worker processes on one shared rate limit, against the test server.

The test server (its own process) enforces a token bucket per window with a latency per
request and per token. Each worker process has one pool slot and sends at most two
requests at a time, so one worker cannot fill the limit and more workers can. Every run
starts from a fresh private Redis (broker, ledger and shared limiter) and an empty cache
and output, and embeds the same synthetic records through ``embedpipe.distributed.submit``.

Reported per worker count: wall time from submit to result, billed tokens per second, the
share of the server's rate (billed tokens over what the server could admit in that time:
one full bucket plus the refill), the share of 429s, and billed ÷ unique texts. The
capacity model in the notes is projected from the measured per-worker rate.
"""

# ruff: noqa: RUF001

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from benchmarks.scenario import Result, Table, Unavailable
from benchmarks.servers import API_KEY, MODEL, server_process

NAME = "distributed"
TITLE = "Distributed runs: workers on one shared limit"
GOAL = ("throughput rises with workers up to the shared limit, held at ≥ 95% of it with ≤ 1% 429s; "
        "billed ÷ unique = 1.000")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def _redis(scratch: Path) -> Iterator[str]:
    exe = shutil.which("redis-server")
    if exe is None:
        raise Unavailable("redis-server is not on PATH")
    port = _free_port()
    proc = subprocess.Popen([exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                             "--dir", str(scratch)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"redis://127.0.0.1:{port}/0"
    try:
        import redis

        for _ in range(100):
            with contextlib.suppress(Exception):
                if redis.Redis.from_url(url).ping():
                    break
            time.sleep(0.05)
        yield url
    finally:
        proc.kill()
        proc.wait(10)


@contextlib.contextmanager
def _workers(n: int, broker: str, repo: Path, scratch: Path) -> Iterator[None]:
    procs = []
    env = {**os.environ, "EMBEDPIPE_BROKER_URL": broker, "OPENAI_API_KEY": API_KEY, "PYTHONPATH": str(repo)}
    logs = []
    try:
        for i in range(n):
            log = scratch / f"worker-{i}.log"
            logs.append(log)
            with log.open("wb") as f:
                procs.append(subprocess.Popen(
                    [sys.executable, "-m", "celery", "-A", "embedpipe.distributed.celery", "worker", "-n",
                     f"bench{i}@%h", "-c", "1", "--pool", "prefork", "--loglevel", "INFO", "--without-gossip",
                     "--without-mingle", "--without-heartbeat"], env=env, stdout=f, stderr=subprocess.STDOUT,
                    start_new_session=True))
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if all(b"ready." in log.read_bytes() for log in logs):
                break
            time.sleep(0.1)
        else:
            raise Unavailable(f"{n} Celery workers were not ready within 120 s")
        yield
    finally:
        for p in procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGTERM)
        for p in procs:
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)


def _records(path: Path, n: int, words: int) -> list[str]:
    import json
    import random

    rng = random.Random(0)
    vocab = [f"w{i}" for i in range(5000)]
    texts = [f"record {i}: " + " ".join(rng.choice(vocab) for _ in range(words)) for i in range(n)]
    path.write_text("".join(json.dumps({"id": f"r{i}", "text": t}) + "\n" for i, t in enumerate(texts)))
    return texts


def run(ctx: Any) -> Result:
    try:
        import celery  # noqa: F401

        from embedpipe import distributed, jobs
        from embedpipe.distributed.celery import make_app
    except ImportError as exc:
        raise Unavailable(f"pip install 'embedpipe[celery]' ({exc})") from exc
    quick = ctx.quick
    window = 10.0 if not quick else 4.0
    tpm = 120_000 if not quick else 20_000      # tokens per window the server admits
    counts = (1, 2, 4) if not quick else (1, 2)
    n_records = 6_000 if not quick else 120  # several windows' worth: the run is long against its fixed costs
    words = 60
    rows = []
    data: dict[str, Any] = {}
    notes: list[str] = []
    # 1.5 s per request: one worker (two requests in flight) reaches about 40% of the limit, so workers add up.
    with server_process(rpm=100_000, tpm=tpm, window=window, latency=1.5, latency_per_token=0.00002,
                        default_dims=64) as server:
        for n in counts:
            scratch = ctx.scratch / f"dist-{n}"
            shutil.rmtree(scratch, ignore_errors=True)
            scratch.mkdir(parents=True)
            texts = _records(scratch / "src.jsonl", n_records, words)
            server.control.reset_ledger()
            with _redis(scratch) as redis_url, _workers(n, redis_url, ctx.repo, scratch):
                # The workers are told the server's limit and window, and share it through one Redis limiter
                # that fails closed.
                spec = jobs.JobSpec.from_options(
                    scratch / "src.jsonl", scratch / "out", model=f"openai:{MODEL}", dimensions=64,
                    base_url=server.base_url, cache=f"sqlite:///{scratch}/cache.db", chunk_size=60,
                    tpm=tpm, rpm=100_000, max_concurrency=2,  # per window: the limiter's window is the server's
                    rate_limiter=f"{redis_url}?key=bench&window={window:g}&on_error=raise")
                start = time.monotonic()
                result = distributed.submit(spec, app=make_app(redis_url), estimate_first=False).wait(600)
                seconds = time.monotonic() - start
            ledger = server.ledger
            billed = ledger.billed_tokens
            ceiling = tpm * (1 + seconds / window)
            responses = sum(ledger.status_counts.values()) or 1
            share_429 = ledger.status_counts.get(429, 0) / responses
            ratio = sum(ledger.times_billed.values()) / max(1, len(set(texts)))
            rows.append([n, f"{seconds:.1f}", f"{billed / seconds:,.0f}", f"{billed / ceiling:.1%}",
                         f"{share_429:.2%}", f"{ratio:.3f}", result.written])
            data[str(n)] = {"seconds": seconds, "billed_tokens": billed, "tokens_per_s": billed / seconds,
                            "share_of_limit": billed / ceiling, "share_429": share_429, "billed_per_unique": ratio,
                            "written": result.written}
    per_worker = data["1"]["tokens_per_s"]
    best = max(data.values(), key=lambda d: d["share_of_limit"])
    goal_met = best["share_of_limit"] >= 0.95 and all(d["share_429"] <= 0.01 for d in data.values()) and \
        all(abs(d["billed_per_unique"] - 1.0) < 1e-9 for d in data.values())
    notes.append(f"Server: {tpm:,} tokens per {window:g} s window, 1.5 s + 0.02 ms/token latency; one pool slot and "
                 "two requests in flight per worker process; all on this 2-core machine, server included.")
    for docs in (10_000_000, 100_000_000):
        tokens = docs * 500
        for limit in (5_000_000, 10_000_000):
            hours = tokens / limit / 60
            workers = limit / 60 / per_worker
            notes.append(f"Capacity model: {docs:,} documents × 500 tokens = {tokens:,} tokens at a {limit:,} TPM "
                         f"account limit take {hours:,.1f} h, with ≈{workers:,.0f} workers at the measured "
                         f"{per_worker:,.0f} tokens/s each (their rate is set by request latency × concurrency, so "
                         "more requests in flight per worker means fewer workers).")
    return Result(NAME, TITLE, GOAL, goal_met=goal_met if not quick else None,
                  headline=f"best share of the limit {best['share_of_limit']:.1%}; billed ÷ unique "
                           f"{max(d['billed_per_unique'] for d in data.values()):.3f}",
                  tables=[Table("Workers on one shared limit", ["workers", "seconds", "billed tokens/s",
                                                                "share of the limit", "429s", "billed ÷ unique",
                                                                "written"], rows)],
                  notes=notes, data=data)
