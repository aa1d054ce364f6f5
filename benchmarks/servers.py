"""The OpenAI-compatible test server (``tests/openai_server.py``), run in its own process.

A separate process keeps the server's CPU work (tokenizing, building vectors) off the
client's GIL, so a client is measured, not the server sharing its interpreter.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from benchmarks.scenario import Unavailable

#: the model every scenario asks the test server for
MODEL = "text-embedding-3-small"
API_KEY = "sk-benchmark"


@contextlib.contextmanager
def server_process(**config: Any) -> Iterator[Any]:
    """A started ``tests.openai_server.ServerProcess`` with ``config`` (ServerConfig fields); stopped on exit."""
    try:
        from tests.openai_server import ServerProcess
    except ImportError as exc:
        raise Unavailable(f"the test server cannot be imported ({exc}); run from the repository root "
                          "with the dev extras installed") from exc
    server = ServerProcess(**config)
    server.start(timeout=60)
    try:
        yield server
    finally:
        server.stop()


def tiktoken_env(scratch: Path) -> dict[str, str]:
    """Environment that lets unmodified ``tiktoken.get_encoding`` (LangChain's) work offline."""
    from embedpipe.tokens import write_tiktoken_cache

    directory = write_tiktoken_cache(scratch / "tiktoken-cache")
    return {**os.environ, "TIKTOKEN_CACHE_DIR": str(directory)}


@contextlib.contextmanager
def tiktoken_cache(scratch: Path) -> Iterator[None]:
    """Point ``TIKTOKEN_CACHE_DIR`` at embedpipe's offline copy for the duration of the block."""
    env = tiktoken_env(scratch)
    old = os.environ.get("TIKTOKEN_CACHE_DIR")
    os.environ["TIKTOKEN_CACHE_DIR"] = env["TIKTOKEN_CACHE_DIR"]
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("TIKTOKEN_CACHE_DIR", None)
        else:
            os.environ["TIKTOKEN_CACHE_DIR"] = old
