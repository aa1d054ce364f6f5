"""The Celery app of the distributed tests' workers: embedpipe's own app, with two test-only changes.

- ``openai:`` providers whose batch holds a text starting ``KILL-THE-WORKER`` end their
  process at once (``os._exit``), as a segfault or the OOM killer would: a poison record.
- ``$EMBEDPIPE_TEST_SINK_FAILS``: the Parquet sink fails to write records whose text starts with it.
- ``$EMBEDPIPE_TEST_QUEUE`` names the queue, so a test on the shared RabbitMQ has one of its own;
  ``$EMBEDPIPE_TEST_VISIBILITY`` shortens the Redis visibility timeout.
"""

from __future__ import annotations

import os
from typing import Any

from embedpipe.distributed.celery import make_app
from embedpipe.providers import PROVIDERS, BatchResult, Provider, Role

_real_openai = PROVIDERS["openai"]


def _poisonable(name: str, **opts: Any) -> Provider:
    provider = _real_openai(name, **opts)
    real = provider.aembed_batch

    async def aembed_batch(texts: list[Any], role: Role) -> BatchResult:
        if any(isinstance(t, str) and t.startswith("KILL-THE-WORKER") for t in texts):
            os._exit(137)
        return await real(texts, role)

    provider.aembed_batch = aembed_batch  # type: ignore[method-assign]
    return provider


PROVIDERS["openai"] = _poisonable

if os.environ.get("EMBEDPIPE_TEST_SINK_FAILS"):
    # A sink that cannot write records whose text starts with the marker (a failing disk, say), and retries
    # that come back at once, so a test does not wait out the real backoff.
    import embedpipe.distributed.celery as _celery
    from embedpipe.jobs.sinks import ParquetSink

    _celery.BACKOFF_SECONDS = 0.2
    _marker = os.environ["EMBEDPIPE_TEST_SINK_FAILS"]
    _write = ParquetSink.write

    def _failing_write(self: ParquetSink, entries: Any, vectors: Any, model: str) -> Any:
        if any(str(e.record.text).startswith(_marker) for e in entries):
            raise OSError(f"the test sink cannot write {_marker!r} records")
        return _write(self, entries, vectors, model)

    ParquetSink.write = _failing_write  # type: ignore[method-assign]

_overrides: dict[str, Any] = {}
if os.environ.get("EMBEDPIPE_TEST_QUEUE"):
    _overrides["task_default_queue"] = os.environ["EMBEDPIPE_TEST_QUEUE"]
if os.environ.get("EMBEDPIPE_TEST_VISIBILITY"):  # a chunk that outlives the Redis visibility timeout
    _overrides["broker_transport_options"] = {"visibility_timeout": float(os.environ["EMBEDPIPE_TEST_VISIBILITY"]),
                                              "unacked_restore_interval": 1, "unacked_restore_throttle": 1}
app = make_app(os.environ["EMBEDPIPE_BROKER_URL"], os.environ.get("EMBEDPIPE_STORE_URL"), **_overrides)
