"""The eval's outputs: ``results.json``, ``report.md`` with a recommendation, and the two plots."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from embedpipe.eval.compare import EvalReport

__all__ = ["recommendation", "write_report"]


def _usd(value: float | None) -> str:
    if value is None:
        return "unknown"
    return f"${value:,.4f}" if value < 1 else f"${value:,.2f}"


def _ms(value: float | None) -> str:
    return "—" if value is None else f"{value:,.1f}"


def _cheapness(c: dict[str, Any]) -> tuple[float, int]:
    cost = c["cost"].get("corpus_usd")
    return (float("inf") if cost is None else cost, c["bytes_per_vector"]["float32"])


def recommendation(candidates: list[dict[str, Any]]) -> list[str]:
    """Which candidate to pick, and what each alternative gives up; differences inside the 95% interval are ties."""
    if not candidates:
        return ["No candidates were evaluated."]
    best = next(c for c in candidates if c["vs_best"].get("best"))
    tied = [c for c in candidates if c is best or c["vs_best"].get("tie")]
    pick = min(tied, key=_cheapness)
    lines = []
    if pick is best:
        lines.append(f"**Use {pick['model']} ({pick['chunking']} chunking)**: the highest Recall@10 "
                     f"({best['recall@10']:.3f}).")
    else:
        lines.append(f"**Use {pick['model']} ({pick['chunking']} chunking)**: its Recall@10 "
                     f"({pick['recall@10']:.3f}) is tied with the best, {best['model']} ({best['chunking']}, "
                     f"{best['recall@10']:.3f}), within the 95% interval, and it is cheaper to store or embed.")
    for c in candidates:
        if c is pick:
            continue
        parts = []
        diff = c["recall@10"] - pick["recall@10"]
        vs = c["vs_best"]
        tie = c is best or vs.get("tie")
        parts.append(f"Recall@10 {diff:+.3f}" + (" (a tie: within the interval)" if tie and c is not best
                                                  and pick is best else ""))
        ratio = c["bytes_per_vector"]["float32"] / pick["bytes_per_vector"]["float32"]
        if ratio != 1:
            parts.append(f"{ratio:.2g} times the bytes per vector")
        cost_c, cost_p = c["cost"].get("corpus_usd"), pick["cost"].get("corpus_usd")
        if cost_c is not None and cost_p is not None and cost_c != cost_p:
            parts.append(f"corpus cost {_usd(cost_c)} against {_usd(cost_p)}")
        p50_c = c["latency"]["per_query"].get("p50_ms")
        p50_p = pick["latency"]["per_query"].get("p50_ms")
        if p50_c is not None and p50_p is not None:
            parts.append(f"query p50 {p50_c:.1f} ms against {p50_p:.1f} ms")
        lines.append(f"- {c['model']} ({c['chunking']}): " + "; ".join(parts) + ".")
    return lines


def _plots(report: EvalReport) -> list[tuple[str, str]]:
    """Draw the plots; ``(file name, caption)`` of each written. None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    assert report.out is not None
    cands = report.candidates
    out = []
    for name, xkey, xlabel, caption in (
            ("recall_vs_cost", "cost", "cost per 1,000 queries + corpus (USD)", "Recall@10 against cost"),
            ("recall_vs_dims", "dimensions", "dimensions", "Recall@10 against dimensions")):
        fig, ax = plt.subplots(figsize=(6.5, 3.8))
        for c in cands:
            if xkey == "cost":
                corpus, per_q = c["cost"].get("corpus_usd"), c["cost"].get("per_1000_queries_usd")
                if corpus is None or per_q is None:
                    continue
                x = corpus + per_q
            else:
                x = c["dimensions"]
            low, high = c["ci95"]["recall@10"]
            ax.errorbar([x], [c["recall@10"]], yerr=[[c["recall@10"] - low], [high - c["recall@10"]]], fmt="o",
                        capsize=3, label=f"{c['model']} / {c['chunking']}")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("Recall@10 (95% CI)")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(report.out / f"{name}.png", dpi=110)
        plt.close(fig)
        out.append((f"{name}.png", caption))
    return out


def write_report(report: EvalReport) -> None:
    """Write ``results.json``, ``report.md`` and the plots into ``report.out``."""
    assert report.out is not None
    report.out.mkdir(parents=True, exist_ok=True)
    (report.out / "results.json").write_text(json.dumps(report.results, indent=2), encoding="utf-8")
    q = report.results["queries"]
    lines = ["# Embedding model evaluation", "",
             f"{q['documents']} documents, {q['count']} queries (source: {q['source']}). Metrics are means over "
             "queries with 95% bootstrap intervals; tied scores count as the average over their orders.", ""]
    lines += [f"> {note}" for note in report.notes] + ([""] if report.notes else [])
    lines += ["| model | chunking | dims | Recall@1 | Recall@5 | Recall@10 (95% CI) | MRR | nDCG@10 | "
              "query p50 / p99 ms | batch p50 ms | bytes/vector f32 | corpus cost | per 1k queries |",
              "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for c in report.candidates:
        lo, hi = c["ci95"]["recall@10"]
        lat = c["latency"]
        tie = " (tie)" if c["vs_best"].get("tie") else (" (best)" if c["vs_best"].get("best") else "")
        lines.append(
            f"| {c['model']} | {c['chunking']} | {c['dimensions']} | {c['recall@1']:.3f} | {c['recall@5']:.3f} | "
            f"{c['recall@10']:.3f} [{lo:.3f}, {hi:.3f}]{tie} | {c['mrr']:.3f} | {c['ndcg@10']:.3f} | "
            f"{_ms(lat['per_query'].get('p50_ms'))} / {_ms(lat['per_query'].get('p99_ms'))} | "
            f"{_ms(lat['per_batch'].get('p50_ms'))} | {c['bytes_per_vector']['float32']:,} | "
            f"{_usd(c['cost'].get('corpus_usd'))} | {_usd(c['cost'].get('per_1000_queries_usd'))} |")
    if any(c["latency"].get("from_previous_run") for c in report.candidates):
        lines += ["", "Latency of candidates served wholly from the cache is carried over from the run that "
                      "embedded them."]
    elif any(not c["latency"].get("measured") for c in report.candidates):
        lines += ["", "Some candidates came wholly from the cache: their latency is the cache's, not the model's."]
    plots = _plots(report)
    if plots:
        lines += [""] + [f"![{caption}]({name})" for name, caption in plots]
    lines += ["", "## Recommendation", "", *recommendation(report.candidates), ""]
    (report.out / "report.md").write_text("\n".join(lines), encoding="utf-8")
