"""Compact output types: bytes per cached vector, and what int8 and binary cost in retrieval quality.

Bytes come from the codec itself (:func:`embedpipe.codec.value_size`, checked against real
encoded values). Quality: title-query Recall@10 on the pydocs sections with the local model
(all-MiniLM-L6-v2): each section's title is the query and its own text the one relevant
document, among a seeded subsample of sections with unique titles. float32 scores by cosine;
int8 by the dot product of the dequantized vectors (per-vector scales); binary by Hamming
distance, and also with float queries against the ±1 document bits (asymmetric).
"""

# The report writes ratios with the multiplication sign, as the other scenarios do.
# ruff: noqa: RUF001

from __future__ import annotations

import random
from typing import Any

import numpy as np

from benchmarks import corpus
from benchmarks.scenario import Context, Result, Table, Unavailable

NAME = "compact"
TITLE = "Compact output types"
GOAL = ("a cached 1024-d vector ≥ 3.9× smaller as int8 and ≥ 29× smaller as binary than as float32 (header "
        "included); the Recall@10 each keeps reported")

DIMS = (384, 1024, 1536, 3072)


def bytes_table() -> tuple[Table, dict[str, Any]]:
    """Bytes per cached value for each dtype at common dimensions, measured on encoded values."""
    from embedpipe import codec
    from embedpipe.quantize import quantize

    rows, data = [], {}
    for d in DIMS:
        v = np.random.default_rng(d).standard_normal((1, d)).astype(np.float32)
        sizes = {"float32": len(codec.encode(v[0], 1)),
                 "int8": len(codec.encode_quantized(quantize(v, "int8"), [1])[0]),
                 "binary": len(codec.encode_quantized(quantize(v, "binary"), [1])[0])}
        assert all(sizes[k] == codec.value_size(d, k) for k in sizes)  # type: ignore[arg-type]
        data[d] = sizes
        rows.append([d, f"{sizes['float32']:,}", f"{sizes['int8']:,}", f"{sizes['float32'] / sizes['int8']:.2f}×",
                     f"{sizes['binary']:,}", f"{sizes['float32'] / sizes['binary']:.1f}×"])
    note = ("Each value carries embedpipe's 12-byte header (and int8 a 4-byte float32 scale); "
            "the ratios approach 4× and 32× as dimensions grow.")
    return Table("Bytes per cached vector", ["dims", "float32", "int8", "vs float32", "binary", "vs float32"],
                 rows, note), data


def recall_at_10(ranked: np.ndarray) -> float:
    """Share of queries whose own document (same row index) is among the 10 best."""
    return float(np.mean([i in row for i, row in enumerate(ranked)]))


def top10(scores: np.ndarray, *, smaller_is_better: bool = False) -> np.ndarray:
    """The 10 best columns of each row."""
    order = scores if smaller_is_better else -scores
    return np.argpartition(order, 10, axis=1)[:, :10]


def recall_table(ctx: Context) -> tuple[Table, dict[str, Any]]:
    """Title-query Recall@10 for float32, int8 and binary, with the local model on a corpus subsample."""
    try:
        from embedpipe import EmbeddingPipeline
        from embedpipe.providers.local import LocalProvider
        from embedpipe.quantize import dequantize, hamming_distances, quantize
    except ImportError as exc:
        raise Unavailable(f"the local provider needs torch and sentence-transformers: {exc}") from exc
    n = 150 if ctx.quick else 1500
    counts: dict[str, int] = {}
    for s in corpus.sections(ctx.repo):
        counts[s.title] = counts.get(s.title, 0) + 1
    pool = [s for s in corpus.sections(ctx.repo) if counts[s.title] == 1 and s.text.strip() and s.title.strip()]
    chosen = random.Random(18).sample(pool, min(n, len(pool)))
    with EmbeddingPipeline(LocalProvider("all-MiniLM-L6-v2", device="cpu"), cache=None,
                           on_long_input="truncate") as pipe:
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "inputs were truncated": expected, the model reads 256 positions
            docs = pipe.embed_array([s.text for s in chosen])
            queries = pipe.embed_array([s.title for s in chosen], role="query")
    results = {"float32": recall_at_10(top10(queries @ docs.T))}
    qi, di = quantize(queries, "int8"), quantize(docs, "int8")
    results["int8"] = recall_at_10(top10(dequantize(qi) @ dequantize(di).T))
    qb, db = quantize(queries, "binary"), quantize(docs, "binary")
    results["binary (Hamming)"] = recall_at_10(top10(hamming_distances(qb, db).astype(np.float64),
                                                     smaller_is_better=True))
    results["binary docs, float32 queries"] = recall_at_10(top10(queries @ dequantize(db).T))
    rows = [[k, f"{v:.3f}", f"{v - results['float32']:+.3f}"] for k, v in results.items()]
    note = (f"{len(chosen)} pydocs sections with unique titles (seed 18); each title queries for its own "
            "section among all of them; all-MiniLM-L6-v2 on CPU, 384 dims, inputs truncated at 256 positions.")
    return Table("Title-query Recall@10 (local model)", ["output type", "Recall@10", "vs float32"], rows,
                 note), {"n": len(chosen), **results}


def run(ctx: Context) -> Result:
    sizes, size_data = bytes_table()
    tables, data = [sizes], {"bytes": size_data}
    notes = []
    try:
        recall, recall_data = recall_table(ctx)
        tables.append(recall)
        data["recall"] = recall_data
    except Unavailable as exc:
        notes.append(f"Recall@10 not measured: {exc}")
    b = size_data[1024]
    return Result(NAME, TITLE, GOAL, goal_met=b["float32"] / b["int8"] >= 3.9 and b["float32"] / b["binary"] >= 29,
                  headline=(f"At 1024 dims a cached vector takes {b['float32']:,} B as float32, {b['int8']:,} B as "
                            f"int8 and {b['binary']:,} B as binary."),
                  tables=tables, notes=notes, data=data)


if __name__ == "__main__":
    import tempfile
    from pathlib import Path

    from benchmarks import report

    result = run(Context(quick=False, repo=Path(__file__).resolve().parents[1],
                         plots_dir=Path(tempfile.mkdtemp())))
    print(result.headline)
    for t in result.tables:
        print(report.table(t))
