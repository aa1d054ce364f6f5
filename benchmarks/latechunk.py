"""Late chunking: chunk-level retrieval, naive vs late at the same chunk boundaries, all-MiniLM-L6-v2.

Each section of a seeded random subset of pydocs is split by ``StableSplitter(128)``; a
query (the section's title) is correct when any chunk of its section ranks in the top k
(a section scores its best chunk). Naive embeds each chunk alone; late pools each chunk
from one pass of the model over the whole section (windows of 512 positions with
overlap). Both run through :func:`embedpipe.eval.compare`, whose intervals are 95%
bootstrap over queries; "tie" is the paired difference's interval containing 0.
"""

from __future__ import annotations

import os
import random
from typing import Any

from benchmarks import corpus
from benchmarks.scenario import Context, Result, Table

NAME = "latechunk"
TITLE = "Late chunking"
GOAL = "report Recall@10 and nDCG@10 of late vs naive chunk vectors at the same boundaries, with 95% intervals " \
       "(no target: a loss is reported as one)"
SPLIT_TOKENS = 128


def subset(ctx: Context, n: int, seed: int = 21) -> list[dict[str, Any]]:
    """``n`` random titled sections as eval documents (id, text, title)."""
    secs = [s for s in corpus.sections(ctx.repo) if s.text.strip() and s.title.strip()]
    picked = random.Random(seed).sample(secs, min(n, len(secs)))
    return [{"id": s.id, "text": s.text, "title": s.title} for s in picked]


def eval_cache(ctx: Context) -> str:
    """One cache for the eval scenarios of a run, so the model-selection run reuses these vectors."""
    return f"sqlite:///{ctx.scratch}/eval-cache.db"


def sizes(quick: bool) -> int:
    return 6 if quick else 300


def run(ctx: Context) -> Result:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from embedpipe.eval import compare

    docs = subset(ctx, sizes(ctx.quick))
    report = compare(docs, models=["local:all-MiniLM-L6-v2"], chunking=["naive", "late"], cache=eval_cache(ctx),
                     split_tokens=SPLIT_TOKENS, resamples=200 if ctx.quick else 2000, out=ctx.scratch_dir(NAME),
                     latency_queries=5 if ctx.quick else 50)
    rows = []
    by_mode = {c["chunking"]: c for c in report.candidates}
    for mode in ("naive", "late"):
        c = by_mode[mode]
        ci = c["ci95"]
        rows.append([mode, str(c["vectors"]), f"{c['recall@10']:.3f}", f"[{ci['recall@10'][0]:.3f}, "
                     f"{ci['recall@10'][1]:.3f}]", f"{c['ndcg@10']:.3f}", f"[{ci['ndcg@10'][0]:.3f}, "
                     f"{ci['ndcg@10'][1]:.3f}]", f"{c['mrr']:.3f}"])
    loser = next(c for c in report.candidates if not c["vs_best"]["best"])
    winner = next(c for c in report.candidates if c["vs_best"]["best"])
    diff = loser["vs_best"]
    verdict = "a tie" if diff["tie"] else f"{winner['chunking']} is better"
    headline = (f"late {by_mode['late']['recall@10']:.3f} vs naive {by_mode['naive']['recall@10']:.3f} Recall@10 "
                f"on {len(docs)} sections: {verdict}")
    table = Table(f"Chunk-level title → section retrieval, {len(docs)} random pydocs sections, ~{SPLIT_TOKENS}-token "
                  "StableSplitter chunks", ["chunking", "chunk vectors", "Recall@10", "95% CI", "nDCG@10", "95% CI",
                                            "MRR"], rows,
                  note=f"Paired Recall@10 difference {loser['chunking']} - {winner['chunking']}: "
                       f"{diff['recall@10_diff']:+.3f}, 95% CI [{diff['diff_ci95'][0]:+.3f}, "
                       f"{diff['diff_ci95'][1]:+.3f}].")
    return Result(NAME, TITLE, GOAL, goal_met=None, headline=headline, tables=[table],
                  notes=[report.notes[0] if report.notes else ""],
                  data={"candidates": report.candidates, "documents": len(docs)},
                  setup=f"{len(docs)} of {len(corpus.sections(ctx.repo)):,} sections (seeded sample), "
                        "all-MiniLM-L6-v2 on CPU")
