"""Celery workers for embedpipe jobs: ``celery -A embedpipe.distributed.celery worker`` (or ``embedpipe worker``).

One task, ``embedpipe.process_chunk``, runs :func:`embedpipe.jobs.process_chunk` on a chunk
the submitter published, against the job's :class:`~embedpipe.distributed.ledger.RedisJobLedger`.
Celery only moves messages; what makes a redelivered message harmless is embedpipe's:

- the chunk's lease (a copy that finds a live lease backs off and asks again later,
  without calling the provider) and its atomic commit (a committed chunk is skipped);
- the cache, shared by every worker, which serves whatever a killed worker paid for;
- attempts counted by embedpipe at each start: above ``max_attempts`` (3) a chunk is
  bisected, so records that kill their worker every time end up alone and dead-lettered
  while the rest are embedded;
- one rate limit for every worker (the Redis limiter keyed by provider, model and a hash of
  the API key; Celery's ``rate_limit`` counts tasks, not tokens, and is not used) and one
  budget (spend reservations in the ledger). Both fail closed: when their Redis is
  unreachable a worker retries the chunk later rather than spend on its own.

Settings (:func:`make_app` sets them; ``**overrides`` change any): ``acks_late``,
``reject_on_worker_lost`` and prefetch 1, so a message is acknowledged only after its chunk
is committed and a killed pool child's message goes back at once; on Redis a visibility
timeout (:data:`VISIBILITY_TIMEOUT`) longer than the task time limit (:data:`TASK_TIME_LIMIT`),
so a whole worker's death costs at most that long, not kombu's default hour.

Secrets never travel in messages: a task carries a :class:`~embedpipe.jobs.JobSpec` (which holds
no key), the chunk's records and the ledger's URL without its password; workers read API keys
(``OPENAI_API_KEY``…) and the ledger's password (``EMBEDPIPE_STORE_PASSWORD``) from their own
environment. The asyncio engine runs on embedpipe's own loop thread, started lazily in each
process, so prefork children (started by fork), threads and solo pools all work; clients are
opened after the fork, on first use.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import threading
from typing import Any

from celery import Celery, Task

from embedpipe.config import with_password
from embedpipe.distributed.ledger import LedgerUnavailableError, RedisJobLedger
from embedpipe.errors import ConfigurationError
from embedpipe.jobs import Chunk, JobSpec, Sink, process_chunk, sink_from
from embedpipe.jobs.errors import JobAbortedError
from embedpipe.jobs.state import Failed
from embedpipe.jobs.unit import default_owner, job_pipeline
from embedpipe.limits import RateLimiterUnavailableError
from embedpipe.pipeline import EmbeddingPipeline

log = logging.getLogger("embedpipe.distributed")

TASK_NAME = "embedpipe.process_chunk"
#: a chunk's lease: renewed every third of it while the chunk is embedded, so a dead worker's chunk is
#: free again within this long
LEASE_SECONDS = 20.0
#: starts of a chunk (deliveries that did not end in a commit) before it is bisected
MAX_ATTEMPTS = 3
#: the hard time limit of one chunk's task, and the Redis transport's visibility timeout (longer)
TASK_TIME_LIMIT = 90
VISIBILITY_TIMEOUT = 100
#: how long a task waits before trying again when its lease is held, or its stores are unreachable
BACKOFF_SECONDS = 5.0


def _with_password(url: str, env: str = "EMBEDPIPE_STORE_PASSWORD") -> str:
    """``url`` with the password from ``$EMBEDPIPE_STORE_PASSWORD`` put back, when it has none."""
    secret = os.environ.get(env)
    return with_password(url, secret) if secret else url


def serve_worker_metrics(port: int) -> Any:
    """Serve ``/metrics`` for every pool process of this worker, aggregated (prometheus-client's multiprocess mode).

    Call it in the worker's main process before the pool starts: it points
    ``PROMETHEUS_MULTIPROC_DIR`` at a fresh folder, which the pool processes inherit.
    """
    import tempfile

    os.environ.setdefault("PROMETHEUS_MULTIPROC_DIR", tempfile.mkdtemp(prefix="embedpipe-metrics-"))
    os.environ["EMBEDPIPE_WORKER_METRICS"] = "1"
    try:
        import prometheus_client as prom
        from prometheus_client import multiprocess
    except ImportError as exc:
        raise ConfigurationError("worker metrics need prometheus-client: pip install 'embedpipe[serve]'") from exc
    registry = prom.CollectorRegistry()
    multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
    server, _ = prom.start_http_server(port, addr="127.0.0.1", registry=registry)
    return server


def limiter_key(spec: JobSpec, api_key: str | None) -> str:
    """The shared rate limit's key: provider and model, and a hash of the API key (keys have their own limits)."""
    digest = hashlib.sha256((api_key or "").encode()).hexdigest()[:12]
    return f"{spec.pipeline.model}:{digest}"


class _Workers:
    """What one worker process keeps between tasks: pipelines, sinks and ledgers, built after the fork."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pid = os.getpid()
        self.pipelines: dict[str, EmbeddingPipeline] = {}
        self.sinks: dict[str, Sink] = {}
        self.ledgers: dict[tuple[str, str], RedisJobLedger] = {}
        self.owner = default_owner()
        #: this process's Prometheus hook, when the worker serves metrics (embedpipe worker --metrics-port)
        self.metrics: Any = None
        if os.environ.get("EMBEDPIPE_WORKER_METRICS"):
            from embedpipe.metrics import PrometheusMetrics

            self.metrics = PrometheusMetrics()

    def _fresh(self) -> None:
        if self._pid != os.getpid():  # a forked child: nothing of the parent's is usable here
            self.__init__()  # type: ignore[misc]

    def pipeline(self, spec: JobSpec, store_url: str) -> EmbeddingPipeline:
        self._fresh()
        key = spec.to_json() + store_url
        with self._lock:
            pipe = self.pipelines.get(key)
            if pipe is None:
                config = spec.pipeline
                api_key = os.environ.get("OPENAI_API_KEY")
                if config.rate_limiter is None and (config.rpm or config.tpm):
                    # One limit for every worker, failing closed: no worker spends on a limit of its own.
                    sep = "&" if "?" in store_url else "?"
                    limiter = f"{store_url}{sep}key={limiter_key(spec, api_key)}&on_error=raise"
                    config = config.replace(rate_limiter=limiter)
                if self.metrics is not None:
                    config = config.replace(hooks=(*config.hooks, self.metrics))
                # The budget is the ledger's (reservations shared by all workers), not this process's.
                pipe = job_pipeline(spec.replace(pipeline=config, budget_usd=None))
                if spec.budget_usd is not None and pipe.price_per_1m_tokens is None:
                    pipe.close()
                    raise ConfigurationError(f"budget_usd is set but the price of {config.model!r} is unknown")
                self.pipelines[key] = pipe
            return pipe

    def sink(self, spec: JobSpec) -> Sink:
        self._fresh()
        with self._lock:
            sink = self.sinks.get(spec.job_id)
            if sink is None:
                sink = self.sinks[spec.job_id] = sink_from(spec.sink)
            return sink

    def ledger(self, store_url: str, job_id: str) -> RedisJobLedger:
        self._fresh()
        with self._lock:
            ledger = self.ledgers.get((store_url, job_id))
            if ledger is None:
                ledger = self.ledgers[(store_url, job_id)] = RedisJobLedger(_with_password(store_url), job_id)
            return ledger


_workers = _Workers()


def _halves(chunk: Chunk) -> list[Chunk]:
    mid = len(chunk.records) // 2
    return [Chunk(chunk.job_id, chunk.gen, chunk.index, part, read=0) for part in
            (chunk.records[:mid], chunk.records[mid:])]


def run_chunk(task: Task, spec_json: str, chunk_data: dict[str, Any], store_url: str,
              max_attempts: int = MAX_ATTEMPTS) -> str:
    """The body of the ``embedpipe.process_chunk`` task (see the module's docstring)."""
    spec = JobSpec.from_json(spec_json)
    chunk = Chunk.from_dict(chunk_data)
    ledger = _workers.ledger(store_url, spec.job_id)
    lease = float(getattr(task.app.conf, "embedpipe_lease_seconds", None) or LEASE_SECONDS)
    try:
        if ledger.cancelled():
            return "cancelled"
        cid = chunk.chunk_id
        if ledger.chunk_status(cid) == "done":
            return "skipped"
        if ledger.attempts(cid) >= max_attempts:
            return _poison(task, spec_json, chunk, ledger, store_url, lease)
        outcome = process_chunk(spec, chunk, store=ledger, pipeline=_workers.pipeline(spec, store_url),
                                sink=_workers.sink(spec), owner=_workers.owner, lease_seconds=lease)
    except (LedgerUnavailableError, RateLimiterUnavailableError) as exc:
        # Fail closed: never spend on a limit or a budget of this worker's own. Try again later.
        log.warning("embedpipe: %s; chunk retried in %.0fs", exc, BACKOFF_SECONDS)
        raise task.retry(countdown=BACKOFF_SECONDS, max_retries=None) from exc
    except JobAbortedError as exc:  # an outage: nothing was dead-lettered for it
        log.warning("embedpipe: %s", exc)
        raise task.retry(countdown=BACKOFF_SECONDS * 6, max_retries=None) from exc
    except Exception as exc:
        # Anything else (a sink that cannot write, a full disk): never let Celery drop the message, which would
        # leave the job waiting for this chunk. Each start counts an attempt, so a chunk that keeps failing is
        # bisected and its failing records end as dead letters with this reason.
        with contextlib.suppress(LedgerUnavailableError):
            ledger.note_error(chunk.chunk_id, f"{type(exc).__name__}: {exc}")
        log.warning("embedpipe: chunk %s failed (%s: %s); retried in %.0fs", chunk.chunk_id, type(exc).__name__,
                    exc, BACKOFF_SECONDS)
        raise task.retry(countdown=BACKOFF_SECONDS, max_retries=None) from exc
    if outcome.status == "budget":
        ledger.stop_at_budget(chunk.chunk_id)
    if outcome.status == "leased":
        # Another worker holds a live lease: this copy is a redelivery. Ask again once that lease could be gone.
        raise task.retry(countdown=lease / 2, max_retries=None)
    return outcome.status


def _poison(task: Task, spec_json: str, chunk: Chunk, ledger: RedisJobLedger, store_url: str, lease: float) -> str:
    """A chunk that started ``max_attempts`` times without a commit: bisect it, or dead-letter its one record."""
    cid = chunk.chunk_id
    owner = _workers.owner
    if ledger.acquire_lease(cid, chunk.gen, owner, lease) is None:
        return "skipped"
    if len(chunk.records) == 1:
        (entry,) = chunk.records
        last = ledger.last_error(cid)
        reason = (f"the record failed {ledger.attempts(cid) - 1} times in its worker (last: {last})" if last else
                  f"the record stopped its worker {ledger.attempts(cid) - 1} times (a crash, or out of memory)")
        ledger.commit(chunk.gen, [], [Failed(entry, reason)], chunk_id=cid, seq=chunk.seq, counts={"dead": 1})
        log.warning("embedpipe: record %r dead-lettered: %s", entry.record.id, reason)
        return "dead"
    children = _halves(chunk)
    ledger.mark_pending([c.chunk_id for c in children])
    ledger.commit(chunk.gen, [], [], chunk_id=cid, seq=chunk.seq, status="split",
                  children=[c.to_dict() for c in children])
    for child in children:
        task.app.send_task(TASK_NAME, args=[spec_json, child.to_dict(), store_url])
    log.warning("embedpipe: chunk %s failed %d times; bisected to find what kills its worker", cid,
                ledger.attempts(cid) - 1)
    return "split"


def make_app(broker_url: str, store_url: str | None = None, **overrides: Any) -> Celery:
    """A Celery app whose workers process embedpipe chunks, with the settings of the module's docstring.

    ``embedpipe_lease_seconds`` (an override) sets the chunk lease (default :data:`LEASE_SECONDS`).

    ``store_url`` is the Redis of the jobs' shared ledger (by default the broker's, if it is a
    Redis URL); it is only recorded here for :func:`embedpipe.distributed.submit`.
    """
    app = Celery("embedpipe", broker=broker_url, set_as_current=False)
    settings: dict[str, Any] = {
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        "task_time_limit": TASK_TIME_LIMIT,
        "task_serializer": "json",
        "accept_content": ["json"],
        "task_ignore_result": True,
        "broker_connection_retry_on_startup": True,
        "worker_hijack_root_logger": False,
        # kombu scans for unacknowledged messages older than the visibility timeout every interval * throttle
        # seconds (10 * 10 by default); scanning every 5 s bounds a dead worker's cost to about 105 s.
        "broker_transport_options": {"visibility_timeout": VISIBILITY_TIMEOUT, "unacked_restore_interval": 5,
                                     "unacked_restore_throttle": 1},
    }
    settings.update(overrides)
    app.conf.update(settings)
    app.conf.embedpipe_store_url = store_url or (broker_url if broker_url.startswith(("redis://", "rediss://"))
                                                 else None)

    @app.task(name=TASK_NAME, bind=True, acks_late=True, reject_on_worker_lost=True)  # type: ignore[untyped-decorator]
    def process_chunk_task(self: Task, spec_json: str, chunk: dict[str, Any], store_url: str) -> str:
        return run_chunk(self, spec_json, chunk, store_url)

    return app


def _default_app() -> Celery:
    broker = os.environ.get("EMBEDPIPE_BROKER_URL", "redis://127.0.0.1:6379/0")
    return make_app(broker, os.environ.get("EMBEDPIPE_STORE_URL"))


#: the app ``celery -A embedpipe.distributed.celery worker`` runs: broker from ``$EMBEDPIPE_BROKER_URL``
app = _default_app()

__all__ = ["BACKOFF_SECONDS", "LEASE_SECONDS", "MAX_ATTEMPTS", "TASK_NAME", "TASK_TIME_LIMIT", "VISIBILITY_TIMEOUT",
           "app", "limiter_key", "make_app", "run_chunk", "serve_worker_metrics"]
