"""Edit-stable chunking: chunks re-embedded per edit for three splitters at the same mean chunk size.

Three edit streams over the pydocs sections, each touching 5% of them (a seeded random
sample): insert a sentence at a random sentence boundary, delete a random sentence, change
one word to another of a different length. For each edit the section is split before and
after; the chunks of the "after" split that the "before" split did not hold (as a
multiset of texts) are what a content-addressed cache or docstore would send to the model
again. Splitters: LlamaIndex ``SentenceSplitter`` and LangChain
``RecursiveCharacterTextSplitter`` (tiktoken-counted, no overlap), whose ``chunk_size`` is
calibrated so their mean chunk size in cl100k tokens matches ``StableSplitter(128)``'s on
the same sample. The retrieval check (title query -> its section, a section scoring its
best chunk, all-MiniLM-L6-v2) runs on a subset of sections: see the setup line.
"""

from __future__ import annotations

import random
import re
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from benchmarks import corpus
from benchmarks.scenario import Context, Result, Table, Unavailable

NAME = "editstable"
TITLE = "Edit-stable chunking"
GOAL = "StableSplitter re-embeds ≤ 1.5 chunks per edit on average; its title-query Recall@10 no worse than " \
       "SentenceSplitter's beyond the 95% interval"

TARGET = 128
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
_WORD = re.compile(r"\b[A-Za-z]{4,}\b")
INSERTED = "This sentence was added by an editor to say something new about the topic."

Splitter = Callable[[str], list[str]]


def _splitters(target_llama: int, target_lc: int) -> dict[str, Splitter]:
    try:
        from langchain_text_splitters import RecursiveCharacterTextSplitter
        from llama_index.core.node_parser import SentenceSplitter
    except ImportError as exc:
        raise Unavailable(f"the framework splitters are not installed ({exc})") from None
    from embedpipe.chunking import StableSplitter

    llama = SentenceSplitter(chunk_size=target_llama, chunk_overlap=0)
    lc = RecursiveCharacterTextSplitter.from_tiktoken_encoder(encoding_name="cl100k_base", chunk_size=target_lc,
                                                              chunk_overlap=0)
    stable = StableSplitter(chunk_size=TARGET)
    return {"LlamaIndex SentenceSplitter": llama.split_text, "LangChain RecursiveCharacterTextSplitter":
            lc.split_text, "embedpipe StableSplitter": stable.split_text}


def _mean_tokens(split: Splitter, texts: Sequence[str]) -> float:
    chunks = [c for t in texts for c in split(t)]
    return float(np.mean(corpus.count_tokens(chunks))) if chunks else 0.0


def _calibrate(make: Callable[[int], Splitter], texts: Sequence[str], want: float,
               quick: bool = False) -> tuple[int, float]:
    """The chunk_size whose mean chunk size is closest to ``want`` tokens (a small grid search)."""
    best = (0, float("inf"), 0.0)
    step = int(want // 2) if quick else max(1, int(want // 16))
    for size in range(int(want * 0.9), int(want * 2.2) + 1, step):
        got = _mean_tokens(make(size), texts)
        if abs(got - want) < best[1]:
            best = (size, abs(got - want), got)
    return best[0], best[2]


def edit(text: str, kind: str, rng: random.Random) -> str | None:
    """``text`` after one edit of ``kind`` (insert, delete, word), or ``None`` when it has no room for one."""
    sentences = _SENTENCE_END.split(text)
    if kind == "insert":
        cuts = [m.end() for m in _SENTENCE_END.finditer(text)]
        at = rng.choice(cuts) if cuts else len(text)
        return text[:at] + INSERTED + " " + text[at:]
    if kind == "delete":
        if len(sentences) < 2:
            return None
        spans = [0, *[m.end() for m in _SENTENCE_END.finditer(text)], len(text)]
        k = rng.randrange(len(spans) - 1)
        return text[:spans[k]] + text[spans[k + 1]:]
    words = list(_WORD.finditer(text))
    if not words:
        return None
    w = rng.choice(words)
    replacement = w.group() + "ing" if rng.random() < 0.5 else w.group()[:-2]
    return text[:w.start()] + replacement + text[w.end():]


def reembedded(before: list[str], after: list[str]) -> int:
    """Chunks of ``after`` not among ``before`` (as a multiset): what a content-addressed cache embeds again."""
    return sum((Counter(after) - Counter(before)).values())


def run(ctx: Context) -> Result:
    secs = [s for s in corpus.sections(ctx.repo) if s.text.strip()]
    rng = random.Random(21)
    calib = [s.text for s in rng.sample(secs, 10 if ctx.quick else 300)]
    from embedpipe.chunking import StableSplitter

    want = _mean_tokens(StableSplitter(chunk_size=TARGET).split_text, calib)
    try:
        from langchain_text_splitters import RecursiveCharacterTextSplitter
        from llama_index.core.node_parser import SentenceSplitter
    except ImportError as exc:
        raise Unavailable(f"the framework splitters are not installed ({exc})") from None
    size_llama, mean_llama = _calibrate(lambda n: SentenceSplitter(chunk_size=n, chunk_overlap=0).split_text,
                                        calib, want, ctx.quick)
    size_lc, mean_lc = _calibrate(lambda n: RecursiveCharacterTextSplitter.from_tiktoken_encoder(
        encoding_name="cl100k_base", chunk_size=n, chunk_overlap=0).split_text, calib, want, ctx.quick)
    splitters = _splitters(size_llama, size_lc)
    means = {"LlamaIndex SentenceSplitter": (size_llama, mean_llama),
             "LangChain RecursiveCharacterTextSplitter": (size_lc, mean_lc),
             "embedpipe StableSplitter": (TARGET, want)}
    n_edit = 5 if ctx.quick else max(1, len(secs) // 20)
    streams = ("insert", "delete", "word")
    counts: dict[str, dict[str, list[int]]] = {name: {k: [] for k in streams} for name in splitters}
    chunks_per_doc: dict[str, list[int]] = {name: [] for name in splitters}
    for kind in streams:
        picked = random.Random(f"{kind}-21").sample(secs, n_edit)
        erng = random.Random(f"{kind}-edit")
        for s in picked:
            after = edit(s.text, kind, erng)
            if after is None or after == s.text:
                continue
            for name, split in splitters.items():
                before_chunks = split(s.text)
                counts[name][kind].append(reembedded(before_chunks, split(after)))
                chunks_per_doc[name].append(len(before_chunks))
    rows = []
    data: dict[str, Any] = {"target_tokens": TARGET, "edits_per_stream": n_edit, "splitters": {}}
    for name in splitters:
        per = {k: float(np.mean(v)) if v else float("nan") for k, v in counts[name].items()}
        everything = [x for v in counts[name].values() for x in v]
        overall = float(np.mean(everything))
        rows.append([name, str(means[name][0]), f"{means[name][1]:.1f}", f"{np.mean(chunks_per_doc[name]):.1f}",
                     f"{per['insert']:.2f}", f"{per['delete']:.2f}", f"{per['word']:.2f}", f"**{overall:.2f}**"])
        data["splitters"][name] = {"chunk_size": means[name][0], "mean_tokens": means[name][1], **per,
                                   "overall": overall, "edits": len(everything)}
    stable = data["splitters"]["embedpipe StableSplitter"]["overall"]
    tables = [Table(f"Chunks re-embedded per edit ({n_edit} sections per stream, 5% of {len(secs):,})",
                    ["splitter", "chunk_size", "mean chunk (tokens)", "chunks per section", "insert sentence",
                     "delete sentence", "change a word's length", "all edits"], rows)]
    notes = [f"Mean chunk sizes are matched on {len(calib)} random sections by choosing each framework "
             "splitter's chunk_size (cl100k tokens; LangChain's counted with tiktoken, LlamaIndex's with its "
             "default tokenizer)."]
    goal_met: bool | None = stable <= 1.5
    recall = None if ctx.quick else _recall(ctx, size_llama, notes)  # quick: no model load (seconds alone)
    if recall is not None:
        tables.append(recall[0])
        data["recall"] = recall[1]
        goal_met = goal_met and recall[1]["stable_not_worse"]
    ratio = data["splitters"]["LlamaIndex SentenceSplitter"]["overall"] / stable if stable else float("nan")
    return Result(NAME, TITLE, GOAL, goal_met=goal_met,
                  headline=f"StableSplitter re-embeds {stable:.2f} chunks per edit "
                           f"({ratio:.1f}x fewer than SentenceSplitter)",
                  tables=tables, notes=notes, data=data,
                  setup=f"pydocs sections; target {TARGET} tokens; edits seeded; retrieval on a subset")


def _recall(ctx: Context, size_llama: int, notes: list[str]) -> tuple[Table, dict[str, Any]] | None:
    """Title-query Recall@10 over chunk vectors (a section scores its best chunk), Stable vs SentenceSplitter."""
    try:
        from llama_index.core.node_parser import SentenceSplitter

        from embedpipe import EmbeddingPipeline
        from embedpipe.chunking import StableSplitter
        from embedpipe.eval.metrics import bootstrap_ci, bootstrap_diff_ci, recall_at_k
    except ImportError as exc:
        notes.append(f"retrieval check skipped: {exc}")
        return None
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    secs = [s for s in corpus.sections(ctx.repo) if s.text.strip() and s.title.strip()]
    n = 40 if ctx.quick else 400
    subset = random.Random(7).sample(secs, min(n, len(secs)))
    try:
        pipe = EmbeddingPipeline("local:all-MiniLM-L6-v2", cache=f"sqlite:///{ctx.scratch_dir(NAME)}/cache.db")
    except Exception as exc:
        notes.append(f"retrieval check skipped: the local model is unavailable ({exc})")
        return None
    per_query: dict[str, np.ndarray] = {}
    with pipe:
        queries = np.asarray(pipe.embed_array([s.title for s in subset], role="query"))
        for name, split in (("SentenceSplitter", SentenceSplitter(chunk_size=size_llama, chunk_overlap=0).split_text),
                            ("StableSplitter", StableSplitter(chunk_size=TARGET).split_text)):
            chunks = [split(s.text) or [s.text] for s in subset]
            owners = np.repeat(np.arange(len(subset)), [len(c) for c in chunks])
            vectors = np.asarray(pipe.embed_array([c for cs in chunks for c in cs]))
            scores = queries @ vectors.T
            starts = np.flatnonzero(np.r_[True, owners[1:] != owners[:-1]])
            best = np.maximum.reduceat(scores, starts, axis=1)
            per_query[name] = np.asarray([recall_at_k(best[i], {i}, 10) for i in range(len(subset))])
    rows, out = [], {}
    for name, v in per_query.items():
        lo, hi = bootstrap_ci(v, resamples=2000, seed=0)
        rows.append([name, f"{v.mean():.3f}", f"[{lo:.3f}, {hi:.3f}]"])
        out[name] = {"recall@10": float(v.mean()), "ci95": [lo, hi]}
    lo, hi = bootstrap_diff_ci(per_query["StableSplitter"], per_query["SentenceSplitter"], resamples=2000, seed=0)
    out["diff_ci95"] = [lo, hi]
    out["stable_not_worse"] = bool(hi >= 0)
    gap = per_query["StableSplitter"].mean() - per_query["SentenceSplitter"].mean()
    rows.append(["Stable - Sentence (paired)", f"{gap:+.3f}", f"[{lo:+.3f}, {hi:+.3f}]"])
    table = Table(f"Title-query Recall@10, all-MiniLM-L6-v2, {len(subset)} random sections (chunk-level)",
                  ["splitter", "Recall@10", "95% CI"], rows,
                  note="A query (a section's title) is correct when its section's best chunk ranks in the top 10.")
    return table, out
