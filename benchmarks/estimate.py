"""Estimate accuracy: ``EmbeddingPipeline.estimate`` against the tokens the test server bills.

The whole corpus (the sections over 8,191 tokens included: embedpipe splits them) is
estimated and then embedded with a cold cache; then the corpus with 10% copies (all cached),
and with 5% of the sections edited (partly cached), each estimated then embedded.
"""

from __future__ import annotations

from benchmarks import corpus, report
from benchmarks.cost import ingestions
from benchmarks.scenario import Context, Result, Table
from benchmarks.servers import API_KEY, MODEL, server_process

NAME = "estimate"
TITLE = "Estimate accuracy"
GOAL = "`estimate` within 1% of the tokens billed"


def run(ctx: Context) -> Result:
    from embedpipe import EmbeddingPipeline

    first = 200 if ctx.quick else None
    everything = [s.text for s in corpus.sections(ctx.repo)[:first]]
    if ctx.quick:  # one section over the input limit, so the split path is estimated too
        everything.append(max(corpus.sections(ctx.repo), key=lambda s: len(s.text)).text)
    runs = ingestions(ctx.repo, first)
    steps = [("cold cache: the corpus, long sections included", everything),
             ("the corpus plus 10% copies (all cached)", [d.text for d in runs[1]]),
             ("5% of the sections edited (partly cached)", [d.text for d in runs[2]])]
    rows, data = [], []
    worst = 0.0
    scratch = ctx.scratch_dir(NAME)
    with server_process(rpm=None, tpm=None) as server, \
            EmbeddingPipeline(f"openai:{MODEL}", base_url=server.base_url, api_key=API_KEY,
                              cache=f"sqlite:///{scratch / 'cache.db'}") as pipe:
        for label, texts in steps:
            est = pipe.estimate(texts)
            server.control.reset()
            pipe.embed(texts)
            ledger = server.ledger
            billed, requests = ledger.billed_tokens, ledger.requests_total
            error = (est.tokens - billed) / billed if billed else (0.0 if est.tokens == 0 else float("inf"))
            worst = max(worst, abs(error))
            price = pipe.price_per_1m_tokens or 0.0
            rows.append([label, f"{len(texts):,}", f"{est.tokens:,}", f"{billed:,}", report.percent(error, 3),
                         f"{est.requests} / {requests}", f"${est.cost_usd or 0:.4f} / ${billed * price / 1e6:.4f}"])
            data.append({"step": label, "texts": len(texts), "estimated": est.tokens, "billed": billed,
                         "error": error, "estimated_requests": est.requests, "requests": requests,
                         "cached": est.cached})
    notes = ["Billed tokens are the test server's ledger (cl100k, as OpenAI counts them). Requests include any "
             "retry; the server injects no faults here."]
    if worst > 0.01 and not ctx.quick:
        notes.append("**The estimate misses by more than 1%**: see the per-step rows; `estimate` and the send "
                     "path plan pieces with the same `_pieces`/`_plan` in `embedpipe/pipeline.py`.")
    elif worst > 0:
        notes.append("Where the estimate differs at all, it is in the split sections: their windows are counted "
                     "before sending, and the server counts each window's text again.")
    return Result(NAME, TITLE, GOAL, goal_met=worst <= 0.01,
                  headline=f"worst error {report.percent(worst, 3)}",
                  tables=[Table("Estimated against billed", ["step", "texts", "estimated tokens", "billed tokens",
                                                             "error", "requests est. / sent", "cost est. / billed"],
                                rows)],
                  notes=notes, data={"steps": data})
