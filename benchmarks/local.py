"""Local model throughput: embedpipe's local provider against ``SentenceTransformer.encode`` called directly.

The same model folder, batch size, texts and normalisation. embedpipe runs through
``EmbeddingPipeline`` (its own token counting and truncation included) with
``on_long_input="truncate"`` and no cache, so both do the same work: sentence-transformers cuts
inputs at the model's 256 positions, and embedpipe cuts them at exactly the same token. Three
cases alternate round by round: sentence-transformers, embedpipe fp32 (exact) and embedpipe
int8 (ONNX Runtime, gated). Ratios are given for the best round of each case and for the
median rounds. The GPU scenario is a separate script (``benchmarks/gpu_local.py``) for a machine
with a GPU.
"""

# The report writes ratios with the multiplication sign, as the issue states them.
# ruff: noqa: RUF001

from __future__ import annotations

import statistics
import warnings
from typing import Any

import numpy as np

from benchmarks import corpus, report, timing
from benchmarks.scenario import Context, Result, Table, Unavailable

NAME = "local"
TITLE = "Local model throughput"
GOAL = ("CPU: embedpipe fp32 (exact) ≥ 1.0× `SentenceTransformer.encode` (same model, batch, texts); "
        "int8 ≥ 1.6× with the gate's min cosine ≥ 0.98")

MODEL = "all-MiniLM-L6-v2"
BATCH = 32


def sample(ctx: Context, n: int) -> list[str]:
    """``n`` documentation sections spread over the corpus (about half longer than 256 tokens)."""
    pool = [s.text for s in corpus.sections(ctx.repo) if s.text.strip()]
    return pool[:: max(1, len(pool) // n)][:n]


def recall_at_10(ctx: Context, pipes: dict[str, Any], n: int) -> dict[str, float]:
    """Title-query Recall@10 over ``n`` sections with distinct titles, per pipeline (its own vectors)."""
    seen: set[str] = set()
    chosen = []
    for s in corpus.sections(ctx.repo):
        if s.title.strip() and s.text.strip() and s.title not in seen:
            seen.add(s.title)
            chosen.append(s)
    chosen = chosen[:: max(1, len(chosen) // n)][:n]
    out = {}
    for name, pipe in pipes.items():
        docs = pipe.embed_array([s.text for s in chosen])
        queries = pipe.embed_array([s.title for s in chosen])
        top = np.argsort(-(queries @ docs.T), axis=1)[:, :10]
        out[name] = float(np.mean([i in row for i, row in enumerate(top)]))
    return out


def run(ctx: Context) -> Result:
    try:
        import torch

        from embedpipe import EmbeddingPipeline
        from embedpipe.providers.local import LocalProvider
    except ImportError as exc:
        raise Unavailable(f"the local provider needs torch and sentence-transformers: {exc}") from exc
    n, rounds = (8, 1) if ctx.quick else (128, 5)
    texts = sample(ctx, n)
    fp32 = LocalProvider(MODEL, device="cpu")
    st = fp32.model_object
    over = sum(1 for c in fp32.tokenizer.count(texts) if c > fp32.max_input_tokens)
    cases: dict[str, Any] = {}
    outputs: dict[str, np.ndarray] = {}

    def keep(name: str, fn: Any) -> Any:
        return lambda: outputs.__setitem__(name, np.asarray(fn()))

    cases["SentenceTransformer.encode"] = keep("st", lambda: st.encode(
        texts, batch_size=BATCH, convert_to_numpy=True, normalize_embeddings=True, show_progress_bar=False))
    pipe32 = EmbeddingPipeline(fp32, cache=None, on_long_input="truncate", batch_size=BATCH)
    cases["embedpipe fp32"] = keep("fp32", lambda: pipe32.embed_array(texts))
    int8_note = ""
    gate = None
    pipes = [pipe32]
    try:
        # The user cache directory, as for any user: the export and the gate run on the first run only.
        int8 = LocalProvider(MODEL, device="cpu", precision="int8")
        assert int8.encoder is not None and int8.encoder.onnx is not None
        gate = int8.encoder.onnx.gate
        pipe8 = EmbeddingPipeline(int8, cache=None, on_long_input="truncate", batch_size=BATCH)
        pipes.append(pipe8)
        cases["embedpipe int8"] = keep("int8", lambda: pipe8.embed_array(texts))
    except Exception as exc:  # e.g. onnxruntime missing: report fp32 alone
        int8_note = f"int8 not run: {type(exc).__name__}: {exc}"

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # embedpipe's "inputs were truncated" warning: expected here
        for fn in cases.values():  # warm-up
            fn()
        times = timing.interleaved(cases, rounds)
    recall: dict[str, float] = {}
    if len(pipes) == 2:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            recall = recall_at_10(ctx, {"fp32": pipes[0], "int8": pipes[1]}, 16 if ctx.quick else 1000)
    for p in pipes:
        p.close()
    st_times = times["SentenceTransformer.encode"]
    rows = []
    data: dict[str, Any] = {"times": times, "texts": n, "over_max_seq": over,
                            "threads": torch.get_num_threads()}
    ratios: dict[str, tuple[float, float]] = {}
    for name in cases:
        if name == "SentenceTransformer.encode":
            continue
        key = "fp32" if "fp32" in name else "int8"
        cos = np.sum(outputs["st"] * outputs[key], axis=1)
        best = timing.best_ratio(st_times, times[name])
        median = statistics.median(st_times) / statistics.median(times[name])
        ratios[key] = (best, median)
        rows.append([name, f"{n / timing.best(st_times):.2f}", f"{n / timing.best(times[name]):.2f}",
                     report.ratio(best), report.ratio(median), f"{cos.min():.6f}", f"{cos.mean():.6f}"])
        data[key] = {"best_ratio": best, "median_ratio": median, "min_cosine_to_st": float(cos.min()),
                     "mean_cosine_to_st": float(cos.mean())}
    fp32_best, fp32_median = ratios["fp32"]
    int8_best, int8_median = ratios.get("int8", (float("nan"), float("nan")))
    gate_ok = gate is not None and gate.min_cosine >= 0.98
    notes = [
        f"{n} documentation sections spread over the corpus, {over} of them longer than the model's "
        f"{fp32.max_input_tokens} tokens (cut at exactly the token sentence-transformers cuts at); batch size "
        f"{BATCH} for all; {torch.get_num_threads()} torch threads. This machine's two cores are shared with "
        "other work, so the rates move between runs; the ratios of interleaved rounds are the result.",
        "Min cosine compares each embedpipe vector with sentence-transformers' vector of the same text.",
        "GPU: not measured (no GPU on this machine). `benchmarks/gpu_local.py` is the prepared GPU scenario.",
    ]
    if gate is not None:
        notes.append(f"int8 gate (first load, {gate.texts} bundled sample texts, fp32 vs int8): min cosine "
                     f"{gate.min_cosine:.4f}, mean {gate.mean_cosine:.4f}.")
        data["gate"] = {"min_cosine": gate.min_cosine, "mean_cosine": gate.mean_cosine, "texts": gate.texts}
    if recall:
        notes.append(f"Title-query Recall@10 over {16 if ctx.quick else 1000} sections with distinct titles (each "
                     "title's own section is the one relevant document; texts truncated at 254 tokens): fp32 "
                     f"{recall['fp32']:.3f}, int8 {recall['int8']:.3f}.")
        data["recall_at_10"] = recall
    if int8_note:
        notes.append(int8_note)
    met = fp32_best >= 1.0 and fp32_median >= 1.0 and int8_best >= 1.6 and gate_ok
    return Result(NAME, TITLE, GOAL, goal_met=met,
                  headline=f"fp32 {report.ratio(fp32_best)} (median {report.ratio(fp32_median)}), int8 "
                           f"{report.ratio(int8_best)} (median {report.ratio(int8_median)}) the throughput of "
                           "SentenceTransformer.encode on CPU",
                  setup=f"Model {MODEL}, {rounds} interleaved rounds; rates are from each case's best round.",
                  tables=[Table("Texts per second", ["embedpipe case", "SentenceTransformer.encode", "embedpipe",
                                                     "best ÷ best", "median ÷ median", "min cosine",
                                                     "mean cosine"], rows)],
                  notes=notes, data=data)
