"""Content keys of non-text inputs, computed in worker threads.

An image's key is a hash of its decoded pixels, so computing it means decoding: that runs
here, in a shared pool, never on the event loop, and several images decode at once (Pillow
releases the GIL while it decodes). Only the digests are kept.
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from embedpipe.engine.planning import content_key_or_why
from embedpipe.inputs import Item

#: items one worker task keys in turn (fewer, larger tasks than one per item)
_PER_TASK = 32

_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def decode_pool() -> ThreadPoolExecutor:
    """The process's pool of decoding threads (one per core, at most 8), started on first use."""
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1), thread_name_prefix="embedpipe-decode")
        return _pool


def _items(inputs: Sequence[Any], modalities: frozenset[str] | None) -> list[tuple[int, Item]]:
    # Items of a kind the model cannot embed are refused by kind, unread.
    return [(i, t) for i, t in enumerate(inputs) if not isinstance(t, str) and isinstance(t, Item)
            and (modalities is None or getattr(t, "kind", None) in modalities)]


def _key_group(group: list[tuple[int, Item]]) -> list[tuple[int, bytes | str]]:
    return [(i, content_key_or_why(t)) for i, t in group]


def _groups(items: list[tuple[int, Item]]) -> list[list[tuple[int, Item]]]:
    return [items[k:k + _PER_TASK] for k in range(0, len(items), _PER_TASK)]


def content_keys(inputs: Sequence[Any], modalities: frozenset[str] | None = None) -> dict[int, bytes | str] | None:
    """Each item's content key (or why it has none) by input index, in the decode pool; ``None`` for text only.

    ``modalities``: only items of these kinds are keyed (the others are refused by kind anyway).
    """
    items = _items(inputs, modalities)
    if not items:
        return None
    if len(items) == 1:
        return dict(_key_group(items))
    out: dict[int, bytes | str] = {}
    for done in decode_pool().map(_key_group, _groups(items)):
        out.update(done)
    return out


async def acontent_keys(inputs: Sequence[Any], modalities: frozenset[str] | None = None
                        ) -> dict[int, bytes | str] | None:
    """Async twin of :func:`content_keys`: the loop awaits the pool, it never decodes."""
    items = _items(inputs, modalities)
    if not items:
        return None
    loop = asyncio.get_running_loop()
    pool = decode_pool()
    out: dict[int, bytes | str] = {}
    for done in await asyncio.gather(*(loop.run_in_executor(pool, _key_group, g) for g in _groups(items))):
        out.update(done)
    return out


__all__ = ["acontent_keys", "content_keys", "decode_pool"]
