"""Local model throughput: embedpipe's local provider against ``SentenceTransformer.encode`` called directly.

The same model object, batch size, texts and normalisation; embedpipe runs with
``on_long_input="truncate"`` and no cache, so both do the same work (the model cuts inputs
at its 256 positions; embedpipe cuts them first, on a word boundary, and counts the cut).
Calls alternate round by round; each side's best round is compared. On a CUDA machine the
comparison repeats on the GPU in fp32 and fp16.
"""

# The report writes ratios with the multiplication sign, as the issue states them.
# ruff: noqa: RUF001

from __future__ import annotations

import warnings
from typing import Any

import numpy as np

from benchmarks import corpus, report, timing
from benchmarks.scenario import Context, Result, Table, Unavailable

NAME = "local"
TITLE = "Local model throughput"
GOAL = "embedpipe's local provider ≥ 0.95× the throughput of `SentenceTransformer.encode` (same model, batch, texts)"

MODEL = "all-MiniLM-L6-v2"
BATCH = 32


def _compare(provider: Any, texts: list[str], rounds: int, label: str) -> tuple[list[Any], dict[str, Any]]:
    from embedpipe import EmbeddingPipeline

    model = provider.model_object
    pipe = EmbeddingPipeline(provider, cache=None, on_long_input="truncate", batch_size=BATCH)

    def direct() -> np.ndarray:
        return model.encode(texts, batch_size=BATCH, convert_to_numpy=True, normalize_embeddings=True,
                            show_progress_bar=False)

    outputs: dict[str, np.ndarray] = {}

    def keep(name: str, fn: Any) -> Any:
        return lambda: outputs.__setitem__(name, np.asarray(fn()))

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # embedpipe's "inputs were truncated" warning: expected here
        model.encode(texts[:4], batch_size=BATCH)  # warm-up
        pipe.embed_array(texts[:4])
        truncated_before = pipe.stats.truncated
        times = timing.interleaved({"SentenceTransformer.encode": keep("direct", direct),
                                    "embedpipe": keep("embedpipe", lambda: pipe.embed_array(texts))}, rounds)
    truncated = (pipe.stats.truncated - truncated_before) // rounds
    cosine = float(np.mean(np.sum(outputs["direct"] * outputs["embedpipe"], axis=1)))
    speed = timing.best_ratio(times["SentenceTransformer.encode"], times["embedpipe"])
    st, ep = timing.best(times["SentenceTransformer.encode"]), timing.best(times["embedpipe"])
    row = [label, f"{len(texts) / st:.1f}", f"{len(texts) / ep:.1f}", report.ratio(speed), f"{truncated}",
           f"{cosine:.4f}"]
    return row, {"times": times, "ratio": speed, "truncated": truncated, "mean_cosine": cosine}


def run(ctx: Context) -> Result:
    try:
        import torch

        from embedpipe.providers.local import LocalProvider
    except ImportError as exc:
        raise Unavailable(f"the local provider needs torch and sentence-transformers: {exc}") from exc
    n, rounds = (6, 1) if ctx.quick else (64, 3)
    pool = corpus.paragraphs(ctx.repo, 10_000)
    pool_tokens = corpus.count_tokens(list(pool))
    # Spread over the whole corpus, plus two paragraphs longer than the model's 256 positions.
    texts = list(pool[:: len(pool) // (n - 2)][:n - 2])
    texts += [pool[i] for i in sorted(range(len(pool)), key=pool_tokens.__getitem__)[-40::20]]
    tokens = corpus.count_tokens(texts)
    rows, data = [], {}
    cpu = LocalProvider(MODEL, device="cpu")
    row, data["cpu"] = _compare(cpu, texts, rounds, f"CPU fp32 ({torch.get_num_threads()} threads)")
    rows.append(row)
    gpu_note = "No GPU on this machine (torch.cuda.is_available() is False): the GPU rows were not run."
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name(0)
        gpu_note = f"GPU: {name}."
        gpu = LocalProvider(MODEL, device="cuda")
        row, data["cuda-fp32"] = _compare(gpu, texts, rounds, f"{name} fp32")
        rows.append(row)
        gpu.model_object.half()
        row, data["cuda-fp16"] = _compare(gpu, texts, rounds, f"{name} fp16")
        rows.append(row)
    ratio = data["cpu"]["ratio"]
    notes = [gpu_note,
             f"{n} paragraphs spread over the corpus, two of them longer than the model's input (median "
             f"{int(np.median(tokens))} cl100k tokens, longest {max(tokens)}); batch size {BATCH} for both; "
             "embeddings normalised by both. This machine's CPU is slow (about 15 GFLOPS with torch), so the "
             "sample is small; the ratio, not the absolute rate, is the result.",
             "Mean cosine compares the two outputs text by text: 1.0000 but for the texts over the model's 256 "
             "positions, which embedpipe cuts on a word boundary and the model cuts mid-word."]
    if ratio < 0.95 and not ctx.quick:
        notes.append(f"**embedpipe misses**: {report.ratio(ratio)} the direct call's throughput; see the final "
                     "report's profile of `LocalProvider.embed_batch` and the pipeline's tokenizer pass.")
    return Result(NAME, TITLE, GOAL, goal_met=ratio >= 0.95,
                  headline=f"embedpipe {report.ratio(ratio)} the throughput of SentenceTransformer.encode on CPU",
                  setup=f"Model {MODEL} (sentence-transformers), {rounds} interleaved rounds; each rate is from "
                        "the best round (other processes only add time).",
                  tables=[Table("Texts per second", ["device", "SentenceTransformer.encode", "embedpipe",
                                                     "embedpipe ÷ direct", "texts truncated", "mean cosine"], rows)],
                  notes=notes, data=data)
