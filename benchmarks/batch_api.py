"""Batch API cost: the same corpus embedded directly and with ``--batch-api``, billed by the test server's ledger.

Both runs are ``jobs.run`` over the documentation's sections into a JSONL file, each with
its own empty cache, against one test server whose batch lifecycle runs on a fast clock
(validating 0.5 s, in progress 2 s, finalizing 0.5 s; a real batch takes minutes to 24 h).
The ledger bills direct requests at the list price and batch lines at half of it.
"""

from __future__ import annotations

import json
import time
from typing import Any

from benchmarks import corpus
from benchmarks.scenario import Context, Result, Table
from benchmarks.servers import API_KEY, MODEL, server_process, tiktoken_cache

NAME = "batch_api"
TITLE = "Batch API: half price for large runs"
GOAL = "billed dollars with --batch-api ÷ direct = 0.50, every vector identical"
CLOCK = {"batch_validating_s": 0.5, "batch_in_progress_s": 2.0, "batch_finalizing_s": 0.5}
#: --quick: a fifth of the clock, so the smoke test takes seconds
QUICK_CLOCK = {name: seconds / 5 for name, seconds in CLOCK.items()}


def run(ctx: Context) -> Result:
    from embedpipe import jobs

    sections = [s for s, _ in corpus.within_limit(ctx.repo, 60 if ctx.quick else None)]
    clock = QUICK_CLOCK if ctx.quick else CLOCK
    scratch = ctx.scratch_dir(NAME)
    src = scratch / "docs.jsonl"
    src.write_text("".join(json.dumps({"id": s.id, "text": s.text}) + "\n" for s in sections))
    unique_tokens = sum(corpus.count_tokens(sorted({s.text for s in sections})))
    rows: list[list[Any]] = []
    data: dict[str, dict[str, Any]] = {}
    with tiktoken_cache(scratch), server_process(rpm=None, tpm=None, **clock) as server:
        # Warm-up (tokenizer, imports) outside the timings, so the run that goes first is not charged for it.
        jobs.estimate(str(src), model=f"openai:{MODEL}", base_url=server.base_url, api_key=API_KEY, cache="memory://")
        for name, batch in (("direct", None), ("--batch-api", jobs.BatchOptions(poll_initial_s=0.1,
                                                                                 poll_max_s=0.5))):
            server.control.reset_ledger()
            out = scratch / f"{name.strip('-')}.jsonl"
            started = time.perf_counter()
            result = jobs.run(str(src), out=str(out), model=f"openai:{MODEL}", base_url=server.base_url,
                              api_key=API_KEY, cache=f"sqlite:///{scratch / name.strip('-')}.db", batch_api=batch)
            wall = time.perf_counter() - started
            led = server.ledger
            data[name] = {"billed_usd": led.billed_usd, "billed_tokens": led.billed_tokens, "wall_s": wall,
                          "batches": led.batches_created, "records": result.records,
                          "vectors": {r["id"]: r["vector"] for r in map(json.loads, out.read_text().splitlines())}}
    direct, batched = data["direct"], data["--batch-api"]
    ratio = batched["billed_usd"] / direct["billed_usd"]
    same = direct["vectors"] == batched["vectors"]
    for name, d in data.items():
        rows.append([name, f"{d['records']:,}", f"{d['billed_tokens']:,}", f"${d['billed_usd']:.6f}",
                     f"{d['billed_usd'] / direct['billed_usd']:.3f}", f"{d['batches']}", f"{d['wall_s']:.2f} s"])
        d.pop("vectors")
    met = abs(ratio - 0.5) < 1e-6 and same and direct["billed_tokens"] == batched["billed_tokens"] == unique_tokens
    notes = [
        f"Unique tokens: {unique_tokens:,} (cl100k). Both runs were billed exactly these tokens; "
        f"the vectors of the two outputs are {'identical' if same else 'NOT identical'}.",
        f"Wall time is the loss: a batch waits for its lifecycle (here {sum(clock.values()):g} s on the test "
        "server's fast clock, up to "
        "24 h at OpenAI), a direct run only for its requests. Use --batch-api when the bill matters more than the "
        "wait.",
    ]
    return Result(NAME, TITLE, GOAL, goal_met=met, headline=f"batch ÷ direct = {ratio:.3f} billed dollars",
                  setup=f"{len(sections):,} documentation sections, {MODEL} at $0.02 per 1M tokens "
                        "(batch: $0.01), test server without rate limits.",
                  tables=[Table("Billed by the test server's ledger", ["run", "records", "billed tokens",
                                                                       "billed", "÷ direct", "batches", "wall"],
                                rows)],
                  notes=notes, data={"unique_tokens": unique_tokens, "runs": data, "ratio": ratio})
