"""Overhead per call: what embedpipe adds to one ``embed_query``, on a cache hit and on a miss.

A hit is timed call by call on each cache (memory, SQLite, Redis) and through the LangChain
class. A miss goes to the test server (its own process, no latency, no limits), alternating
call by call with the openai SDK calling the same server directly; every call embeds a text
never seen before.
"""

from __future__ import annotations

import functools
import os
import time
from collections.abc import Callable
from typing import Any

from benchmarks import corpus, report, timing
from benchmarks.scenario import Context, Plot, Result, Table
from benchmarks.servers import API_KEY, MODEL, server_process

NAME = "overhead"
TITLE = "Overhead per call"
GOAL = "a cached `embed_query` under 1 ms p50; the latency a miss adds over the openai SDK reported"


def _each(fn: Callable[[], object], n: int) -> list[float]:
    out = []
    for _ in range(n):
        start = time.perf_counter()
        fn()
        out.append(time.perf_counter() - start)
    return out


def run(ctx: Context) -> Result:
    import openai

    from embedpipe import EmbeddingPipeline

    hits, misses = (200, 20) if ctx.quick else (5000, 300)
    queries = [p for p in corpus.paragraphs(ctx.repo, 10_000) if len(p) < 300]
    query = queries[0]
    scratch = ctx.scratch_dir(NAME)
    tag = f"bench{os.getpid()}"
    hit_rows: list[list[Any]] = []
    data: dict[str, Any] = {}
    with server_process(rpm=None, tpm=None) as server:
        caches = {"memory": "memory://", "SQLite": f"sqlite:///{scratch / 'hits.db'}",
                  "Redis": f"redis://127.0.0.1:6379/0?namespace={tag}"}
        faces: dict[str, Callable[[str], Any]] = {}
        pipes = []
        for name, url in caches.items():
            pipe = EmbeddingPipeline(f"openai:{MODEL}", base_url=server.base_url, api_key=API_KEY, cache=url)
            pipes.append(pipe)
            faces[f"`EmbeddingPipeline.embed_query`, {name}"] = pipe.embed_query
        try:
            from langchain_embedpipe import EmbedPipeEmbeddings

            lc = EmbedPipeEmbeddings(model=f"openai:{MODEL}", base_url=server.base_url, api_key=API_KEY,
                                     cache="memory://")
            faces["LangChain `EmbedPipeEmbeddings.embed_query`, memory"] = lc.embed_query
        except ImportError as exc:
            hit_rows.append(["LangChain `EmbedPipeEmbeddings.embed_query`", f"not available: {exc}", "", ""])
        for label, face in faces.items():
            face(query)  # the miss that fills the cache
            times = _each(functools.partial(face, query), hits)
            p50, p99 = timing.percentile(times, 50), timing.percentile(times, 99)
            data[label] = {"p50": p50, "p99": p99}
            hit_rows.append([label, report.seconds(p50), report.seconds(p99), f"{hits:,}"])

        # Misses: every call a new text, alternating embedpipe and the SDK against the same server.
        sdk = openai.OpenAI(base_url=server.base_url, api_key=API_KEY)
        miss_pipe = pipes[0]
        sdk.embeddings.create(model=MODEL, input="warm up the connection")
        miss_pipe.embed_query("warm up the connection and the runner")
        ep_times, sdk_times = [], []
        for i in range(misses):
            text = queries[1 + i % (len(queries) - 1)]
            ep_times += _each(functools.partial(miss_pipe.embed_query, f"{text} [{i}a]"), 1)
            sdk_times += _each(functools.partial(sdk.embeddings.create, model=MODEL, input=f"{text} [{i}b]"), 1)
        for pipe in pipes:
            if pipe.cache is not None and "Redis" in type(pipe.cache).__name__:
                pipe.cache.clear()
            pipe.close()
    miss_rows = []
    for label, times in (("openai SDK `embeddings.create`", sdk_times), ("embedpipe `embed_query` (miss)", ep_times)):
        miss_rows.append([label, report.seconds(timing.percentile(times, 50)),
                          report.seconds(timing.percentile(times, 99))])
    added50 = timing.percentile(ep_times, 50) - timing.percentile(sdk_times, 50)
    added99 = timing.percentile(ep_times, 99) - timing.percentile(sdk_times, 99)
    miss_rows.append(["added by embedpipe", report.seconds(added50), report.seconds(added99)])
    data["miss"] = {"embedpipe": ep_times, "sdk": sdk_times}
    worst_hit = max(v["p50"] for k, v in data.items() if k != "miss")
    mem_hit = data["`EmbeddingPipeline.embed_query`, memory"]["p50"]
    notes = ["A miss also writes the new vector to the memory cache, as every real miss does.",
             "The SDK decodes the same base64 answer embedpipe asks for (its default encoding_format)."]
    if worst_hit >= 1e-3 and not ctx.quick:
        notes.append("**A cache hit takes 1 ms or more on some store** (see the table).")
    result = Result(NAME, TITLE, GOAL, goal_met=worst_hit < 1e-3,
                    headline=f"hit p50 {report.seconds(mem_hit)} (memory), worst store {report.seconds(worst_hit)}; "
                             f"a miss adds {report.seconds(added50)} p50",
                    tables=[Table("A cache hit", ["call", "p50", "p99", "calls"], hit_rows),
                            Table(f"A miss, {misses} calls each, alternating", ["call", "p50", "p99"], miss_rows)],
                    notes=notes, data=data)
    plot = _plot(ctx, ep_times, sdk_times)
    if plot is not None:
        result.plots.append(plot)
    return result


def _plot(ctx: Context, ep: list[float], sdk: list[float]) -> Plot | None:
    def draw(fig: Any, ax: Any) -> None:
        for label, times in (("openai SDK", sdk), ("embedpipe embed_query", ep)):
            xs = sorted(t * 1e3 for t in times)
            ax.plot(xs, [(i + 1) / len(xs) for i in range(len(xs))], label=label)
        ax.set_xscale("log")
        ax.set_xlabel("latency of one uncached query (ms, log)")
        ax.set_ylabel("share of calls")
        ax.legend()
        ax.grid(alpha=0.3)

    return ctx.save_plot("overhead-miss", "Latency of an uncached query: embedpipe against the openai SDK on the "
                         "same server (CDF)", draw)
