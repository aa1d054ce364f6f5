"""Closing async SDK clients that live on embedpipe's runner loop, from any thread."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable


def close_on_runner(aclose: Callable[[], Awaitable[object]]) -> None:
    """Run ``aclose()`` on the runner loop, where the client was made and must close."""
    from embedpipe import _runner

    async def run() -> None:
        await aclose()

    try:
        if _runner.in_runner():
            _runner.get_loop().create_task(run())
        else:
            asyncio.run_coroutine_threadsafe(run(), _runner.get_loop()).result(timeout=10)
    except Exception:  # closing at interpreter exit or after a fork: nothing left to release
        pass
