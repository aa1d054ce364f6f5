"""Model selection: ``embedpipe.eval.compare`` on pydocs, all-MiniLM-L6-v2 at 384/256/128 dims x naive/late.

The same seeded subset of sections as the late-chunking scenario (and its cache, so the
384-dim candidates are not embedded twice); queries are the section titles, as the
report says. Matryoshka reduction of a model not trained for it (MiniLM) is measured,
not assumed. The table is the eval's own; its plot is copied into the benchmark plots.
"""

from __future__ import annotations

import os
import shutil

from benchmarks.latechunk import SPLIT_TOKENS, eval_cache, sizes, subset
from benchmarks.scenario import Context, Plot, Result, Table

NAME = "modelselect"
TITLE = "Model selection (embedpipe eval)"
GOAL = "the eval ranks the candidates with intervals and flags ties; a second run embeds nothing"
MODELS = ["local:all-MiniLM-L6-v2", "local:all-MiniLM-L6-v2@256", "local:all-MiniLM-L6-v2@128"]


def run(ctx: Context) -> Result:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from embedpipe.eval import compare

    docs = subset(ctx, sizes(ctx.quick))
    out = ctx.scratch_dir(NAME)
    models = MODELS[:2] if ctx.quick else MODELS
    report = compare(docs, models=models, chunking=["naive", "late"], cache=eval_cache(ctx),
                     split_tokens=SPLIT_TOKENS, resamples=200 if ctx.quick else 2000, out=out, corpus_size=4362,
                     latency_queries=5 if ctx.quick else 50)
    again = compare(docs, models=models, latency_queries=5, chunking=["naive", "late"], cache=eval_cache(ctx),
                    split_tokens=SPLIT_TOKENS, resamples=200)
    rows = []
    for c in sorted(report.candidates, key=lambda c: -c["recall@10"]):
        ci = c["ci95"]["recall@10"]
        vs = c["vs_best"]
        rank = "best" if vs["best"] else ("tie" if vs["tie"] else f"{vs['recall@10_diff']:+.3f}")
        lat = c["latency"]["per_query"]
        rows.append([c["model"], c["chunking"], str(c["dimensions"]), f"{c['recall@5']:.3f}",
                     f"{c['recall@10']:.3f}", f"[{ci[0]:.3f}, {ci[1]:.3f}]", f"{c['ndcg@10']:.3f}",
                     f"{c['mrr']:.3f}", rank, str(c["bytes_per_vector"]["float32"]),
                     "n/a" if lat["p50_ms"] is None else f"{lat['p50_ms']:.1f}"])
    plots = []
    for name in ("recall_vs_dims", "recall_vs_cost"):
        src = out / f"{name}.png"
        if src.is_file():
            dst = ctx.plot_path(f"modelselect_{name}")
            shutil.copyfile(src, dst)
            plots.append(Plot(f"eval: {name.replace('_', ' ')}", dst))
    table = Table(f"embedpipe eval on {len(docs)} pydocs sections (title queries)",
                  ["model", "chunking", "dims", "Recall@5", "Recall@10", "95% CI", "nDCG@10", "MRR", "vs best",
                   "bytes/vector", "query p50 ms"], rows,
                  note="'vs best': the paired Recall@10 difference to the best candidate, or 'tie' when its 95% "
                       "interval contains 0. Local model: cost $0.")
    best = next(c for c in report.candidates if c["vs_best"]["best"])
    return Result(NAME, TITLE, GOAL, goal_met=again.embedded == 0,
                  headline=f"best: {best['model']} / {best['chunking']} (Recall@10 {best['recall@10']:.3f}); "
                           f"re-run embedded {again.embedded}",
                  tables=[table], plots=plots, notes=[report.notes[0] if report.notes else ""],
                  data={"candidates": report.candidates, "rerun_embedded": again.embedded},
                  setup=f"{len(docs)} sections (seeded sample), all-MiniLM-L6-v2 on CPU")
