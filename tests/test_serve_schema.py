"""schemathesis against the service's own OpenAPI schema: no 5xx, answers valid against the schema."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest

pytest.importorskip("fastapi")
schemathesis = pytest.importorskip("schemathesis")

from hypothesis import HealthCheck, given, settings  # noqa: E402

from tests.openai_server import OpenAITestServer  # noqa: E402
from tests.serve_live import MODEL, LiveService, metric, settings_for  # noqa: E402


@pytest.fixture(scope="module")
def live() -> Iterator[LiveService]:
    with OpenAITestServer() as upstream, LiveService(settings_for(upstream.base_url)) as service:
        yield service


def _operations(url: str) -> list[Any]:
    loaded = schemathesis.openapi.from_url(f"{url}/openapi.json")
    return [result.ok() for result in loaded.get_all_operations()]


# Driven with hypothesis directly: schemathesis's pytest plugin (from_fixture/parametrize) reads a
# private attribute pytest 9 no longer has.
def test_the_service_keeps_to_its_schema(live: LiveService) -> None:
    operations = _operations(live.url)
    assert {op.path for op in operations} >= {"/v1/embeddings", "/embeddings", "/healthz", "/readyz", "/metrics"}
    for operation in operations:

        @given(case=operation.as_strategy())
        @settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True,
                  database=None)
        def check(case: Any) -> None:
            if isinstance(case.body, dict) and "model" in case.body:
                # A random model name is a 404 (tested elsewhere); the configured one reaches the pipeline.
                case.body["model"] = MODEL
                # Which dimensions a model takes is the model's (tested in test_serve.py), not the schema's.
                case.body.pop("dimensions", None)
            case.call_and_validate(timeout=10)

        check()
    # The fuzzing reached the pipeline: schema-valid bodies were embedded, not only refused.
    text = httpx.get(f"{live.url}/metrics", timeout=10).text
    assert metric(text, "embedpipe_requests_total", route="/v1/embeddings", status="200") > 0
    assert metric(text, "embedpipe_requests_total", status="500") == 0
