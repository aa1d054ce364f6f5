"""``embedpipe serve`` run for real by uvicorn on a pre-bound 127.0.0.1 socket, in a background thread."""

from __future__ import annotations

import asyncio
import socket
import threading
from types import TracebackType
from typing import Any

import uvicorn

from embedpipe.serve import ServeSettings, Service, create_app, service_of
from embedpipe.serve.settings import ModelSettings

MODEL = "text-embedding-3-small"


def settings_for(upstream_url: str, **changes: Any) -> ServeSettings:
    """The service's settings for one OpenAI model on ``upstream_url`` (the test server's base URL)."""
    options = changes.pop("model_options", {})
    return ServeSettings(models=(ModelSettings(MODEL, f"openai:{MODEL}", {"base_url": upstream_url, **options}),),
                         **changes)


class LiveService:
    """A started service; ``url`` is its root and ``base_url`` what OpenAI clients take."""

    def __init__(self, settings: ServeSettings) -> None:
        self.settings = settings
        self.app = create_app(settings)
        self.service: Service = service_of(self.app)
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        config = uvicorn.Config(self.app, log_config=None, log_level="warning", access_log=False,
                                timeout_graceful_shutdown=2, lifespan="on")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self._serve, daemon=True, name="embedpipe-serve-test")
        self.failure: BaseException | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def base_url(self) -> str:
        return f"{self.url}/v1"

    def _serve(self) -> None:
        try:
            asyncio.run(self.server.serve(sockets=[self.sock]))
        except BaseException as exc:
            self.failure = exc

    def __enter__(self) -> LiveService:
        self.thread.start()
        for _ in range(200):
            if self.server.started or not self.thread.is_alive():
                break
            self.thread.join(0.025)
        if not self.server.started:
            self.server.should_exit = True
            raise RuntimeError("the service did not start") from self.failure
        return self

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self.server.should_exit = True
        self.thread.join(10)
        self.sock.close()
        if self.thread.is_alive():
            raise RuntimeError("the service did not stop within 10 s")


def metric(text: str, name: str, **labels: str) -> float:
    """The sum of the samples of ``name`` in a /metrics exposition whose labels include ``labels``."""
    from prometheus_client.parser import text_string_to_metric_families

    total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
    return total
