"""``embedpipe serve``: the proxy's overhead on a cache hit, and what coalescing saves upstream.

The test server runs in its own process and so does the service (``embedpipe serve``, one
uvicorn worker), so the client measured here shares its interpreter with neither.

- Overhead: p50 of one cached text through the service with an httpx keep-alive client, minus
  p50 of a direct ``EmbeddingPipeline.embed`` of the same cached text (memory cache), calls
  interleaved.
- Coalescing: single-text requests from 50 concurrent clients (30% duplicates), once with the
  micro-batcher and once with ``max_batch_inputs = 1`` (every request its own upstream call);
  upstream requests and billed tokens come from the test server's ledger, latencies from the
  clients.
"""

# The report writes ratios with the multiplication sign, as the issue states them.
# ruff: noqa: RUF001

from __future__ import annotations

import asyncio
import os
import random
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks import report, timing
from benchmarks.scenario import Context, Result, Table, Unavailable
from benchmarks.servers import API_KEY, MODEL, server_process

NAME = "serve"
TITLE = "Service: proxy overhead and coalescing"
GOAL = ("a cache hit through `embedpipe serve` adds ≤ 1 ms p50 over a direct `EmbeddingPipeline` call; "
        "1,000 single-text requests from 50 clients make ≥ 10× fewer upstream requests with coalescing")

CLIENTS = 50


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class _Service:
    """``embedpipe serve`` in a subprocess, with a TOML config written for it."""

    def __init__(self, ctx: Context, upstream_url: str, label: str, server: dict[str, Any]) -> None:
        scratch = ctx.scratch_dir(NAME)
        self.port = _free_port()
        self.config = scratch / f"{label}.toml"
        lines = [f'[models."{MODEL}"]', f'spec = "openai:{MODEL}"', f'base_url = "{upstream_url}"', "",
                 "[server]", *(f"{k} = {v}" for k, v in server.items())]
        self.config.write_text("\n".join(lines) + "\n")
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> _Service:
        import httpx

        env = {**os.environ, "OPENAI_API_KEY": API_KEY, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
        self.proc = subprocess.Popen([sys.executable, "-m", "embedpipe.cli", "serve", "--config", str(self.config),
                                      "--port", str(self.port), "--cache", "memory://"], env=env,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError("embedpipe serve exited at start")
            try:
                if httpx.get(f"{self.url}/healthz", timeout=1).status_code == 200:
                    return self
            except httpx.TransportError:
                time.sleep(0.1)
        raise RuntimeError("embedpipe serve did not start within 60 s")

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


class _LiteLLM:
    """LiteLLM's proxy (``litellm --config``) on the same upstream, its in-memory cache on."""

    def __init__(self, ctx: Context, upstream_url: str, executable: str) -> None:
        self.port = _free_port()
        self.config = ctx.scratch_dir(NAME) / "litellm.yaml"
        self.config.write_text(
            "model_list:\n"
            f"  - model_name: {MODEL}\n"
            "    litellm_params:\n"
            f"      model: openai/{MODEL}\n"
            f"      api_base: {upstream_url}\n"
            f"      api_key: {API_KEY}\n"
            "litellm_settings:\n"
            "  cache: true\n"
            "  cache_params:\n"
            "    type: local\n")
        self.executable = executable
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> _LiteLLM:
        import httpx

        # Open, as embedpipe serve runs here without keys; LiteLLM refuses that unless told.
        env = {**{k: v for k, v in os.environ.items() if k != "PYTHONPATH"},
               "LITELLM_DANGEROUSLY_PERMIT_WEAK_OR_UNSET_MASTER_KEY": "true"}
        self.proc = subprocess.Popen([self.executable, "--config", str(self.config), "--host", "127.0.0.1",
                                      "--port", str(self.port), "--num_workers", "1"], env=env,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise Unavailable("litellm exited at start")
            try:
                if httpx.get(f"{self.url}/health/liveliness", timeout=1).status_code == 200:
                    return self
            except httpx.TransportError:
                time.sleep(0.25)
        raise Unavailable("litellm did not start within 120 s")

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


def _litellm_executable() -> str | None:
    """``$EMBEDPIPE_BENCH_LITELLM`` or ``litellm`` on PATH (it is not among the dev extras: see BENCHMARKS.md)."""
    import shutil

    return os.environ.get("EMBEDPIPE_BENCH_LITELLM") or shutil.which("litellm")


def _workload(n: int, seed: int = 11) -> list[str]:
    rng = random.Random(seed)
    unique = [f"support ticket {i}: {rng.random():.10f}" for i in range(int(n * 0.7))]
    texts = unique + [rng.choice(unique) for _ in range(n - len(unique))]
    rng.shuffle(texts)
    return texts


async def _load(url: str, texts: list[str]) -> tuple[list[float], list[int]]:
    import httpx

    queue: asyncio.Queue[str] = asyncio.Queue()
    for t in texts:
        queue.put_nowait(t)
    latencies: list[float] = []
    statuses: list[int] = []

    async def client() -> None:
        async with httpx.AsyncClient(base_url=url, timeout=60) as http:
            while not queue.empty():
                text = queue.get_nowait()
                start = time.perf_counter()
                got = await http.post("/v1/embeddings", json={"model": MODEL, "input": text,
                                                              "encoding_format": "base64"})
                latencies.append(time.perf_counter() - start)
                statuses.append(got.status_code)

    await asyncio.gather(*(client() for _ in range(CLIENTS)))
    return latencies, statuses


def _overhead(ctx: Context, upstream: Any, calls: int) -> tuple[list[list[Any]], dict[str, float]]:
    import httpx

    from embedpipe import EmbeddingPipeline

    text = "a text every call finds in the cache"
    with _Service(ctx, upstream.base_url, "overhead", {}) as service, \
            EmbeddingPipeline(f"openai:{MODEL}", base_url=upstream.base_url, api_key=API_KEY,
                              cache="memory://") as pipe, httpx.Client(base_url=service.url, timeout=10) as http:
        body = {"model": MODEL, "input": [text], "encoding_format": "base64"}
        assert http.post("/v1/embeddings", json=body).status_code == 200  # the miss that fills its cache
        pipe.embed([text])
        # Alternating calls, as timing.interleaved does, without its gc.collect() before each call: a
        # collection of this process's heap costs more than the microseconds measured here.
        cases = {"service": lambda: http.post("/v1/embeddings", json=body), "direct": lambda: pipe.embed([text]),
                 "floor": lambda: http.get("/healthz")}
        times: dict[str, list[float]] = {name: [] for name in cases}
        for _ in range(calls):
            for name, call in cases.items():
                start = time.perf_counter()
                call()
                times[name].append(time.perf_counter() - start)
    p50 = {k: timing.percentile(v, 50) for k, v in times.items()}
    p99 = {k: timing.percentile(v, 99) for k, v in times.items()}
    rows = [["`EmbeddingPipeline.embed`, direct", report.seconds(p50["direct"]), report.seconds(p99["direct"])],
            ["`POST /v1/embeddings` via `embedpipe serve` (httpx keep-alive)", report.seconds(p50["service"]),
             report.seconds(p99["service"])],
            ["added by the service", report.seconds(p50["service"] - p50["direct"]),
             report.seconds(p99["service"] - p99["direct"])],
            ["`GET /healthz` on the same connection (the HTTP floor: no embedding)", report.seconds(p50["floor"]),
             report.seconds(p99["floor"])]]
    return rows, {"direct_p50": p50["direct"], "service_p50": p50["service"], "floor_p50": p50["floor"],
                  "added_p50": p50["service"] - p50["direct"]}


def run(ctx: Context) -> Result:
    try:
        import fastapi  # noqa: F401
        import httpx  # noqa: F401
    except ImportError as exc:
        raise Unavailable(f"the serve extra is not installed ({exc})") from exc
    requests, calls = (60, 50) if ctx.quick else (1000, 1000)
    texts = _workload(requests)
    data: dict[str, Any] = {}
    rows = []
    with server_process(rpm=None, tpm=None, latency=0.005) as upstream:
        overhead_rows, data["overhead"] = _overhead(ctx, upstream, calls)
        litellm = _litellm_executable()
        cases: list[tuple[str, Any]] = [
            ("`embedpipe serve`, coalescing (the defaults)", lambda: _Service(ctx, upstream.base_url, "c", {})),
            ("`embedpipe serve`, no coalescing (`max_batch_inputs = 1`)",
             lambda: _Service(ctx, upstream.base_url, "n", {"max_batch_inputs": 1}))]
        if litellm and not ctx.quick:
            cases.append(("LiteLLM proxy, `cache: true` (local)", lambda: _LiteLLM(ctx, upstream.base_url, litellm)))
        for label, make in cases:
            upstream.control.reset_ledger()
            with make() as service:
                started = time.perf_counter()
                latencies, statuses = asyncio.run(_load(service.url, texts))
                elapsed = time.perf_counter() - started
            ledger = upstream.ledger
            bad = len([s for s in statuses if s != 200])
            data[label] = {"upstream_requests": ledger.requests_total, "billed_tokens": ledger.billed_tokens,
                           "p50": timing.percentile(latencies, 50), "p99": timing.percentile(latencies, 99),
                           "seconds": elapsed, "errors": bad,
                           "billed_once": all(v == 1 for v in ledger.times_billed.values())}
            rows.append([label, f"{ledger.requests_total:,}", f"{ledger.billed_tokens:,}",
                         "yes" if data[label]["billed_once"] else "no",
                         report.seconds(data[label]["p50"]), report.seconds(data[label]["p99"]),
                         f"{requests / elapsed:,.0f}", f"{bad}"])
    with_c, without = (data[label]["upstream_requests"] for label, _ in cases[:2])
    ratio = without / with_c if with_c else float("nan")
    added = data["overhead"]["added_p50"]
    notes = [f"{requests:,} single-text requests, {CLIENTS} concurrent httpx clients, 30% duplicate texts, "
             "base64 answers; the upstream test server adds 5 ms per request.",
             "Upstream requests and billed tokens are the test server's ledger; latencies are the clients'.",
             "LiteLLM's proxy runs when `litellm` is on PATH (or `$EMBEDPIPE_BENCH_LITELLM`) and not with "
             "`--quick`; it is not a dev dependency: `litellm[proxy]` would change packages the rest of the "
             "project pins." if litellm is None or ctx.quick else
             "LiteLLM: its proxy from its own virtual environment, in-memory cache on, default settings otherwise."]
    return Result(NAME, TITLE, GOAL, goal_met=added <= 1e-3 and ratio >= 10,
                  headline=f"a cache hit adds {report.seconds(added)} p50; coalescing sends {report.ratio(ratio)} "
                           "fewer upstream requests",
                  tables=[Table("A cache hit: through the service and direct (calls interleaved)",
                                ["call", "p50", "p99"], overhead_rows),
                          Table("Coalescing: the same workload with and without the micro-batcher",
                                ["service", "upstream requests", "billed tokens", "each text billed once",
                                 "p50", "p99", "requests/s", "non-200"], rows)],
                  notes=notes, data=data)
