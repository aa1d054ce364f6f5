"""Distributed runs: the submitter plans chunks and publishes them to Celery workers on any number of hosts.

>>> from embedpipe import distributed                                          # doctest: +SKIP
>>> from embedpipe.distributed.celery import make_app                          # doctest: +SKIP
>>> app = make_app("redis://queue:6379/0")                                     # doctest: +SKIP
>>> job = distributed.submit(spec, app=app)                                    # doctest: +SKIP
>>> job.wait().exit_code                                                       # doctest: +SKIP
0

The submitting process is the only one that reads the source: it runs
:func:`~embedpipe.jobs.plan_chunks` against the job's own store (the source snapshot, by
default ``OUT/_state.sqlite``), publishes every chunk with something to embed (the records
travel in the task message), and applies each chunk's committed result, read from the
shared :class:`~embedpipe.distributed.ledger.RedisJobLedger`, to its store. When every chunk
is in, it runs :func:`~embedpipe.jobs.finish_job`: deletions, compaction, read-back.

Submitting the same spec again resumes it: its ``job_id`` comes from the spec, results
committed meanwhile are applied first, and only what is still pending is published.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from embedpipe.config import strip_password
from embedpipe.deadletters import DeadLetter
from embedpipe.distributed.ledger import LedgerUnavailableError, RedisJobLedger, entry_of
from embedpipe.errors import ConfigurationError
from embedpipe.jobs import Chunk, JobEstimate, JobProgress, JobResult, JobSpec, SQLiteJobStore, finish_job, plan_chunks
from embedpipe.jobs.errors import BudgetRefusedError, JobAbortedError
from embedpipe.jobs.runner import estimate_pass
from embedpipe.jobs.sinks import JSONLSink, Sink, sink_from
from embedpipe.jobs.state import Failed, Written
from embedpipe.jobs.unit import job_pipeline, open_store

if TYPE_CHECKING:
    from celery import Celery

#: seconds between two reads of the ledger while following a job
POLL_SECONDS = 0.2
#: how long the submitter waits for an unreachable ledger before it stops the job (checkpointed)
LEDGER_OUTAGE_SECONDS = 120.0

log = logging.getLogger("embedpipe.distributed")


@dataclass
class _Counts:
    records: int = 0
    unchanged: int = 0
    embedded: int = 0
    cached: int = 0
    dead: int = 0
    tokens: int = 0
    cost_usd: float = 0.0


class DistributedJob:
    """A job submitted to Celery workers: follow it with :meth:`progress`, :meth:`wait`, :meth:`cancel`."""

    def __init__(self, spec: JobSpec, app: Celery, store_url: str, *, rebuild: bool = False,
                 estimate_first: bool = True, on_estimate: Callable[[JobEstimate], None] | None = None,
                 progress: Callable[[JobProgress], None] | None = None, api_key: str | None = None,
                 poll: float = POLL_SECONDS) -> None:
        spec_json = spec.to_json()  # refuses a spec holding objects: workers could not rebuild it
        self.spec = spec
        self.job_id = spec.job_id
        self.app = app
        self.store_url = store_url
        self.ledger = RedisJobLedger(store_url, spec.job_id)
        self._spec_json = spec_json
        self._rebuild = rebuild
        self._estimate_first = estimate_first
        self._on_estimate = on_estimate
        self._callback = progress
        self._api_key = api_key
        self._poll = poll
        self._counts = _Counts()
        self._total: int | None = None
        self._started = time.monotonic()
        self._lock = threading.Lock()
        self._result: JobResult | None = None
        self._error: BaseException | None = None
        self._cancel = threading.Event()
        self._thread = threading.Thread(target=self._main, name=f"embedpipe-job-{self.job_id}", daemon=True)
        self._thread.start()

    def __repr__(self) -> str:
        return f"DistributedJob({self.job_id!r}, state={'finished' if self._result else 'running'})"

    # ------------------------------------------------------------------ the public face
    def progress(self) -> JobProgress:
        """Where the job is: records settled, embedded, cached, dead, tokens and cost, so far."""
        with self._lock:
            c = self._counts
            return JobProgress(records=c.records, total=self._total, embedded=c.embedded, cached=c.cached,
                               unchanged=c.unchanged, dead=c.dead, tokens=c.tokens, cost_usd=c.cost_usd,
                               elapsed=time.monotonic() - self._started)

    def wait(self, timeout: float | None = None) -> JobResult:
        """Block until the job finished; its :class:`~embedpipe.jobs.JobResult` (re-raises what stopped it)."""
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise TimeoutError(f"job {self.job_id} is still running after {timeout}s")
        if self._error is not None:
            raise self._error
        assert self._result is not None  # the thread ended without an error, so it set a result
        return self._result

    def cancel(self) -> None:
        """Stop: workers leave the remaining chunks alone; what was committed is kept. Resubmit to carry on."""
        self.ledger.cancel()
        self._cancel.set()

    def dead_letters(self) -> list[DeadLetter]:
        """The job's dead letters so far (from its store, where the submitter applies them)."""
        sink = sink_from(self.spec.sink)
        with open_store(self.spec, sink, readonly=True) as store:
            return store.dead_letters()

    # ------------------------------------------------------------------ the submitter's loop
    def _main(self) -> None:
        try:
            self._result = self._run()
        except BaseException as exc:  # handed to wait()
            self._error = exc

    def _run(self) -> JobResult:
        spec = self.spec
        sink = sink_from(spec.sink)
        if isinstance(sink, JSONLSink):
            raise ConfigurationError("a JSONL output cannot be written by many workers at once; use a Parquet "
                                     "folder on a path every worker shares, or a database sink")
        pipe = job_pipeline(spec, sink=sink, api_key=self._api_key)
        try:
            with open_store(spec, sink) as store:
                store.lock()
                self.ledger.register(self._spec_json, spec.budget_usd,
                                     dimensions=None if self._rebuild else store.get("dimensions"))
                self.ledger.resume()
                applied = self._apply(store, sink, 0, {})
                if self._estimate_first:
                    sink.bind(pipe)
                    if not self._rebuild:
                        store.check_model(pipe.provider.spec, pipe.expected_dims)
                    with contextlib.ExitStack() as stack:
                        view = stack.enter_context(SQLiteJobStore(None)) if self._rebuild else store
                        est = estimate_pass(spec, view, pipe, sink)
                    self._total = est.records
                    if self._on_estimate is not None:
                        self._on_estimate(est)
                    if spec.budget_usd is not None and est.cost_usd is not None and est.cost_usd > spec.budget_usd:
                        raise BudgetRefusedError(
                            f"the estimate for the uncached part, ${est.cost_usd:.6f} ({est.tokens:,} tokens), "
                            f"exceeds the budget of ${spec.budget_usd:.6f}; nothing was sent", est, spec.budget_usd)
                return self._follow(store, sink, pipe, applied)
        finally:
            pipe.close()

    def _publish(self, chunk: Chunk) -> None:
        from embedpipe.distributed.celery import TASK_NAME

        self.app.send_task(TASK_NAME, args=[self._spec_json, chunk.to_dict(), strip_password(self.store_url)])

    def _follow(self, store: SQLiteJobStore, sink: Sink, pipe: Any, applied: int) -> JobResult:
        spec = self.spec
        pending: dict[str, Chunk] = {}
        started = time.time()
        budget = False
        down: float | None = None
        chunks = plan_chunks(spec, store, pipeline=pipe, sink=sink, rebuild=self._rebuild)
        try:
            for chunk in chunks:
                with self._lock:
                    self._counts.records += chunk.read - len(chunk.records)
                    self._counts.unchanged += chunk.unchanged
                if chunk.records:
                    self.ledger.mark_pending([chunk.chunk_id])
                    pending[chunk.chunk_id] = chunk
                    self._publish(chunk)
                applied = self._apply(store, sink, applied, pending)
                budget = budget or self._budget_stopped(pending)
                if budget or self._cancel.is_set():
                    break
        finally:
            chunks.close()
        while pending and not budget and not self._cancel.is_set():
            time.sleep(self._poll)
            try:
                applied = self._apply(store, sink, applied, pending)
                budget = self._budget_stopped(pending)
                if self.ledger.get("spec") is None:
                    applied = self._republish(pending)
            except LedgerUnavailableError as exc:
                # Redis is down (a restart, a failover): wait for it, within reason; nothing is lost meanwhile.
                down = down if down is not None else time.monotonic()
                if time.monotonic() - down > LEDGER_OUTAGE_SECONDS:
                    raise JobAbortedError(f"{exc}; the job stopped, checkpointed: submit it again to carry on") \
                        from exc
                continue
            down = None
        if self._cancel.is_set():
            gen = store.latest_run()
            if gen is not None:
                store.end_run(gen, "cancelled")
            raise JobAbortedError(f"job {self.job_id} was cancelled; what was committed is kept. Submit it again "
                                  "(embedpipe jobs resume) to carry on")
        if budget:
            # Chunks already running may still commit: give them their lease's time, then stop.
            deadline = time.monotonic() + 30
            while pending and self.ledger.live_leases() and time.monotonic() < deadline:
                time.sleep(self._poll)
                applied = self._apply(store, sink, applied, pending)
            self._apply(store, sink, applied, pending)
        return finish_job(spec, store, sink=sink, status="budget" if budget else None, started=started)

    def _republish(self, pending: dict[str, Chunk]) -> int:
        """The ledger came back empty (Redis restarted without persistence): register the job and publish what
        is still pending again. What was committed before is in this process's store already."""
        log.warning("embedpipe: the job ledger of %s lost its state; publishing %d pending chunk(s) again",
                    self.job_id, len(pending))
        self.ledger.register(self._spec_json, self.spec.budget_usd)
        self.ledger.mark_pending(list(pending))
        for chunk in list(pending.values()):
            self._publish(chunk)
        return 0

    def _budget_stopped(self, pending: dict[str, Chunk]) -> bool:
        if self.spec.budget_usd is None or not pending:
            return False
        states = self.ledger.states()
        return any(states.get(cid) == "budget" for cid in pending)

    def _apply(self, store: SQLiteJobStore, sink: Sink, start: int, pending: dict[str, Chunk]) -> int:
        """Apply committed results from position ``start`` of the ledger's done list; return the next position."""
        results = self.ledger.results(start)
        for cid, res in results:
            for child in res.get("children") or ():
                part = Chunk.from_dict(child)
                pending[part.chunk_id] = part
            written = [Written(entry_of(w), w["loc"]) for w in res["written"]]
            failed = [Failed(entry_of(f), f["reason"]) for f in res["failed"]]
            samples = [(float(s["priority"]), entry_of(s), np.asarray(s["vector"], dtype=np.float32))
                       for s in res["samples"]]
            counts = res["counts"]
            if store.chunk_status(cid) != "done":
                store.commit(int(res["gen"]), written, failed, res["meta"], chunk_id=cid, seq=res["seq"],
                             counts=counts or None, samples=samples, sample_size=sink.verify_sample)
                chunk = pending.get(cid)
                with self._lock:
                    c = self._counts
                    c.records += len(chunk.records) if chunk is not None and not res.get("children") else 0
                    c.embedded += int(counts.get("embedded", 0))
                    c.cached += int(counts.get("cached", 0))
                    c.dead += int(counts.get("dead", 0))
                    c.tokens += int(counts.get("tokens", 0))
                    c.cost_usd += float(counts.get("cost_usd", 0.0))
            pending.pop(cid, None)
        if results and self._callback is not None:
            self._callback(self.progress())
        return start + len(results)


def submit(spec: JobSpec, *, app: Celery, store: str | None = None, rebuild: bool = False,
           estimate_first: bool = True, on_estimate: Callable[[JobEstimate], None] | None = None,
           progress: Callable[[JobProgress], None] | None = None, api_key: str | None = None) -> DistributedJob:
    """Plan ``spec`` and publish its chunks to ``app``'s workers; returns at once with a :class:`DistributedJob`.

    ``store`` is the Redis URL of the shared ledger (by default the app's, which is the
    broker's on a Redis broker; required with RabbitMQ).
    """
    url = store or getattr(app.conf, "embedpipe_store_url", None)
    if not url:
        raise ConfigurationError("a distributed job needs a Redis store for its shared state: pass "
                                 "store='redis://host:6379/0' (--store); it defaults to a Redis broker's URL")
    return DistributedJob(spec, app, url, rebuild=rebuild, estimate_first=estimate_first, on_estimate=on_estimate,
                          progress=progress, api_key=api_key)


__all__ = ["POLL_SECONDS", "DistributedJob", "submit"]
