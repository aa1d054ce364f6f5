"""The corpus: the Python 3.11 documentation sections, read where the repository's checkout keeps them.

``../shared/data/pydocs-sections.jsonl.gz`` relative to the repository root (4,362 sections
with id, source, title, text). It is never copied into the repository. Synthetic records
are made only where a scenario needs more records than the corpus has (the jobs CLI's
memory benchmark).
"""

from __future__ import annotations

import functools
import gzip
import json
import random
from dataclasses import dataclass
from pathlib import Path

from benchmarks.scenario import Unavailable

#: the longest input OpenAI's embedding models accept, in cl100k tokens
MAX_INPUT_TOKENS = 8191


@dataclass(frozen=True)
class Section:
    """One documentation section."""

    id: str
    source: str
    title: str
    text: str


def corpus_path(repo: Path) -> Path:
    """Where the corpus lives: ``../shared/data/pydocs-sections.jsonl.gz`` from the repository root."""
    return (repo / ".." / "shared" / "data" / "pydocs-sections.jsonl.gz").resolve()


@functools.cache
def sections(repo: Path) -> tuple[Section, ...]:
    """Every section, in file order."""
    path = corpus_path(repo)
    if not path.is_file():
        raise Unavailable(f"the corpus is not at {path}")
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return tuple(Section(r["id"], r["source"], r["title"], r["text"]) for r in map(json.loads, f))


@functools.cache
def encoding():  # type: ignore[no-untyped-def]
    """cl100k_base, built offline by embedpipe."""
    from embedpipe.tokens import get_encoding

    return get_encoding("cl100k_base")


def count_tokens(texts: list[str] | tuple[str, ...]) -> list[int]:
    """cl100k token count of each text."""
    return [len(ids) for ids in encoding().encode_ordinary_batch(list(texts))]


@functools.cache
def section_tokens(repo: Path, first: int | None = None) -> tuple[int, ...]:
    """cl100k token count of each section, or of the ``first`` ones (what OpenAI would bill for them)."""
    return tuple(count_tokens([s.text for s in sections(repo)[:first]]))


def within_limit(repo: Path, first: int | None = None) -> list[tuple[Section, int]]:
    """Sections (of the ``first`` ones) that fit one OpenAI input (<= 8,191 tokens), with their token counts."""
    chosen = sections(repo)[:first]
    return [(s, n) for s, n in zip(chosen, section_tokens(repo, first), strict=True) if n <= MAX_INPUT_TOKENS]


@functools.cache
def paragraphs(repo: Path, n: int) -> tuple[str, ...]:
    """``n`` distinct paragraphs (at least 40 characters) of the corpus, in file order: RAG-sized chunks."""
    seen: dict[str, None] = {}
    for section in sections(repo):
        for part in section.text.split("\n\n"):
            part = part.strip()
            if len(part) >= 40:
                seen.setdefault(part, None)
                if len(seen) == n:
                    return tuple(seen)
    raise Unavailable(f"the corpus has only {len(seen)} distinct paragraphs, {n} were asked for")


def write_synthetic_records(path: Path, n: int, seed: int = 0) -> Path:
    """Write ``n`` synthetic JSONL records ``{"id", "text"}`` (distinct texts of 20-60 words) to ``path``."""
    rng = random.Random(seed)
    words = ["embedding", "cache", "batch", "token", "limit", "retry", "vector", "query", "document", "section",
             "python", "module", "function", "class", "method", "return", "value", "error", "window", "request",
             "server", "model", "index", "store"]
    with path.open("w", encoding="utf-8") as f:
        for i in range(n):
            body = " ".join(rng.choices(words, k=rng.randint(20, 60)))
            f.write(json.dumps({"id": f"rec-{i}", "text": f"record {i}: {body}"}) + "\n")
    return path
