"""``compare``: rank candidate models (and chunkings) on the user's own documents and queries.

Every embedding goes through an :class:`~embedpipe.EmbeddingPipeline` and its cache, so a
re-run embeds only what is new (one more model, say). The outputs are ``results.json``, a
Markdown report with a recommendation, and two plots (recall against cost, against dims).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from embedpipe.chunking import StableSplitter
from embedpipe.errors import ConfigurationError
from embedpipe.eval.metrics import bootstrap_ci, bootstrap_diff_ci, ndcg_at_k, recall_at_k, reciprocal_rank
from embedpipe.jobs.sources import Source, source_from
from embedpipe.late_chunking import late_vectors
from embedpipe.pipeline import EmbeddingPipeline

__all__ = ["CHUNKINGS", "EvalReport", "compare", "parse_candidate"]

#: "none": one vector per document; "naive"/"late": chunk vectors, a document scores its best chunk
CHUNKINGS = ("none", "naive", "late")
_METRICS = ("recall@1", "recall@5", "recall@10", "mrr", "ndcg@10")
_SPEC = re.compile(r"^(?P<model>.+?)(?:@(?P<dims>\d+))?$")


@dataclass
class EvalReport:
    """What :func:`compare` measured: ``results`` is the ``results.json`` document."""

    results: dict[str, Any]
    out: Path | None
    #: unique texts the providers embedded (plus late-chunked documents computed) in this run
    embedded: int = 0
    notes: list[str] = field(default_factory=list)

    @property
    def candidates(self) -> list[dict[str, Any]]:
        return list(self.results["candidates"])


def parse_candidate(spec: str) -> tuple[str, int | None]:
    """``"openai:text-embedding-3-small@256"`` -> ``("openai:text-embedding-3-small", 256)`` (Matryoshka dims)."""
    m = _SPEC.match(spec.strip())
    if not m or ":" not in m.group("model"):
        raise ConfigurationError(f"model {spec!r} is not 'provider:name' or 'provider:name@dims'")
    dims = m.group("dims")
    if dims is not None and int(dims) < 1:
        raise ConfigurationError(f"model {spec!r}: dimensions after '@' must be positive")
    return m.group("model"), int(dims) if dims else None


def _load_queries(path: str | os.PathLike[str], ids: set[str]) -> list[tuple[str, list[str]]]:
    out = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ConfigurationError(f"{path}:{n}: not JSON ({exc.msg})") from None
            query, relevant = row.get("query") if isinstance(row, dict) else None, \
                row.get("relevant") if isinstance(row, dict) else None
            if not isinstance(query, str) or not query.strip():
                raise ConfigurationError(f"{path}:{n}: needs a non-empty \"query\" string")
            if not isinstance(relevant, list) or not relevant:
                raise ConfigurationError(f"{path}:{n}: needs \"relevant\": a non-empty list of document ids")
            missing = [str(r) for r in relevant if str(r) not in ids]
            if missing:
                raise ConfigurationError(f"{path}:{n}: relevant ids not among the documents: {missing[:5]}")
            out.append((query, [str(r) for r in relevant]))
    if not out:
        raise ConfigurationError(f"{path} holds no queries")
    return out


def _first_sentence(text: str) -> str:
    line = text.strip().split("\n", 1)[0]
    return re.split(r"(?<=[.!?])\s", line, maxsplit=1)[0][:300]


def _title_queries(docs: list[tuple[str, str, dict[str, Any]]],
                   title_field: str) -> tuple[list[tuple[str, list[str]]], str]:
    queries, used_titles = [], 0
    for rid, text, meta in docs:
        title = meta.get(title_field)
        query = title.strip() if isinstance(title, str) and title.strip() else _first_sentence(text)
        used_titles += query == (title or "").strip()
        queries.append((query, [rid]))
    # A title shared by several documents cannot tell them apart: keep the query, all of them relevant.
    by_query: dict[str, list[str]] = {}
    for query, rel in queries:
        by_query.setdefault(query, []).extend(rel)
    built = list(by_query.items())
    how = (f"No queries were given: each document's {title_field!r} field ({used_titles} documents) or else its "
           f"first sentence served as a query for that document; {len(built)} distinct queries.")
    return built, how


def _percentiles(samples: Sequence[float]) -> dict[str, float | None]:
    if not samples:
        return {"p50_ms": None, "p99_ms": None, "n": 0}
    arr = np.asarray(samples) * 1000
    return {"p50_ms": float(np.percentile(arr, 50)), "p99_ms": float(np.percentile(arr, 99)), "n": len(samples)}


def _cost(pipe: EmbeddingPipeline, doc_texts: list[str], query_texts: list[str],
          corpus_size: int | None) -> dict[str, Any]:
    price = pipe.price_per_1m_tokens
    tokenizer = pipe.provider.tokenizer
    doc_tokens = sum(tokenizer.count(doc_texts)) if tokenizer is not None else None
    q_tokens = sum(tokenizer.count(query_texts)) if tokenizer is not None else None
    n = corpus_size or len(doc_texts)
    out: dict[str, Any] = {"price_per_1m_tokens": price, "corpus_documents": n}
    if doc_tokens is not None:
        out["corpus_tokens"] = round(doc_tokens * n / len(doc_texts))
    if price is None or doc_tokens is None or q_tokens is None:
        out.update(corpus_usd=None, per_1000_queries_usd=None)
    else:
        out["corpus_usd"] = doc_tokens * n / len(doc_texts) * price / 1e6
        out["per_1000_queries_usd"] = q_tokens / len(query_texts) * 1000 * price / 1e6
    return out


class _Corpus:
    """Documents, their chunk spans and the queries, shared by every candidate."""

    def __init__(self, docs: list[tuple[str, str, dict[str, Any]]], queries: list[tuple[str, list[str]]],
                 splitter: StableSplitter) -> None:
        self.ids = [d[0] for d in docs]
        self.texts = [d[1] for d in docs]
        self.index = {rid: i for i, rid in enumerate(self.ids)}
        self.queries = [q for q, _ in queries]
        self.relevant = [{self.index[r] for r in rel} for _, rel in queries]
        self.splitter = splitter
        self._spans: list[list[tuple[int, int]]] | None = None

    @property
    def spans(self) -> list[list[tuple[int, int]]]:
        if self._spans is None:
            self._spans = [self.splitter.split_spans(t) or [(0, len(t))] for t in self.texts]
        return self._spans


def _embed_documents(pipe: EmbeddingPipeline, corpus: _Corpus, chunking: str,
                     batch: int) -> tuple[np.ndarray, np.ndarray | None, list[float], int]:
    """Document (or chunk) vectors, the chunk -> document map, per-batch seconds and late documents computed."""
    timings: list[float] = []
    computed = 0
    if chunking == "none":
        parts = []
        for i in range(0, len(corpus.texts), batch):
            t0 = time.perf_counter()
            parts.append(np.asarray(pipe.embed_array(corpus.texts[i:i + batch])))
            timings.append(time.perf_counter() - t0)
        return np.concatenate(parts), None, timings, 0
    owners = np.repeat(np.arange(len(corpus.texts)), [len(s) for s in corpus.spans])
    if chunking == "naive":
        texts = [t[s:e] for t, spans in zip(corpus.texts, corpus.spans, strict=True) for s, e in spans]
        parts = []
        for i in range(0, len(texts), batch):
            t0 = time.perf_counter()
            parts.append(np.asarray(pipe.embed_array(texts[i:i + batch])))
            timings.append(time.perf_counter() - t0)
        return np.concatenate(parts), owners, timings, 0
    parts = []
    for text, spans in zip(corpus.texts, corpus.spans, strict=True):
        t0 = time.perf_counter()
        vectors, ran = late_vectors(pipe, text, spans)
        parts.append(vectors)
        computed += ran
        timings.append(time.perf_counter() - t0)
    return np.concatenate(parts), owners, timings, computed


def _per_query(scores: np.ndarray, relevant: list[set[int]]) -> dict[str, np.ndarray]:
    rows: dict[str, list[float]] = {m: [] for m in _METRICS}
    for s, rel in zip(scores, relevant, strict=True):
        rows["recall@1"].append(recall_at_k(s, rel, 1))
        rows["recall@5"].append(recall_at_k(s, rel, 5))
        rows["recall@10"].append(recall_at_k(s, rel, 10))
        rows["mrr"].append(reciprocal_rank(s, rel))
        rows["ndcg@10"].append(ndcg_at_k(s, rel, 10))
    return {m: np.asarray(v) for m, v in rows.items()}


def _doc_scores(queries: np.ndarray, vectors: np.ndarray, owners: np.ndarray | None, n_docs: int) -> np.ndarray:
    scores: np.ndarray = queries @ vectors.T
    if owners is None:
        return scores
    # A document scores its best chunk; chunks are stored document by document.
    starts = np.flatnonzero(np.r_[True, owners[1:] != owners[:-1]])
    best: np.ndarray = np.maximum.reduceat(scores, starts, axis=1)
    return best


def compare(docs: str | os.PathLike[str] | Source | Iterable[Mapping[str, Any]], *,
            models: Sequence[str], queries: str | os.PathLike[str] | None = None,
            cache: str | None = "sqlite:///embedpipe-eval-cache.db", out: str | os.PathLike[str] | None = None,
            chunking: Sequence[str] = ("none",), split_tokens: int = 128, corpus_size: int | None = None,
            limit: int | None = None, title_field: str = "title", id_field: str = "id", text_field: str = "text",
            batch_size: int = 64, latency_queries: int = 50, resamples: int = 2000, seed: int = 0) -> EvalReport:
    """Evaluate each model spec (``provider:name[@dims]``) crossed with each ``chunking`` on ``docs``.

    ``queries`` is JSONL of ``{"query": ..., "relevant": [ids]}``; without it each
    document's ``title_field`` (else its first sentence) is a query for that document, and
    the report says so. ``corpus_size`` projects the cost to a corpus of that many
    documents (default: the source's size). Writes ``results.json``, ``report.md`` and plots
    to ``out`` when given.
    """
    if not models:
        raise ConfigurationError("give at least one model spec, e.g. local:all-MiniLM-L6-v2")
    specs = [parse_candidate(m) for m in models]
    for c in chunking:
        if c not in CHUNKINGS:
            raise ConfigurationError(f"chunking {c!r}: use one of {', '.join(CHUNKINGS)}")
    source = source_from(docs, id_field=id_field, text_field=text_field)
    rows = []
    for record in source:
        if record.text.strip():
            rows.append((record.id, record.text, dict(record.metadata)))
        if limit is not None and len(rows) >= limit:
            break
    if not rows:
        raise ConfigurationError(f"{source!r} holds no documents with text")
    if len({r[0] for r in rows}) != len(rows):
        raise ConfigurationError("document ids repeat; each document needs its own id")
    notes: list[str] = []
    if queries is not None:
        query_rows = _load_queries(queries, {r[0] for r in rows})
    else:
        query_rows, how = _title_queries(rows, title_field)
        notes.append(how)
    corpus = _Corpus(rows, query_rows, StableSplitter(split_tokens))
    out_dir = Path(out) if out is not None else None
    previous = _previous(out_dir)
    candidates: list[dict[str, Any]] = []
    per_query: dict[str, dict[str, np.ndarray]] = {}
    embedded_total = 0
    for spec, dims in specs:
        for mode in chunking:
            pipe = EmbeddingPipeline(spec, dimensions=dims, cache=cache)
            try:
                before = pipe.stats.embedded
                vectors, owners, batch_times, late_done = _embed_documents(pipe, corpus, mode, batch_size)
                q_single: list[float] = []
                # When the model ran for the documents, single queries are timed past the cache (same
                # provider, no cache): a candidate whose queries an earlier candidate embedded (the same
                # model, another chunking) would otherwise time cache hits. A fully cached candidate
                # sends nothing and keeps an earlier run's timings (below).
                ran = pipe.stats.embedded - before + late_done > 0
                with EmbeddingPipeline(pipe.provider, dimensions=dims, cache="none") if ran else \
                        contextlib.nullcontext(pipe) as timed:
                    for q in corpus.queries[:latency_queries]:
                        t0 = time.perf_counter()
                        timed.embed_query(q)
                        q_single.append(time.perf_counter() - t0)
                qv = np.asarray(pipe.embed_array(corpus.queries, role="query"))
                embedded = pipe.stats.embedded - before + late_done
                scores = _doc_scores(qv, vectors, owners, len(corpus.texts))
                values = _per_query(scores, corpus.relevant)
                d = int(vectors.shape[1])
                name = f"{spec}@{dims}" if dims else spec
                key = f"{name} / {mode}"
                latency = {"per_batch": _percentiles(batch_times), "per_query": _percentiles(q_single),
                           "batch": batch_size if mode != "late" else "one document", "measured": embedded > 0}
                if embedded == 0 and key in previous:
                    # Everything came from the cache, so this run timed cache hits; keep the model's timings.
                    latency = {**previous[key], "measured": False, "from_previous_run": True}
                cand = {"model": name, "dimensions": d, "chunking": mode,
                        **{m: float(v.mean()) for m, v in values.items()},
                        "ci95": {m: list(bootstrap_ci(v, resamples=resamples, seed=seed)) for m, v in values.items()},
                        "latency": latency,
                        "bytes_per_vector": {"float32": 4 * d, "float16": 2 * d, "int8": d},
                        "vectors": int(vectors.shape[0]),
                        "cost": _cost(pipe, corpus.texts, corpus.queries, corpus_size or source.count()),
                        "embedded": embedded}
                candidates.append(cand)
                per_query[key] = values
                embedded_total += embedded
            finally:
                pipe.close()
    _flag_ties(candidates, per_query, resamples, seed)
    results = {"candidates": candidates,
               "queries": {"count": len(corpus.queries), "source": str(queries) if queries else "titles",
                           "documents": len(corpus.texts), "built_from_documents": queries is None,
                           "note": notes[0] if notes else ""}}
    report = EvalReport(results, out_dir, embedded_total, notes)
    if out_dir is not None:
        from embedpipe.eval.report import write_report

        write_report(report)
    return report


def _key(c: Mapping[str, Any]) -> str:
    return f"{c['model']} / {c['chunking']}"


def _previous(out_dir: Path | None) -> dict[str, Any]:
    """Latency figures of an earlier run into ``out_dir``, by candidate, to carry over fully cached candidates."""
    if out_dir is None or not (out_dir / "results.json").is_file():
        return {}
    try:
        data = json.loads((out_dir / "results.json").read_text(encoding="utf-8"))
        return {_key(c): c["latency"] for c in data["candidates"] if c.get("latency", {}).get("measured", False)
                or c.get("latency", {}).get("from_previous_run", False)}
    except (ValueError, KeyError, TypeError):
        return {}


def _flag_ties(candidates: list[dict[str, Any]], per_query: dict[str, dict[str, np.ndarray]], resamples: int,
               seed: int) -> None:
    """Mark each candidate against the best by Recall@10: the paired difference's 95% interval, tied or not."""
    if not candidates:
        return
    best = max(candidates, key=lambda c: (c["recall@10"], c["ndcg@10"]))
    for c in candidates:
        if c is best:
            c["vs_best"] = {"best": True}
            continue
        low, high = bootstrap_diff_ci(per_query[_key(c)]["recall@10"], per_query[_key(best)]["recall@10"],
                                      resamples=resamples, seed=seed)
        c["vs_best"] = {"best": False, "recall@10_diff": c["recall@10"] - best["recall@10"],
                        "diff_ci95": [low, high], "tie": bool(low <= 0 <= high)}
