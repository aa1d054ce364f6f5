"""Keys, per-key rpm/tpm and budgets of ``embedpipe serve``, on every key store, against a live service."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

pytest.importorskip("fastapi")

from embedpipe.serve import KeyStore, key_store_from
from tests.openai_server import OpenAITestServer, cl100k_encoding
from tests.serve_live import MODEL, LiveService, metric, settings_for

POSTGRES = "postgresql://postgres@127.0.0.1:5432/test"


def _postgres_alive() -> bool:
    try:
        import psycopg

        with psycopg.connect(POSTGRES, connect_timeout=2):
            return True
    except Exception:
        return False


@pytest.fixture(params=["sqlite", "redis", "postgresql"])
def keys_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """One key-store URL per backend; Redis and PostgreSQL get a private prefix/table, removed afterwards."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path}/keys.db"
        return
    if request.param == "redis":
        redis_url = request.getfixturevalue("redis_url")
        prefix = f"embedpipe-test-{uuid.uuid4().hex[:10]}"
        yield f"{redis_url}?prefix={prefix}"
        import redis

        client = redis.Redis.from_url(redis_url)
        found = list(client.scan_iter(match=f"{prefix}:*"))
        if found:
            client.delete(*found)
        client.close()
        return
    if not _postgres_alive():
        pytest.skip(f"PostgreSQL is not reachable at {POSTGRES}")
    table = f"keys_{uuid.uuid4().hex[:10]}"
    yield f"{POSTGRES}?table={table}"
    import psycopg

    with psycopg.connect(POSTGRES, autocommit=True) as conn:
        conn.execute(f"DROP TABLE IF EXISTS {table}")


@pytest.fixture
def upstream() -> Iterator[OpenAITestServer]:
    with OpenAITestServer() as server:
        yield server


@pytest.fixture
def store(keys_url: str) -> Iterator[KeyStore]:
    s = key_store_from(keys_url)
    yield s
    s.close()


def _embed(live: LiveService, key: str | None, text: Any = "hello") -> httpx.Response:
    headers = {"authorization": f"Bearer {key}"} if key is not None else {}
    return httpx.post(f"{live.base_url}/embeddings", json={"model": MODEL, "input": text}, headers=headers,
                      timeout=10)


def test_store_keeps_hashes_not_keys_and_revokes(store: KeyStore) -> None:
    key = store.add("team-a", rpm=60, tpm=1000, budget_usd=2.5)
    record = store.lookup(key)
    assert record is not None and (record.name, record.rpm, record.tpm, record.budget_usd) == ("team-a", 60, 1000, 2.5)
    assert key not in repr(store.list()) and record.key_hash != key and len(record.key_hash) == 64
    assert store.lookup(key + "x") is None
    assert store.spend(record.key_hash, 0.5) == pytest.approx(0.5)
    assert store.spend(record.key_hash, 0.25) == pytest.approx(0.75)
    from embedpipe.serve import KeyStoreError

    with pytest.raises(KeyStoreError, match="already exists"):
        store.add("team-a")
    store.revoke("team-a")
    assert store.lookup(key) is None
    assert [r.revoked for r in store.list()] == [True]
    with pytest.raises(KeyStoreError, match="no key named"):
        store.revoke("nobody")


def test_missing_wrong_and_revoked_keys_are_refused(upstream: OpenAITestServer, keys_url: str,
                                                    store: KeyStore) -> None:
    key = store.add("team-a")
    with LiveService(settings_for(upstream.base_url, keys=keys_url)) as live:
        assert _embed(live, key).status_code == 200
        for bad in (None, "ep-not-a-key-at-all", key[:-1]):
            got = _embed(live, bad)
            assert got.status_code == 401, bad
            assert got.json()["error"]["code"] == "invalid_api_key"
        basic = httpx.post(f"{live.base_url}/embeddings", json={"model": MODEL, "input": "x"},
                           headers={"authorization": f"Basic {key}"})
        assert basic.status_code == 401
        assert httpx.get(f"{live.url}/healthz").status_code == 200  # open
        assert httpx.get(f"{live.url}/metrics").status_code == 401  # needs a key
        metrics = httpx.get(f"{live.url}/metrics", headers={"authorization": f"Bearer {key}"})
        assert metrics.status_code == 200
        assert key not in metrics.text
        record = store.lookup(key)
        assert record is not None
        assert metric(metrics.text, "embedpipe_requests_total", key=record.label, status="200") == 1
        store.revoke("team-a")
        assert _embed(live, key).status_code == 401
    assert upstream.ledger.requests_total == 1


def test_per_key_rpm_tpm_and_budget_are_enforced_independently(upstream: OpenAITestServer, keys_url: str,
                                                               store: KeyStore) -> None:
    slow = store.add("slow", rpm=2)
    thrifty = store.add("thrifty", tpm=5)
    cheap, dear = ["alpha beta gamma delta", "epsilon zeta eta theta"], ["iota kappa lambda mu nu xi " * 3]
    n_cheap, n_dear = sum(len(cl100k_encoding().encode(t)) for t in cheap), len(cl100k_encoding().encode(dear[0]))
    assert n_dear > n_cheap + 1
    budget = (2 * n_cheap + 1) * 0.02 / 1e6  # text-embedding-3-small: $0.02 per 1M tokens
    poor = store.add("poor", budget_usd=budget)
    free = store.add("free")
    with LiveService(settings_for(upstream.base_url, keys=keys_url)) as live:
        assert [_embed(live, slow, f"s{i}").status_code for i in range(2)] == [200, 200]
        refused = _embed(live, slow, "s2")
        assert refused.status_code == 429 and refused.json()["error"]["code"] == "rate_limit_exceeded"
        assert int(refused.headers["retry-after"]) >= 1

        assert _embed(live, thrifty, "one two three").status_code == 200  # 3 tokens of 5
        assert _embed(live, thrifty, "four five six").status_code == 429
        too_big = _embed(live, thrifty, "one two three four five six seven")
        assert too_big.status_code == 400 and too_big.json()["error"]["code"] == "tokens_over_limit"

        # The budget is spent by what upstream bills: the first request pays, its repeat is all cache
        # hits and free (and fits what is left), a larger one no longer fits.
        billed = upstream.ledger.billed_tokens
        assert _embed(live, poor, cheap).status_code == 200
        assert _embed(live, poor, cheap).status_code == 200
        spent = store.lookup(poor)
        assert spent is not None
        assert spent.spent_usd == pytest.approx((upstream.ledger.billed_tokens - billed) * 0.02 / 1e6)
        assert spent.spent_usd == pytest.approx(n_cheap * 0.02 / 1e6)
        broke = _embed(live, poor, dear)
        assert broke.status_code == 429 and broke.json()["error"]["code"] == "insufficient_quota"

        # Another key is untouched by all of the above.
        assert all(_embed(live, free, f"f{i}").status_code == 200 for i in range(5))
        text = httpx.get(f"{live.url}/metrics", headers={"authorization": f"Bearer {free}"}).text
        assert metric(text, "embedpipe_requests_total", status="429") == 3
        assert metric(text, "embedpipe_budget_remaining_usd", key=spent.label) == pytest.approx(
            budget - spent.spent_usd)


def test_shared_per_key_limits_live_in_redis_and_fail_closed(upstream: OpenAITestServer, tmp_path: Path,
                                                             private_redis: Any) -> None:
    keys_url = f"sqlite:///{tmp_path}/keys.db"
    store = key_store_from(keys_url)
    key = store.add("team", rpm=3)
    store.close()
    limits = f"{private_redis.url}?socket_timeout=1"
    settings = settings_for(upstream.base_url, keys=keys_url, key_limits=limits)
    # Two services sharing the Redis limits are two workers: together they allow rpm, not twice it.
    with LiveService(settings) as first, LiveService(settings) as second:
        codes = [_embed(live, key, f"t{i}").status_code for i, live in enumerate([first, second] * 3)]
        assert codes.count(200) == 3 and codes.count(429) == 3
        private_redis.kill()
        down = _embed(first, key, "while redis is down")
        assert down.status_code == 429 and down.json()["error"]["code"] == "rate_limiter_unavailable"
        assert down.headers["retry-after"] == "1"
