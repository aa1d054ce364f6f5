"""Edit-stable chunking: content-defined cuts at sentence ends, so an edit moves only the cuts next to it.

Fixed-size splitters (LlamaIndex's ``SentenceSplitter``, LangChain's
``RecursiveCharacterTextSplitter``) pack text from the start of the document, so one
inserted word shifts every later boundary and a re-index re-embeds most of the document.
:class:`StableSplitter` picks each cut from the content around it instead, as backup tools
do (FastCDC, restic), with sentences and paragraphs as the candidate cut points and sizes
counted in tokens.

How a cut is chosen
    The text is cut into *pieces*: sentences, and paragraphs where a blank line ends them.
    Each piece end is a candidate cut with a 64-bit hash of the piece's own text. A
    candidate becomes a cut when its hash is the smallest of all candidates within
    ``radius`` tokens on either side (a local minimum, the "local extremum" family of
    content-defined chunking; AE, Zhang et al. 2015). Whether a candidate cuts therefore
    depends only on the text within ``radius`` tokens of it, never on where the current
    chunk began: an edit can change cuts within ``radius`` of itself and nowhere else.

    FastCDC's two-mask rule decides a cut from the hash *and* the bytes since the last
    cut; at sentence granularity (a few candidates per chunk) that position dependence
    makes a shifted cut drag the next ones along for several chunks. The local minimum
    keeps the normalising effect (two cuts are never closer than ``radius``, which is at
    least ``min_size``, and rarely much further apart than ``2 * radius``) without it.

Sizes
    A chunk's size is the sum of its pieces' token counts (each piece counted alone, with
    the whitespace before it; this can exceed the chunk's count as one text by a token per
    piece, never by less). Every chunk holds at most ``max_size`` tokens. Every chunk holds
    at least ``min_size`` tokens, except:

    * the whole text, when it is shorter than ``2 * min_size`` tokens and so cannot be
      cut in two (a short text is one chunk, however small);
    * a chunk next to a sentence so long that the two cannot share a chunk under
      ``max_size``, when no cut further from it exists.

    A sentence longer than ``max_size`` tokens is cut into pieces of at most ``max_size``
    tokens: at line ends first, then between words, then between tokens.
"""

from __future__ import annotations

import hashlib
import itertools
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from embedpipe.errors import ConfigurationError
from embedpipe.tokens import TiktokenTokenizer

__all__ = ["Chunk", "StableSplitter", "TokenCounter"]


@dataclass(frozen=True)
class Chunk:
    """One chunk: its text, its ``(start, end)`` character span in the source, and its size in tokens."""

    text: str
    start: int
    end: int
    #: the splitter's measure: the sum of the chunk's pieces, each counted alone
    tokens: int


@runtime_checkable
class TokenCounter(Protocol):
    """Anything that counts tokens of many texts at once (every embedpipe tokenizer does)."""

    def count(self, texts: Sequence[str]) -> list[int]: ...


# A piece ends after sentence punctuation (and any closing quotes/brackets) when
# whitespace follows, and at a blank line. The whitespace itself starts the next piece:
# BPE tokenisers attach a leading space to the word after it, so counting " Next"
# alone gives the same tokens as inside the text.
_PIECE_END = re.compile(r"""(?<=[.!?])['")\]]*(?=\s)|(?=\n[ \t]*\n)""")
_LINE_END = re.compile(r"(?=\n)")
_WORD_START = re.compile(r"(?=\s+\S)")


def _hash(piece: str) -> int:
    # Whitespace around a piece is not content: re-wrapping a paragraph keeps its cuts.
    digest = hashlib.blake2b(" ".join(piece.split()).encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "big")


class StableSplitter:
    """Split text into chunks of about ``chunk_size`` tokens whose boundaries survive edits.

    >>> splitter = StableSplitter(chunk_size=64)
    >>> chunks = splitter.split_text(text)          # doctest: +SKIP
    >>> "".join(chunks) != text                      # chunks are stripped substrings

    ``min_size`` and ``max_size`` default to half and twice ``chunk_size``. Token counts
    come from the bundled cl100k_base ranks (offline) unless ``tokenizer`` is given:
    anything with ``count(texts) -> list[int]`` (every embedpipe tokenizer, a wrapper around
    a Hugging Face tokenizer) or a callable ``str -> int``.
    See :mod:`embedpipe.chunking.stable` for what is guaranteed.
    """

    def __init__(self, chunk_size: int = 256, min_size: int | None = None, max_size: int | None = None,
                 tokenizer: TokenCounter | Callable[[str], int] | None = None) -> None:
        if not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 2:
            raise ConfigurationError(f"chunk_size must be an integer of at least 2 tokens, got {chunk_size!r}")
        min_size = chunk_size // 2 if min_size is None else min_size
        max_size = 2 * chunk_size if max_size is None else max_size
        for name, value in (("min_size", min_size), ("max_size", max_size)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigurationError(f"{name} must be a positive integer of tokens, got {value!r}")
        if not min_size <= chunk_size <= max_size:
            raise ConfigurationError(
                f"sizes must satisfy min_size <= chunk_size <= max_size, got {min_size} <= {chunk_size} <= {max_size}")
        if max_size < 2 * min_size:
            # Splitting a gap longer than max_size must leave two parts of at least min_size.
            raise ConfigurationError(f"max_size ({max_size}) must be at least twice min_size ({min_size})")
        self.chunk_size = chunk_size
        self.min_size = min_size
        self.max_size = max_size
        # Cuts closer than `radius` never happen (so radius >= min_size gives the minimum),
        # and the spacing of local minima averages about 2 * radius candidates' worth.
        self.radius = max(min_size, chunk_size // 2)
        self._count = _counter(tokenizer)
        self._tiktoken = tokenizer if isinstance(tokenizer, TiktokenTokenizer) else (
            TiktokenTokenizer.for_encoding("cl100k_base") if tokenizer is None else None)

    def __repr__(self) -> str:
        return (f"StableSplitter(chunk_size={self.chunk_size}, min_size={self.min_size}, "
                f"max_size={self.max_size})")

    # -- public API --------------------------------------------------------------------------
    def split_text(self, text: str) -> list[str]:
        """The chunks of ``text``, in order; each is a substring of ``text`` without surrounding whitespace."""
        return [c.text for c in self.split_chunks(text)]

    def split_spans(self, text: str) -> list[tuple[int, int]]:
        """``(start, end)`` character spans of the chunks of ``text`` (whitespace between them excluded)."""
        return [(c.start, c.end) for c in self.split_chunks(text)]

    def split_chunks(self, text: str) -> list[Chunk]:
        """The chunks of ``text`` with their spans and token sizes."""
        if not isinstance(text, str):
            raise TypeError(f"StableSplitter splits a str, got {type(text).__name__}")
        if not text.strip():
            return []
        starts, sizes, hashes = self._pieces(text)
        bounds = [0, *self._cuts(sizes, hashes), len(starts)]
        chunks = []
        for a, b in itertools.pairwise(bounds):
            start = starts[a]
            end = starts[b] if b < len(starts) else len(text)
            raw = text[start:end]
            stripped = raw.strip()
            if stripped:
                lead = len(raw) - len(raw.lstrip())
                chunks.append(Chunk(stripped, start + lead, start + lead + len(stripped), sum(sizes[a:b])))
        return chunks

    def count_tokens(self, text: str) -> int:
        """Tokens in ``text`` by this splitter's tokenizer."""
        return self._count([text])[0]

    # -- pieces ------------------------------------------------------------------------------
    def _pieces(self, text: str) -> tuple[list[int], list[int], list[int]]:
        """Start offset, token size and hash of each piece; pieces cover ``text`` in order."""
        starts = _merge_blank(text, _split_points(_PIECE_END, text, 0, len(text)), len(text))
        ends = [*starts[1:], len(text)]
        sizes = self._count([text[s:e] for s, e in zip(starts, ends, strict=True)])
        out_starts: list[int] = []
        out_sizes: list[int] = []
        for s, e, n in zip(starts, ends, sizes, strict=True):
            if n <= self.max_size:
                out_starts.append(s)
                out_sizes.append(n)
            else:
                for sub_s, sub_n in self._cut_oversize(text, s, e):
                    out_starts.append(sub_s)
                    out_sizes.append(sub_n)
        ends = [*out_starts[1:], len(text)]
        hashes = [_hash(text[s:e]) for s, e in zip(out_starts, ends, strict=True)]
        return out_starts, out_sizes, hashes

    def _cut_oversize(self, text: str, start: int, end: int) -> list[tuple[int, int]]:
        """Cut ``text[start:end]`` (over ``max_size`` tokens) into pieces of at most ``max_size`` tokens.

        Lines become pieces of their own, then words of a line still too long, then token
        windows of a word still too long. The pieces are candidates like sentences, so cuts
        inside a long code block or run-on sentence are content-defined too.
        """
        return self._finer(text, start, end, (_LINE_END, _WORD_START))

    def _finer(self, text: str, start: int, end: int, patterns: tuple[re.Pattern[str], ...]) -> list[tuple[int, int]]:
        if not patterns:
            return self._token_cut(text, start, end)
        points = _merge_blank(text, _split_points(patterns[0], text, start, end), end)
        if len(points) < 2:
            return self._finer(text, start, end, patterns[1:])
        ends = [*points[1:], end]
        sizes = self._count([text[s:e] for s, e in zip(points, ends, strict=True)])
        out: list[tuple[int, int]] = []
        for s, e, n in zip(points, ends, sizes, strict=True):
            out.extend([(s, n)] if n <= self.max_size else self._finer(text, s, e, patterns[1:]))
        return out

    def _token_cut(self, text: str, start: int, end: int) -> list[tuple[int, int]]:
        """Cut a single over-long word into windows of at most ``max_size`` tokens."""
        if self._tiktoken is not None:
            out, pos = [], start
            for window, n in self._tiktoken.split(text[start:end], self.max_size):
                out.append((pos, n))
                pos += len(window)
            return out
        # A foreign tokenizer can only count: find each window's end by bisecting characters.
        out, pos = [], start
        while pos < end:
            lo, hi = pos + 1, end
            while lo < hi:
                mid = (lo + hi + 1) // 2
                if self._count([text[pos:mid]])[0] <= self.max_size:
                    lo = mid
                else:
                    hi = mid - 1
            out.append((pos, self._count([text[pos:lo]])[0]))
            pos = lo
        return out

    # -- cuts --------------------------------------------------------------------------------
    def _cuts(self, sizes: list[int], hashes: list[int]) -> list[int]:
        """Indices of the pieces that start a new chunk (never 0)."""
        n = len(sizes)
        if n < 2:
            return []
        # ends[i]: token position of the candidate cut after piece i
        ends = []
        total = 0
        for size in sizes:
            total += size
            ends.append(total)
        r = self.radius
        natural = []
        lo = 0
        for i in range(n - 1):
            pos = ends[i]
            if pos < self.min_size or total - pos < self.min_size:
                continue
            while ends[lo] < pos - r:
                lo += 1
            key = (hashes[i], i)
            j = lo
            is_min = True
            while j < n - 1 and ends[j] <= pos + r:
                if j != i and (hashes[j], j) < key:
                    is_min = False
                    break
                j += 1
            if is_min:
                natural.append(i + 1)
        cuts: list[int] = []
        bounds = [0, *natural, n]
        for a, b in itertools.pairwise(bounds):
            self._split_gap(a, b, ends, hashes, cuts)
            if b < n:
                cuts.append(b)
        return cuts

    def _split_gap(self, a: int, b: int, ends: list[int], hashes: list[int], cuts: list[int]) -> None:
        """Append cuts inside pieces ``a..b-1`` until no chunk there exceeds ``max_size``.

        The cut is the smallest hash among candidates that leave ``min_size`` on both
        sides, so it too depends on content, and an edit elsewhere in a long gap keeps it.
        """
        base = ends[a - 1] if a else 0
        size = ends[b - 1] - base
        if size <= self.max_size or b - a < 2:
            return
        inner = range(a, b - 1)  # candidate after piece i starts piece i + 1
        valid = [i for i in inner if ends[i] - base >= self.min_size and ends[b - 1] - ends[i] >= self.min_size]
        if valid:
            pick = min(valid, key=lambda i: (hashes[i], i))
        else:
            # Long pieces leave no cut with min_size on both sides: take the most even cut,
            # so a short run next to a long piece stays one chunk instead of crumbling.
            pick = max(inner, key=lambda i: (min(ends[i] - base, ends[b - 1] - ends[i]), -hashes[i]))
        self._split_gap(a, pick + 1, ends, hashes, cuts)
        cuts.append(pick + 1)
        self._split_gap(pick + 1, b, ends, hashes, cuts)


def _split_points(pattern: re.Pattern[str], text: str, start: int, end: int) -> list[int]:
    """``start`` plus every zero-width match of ``pattern`` strictly inside ``text[start:end]``."""
    points = [start]
    for m in pattern.finditer(text, start, end):
        pos = m.end()
        if start < pos < end and pos != points[-1]:
            points.append(pos)
    return points


def _merge_blank(text: str, points: list[int], end: int) -> list[int]:
    """Drop split points so that no piece is blank: a blank piece joins the next one (the last, the one before)."""
    kept = [points[0]]
    for pos in points[1:]:
        if text[kept[-1]:pos].strip():
            kept.append(pos)
    if len(kept) > 1 and not text[kept[-1]:end].strip():
        kept.pop()
    return kept


def _counter(tokenizer: Any) -> Callable[[Sequence[str]], list[int]]:
    if tokenizer is None:
        tokenizer = TiktokenTokenizer.for_encoding("cl100k_base")
    if isinstance(tokenizer, TokenCounter):
        counter: TokenCounter = tokenizer

        def count(texts: Sequence[str]) -> list[int]:
            return list(counter.count(texts))

        return count
    if callable(tokenizer):
        fn: Callable[[str], int] = tokenizer

        def count_each(texts: Sequence[str]) -> list[int]:
            return [int(fn(t)) for t in texts]

        return count_each
    raise ConfigurationError(
        f"tokenizer must have count(texts) -> list[int] or be a callable str -> int, got {type(tokenizer).__name__}")

