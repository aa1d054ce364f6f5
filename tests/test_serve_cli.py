"""``embedpipe serve`` on the command line: keys add/list/revoke, the TOML config, and the server itself."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from click.testing import CliRunner

pytest.importorskip("fastapi")

from embedpipe.cli import main
from embedpipe.errors import ConfigurationError
from embedpipe.serve import key_store_from, load_settings
from tests.openai_server import OpenAITestServer, expected_vector
from tests.serve_live import MODEL, metric

ROOT = Path(__file__).resolve().parent.parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_keys_add_list_revoke(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/keys.db"
    runner = CliRunner()
    added = runner.invoke(main, ["serve", "keys", "add", "team-a", "--rpm", "60", "--budget-usd", "5", "--keys", url])
    assert added.exit_code == 0, added.output
    key = added.stdout.strip()
    assert key.startswith("ep-") and len(key) > 40
    given = runner.invoke(main, ["serve", "keys", "add", "team-b", "--key", "sk-chosen-by-me-123456", "--keys", url])
    assert given.exit_code == 0 and "sk-chosen" not in given.stdout
    listed = runner.invoke(main, ["serve", "keys", "list", "--keys", url])
    assert listed.exit_code == 0 and "team-a" in listed.output and "team-b" in listed.output
    assert key not in listed.output and "sk-chosen" not in listed.output
    store = key_store_from(url)
    record = store.lookup(key)
    assert record is not None and record.label in listed.output and record.rpm == 60 and record.budget_usd == 5
    assert store.lookup("sk-chosen-by-me-123456") is not None
    revoked = runner.invoke(main, ["serve", "keys", "revoke", "team-a", "--keys", url])
    assert revoked.exit_code == 0
    assert store.lookup(key) is None
    store.close()
    again = runner.invoke(main, ["serve", "keys", "revoke", "nobody", "--keys", url])
    assert again.exit_code == 1 and "no key named 'nobody'" in again.output
    dup = runner.invoke(main, ["serve", "keys", "add", "team-b", "--keys", url])
    assert dup.exit_code == 1 and "already exists" in dup.output
    short = runner.invoke(main, ["serve", "keys", "add", "team-c", "--key", "short", "--keys", url])
    assert short.exit_code == 2 and "too short" in short.output


def test_toml_config_and_command_line_overrides(tmp_path: Path) -> None:
    config = tmp_path / "serve.toml"
    config.write_text('''
[models.small]
spec = "openai:text-embedding-3-small"
base_url = "http://upstream:8000/v1"
rpm = 3000
dimensions = 512

[models.tiny]
spec = "fake:8"

[cache]
url = "sqlite:///cache.db"

[keys]
url = "sqlite:///keys.db"
limits = "redis://127.0.0.1:6379/0"

[server]
host = "0.0.0.0"
port = 9000
max_wait_ms = 5
''')
    s = load_settings(config)
    assert [(m.name, m.spec) for m in s.models] == [("small", "openai:text-embedding-3-small"), ("tiny", "fake:8")]
    assert s.models[0].options == {"base_url": "http://upstream:8000/v1", "rpm": 3000, "dimensions": 512}
    assert (s.cache, s.keys, s.key_limits, s.host, s.port, s.max_wait_ms) == (
        "sqlite:///cache.db", "sqlite:///keys.db", "redis://127.0.0.1:6379/0", "0.0.0.0", 9000, 5)
    o = load_settings(config, port=9001, cache="none", models=["small=openai:text-embedding-3-large"],
                      base_url="http://other/v1")
    assert o.port == 9001 and o.cache is None
    assert [(m.name, m.spec, m.options) for m in o.models] == [
        ("tiny", "fake:8", {}), ("small", "openai:text-embedding-3-large", {"base_url": "http://other/v1"})]
    assert load_settings(models=["openai:text-embedding-3-small"]).models[0].name == "text-embedding-3-small"
    bad = tmp_path / "bad.toml"
    bad.write_text('[models.x]\nspec = "fake:8"\nbatchsize = 3\n')
    with pytest.raises(ConfigurationError, match=r"\[models.x\] has unknown option\(s\) \['batchsize'\]"):
        load_settings(bad)
    bad.write_text('[server]\nprot = 1\n')
    with pytest.raises(ConfigurationError, match="prot"):
        load_settings(bad)
    with pytest.raises(ConfigurationError, match="give a spec"):
        load_settings(models=["nocolon"])


def test_an_open_service_on_another_host_is_refused(tmp_path: Path) -> None:
    got = CliRunner().invoke(main, ["serve", "--model", "fake:8", "--host", "0.0.0.0"])
    assert got.exit_code == 2 and "without keys" in got.output


@pytest.fixture
def upstream() -> Iterator[OpenAITestServer]:
    with OpenAITestServer() as server:
        yield server


def _start(args: list[str], port: int, health_port: int | None = None) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OPENAI_API_KEY": "sk-upstream"}
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    proc = subprocess.Popen([sys.executable, "-m", "embedpipe.cli", "serve", "--port", str(port), *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    probe = f"http://127.0.0.1:{health_port}/metrics" if health_port else f"http://127.0.0.1:{port}/healthz"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"embedpipe serve exited: {proc.stdout.read() if proc.stdout else ''}")
        try:
            if httpx.get(probe, timeout=1).status_code == 200:
                return proc
        except httpx.TransportError:
            time.sleep(0.1)
    proc.kill()
    raise AssertionError("embedpipe serve did not come up within 30 s")


def _stop(proc: subprocess.Popen[str]) -> str:
    proc.terminate()
    try:
        out, _ = proc.communicate(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate(timeout=5)
    return out


@pytest.mark.timeout(90)
def test_the_command_serves_openai_clients(upstream: OpenAITestServer, tmp_path: Path) -> None:
    import openai

    port = _free_port()
    proc = _start(["--model", f"openai:{MODEL}", "--base-url", upstream.base_url, "--cache",
                   f"sqlite:///{tmp_path}/cache.db", "--log-format", "json"], port)
    try:
        with openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0) as client:
            got = client.embeddings.create(model=MODEL, input=["from the command line"])
            assert got.data[0].embedding == pytest.approx(expected_vector("from the command line", 1536).tolist(),
                                                          abs=1e-6)
            client.embeddings.create(model=MODEL, input=["from the command line"])
        assert upstream.ledger.times_billed == {"from the command line": 1}
    finally:
        out = _stop(proc)
    assert "OPEN" in out and '"request_id"' in out and "sk-upstream" not in out


@pytest.mark.timeout(120)
def test_workers_share_one_metrics_view(upstream: OpenAITestServer, tmp_path: Path) -> None:
    """Under --workers 2, prometheus-client's multiprocess mode adds every worker's counts up."""
    port, metrics_port = _free_port(), _free_port()
    proc = _start(["--model", f"openai:{MODEL}", "--base-url", upstream.base_url, "--workers", "2",
                   "--metrics-port", str(metrics_port), "--cache", f"sqlite:///{tmp_path}/cache.db"], port,
                  health_port=metrics_port)
    try:
        for _ in range(50):  # both workers up: a fresh connection per request spreads them
            try:
                if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.1)
        for i in range(12):
            got = httpx.post(f"http://127.0.0.1:{port}/v1/embeddings", json={"model": MODEL, "input": f"w{i}"},
                             timeout=10)
            assert got.status_code == 200
        text = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).text
        assert metric(text, "embedpipe_requests_total", route="/v1/embeddings", status="200") == 12
        assert metric(text, "embedpipe_cache_misses_total") == 12
        assert httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).status_code == 404  # on its own port
    finally:
        _stop(proc)
