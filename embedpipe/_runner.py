"""A private event loop on a daemon thread: the sync API runs the async engine there.

This is how one engine serves both APIs without a second copy of the logic, and why
the sync API works inside Jupyter, where the caller's thread already runs a loop.
Async callers are also moved onto this loop, so async clients (httpx pools, the
rate limiter's waiters) only ever live on one loop.
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")

_lock = threading.Lock()
_loop: asyncio.AbstractEventLoop | None = None
_thread: threading.Thread | None = None
_pid: int | None = None


def get_loop() -> asyncio.AbstractEventLoop:
    """The runner's loop, started on first use (and again in a forked child)."""
    global _loop, _thread, _pid
    with _lock:
        if _loop is None or _pid != os.getpid() or _thread is None or not _thread.is_alive():
            loop = asyncio.new_event_loop()
            ready = threading.Event()

            def run() -> None:
                asyncio.set_event_loop(loop)
                loop.call_soon(ready.set)
                loop.run_forever()

            thread = threading.Thread(target=run, name="embedpipe-loop", daemon=True)
            thread.start()
            ready.wait()
            _loop, _thread, _pid = loop, thread, os.getpid()
        return _loop


def current_loop() -> asyncio.AbstractEventLoop | None:
    """The runner's loop if it is running in this process, without starting one."""
    loop = _loop
    if loop is None or _pid != os.getpid() or loop.is_closed():
        return None
    return loop


def in_runner() -> bool:
    """Whether the current thread is the runner's."""
    return _thread is not None and threading.current_thread() is _thread


def run_sync(coro: Coroutine[Any, Any, T]) -> T:
    """Run ``coro`` on the runner loop and block until it finishes."""
    if in_runner():
        coro.close()
        raise RuntimeError("a blocking embedpipe call was made from embedpipe's own event loop; "
                           "use the async method (aembed...) there")
    return asyncio.run_coroutine_threadsafe(coro, get_loop()).result()


async def run_async(coro: Coroutine[Any, Any, T]) -> T:
    """Await ``coro`` on the runner loop from any other loop."""
    loop = get_loop()
    try:
        current = asyncio.get_running_loop()
    except RuntimeError:
        current = None
    if current is loop:
        return await coro
    return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coro, loop))
