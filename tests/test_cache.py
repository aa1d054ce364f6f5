"""Every cache backend, through one test body each (memory, SQLite, Redis)."""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import sqlite3
from pathlib import Path

import pytest

from embedpipe.cache import SQLiteCache, cache_from_url
from embedpipe.cache.base import parse_duration, parse_size
from embedpipe.errors import CacheUnavailableError, ConfigurationError


def test_get_set_delete_roundtrip(cache_url: str) -> None:
    cache = cache_from_url(cache_url)
    try:
        assert cache.get_many(["a", "b"]) == [None, None]
        cache.set_many([("a", b"\x00\x01"), ("b", b"bee")])
        assert cache.get_many(["b", "a", "zz", "a"]) == [b"bee", b"\x00\x01", None, b"\x00\x01"]
        cache.set_many([("a", b"new")])
        assert cache.get_many(["a"]) == [b"new"]
        cache.delete(["a", "missing"])
        assert cache.get_many(["a", "b"]) == [None, b"bee"]
        st = cache.stats()
        assert st.entries == 1
        assert st.hits >= 4
    finally:
        cache.clear()
        cache.close()


def test_bulk_and_iteration(cache_url: str) -> None:
    cache = cache_from_url(cache_url)
    try:
        items = [(f"k{i:05d}", bytes([i % 256]) * 10) for i in range(2500)]
        cache.set_many(items)
        got = cache.get_many([k for k, _ in items])
        assert got == [v for _, v in items]
        assert sorted(cache.yield_keys()) == sorted(k for k, _ in items)
        assert sorted(cache.yield_keys("k0001")) == [f"k0001{i}" for i in range(10)]
        assert dict(cache.items()) == dict(items)
        cache.clear()
        assert list(cache.yield_keys()) == []
    finally:
        cache.close()


async def test_async_twins(cache_url: str) -> None:
    cache = cache_from_url(cache_url)
    try:
        await cache.aset_many([("x", b"1"), ("y", b"2")])
        assert await cache.aget_many(["x", "y", "z"]) == [b"1", b"2", None]
        await cache.adelete(["x"])
        assert await cache.aget_many(["x"]) == [None]
        await cache.aclear()
    finally:
        await cache.aclose()


def test_close_is_idempotent(cache_url: str) -> None:
    cache = cache_from_url(cache_url)
    cache.close()
    cache.close()


def test_memory_lru_limits() -> None:
    cache = cache_from_url("memory://?max_entries=3")
    cache.set_many([("a", b"1"), ("b", b"2"), ("c", b"3")])
    cache.get_many(["a"])  # a is now most recent
    cache.set_many([("d", b"4")])
    assert cache.get_many(["a", "b", "c", "d"]) == [b"1", None, b"3", b"4"]
    by_bytes = cache_from_url("memory://?max_bytes=100")
    by_bytes.set_many([(f"k{i}", b"x" * 30) for i in range(10)])
    assert by_bytes.stats().bytes is not None and by_bytes.stats().bytes <= 100


def test_memory_ttl_with_injected_clock() -> None:
    from embedpipe.cache.memory import MemoryCache

    now = [1000.0]
    cache = MemoryCache(ttl=10, clock=lambda: now[0])
    cache.set_many([("a", b"1")])
    now[0] += 9
    assert cache.get_many(["a"]) == [b"1"]
    now[0] += 2
    assert cache.get_many(["a"]) == [None]


def test_sqlite_ttl_and_prune(tmp_path: Path) -> None:
    cache = cache_from_url(f"sqlite:///{tmp_path}/t.db?ttl=60")
    assert isinstance(cache, SQLiteCache)
    cache.set_many([("old", b"1"), ("new", b"2")])
    # Age one entry by writing its creation time directly: no test waits on the clock.
    with sqlite3.connect(cache.path) as conn:
        conn.execute("UPDATE entries SET created = created - 120 WHERE key = 'old'")
    assert cache.get_many(["old", "new"]) == [None, b"2"]
    assert cache.prune() == 1
    assert cache.stats().entries == 1
    cache.close()


def test_sqlite_lru_eviction_by_size(tmp_path: Path) -> None:
    cache = SQLiteCache(tmp_path / "lru.db", max_bytes=20_000)
    for i in range(10):
        cache.set_many([(f"k{i}", b"v" * 1000)])
        with sqlite3.connect(cache.path) as conn:  # distinct, increasing recency
            conn.execute("UPDATE entries SET accessed = ? WHERE key = ?", (i, f"k{i}"))
    # A hit on k0 makes it recent; recency reaches the file in the next write, batched.
    assert cache.get_many(["k0"]) == [b"v" * 1000]
    cache.set_many([(f"n{i}", b"w" * 1000) for i in range(15)])
    st = cache.stats()
    assert st.bytes is not None and st.bytes <= 20_000
    assert cache.get_many(["k0"]) == [b"v" * 1000], "recently used entry was evicted"
    assert cache.get_many(["k1"]) == [None], "least recently used entry survived"
    cache.close()


def test_sqlite_hit_is_not_a_write(tmp_path: Path) -> None:
    cache = SQLiteCache(tmp_path / "ro.db", max_bytes=10**9)
    cache.set_many([("a", b"1")])
    other = sqlite3.connect(cache.path, timeout=0)
    other.execute("BEGIN IMMEDIATE")  # another process holds the write lock
    try:
        assert cache.get_many(["a"] * 5) == [b"1"] * 5  # reads still succeed, no write attempted
    finally:
        other.execute("ROLLBACK")
        other.close()
        cache.close()


def test_sqlite_url_paths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    rel = cache_from_url("sqlite:///rel/c.db")
    assert isinstance(rel, SQLiteCache) and rel.path == Path("rel/c.db")
    absolute = cache_from_url(f"sqlite:///{tmp_path}/abs.db")
    assert isinstance(absolute, SQLiteCache) and absolute.path == tmp_path / "abs.db"
    rel.close()
    absolute.close()


@pytest.mark.parametrize("url,msg", [
    ("ftp://x", "unknown cache URL scheme"),
    ("memory://?colour=red", "unknown option"),
    ("sqlite:///x.db?ttl=forever", "not a duration"),
    ("sqlite://", "names no file"),
    ("redis://127.0.0.1:6379/0?on_error=maybe", "on_error"),
])
def test_bad_urls(url: str, msg: str) -> None:
    with pytest.raises(ConfigurationError, match=msg):
        cache_from_url(url)


def test_parsers() -> None:
    assert parse_duration("7d") == 7 * 86400
    assert parse_duration("500ms") == 0.5
    assert parse_duration(30) == 30
    assert parse_size("2GB") == 2_000_000_000
    assert parse_size("64KiB") == 65536


def test_redis_fail_open_and_fail_closed(caplog: pytest.LogCaptureFixture) -> None:
    port = _dead_port()
    cache = cache_from_url(f"redis://127.0.0.1:{port}/0?socket_timeout=0.5")
    assert cache.get_many(["a", "b"]) == [None, None]
    cache.set_many([("a", b"1")])
    assert cache.stats().errors == 2
    assert sum("unavailable" in r.message for r in caplog.records) == 1, "warn once, not per call"
    closed = cache_from_url(f"redis://127.0.0.1:{port}/0?on_error=raise&socket_timeout=0.5")
    with pytest.raises(CacheUnavailableError, match="unavailable"):
        closed.get_many(["a"])


def _dead_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_redis_ttl(redis_url: str, redis_namespace: str) -> None:
    import redis

    cache = cache_from_url(f"{redis_url}?namespace={redis_namespace}&ttl=1h")
    cache.set_many([("a", b"1")])
    ttl = redis.Redis.from_url(redis_url).pttl(f"embedpipe:{redis_namespace}:a")
    assert 3_500_000 < ttl <= 3_600_000


def _writer(path: str, worker: int, n: int) -> None:
    cache = SQLiteCache(path)
    for start in range(0, n, 25):
        cache.set_many([(f"w{worker}-{i}", f"{worker}:{i}".encode()) for i in range(start, min(n, start + 25))])
        cache.get_many([f"w{worker}-{start}"])
    cache.close()


def test_sqlite_many_processes_lose_nothing(tmp_path: Path) -> None:
    path = str(tmp_path / "shared.db")
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_writer, args=(path, w, 400)) for w in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    cache = SQLiteCache(path)
    keys = [f"w{w}-{i}" for w in range(4) for i in range(400)]
    values = cache.get_many(keys)
    assert values == [f"{k[1:].split('-')[0]}:{k.split('-')[1]}".encode() for k in keys]
    assert cache.stats().entries == 1600
    cache.close()


def test_cache_pickles_and_reopens(tmp_path: Path) -> None:
    import pickle

    cache = cache_from_url(f"sqlite:///{tmp_path}/p.db")
    cache.set_many([("a", b"1")])
    clone = pickle.loads(pickle.dumps(cache))
    assert clone.get_many(["a"]) == [b"1"]
    clone.close()
    cache.close()


def test_async_runs_concurrently(tmp_path: Path) -> None:
    cache = cache_from_url(f"sqlite:///{tmp_path}/c.db")

    async def main() -> list[list[bytes | None]]:
        await cache.aset_many([("k", b"v")])
        return await asyncio.gather(*(cache.aget_many(["k"]) for _ in range(20)))

    assert asyncio.run(main()) == [[b"v"]] * 20
    cache.close()
