"""The pure steps of a call: validate and dedupe, cut pieces, plan requests, combine windows, assemble.

None of these does I/O or touches shared state: each works on one :class:`Call` and the
settings it is handed, so the sync and async drivers, ``estimate`` and the job runner all
share them.
"""

from __future__ import annotations

import collections
import functools
import inspect
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from embedpipe import codec
from embedpipe.errors import Failure, InputTypeError, InvalidInputError
from embedpipe.inputs import TEXT, Item
from embedpipe.providers.base import Role, Tokenizer
from embedpipe.stats import Stats

OnLongInput = Literal["split", "truncate", "error"]
Errors = Literal["raise", "collect"]


@dataclass(slots=True)
class Piece:
    """One input to send: a whole text or item, or one window of a long text."""

    owner: int          # index into Call.unique
    text: Any           # str, or an Item
    tokens: int
    window: int = 0


@dataclass
class Call:
    """The state of one embed call."""

    id: int
    n: int
    role: Role
    errors: Errors
    stats: Stats
    failures: dict[int, Failure]            # input index -> why it is invalid
    unique: list[Any]                       # distinct valid inputs (str or Item)
    where: list[int]                        # input index -> unique index (-1 when invalid)
    keys: list[str] | None = None
    vectors: list[np.ndarray | None] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)    # per unique input, once known
    hit_block: np.ndarray | None = None     # the decoded cache hits, one row per hit
    hit_rows: dict[int, int] = field(default_factory=dict)  # unique index -> row of hit_block
    unique_failures: dict[int, Failure] = field(default_factory=dict)
    budget_exceeded: bool = False
    has_items: bool = False
    #: the engine's completion count when this call read the cache (single-flight re-reads if it moved)
    read_epoch: int = 0


def _show(idx: list[int]) -> str:
    return f"{idx[:20]}{' ...' if len(idx) > 20 else ''}"


def _surrogate_at(text: str) -> int:
    return next(i for i, ch in enumerate(text) if 0xD800 <= ord(ch) <= 0xDFFF)


def prepare(inputs: Sequence[Any], role: Role, errors: Errors, *, call_id: int, stats: Stats,
            modalities: frozenset[str], spec: str, content_keys: Mapping[int, bytes | str] | None = None) -> Call:
    """Validate ``inputs`` (before any spend) and dedupe them into the call's unique list.

    Invalid inputs (not str/Item, empty, not encodable as UTF-8, a kind the provider does not
    embed, an item whose content cannot be read) raise with every offending index when
    ``errors="raise"``; with ``"collect"`` they become ``invalid_input`` failures and the rest
    goes on. ``content_keys``: the items' keys computed beforehand (in worker threads, see
    :func:`item_content_keys`), by input index; a ``str`` there is why that item is unreadable.
    """
    if isinstance(inputs, (str, bytes)):
        raise InputTypeError(f"texts must be a list of str, not a single {type(inputs).__name__}; "
                             "wrap it in a list or use embed_query")
    inputs = list(inputs)
    index: dict[Any, int] = {}
    firsts: list[Any] = []                  # the first input of each distinct key
    where = [-1] * len(inputs)
    bad_type: list[int] = []
    empty: list[int] = []
    not_utf8: list[int] = []
    wrong_kind: list[int] = []
    unreadable: dict[int, str] = {}
    has_items = False
    for i, t in enumerate(inputs):
        if isinstance(t, str):
            if not t.strip():
                empty.append(i)
                continue
            if not t.isascii():
                try:
                    t.encode("utf-8")
                except UnicodeEncodeError:  # a lone surrogate: no provider could read it
                    not_utf8.append(i)
                    continue
            key: Any = t
        elif isinstance(t, Item):
            kind = t.kind
            if not isinstance(kind, str) or kind not in modalities or kind == TEXT:
                wrong_kind.append(i)
                continue
            content = content_keys.get(i) if content_keys is not None else None
            if content is None:
                content = content_key_or_why(t)
            if isinstance(content, str):
                unreadable[i] = content
                continue
            has_items = True
            key = ("\x00item", kind, content)
        else:
            bad_type.append(i)
            continue
        u = index.get(key)
        if u is None:
            u = index[key] = len(firsts)
            firsts.append(t)
        where[i] = u
    failures: dict[int, Failure] = {}
    if bad_type or empty or not_utf8 or wrong_kind or unreadable:
        if errors == "raise":
            _raise_invalid(inputs, bad_type, empty, not_utf8, wrong_kind, modalities, spec, unreadable)
        for i in bad_type:
            failures[i] = Failure("invalid_input", message=f"input is {type(inputs[i]).__name__}, not str")
        for i in empty:
            failures[i] = Failure("invalid_input", message="input is empty or whitespace only")
        for i in not_utf8:
            failures[i] = Failure("invalid_input", message=(
                f"input is not valid UTF-8 text (a lone surrogate at character {_surrogate_at(inputs[i])})"))
        for i in wrong_kind:
            failures[i] = Failure("invalid_input", message=_kind_message(inputs[i], modalities, spec))
        for i, why in unreadable.items():
            failures[i] = Failure("invalid_input", message=why)
    unique = firsts
    stats.add(deduped=len(inputs) - len(failures) - len(unique))
    return Call(call_id, len(inputs), role, errors, stats, failures, unique, where,
                vectors=[None] * len(unique), tokens=[0] * len(unique), has_items=has_items)


def _kind_message(item: Any, modalities: frozenset[str], spec: str) -> str:
    kind = getattr(item, "kind", None)
    return f"input is of kind {kind!r}, which {spec} cannot embed (it embeds {sorted(modalities)})"


def content_key_or_why(item: Item) -> bytes | str:
    """``item.content_key()``, or the message of the :class:`InvalidInputError` that says why it has none."""
    try:
        return item.content_key()
    except InvalidInputError as exc:
        return str(exc)


def _raise_invalid(inputs: list[Any], bad_type: list[int], empty: list[int], not_utf8: list[int],
                   wrong_kind: list[int], modalities: frozenset[str], spec: str,
                   unreadable: Mapping[int, str]) -> None:
    if bad_type:
        kinds = sorted({type(inputs[i]).__name__ for i in bad_type})
        others = sorted(empty + not_utf8 + wrong_kind + list(unreadable))
        extra = f"; inputs at {_show(others)} are invalid too" if others else ""
        raise InputTypeError(
            f"{len(bad_type)} input(s) are not str ({', '.join(kinds)}) at indices {_show(bad_type)}{extra}; "
            "nothing was embedded", bad_type)
    parts = []
    if empty:
        parts.append(f"{len(empty)} input(s) are empty or whitespace only at indices {_show(empty)}")
    if not_utf8:
        parts.append(f"{len(not_utf8)} input(s) are not valid UTF-8 (lone surrogates) at indices {_show(not_utf8)}")
    if wrong_kind:
        kinds = sorted({str(getattr(inputs[i], "kind", None)) for i in wrong_kind})
        parts.append(f"{len(wrong_kind)} input(s) are of kind {', '.join(kinds)}, which {spec} cannot embed "
                     f"(it embeds {sorted(modalities)}), at indices {_show(wrong_kind)}")
    if unreadable:
        shown = "; ".join(f"input {i}: {why}" for i, why in list(unreadable.items())[:5])
        more = f" (and {len(unreadable) - 5} more)" if len(unreadable) > 5 else ""
        parts.append(f"{len(unreadable)} input(s) cannot be read at indices {_show(sorted(unreadable))}: "
                     f"{shown}{more}")
    raise InvalidInputError("; ".join(parts) + "; nothing was embedded",
                            sorted(empty + not_utf8 + wrong_kind + list(unreadable)))


def apply_hits(call: Call, values: Sequence[bytes | None], expected_dims: int | None,
               fmt: codec.ValueFormat = codec.FLOAT32) -> tuple[list[int], int, int]:
    """Decode cache values (stored in ``fmt``) into ``call``; return the unique indices still to embed,
    the number of corrupt values, and the tokens the hits stand for."""
    present = [u for u, v in enumerate(values) if v is not None]
    corrupt: list[int] = []
    if present:
        decoded, bad = fmt.decode_many([values[u] for u in present], expected_dims)  # type: ignore[misc]
        call.hit_block = decoded.vectors
        for row, (pos, tok) in enumerate(zip(decoded.positions, decoded.tokens, strict=True)):
            u = present[pos]
            call.vectors[u] = decoded.vectors[row]
            call.tokens[u] = tok
            call.hit_rows[u] = row
        corrupt = [present[p] for p in bad]
    hit_tokens = sum(call.tokens[u] for u in call.hit_rows)
    misses = [u for u in range(len(call.unique)) if call.vectors[u] is None]
    return misses, len(corrupt), hit_tokens


@dataclass
class Cut:
    """What :func:`cut_pieces` made of some misses."""

    pieces: list[Piece]
    too_long: list[int]
    split: int = 0
    truncated: int = 0


def cut_pieces(call: Call, misses: list[int], tokenizer: Tokenizer, limit: int | None,
               on_long_input: OnLongInput, item_tokens: Callable[[Any], int] | None = None) -> Cut:
    """Count tokens and apply ``on_long_input``: texts over ``limit`` become windows or are cut.

    Items (images, audio) are one piece each, weighing what ``item_tokens`` says (an image's
    patches for a vision model: batches are then planned by pixels as texts are by tokens), 0 without it.
    """
    cut = Cut([], [])
    if not misses:
        return cut
    texts = [u for u in misses if isinstance(call.unique[u], str)]
    batch = [call.unique[u] for u in texts]
    if limit is not None and on_long_input != "split" and takes_cap(tokenizer):
        # Only "over the limit?" matters: a text need not be counted past it.
        raw = tokenizer.count(batch, cap=limit)  # type: ignore[call-arg]
    else:
        raw = tokenizer.count(batch)
    counts = dict(zip(texts, raw, strict=True))
    for u in misses:
        text = call.unique[u]
        n = counts.get(u)
        if n is None:
            weight = item_tokens(text) if item_tokens is not None else 0
            call.tokens[u] = weight
            cut.pieces.append(Piece(u, text, weight))
            continue
        call.tokens[u] = n
        if limit is None or n <= limit:
            cut.pieces.append(Piece(u, text, n))
        elif on_long_input == "split":
            windows = tokenizer.split(text, limit)
            cut.split += 1
            cut.pieces.extend(Piece(u, w, wn, k) for k, (w, wn) in enumerate(windows))
        elif on_long_input == "truncate":
            short, sn = tokenizer.truncate(text, limit)
            call.tokens[u] = sn
            cut.truncated += 1
            cut.pieces.append(Piece(u, short, sn))
        else:
            cut.too_long.append(u)
    return cut


@functools.lru_cache(maxsize=64)
def _count_takes_cap(kind: type) -> bool:
    try:
        return "cap" in inspect.signature(kind.count).parameters  # type: ignore[attr-defined]
    except (TypeError, ValueError, AttributeError):
        return False


def takes_cap(tokenizer: Tokenizer) -> bool:
    """Whether ``tokenizer.count`` accepts ``cap=`` (see :class:`~embedpipe.providers.base.Tokenizer`)."""
    return _count_takes_cap(type(tokenizer))


def plan_batches(pieces: list[Piece], batch_size: int, max_tokens: int | None) -> list[list[Piece]]:
    """Pack pieces into requests of at most ``batch_size`` inputs and ``max_tokens`` tokens,
    shortest first (similar lengths pad less)."""
    pieces = sorted(pieces, key=lambda p: p.tokens)
    batches: list[list[Piece]] = []
    cur: list[Piece] = []
    cur_tokens = 0
    for p in pieces:
        if cur and (len(cur) >= batch_size or (max_tokens is not None and cur_tokens + p.tokens > max_tokens)):
            batches.append(cur)
            cur, cur_tokens = [], 0
        cur.append(p)
        cur_tokens += p.tokens
    if cur:
        batches.append(cur)
    return batches


def take(pending: collections.deque[Piece], batch_size: int, max_tokens: int | None) -> tuple[list[Piece], int]:
    """Pop the next request off ``pending``: at most ``batch_size`` pieces and ``max_tokens`` tokens
    (one piece always), and its tokens."""
    batch = [pending.popleft()]
    tokens = batch[0].tokens
    while pending and len(batch) < batch_size and (max_tokens is None or tokens + pending[0].tokens <= max_tokens):
        p = pending.popleft()
        batch.append(p)
        tokens += p.tokens
    return batch, tokens


def combine(parts: list[tuple[int, np.ndarray | None]]) -> np.ndarray | None:
    """One input's vector from its pieces: ``None`` if any failed; windows give their token-weighted mean."""
    if any(v is None for _, v in parts):
        return None
    if len(parts) == 1:
        return parts[0][1]
    # Token-weighted mean of the windows, renormalised: a long text is the sum of its parts.
    weights = np.array([w for w, _ in parts], dtype=np.float64)
    stacked = np.stack([v for _, v in parts]).astype(np.float64)  # type: ignore[misc]
    mean = (stacked * weights[:, None]).sum(axis=0) / weights.sum()
    norm = np.linalg.norm(mean)
    out: np.ndarray = (mean / norm if norm else mean).astype(np.float32)
    return out


_NOT_EMBEDDED = Failure("provider", message="not embedded")


def assemble(call: Call, expected_dims: int | None) -> tuple[np.ndarray, dict[int, Failure]]:
    """The call's (n, d) block in input order (NaN rows where an input failed) and its failures."""
    failures = dict(call.failures)
    for i, u in enumerate(call.where):
        if u >= 0 and call.vectors[u] is None:
            failures[i] = call.unique_failures.get(u, _NOT_EMBEDDED)
    # Gather every row with one fancy index over [cached rows; new rows]: a fully
    # cached call copies the decoded block once instead of stacking row by row.
    hits = call.hit_block
    n_hit = 0 if hits is None else hits.shape[0]
    fresh = [u for u, v in enumerate(call.vectors) if v is not None and u not in call.hit_rows]
    blocks: list[np.ndarray] = [] if hits is None else [hits]
    if fresh:
        blocks.append(np.stack([call.vectors[u] for u in fresh]))  # type: ignore[misc]
    dims = blocks[0].shape[1] if blocks else (expected_dims or 0)
    if not blocks:
        return np.full((call.n, dims), np.nan, dtype=np.float32), failures
    row_of = np.full(len(call.unique) + 1, -1, dtype=np.int64)  # the extra slot: invalid inputs
    for u, r in call.hit_rows.items():
        row_of[u] = r
    for k, u in enumerate(fresh):
        row_of[u] = n_hit + k
    idx = row_of[np.asarray(call.where, dtype=np.int64)]  # where == -1 reads the extra slot
    pool = blocks[0] if len(blocks) == 1 else np.concatenate(blocks)
    out = pool[np.maximum(idx, 0)]
    if failures:
        out[idx < 0] = np.nan
    return out, failures


def slices(call: Call, misses: list[int], whole: bool) -> list[list[int]]:
    """Slices of the misses to count and send in turn, small first so the first request leaves at
    once, then growing. One slice when ``whole``: nothing may be sent before everything is counted
    (a budget, or on_long_input="error" with errors="raise", must refuse first)."""
    if whole:
        return [misses]
    chunks: list[list[int]] = []
    cur: list[int] = []
    size, limit = 0, 50_000  # characters
    for u in misses:
        cur.append(u)
        item = call.unique[u]
        size += len(item) if isinstance(item, str) else 1000
        if size >= limit:
            chunks.append(cur)
            cur, size, limit = [], 0, min(limit * 2, 2_000_000)
    if cur:
        chunks.append(cur)
    return chunks


__all__ = ["Call", "Cut", "Errors", "OnLongInput", "Piece", "apply_hits", "assemble", "combine",
           "content_key_or_why", "cut_pieces", "plan_batches", "prepare", "slices", "take"]
