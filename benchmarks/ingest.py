"""``POST /v1/ingest``: what the service's durable jobs cost over ``jobs.run`` on the same records.

The test server runs in its own process, and so does the service (``embedpipe serve`` with a
``[sinks.docs]`` Parquet sink and a SQLite job store). The same pydocs sections go:

- through ``jobs.run`` (JSONL file → Parquet folder, chunks of 500), in this process;
- through the service: one ``POST /v1/ingest`` (timed to its 202, i.e. validated, written and
  fsynced), then followed with ``GET /v1/jobs/{id}`` to ``succeeded``.

Both use a fresh SQLite cache, so both pay for every text once; the ratio is the service's
end-to-end time over ``jobs.run``'s.
"""

# ruff: noqa: RUF001

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.corpus import sections
from benchmarks.scenario import Context, Result, Table
from benchmarks.servers import API_KEY, MODEL, server_process

NAME = "ingest"
TITLE = "Service: ingest jobs against jobs.run"
GOAL = ("2,000 sections through `POST /v1/ingest` (stored durably, run by the service's worker loop) take "
        "≤ 1.5× the time of `jobs.run` on the same records")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _records(ctx: Context, n: int) -> list[dict[str, Any]]:
    return [{"id": s.id, "text": s.text, "metadata": {"title": s.title}} for s in sections(ctx.repo)[:n]]


def _direct(ctx: Context, upstream: str, records: list[dict[str, Any]], scratch: Path) -> float:
    from embedpipe import jobs

    warm = scratch / "warm.jsonl"  # load the tokenizer and the provider's client before the clock starts
    warm.write_text(json.dumps({"id": "w", "text": "warm up"}) + "\n")
    jobs.run(str(warm), out=str(scratch / "warm-out"), model=f"openai:{MODEL}", base_url=upstream, api_key=API_KEY,
             cache=None)
    src = scratch / "direct.jsonl"
    src.write_text("".join(json.dumps({"id": r["id"], "text": r["text"], **r["metadata"]}) + "\n" for r in records))
    started = time.perf_counter()
    result = jobs.run(str(src), out=str(scratch / "direct-out"), model=f"openai:{MODEL}", base_url=upstream,
                      api_key=API_KEY, cache=f"sqlite:///{scratch}/direct-cache.db", chunk_size=500)
    elapsed = time.perf_counter() - started
    assert result.written == len(records), result
    return elapsed


def _service(ctx: Context, upstream: str, records: list[dict[str, Any]], scratch: Path) -> tuple[float, float]:
    import httpx

    port = _free_port()
    config = scratch / "serve.toml"
    config.write_text(f'[models."{MODEL}"]\nspec = "openai:{MODEL}"\nbase_url = "{upstream}"\n\n'
                      f'[cache]\nurl = "sqlite:///{scratch}/serve-cache.db"\n\n'
                      f'[sinks.docs]\nurl = "{scratch / "serve-out"}"\n\n'
                      f'[store]\nurl = "sqlite:///{scratch}/jobs.sqlite"\n')
    env = {**os.environ, "OPENAI_API_KEY": API_KEY, "PYTHONPATH": str(ctx.repo)}
    proc = subprocess.Popen([sys.executable, "-m", "embedpipe.cli", "serve", "--config", str(config), "--port",
                             str(port)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{base}/readyz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("embedpipe serve did not start")
            time.sleep(0.1)
        body = json.dumps({"model": MODEL, "sink": "docs", "records": records}).encode()
        with httpx.Client(timeout=60) as client:
            started = time.perf_counter()
            posted = client.post(f"{base}/v1/ingest", content=body, headers={"content-type": "application/json"})
            accepted = time.perf_counter() - started
            assert posted.status_code == 202, posted.text
            job = posted.json()["job_id"]
            while True:
                status = client.get(f"{base}/v1/jobs/{job}").json()
                if status["state"] == "succeeded":
                    break
                if status["state"] in ("failed", "cancelled") or time.perf_counter() - started > 300:
                    raise RuntimeError(f"the ingest job ended {status['state']}: {status.get('error')}")
                time.sleep(0.02)
            total = time.perf_counter() - started
        assert status["counts"]["written"] == len(records), status
        return accepted, total
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def run(ctx: Context) -> Result:
    n = 200 if ctx.quick else 2000
    records = _records(ctx, n)
    scratch = ctx.scratch_dir(NAME)
    body_mb = len(json.dumps({"records": records})) / 1e6
    with server_process() as upstream:
        direct = _direct(ctx, upstream.base_url, records, scratch)
        accepted, total = _service(ctx, upstream.base_url, records, scratch)
    ratio = total / direct
    table = Table(f"{n:,} pydocs sections ({body_mb:.1f} MB of JSON), OpenAI test server in its own process",
                  ["path", "202 after", "done after", "records/s", "vs jobs.run"],
                  [["jobs.run (JSONL → Parquet)", "—", f"{direct:.2f} s", f"{n / direct:,.0f}", "1.00×"],
                   ["POST /v1/ingest → succeeded", f"{accepted * 1000:.0f} ms", f"{total:.2f} s",
                    f"{n / total:,.0f}", f"{ratio:.2f}×"]])
    return Result(NAME, TITLE, GOAL, goal_met=None if ctx.quick else ratio <= 1.5,
                  headline=(f"{n:,} sections: the service answered 202 (stored, fsynced) in {accepted * 1000:.0f} ms "
                            f"and finished the job in {total:.2f} s, {ratio:.2f}× `jobs.run`'s {direct:.2f} s."),
                  tables=[table], data={"records": n, "direct_s": direct, "accepted_s": accepted, "service_s": total,
                                        "ratio": ratio, "body_mb": body_mb},
                  notes=["The service's time includes the upload, validation, the durable write, the worker "
                         "loop's lease and the client's polling (every 20 ms)."])


if __name__ == "__main__":
    import tempfile

    result = run(Context(quick=False, repo=Path(__file__).resolve().parents[1], plots_dir=Path(tempfile.mkdtemp())))
    print(result.headline)
