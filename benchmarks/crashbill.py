"""Re-billing after a SIGKILL: what a crash at a random moment of a jobs-CLI run costs again on resume.

The scenario of Hardening II, defect 2: the test server (its own process) allows 300 requests
and 600,000 tokens per 10 s, with 0.3 s + 0.05 s per 1k tokens of latency, and bills a request
it admitted even when the client leaves before the answer (``bill_abandoned``: a provider that
did the work bills it). The client is told 1,800 rpm and 3.6M tpm (the same rates per minute;
its bucket is six times the server's). ``embedpipe run`` embeds the first 3,000 documentation
sections with default options.

One uninterrupted run gives the job's tokens and duration. Then, in each trial, with a fresh
output and cache, the run is SIGKILLed at a random moment of that duration (seeded), resumed
to the end, and the re-billed tokens are everything billed minus the job's tokens. Goal:
at most max(2% of the job, one request) in every trial.

``EMBEDPIPE_BENCH_BEFORE=DIR`` (a checkout of an earlier commit) runs a few trials of that code
too, side by side, with the same kill moments.
"""

# ruff: noqa: RUF001

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.scenario import Result, Table
from benchmarks.servers import API_KEY, MODEL, server_process, tiktoken_env

NAME = "crashbill"
TITLE = "Re-billing after a SIGKILL"
GOAL = "a SIGKILL at 10 random moments re-bills at most max(2% of the job, one request) each time"

SERVER = {"rpm": 300, "tpm": 600_000, "window": 10.0, "latency": 0.3, "latency_per_token": 5e-5,
          "bill_abandoned": True}
CLIENT_RPM, CLIENT_TPM = 1_800, 3_600_000
#: the largest request OpenAI takes is 8,191 tokens per input; a request of embedpipe's sizing is smaller
INPUT_LIMIT = 8_191


def _records(repo: Path, n: int, path: Path) -> None:
    from benchmarks import corpus

    with path.open("w", encoding="utf-8") as f:
        for section in corpus.sections(repo)[:n]:
            f.write(json.dumps({"id": section.id, "text": section.text}) + "\n")


def _command(source: Path, out: Path, url: str) -> list[str]:
    code = "import sys; from embedpipe.cli import main; sys.exit(main())"
    return [sys.executable, "-c", code, "run", str(source), "-o", str(out), "-m", f"openai:{MODEL}",
            "--base-url", url, "--rpm", str(CLIENT_RPM), "--tpm", str(CLIENT_TPM), "--no-progress"]


def _env(tree: Path, scratch: Path, cache: Path) -> dict[str, str]:
    env = tiktoken_env(scratch)
    env.update(PYTHONPATH=str(tree), OPENAI_API_KEY=API_KEY, EMBEDPIPE_CACHE=f"sqlite:///{cache}",
               HF_HUB_OFFLINE="1")
    return env


def _run(cmd: list[str], env: dict[str, str], kill_at: float | None, log: Path) -> tuple[float, int | None]:
    """Run the CLI; SIGKILL it ``kill_at`` seconds after the start (None: let it finish). Seconds, exit code."""
    with log.open("a") as err:
        start = time.monotonic()
        proc = subprocess.Popen(cmd, env=env, stdout=err, stderr=err)
        try:
            if kill_at is None:
                code = proc.wait(timeout=600)
                return time.monotonic() - start, code
            try:
                proc.wait(timeout=kill_at)
                return time.monotonic() - start, proc.returncode  # it finished first
            except subprocess.TimeoutExpired:
                proc.send_signal(signal.SIGKILL)
                proc.wait(timeout=60)
                return time.monotonic() - start, None
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def _trial(tree: Path, scratch: Path, server: Any, source: Path, name: str, kill_at: float | None) -> dict[str, Any]:
    folder = scratch / name
    folder.mkdir(parents=True, exist_ok=True)
    out, cache, log = folder / "out", folder / "cache.db", folder / "log.txt"
    env = _env(tree, scratch, cache)
    cmd = _command(source, out, server.base_url)
    server.control.reset()  # full buckets, empty ledger
    time.sleep(0.2)
    seconds, code = _run(cmd, env, kill_at, log)
    killed = code is None
    resumed = None
    if killed:
        time.sleep(1.0)  # the server notices the dropped connections and bills what it admitted
        resumed, code = _run(cmd, env, None, log)
    ledger = server.ledger
    return {"kill_at": kill_at, "killed": killed, "seconds": seconds, "resume_seconds": resumed, "exit": code,
            "billed": ledger.billed_tokens, "requests": ledger.requests_total,
            "abandoned": ledger.requests_abandoned, "status_counts": dict(ledger.status_counts)}


def run(ctx: Any) -> Result:
    quick = ctx.quick
    scratch = ctx.scratch_dir(NAME)
    n = 300 if quick else 3_000
    trials = 2 if quick else 10
    source = scratch / "records.jsonl"
    _records(ctx.repo, n, source)
    before = os.environ.get("EMBEDPIPE_BENCH_BEFORE")
    trees = [("this checkout", ctx.repo)] + ([("before", Path(before))] if before and not quick else [])
    rng = random.Random(13)
    rows: list[list[Any]] = []
    data: dict[str, Any] = {}
    verdict = True
    config = dict(SERVER)
    if quick:
        config.update(latency=0.05, latency_per_token=5e-6)
    with server_process(**config) as server:
        full = _trial(ctx.repo, scratch, server, source, "full", None)
        job = full["billed"]
        duration = full["seconds"]
        moments = [rng.uniform(0.05, 0.95) * duration for _ in range(trials)]
        data["job"] = full
        for label, tree in trees:
            picks = moments if label == "this checkout" else moments[:3]
            results = [_trial(tree, scratch, server, source, f"{label}-{i}", t) for i, t in enumerate(picks)]
            data[label] = results
            for r in results:
                again = r["billed"] - job
                bound = max(0.02 * job, INPUT_LIMIT)
                ok = r["exit"] in (0, 3) and again <= bound
                if label == "this checkout":
                    verdict = verdict and ok
                rows.append([label, f"{r['kill_at']:.1f} s" + ("" if r["killed"] else " (finished first)"),
                             f"{again:,}", f"{again / job:.2%}", f"{r['abandoned']:,}", str(r["exit"]),
                             "yes" if ok else "**no**"])
    ours = [r["billed"] - job for r in data["this checkout"]]
    headline = (f"worst re-billing {max(ours):,} tokens = {max(ours) / job:.2%} of the {job:,}-token job "
                f"(median {sorted(ours)[len(ours) // 2] / job:.2%})")
    if "before" in data:
        theirs = [r["billed"] - job for r in data["before"]]
        headline += f"; the code before, same moments: worst {max(theirs) / job:.2%}"
    notes = [
        f"The uninterrupted run took {duration:.1f} s and was billed {job:,} tokens; kill moments are uniform "
        "over 5–95% of that duration (seed 13).",
        "Re-billed = everything the server billed over the killed run and its resume, minus the job's tokens. "
        "The test server bills a request it admitted even when the killed client never reads the answer "
        "(`bill_abandoned`), as a provider that did the work would; answers that arrived are in the cache "
        "and cost nothing on resume.",
        "Requests in flight at a crash are what it re-bills: embedpipe keeps about rate × latency tokens in "
        "flight (Little's law, `embedpipe/engine/flow.py`), in requests sized from the rpm and tpm, and a job at "
        "most 1.5% of its estimated tokens (at least 32,768: `max_tokens_in_flight`); answers that arrived but "
        "were not yet cached at the kill add a little.",
    ]
    setup = (f"Server: {SERVER['rpm']} requests and {SERVER['tpm']:,} tokens per {SERVER['window']:g} s, latency "
             f"{SERVER['latency']:g} s + {SERVER['latency_per_token'] * 1000:g} s per 1k tokens; client told "
             f"{CLIENT_RPM:,} rpm and {CLIENT_TPM:,} tpm; `embedpipe run` on the first {n:,} pydocs sections.")
    return Result(NAME, TITLE, GOAL, goal_met=verdict if not quick else None, headline=headline, setup=setup,
                  tables=[Table("Re-billed tokens after a SIGKILL and resume",
                                ["code", "killed at", "re-billed tokens", "share of the job",
                                 "requests abandoned", "exit", "within the goal"], rows)],
                  notes=notes, data=data)
