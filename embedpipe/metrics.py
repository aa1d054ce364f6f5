"""Prometheus metrics from a pipeline's events: one hooks subscriber for the library, the CLI and the service.

>>> from embedpipe import EmbeddingPipeline
>>> from embedpipe.metrics import PrometheusMetrics
>>> metrics = PrometheusMetrics()
>>> with EmbeddingPipeline("fake:8", cache="memory://", hooks=[metrics]) as pipe:
...     _ = pipe.embed(["a", "b", "a"])
>>> metrics.value("embedpipe_deduped_total", model="fake:8")
1.0

:class:`PrometheusMetrics` is a hook (``hooks=[metrics]``): it turns the
:mod:`embedpipe.events` stream into the counters, histograms and gauges named below, every
series labelled with the ``model`` spec. The service (``embedpipe serve``) adds what only it
sees (requests, their duration, the queue, per-key budgets) through the methods at the end.
Per-key series carry :func:`key_label`, a short hash of the key, never the key.

Multiprocess mode: with ``PROMETHEUS_MULTIPROC_DIR`` set (as under ``uvicorn --workers N``),
prometheus-client keeps the values in files there and :meth:`PrometheusMetrics.exposition`
aggregates every worker's; gauges say how (``livesum`` for levels, ``mostrecent`` for readings).
"""

from __future__ import annotations

import os
from typing import Any

from embedpipe.events import (
    BudgetChanged,
    CacheRead,
    CallDone,
    Event,
    InputsFailed,
    LimiterWaited,
    LimitsObserved,
    RateLimited,
    RequestDone,
    RequestSent,
    Retried,
)

__all__ = ["METRIC_NAMES", "PrometheusMetrics", "key_label"]

#: every metric family this module exports, as it appears on ``/metrics`` (counters without ``_total``
#: get it from prometheus-client)
METRIC_NAMES = (
    "embedpipe_requests_total", "embedpipe_cache_hits_total", "embedpipe_cache_misses_total",
    "embedpipe_deduped_total", "embedpipe_tokens_total", "embedpipe_cost_usd_total",
    "embedpipe_upstream_requests_total", "embedpipe_rate_limited_total", "embedpipe_retries_total",
    "embedpipe_dead_letters_total", "embedpipe_request_duration_seconds", "embedpipe_upstream_latency_seconds",
    "embedpipe_limiter_wait_seconds", "embedpipe_queue_wait_seconds", "embedpipe_batch_inputs",
    "embedpipe_batch_tokens", "embedpipe_inflight_requests", "embedpipe_queue_depth",
    "embedpipe_ratelimit_remaining", "embedpipe_budget_remaining_usd", "embedpipe_budget_limit_usd",
    "embedpipe_jobs_total", "embedpipe_job_records_total", "embedpipe_jobs_running",
)

#: the states of the service's ingest jobs; their ``embedpipe_jobs_total`` series exist from the start, at zero
JOB_STATES = ("queued", "running", "succeeded", "failed", "cancelled")

#: the reasons :class:`~embedpipe.events.Retried` carries; their series exist from the start, at zero
RETRY_REASONS = ("rate_limited", "server_error", "timeout", "connection", "invalid_response", "other")

_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
                    60.0)
_INPUT_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048)
_TOKEN_BUCKETS = (16, 64, 256, 1024, 4096, 16384, 65536, 300_000)


def key_label(key_hash: str) -> str:
    """The label of a key in metrics and logs: 8 hex digits of its SHA-256 (``key_hash`` is that hex digest)."""
    return key_hash[:8]


class PrometheusMetrics:
    """Counters, histograms and gauges fed by pipeline events; pass it as a hook.

    ``registry`` is a ``prometheus_client.CollectorRegistry``; by default a new one, so two
    instances in one process never clash (use ``prometheus_client.REGISTRY`` to join the
    global one). Needs ``prometheus-client`` (``pip install 'embedpipe[serve]'``).
    """

    def __init__(self, registry: Any = None) -> None:
        try:
            import prometheus_client as prom
        except ImportError as exc:  # pragma: no cover - the serve extra installs it
            from embedpipe.errors import ConfigurationError

            raise ConfigurationError("metrics need prometheus-client: pip install 'embedpipe[serve]'") from exc
        self._prom = prom
        self.registry = registry if registry is not None else prom.CollectorRegistry()
        r = self.registry
        c, h, g = prom.Counter, prom.Histogram, prom.Gauge
        self.requests = c("embedpipe_requests", "HTTP requests answered, by route and status.",
                          ["model", "route", "status", "key"], registry=r)
        self.cache_hits = c("embedpipe_cache_hits", "Unique inputs served from the cache.", ["model"], registry=r)
        self.cache_misses = c("embedpipe_cache_misses", "Unique inputs not in the cache.", ["model"], registry=r)
        self.deduped = c("embedpipe_deduped", "Inputs answered by another copy of the same input.", ["model"],
                         registry=r)
        self.tokens = c("embedpipe_tokens", "Tokens billed upstream, and saved by cache hits.", ["model", "kind"],
                        registry=r)
        self.cost = c("embedpipe_cost_usd", "USD spent upstream, and saved by cache hits.", ["model", "kind"],
                      registry=r)
        self.upstream = c("embedpipe_upstream_requests", "Requests sent to the provider, by HTTP status.",
                          ["model", "status"], registry=r)
        self.rate_limited = c("embedpipe_rate_limited", "Provider answers that were 429.", ["model"], registry=r)
        self.retries = c("embedpipe_retries", "Provider requests retried, by reason.", ["model", "reason"],
                         registry=r)
        self.dead_letters = c("embedpipe_dead_letters", "Inputs that could not be embedded.", ["model"], registry=r)
        self.request_duration = h("embedpipe_request_duration_seconds", "HTTP request duration.",
                                  ["model", "route"], buckets=_LATENCY_BUCKETS, registry=r)
        self.upstream_latency = h("embedpipe_upstream_latency_seconds", "Provider request latency.", ["model"],
                                  buckets=_LATENCY_BUCKETS, registry=r)
        self.limiter_wait = h("embedpipe_limiter_wait_seconds", "Time embedpipe's rate limiter held a request.",
                              ["model"], buckets=_LATENCY_BUCKETS, registry=r)
        self.queue_wait = h("embedpipe_queue_wait_seconds", "Time a request waited in the micro-batcher.",
                            ["model"], buckets=_LATENCY_BUCKETS, registry=r)
        self.batch_inputs = h("embedpipe_batch_inputs", "Inputs per provider request.", ["model"],
                              buckets=_INPUT_BUCKETS, registry=r)
        self.batch_tokens = h("embedpipe_batch_tokens", "Estimated tokens per provider request.", ["model"],
                              buckets=_TOKEN_BUCKETS, registry=r)
        self.inflight = g("embedpipe_inflight_requests", "HTTP requests being answered.", ["model"],
                          multiprocess_mode="livesum", registry=r)
        self.queue_depth = g("embedpipe_queue_depth", "Inputs waiting in the micro-batcher.", ["model"],
                             multiprocess_mode="livesum", registry=r)
        self.ratelimit_remaining = g("embedpipe_ratelimit_remaining", "The provider's x-ratelimit-remaining-*.",
                                     ["model", "kind"], multiprocess_mode="mostrecent", registry=r)
        self.budget_remaining = g("embedpipe_budget_remaining_usd", "USD left of a budget (a pipeline's or a "
                                  "key's).", ["model", "key"], multiprocess_mode="mostrecent", registry=r)
        self.budget_limit = g("embedpipe_budget_limit_usd", "The budget itself, for the share left.",
                              ["model", "key"], multiprocess_mode="mostrecent", registry=r)
        self.jobs = c("embedpipe_jobs", "Ingest jobs that entered each state (queued, running, succeeded, failed, "
                      "cancelled).", ["state"], registry=r)
        for state in JOB_STATES:
            self.jobs.labels(state)
        self.job_records = c("embedpipe_job_records", "Records the service's ingest jobs have handed to their chunks.",
                             registry=r)
        self.jobs_running = g("embedpipe_jobs_running", "Ingest jobs this service's worker loop is running.",
                              multiprocess_mode="livesum", registry=r)

    # ------------------------------------------------------------------ the hook
    def __call__(self, event: Event) -> None:
        """Count one pipeline event."""
        model = event.model
        if isinstance(event, CacheRead):
            if event.hits:
                self.tokens.labels(model, "saved").inc(event.saved_tokens)
                if event.saved_usd:
                    self.cost.labels(model, "saved").inc(event.saved_usd)
        elif isinstance(event, RequestSent):
            self.batch_inputs.labels(model).observe(event.inputs)
            self.batch_tokens.labels(model).observe(event.tokens_est)
        elif isinstance(event, RequestDone):
            self.upstream.labels(model, str(event.status) if event.status is not None else "none").inc()
            self.upstream_latency.labels(model).observe(event.seconds)
            if event.tokens:
                self.tokens.labels(model, "billed").inc(event.tokens)
            if event.cost_usd:
                self.cost.labels(model, "spent").inc(event.cost_usd)
        elif isinstance(event, Retried):
            self.retries.labels(model, event.reason).inc()
        elif isinstance(event, RateLimited):
            self.rate_limited.labels(model).inc()
        elif isinstance(event, LimiterWaited):
            self.limiter_wait.labels(model).observe(event.wait)
        elif isinstance(event, InputsFailed):
            self.dead_letters.labels(model).inc(len(event.failures))
        elif isinstance(event, CallDone):
            # Hits, misses and dedupes are final only at the end: single-flight turns misses into dedupes
            # and a re-read turns them into hits, after the CacheRead event.
            stats = event.stats
            if stats.hits:
                self.cache_hits.labels(model).inc(stats.hits)
            if stats.misses:
                self.cache_misses.labels(model).inc(stats.misses)
            if stats.deduped:
                self.deduped.labels(model).inc(stats.deduped)
        elif isinstance(event, LimitsObserved):
            if event.remaining_requests is not None:
                self.ratelimit_remaining.labels(model, "requests").set(event.remaining_requests)
            if event.remaining_tokens is not None:
                self.ratelimit_remaining.labels(model, "tokens").set(event.remaining_tokens)
        elif isinstance(event, BudgetChanged) and event.remaining_usd is not None:
            self.budget_remaining.labels(model, "").set(event.remaining_usd)
            self.budget_limit.labels(model, "").set(event.spent_usd + event.remaining_usd)

    # ------------------------------------------------------------------ what the service adds
    def declare(self, model: str) -> None:
        """Create ``model``'s series at zero, so rules and dashboards see them before the first event."""
        for family in (self.cache_hits, self.cache_misses, self.deduped, self.rate_limited, self.dead_letters,
                       self.upstream_latency, self.limiter_wait, self.queue_wait, self.batch_inputs,
                       self.batch_tokens, self.inflight, self.queue_depth):
            family.labels(model)
        for kind in ("billed", "saved"):
            self.tokens.labels(model, kind)
        for kind in ("spent", "saved"):
            self.cost.labels(model, kind)
        for reason in RETRY_REASONS:
            self.retries.labels(model, reason)

    def observe_request(self, model: str, route: str, status: int, key: str, seconds: float) -> None:
        """Count one answered HTTP request; ``key`` is a :func:`key_label` (or ``""`` for an open service)."""
        self.requests.labels(model, route, str(status), key).inc()
        self.request_duration.labels(model, route).observe(seconds)

    def key_budget(self, model: str, key: str, remaining_usd: float, limit_usd: float) -> None:
        """Set the budget of the key labelled ``key`` and what is left of it."""
        self.budget_remaining.labels(model, key).set(remaining_usd)
        self.budget_limit.labels(model, key).set(limit_usd)

    # ------------------------------------------------------------------ reading
    def job_state(self, state: str) -> None:
        """Count an ingest job entering ``state``."""
        self.jobs.labels(state).inc()

    def exposition(self) -> tuple[bytes, str]:
        """The text format of every metric and its content type; every worker's in multiprocess mode."""
        prom = self._prom
        if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            from prometheus_client import multiprocess

            registry = prom.CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
            return prom.generate_latest(registry), prom.CONTENT_TYPE_LATEST
        return prom.generate_latest(self.registry), prom.CONTENT_TYPE_LATEST

    def value(self, name: str, **labels: str) -> float:
        """One sample's value (0.0 when absent), for tests and the CLI's summary."""
        got = self.registry.get_sample_value(name, labels)
        return float(got) if got is not None else 0.0

    def start_http_server(self, port: int, addr: str = "127.0.0.1") -> Any:
        """Serve ``/metrics`` on its own port (the CLI's and Celery workers' ``--metrics-port``)."""
        server, _thread = self._prom.start_http_server(port, addr=addr, registry=self.registry)
        return server
