"""deploy/: the alert rules pass promtool, and every metric the rules and the dashboard name is on /metrics."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

pytest.importorskip("fastapi")

from embedpipe.metrics import METRIC_NAMES
from embedpipe.serve import key_store_from
from tests.openai_server import OpenAITestServer
from tests.serve_live import MODEL, LiveService, settings_for

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
RULES = DEPLOY / "prometheus" / "alerts.yml"
RULE_TESTS = DEPLOY / "prometheus" / "alerts_test.yml"
DASHBOARD = DEPLOY / "grafana" / "embedpipe.json"
_NAME = re.compile(r"\bembedpipe_[a-z0-9_]+")
_SUFFIXES = ("_bucket", "_sum", "_count")


def _promtool() -> str:
    found = shutil.which("promtool")
    if found is None:
        if os.environ.get("CI"):
            pytest.fail("promtool is not installed (apt-get install prometheus)")
        pytest.skip("promtool is not installed (apt-get install prometheus)")
    return found


def _family(name: str) -> str:
    for suffix in _SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def _named() -> set[str]:
    exprs = [m for m in _NAME.findall(RULES.read_text())]
    dashboard = json.loads(DASHBOARD.read_text())
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            exprs += _NAME.findall(target["expr"])
    for variable in dashboard["templating"]["list"]:
        exprs += _NAME.findall(str(variable.get("query", "")))
    return {_family(n) for n in exprs}


@pytest.mark.parametrize("command", ["check", "test"])
def test_promtool_checks_and_tests_the_rules(command: str) -> None:
    promtool = _promtool()
    target = RULES if command == "check" else RULE_TESTS
    done = subprocess.run([promtool, f"{command}", "rules", str(target)], capture_output=True, text=True,
                          timeout=60, cwd=target.parent)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS" in done.stdout + done.stderr


def test_every_rule_has_a_test_case() -> None:
    alerts = set(re.findall(r"- alert: (\w+)", RULES.read_text()))
    tested = set(re.findall(r"alertname: (\w+)", RULE_TESTS.read_text()))
    assert alerts and alerts == tested


@pytest.fixture
def upstream() -> Iterator[OpenAITestServer]:
    with OpenAITestServer(rpm=100_000, tpm=10_000_000) as server:  # so it sends x-ratelimit-* headers
        yield server


def test_every_metric_the_rules_and_dashboard_name_is_on_metrics(upstream: OpenAITestServer, tmp_path: Path) -> None:
    named = _named()
    assert named <= {_family(n) for n in METRIC_NAMES}, named - set(METRIC_NAMES)
    keys = f"sqlite:///{tmp_path}/keys.db"
    store = key_store_from(keys)
    key = store.add("team", budget_usd=1.0, rpm=1000)
    store.close()
    with LiveService(settings_for(upstream.base_url, keys=keys)) as live:
        auth = {"authorization": f"Bearer {key}"}
        got = httpx.post(f"{live.base_url}/embeddings", json={"model": MODEL, "input": ["a", "b"]}, headers=auth)
        assert got.status_code == 200
        text = httpx.get(f"{live.url}/metrics", headers=auth).text
    exposed = {_family(line.split("{")[0].split(" ")[0]) for line in text.splitlines()
               if line and not line.startswith("#")}
    missing = sorted(named - exposed)
    assert not missing, f"named in deploy/ but not on /metrics: {missing}"
    assert set(METRIC_NAMES) <= exposed  # every exported family has a series from the start
