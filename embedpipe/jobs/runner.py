"""Run an embedding job: stream a source through the pipeline into a sink, resumable and incremental.

Re-running the same job is resume and incremental update in one. :func:`run` is a driver
of the job unit (:mod:`embedpipe.jobs.unit`): it plans chunks (each record compared with
the state: unchanged records are skipped, metadata-only changes queued for the sink, new
or changed texts sent on), processes two of them at a time (the next one embeds while
the last one is written; the cache, written as each response arrives, serves whatever an
interrupted run already paid for), and finishes the run (records the source no longer
holds are deleted, the sink compacts and a sample is read back).

Memory holds a few chunks at a time (``chunk_size`` records), never the corpus: the
state is in SQLite, and "seen in this run" is a generation number there.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from embedpipe.cost import BATCH_COMPLETION_WINDOW, batch_price_of, cost_of
from embedpipe.engine.flow import at_risk_for
from embedpipe.events import Event, LimiterWaited, RateLimited, RequestDone
from embedpipe.jobs.batch_api import batch_options, batch_provider, through_batches
from embedpipe.jobs.chunked import job_source, record_batches
from embedpipe.jobs.errors import BudgetRefusedError
from embedpipe.jobs.results import BatchInfo, JobEstimate, JobProgress, JobResult
from embedpipe.jobs.sinks import Sink, sink_from
from embedpipe.jobs.sources import Source, source_from
from embedpipe.jobs.spec import DEFAULT_CHUNK_SIZE, JobSpec
from embedpipe.jobs.spill import Spill
from embedpipe.jobs.state import SQLiteJobStore
from embedpipe.jobs.unit import (
    IN_FLIGHT,
    Chunk,
    ChunkOutcome,
    classify,
    default_owner,
    finish_job,
    job_pipeline,
    open_store,
    plan_chunks,
    process_chunk,
    secrets_of,
)
from embedpipe.pipeline import EmbeddingPipeline

log = logging.getLogger("embedpipe.jobs")

SourceLike = Any  # a path, a URL, a Source, an iterable of records or mappings, or a JobSpec


def _spec(source: SourceLike, out: Any, options: dict[str, Any]) -> JobSpec:
    if isinstance(source, JobSpec):
        if options or out is not None:
            given = sorted([*options, *(["out"] if out is not None else [])])
            raise TypeError(f"run(spec) takes the job from its JobSpec; also given: {', '.join(given)}")
        return source
    if not isinstance(source, (str, Source)) and not hasattr(source, "__fspath__"):
        source = source_from(source, id_field=options.get("id_field") or "id",
                             text_field=options.get("text_field") or "text")
    return JobSpec.from_options(source, out, **options)


def estimate_pass(spec: JobSpec, store: SQLiteJobStore, pipe: EmbeddingPipeline, sink: Sink | None) -> JobEstimate:
    """Read the source once and work out what a run would do and cost, with no API call and no write."""
    n = unchanged = meta_only = to_embed = dead = known = 0
    unique = cached = invalid = tokens = requests = 0
    src = job_source(spec, pipe)
    updates_metadata = sink.updates_metadata if sink is not None else True
    for records in record_batches(src, spec.chunk_size):
        entries, pending, same, meta, gone_dead, seen = classify(store, records, updates_metadata=updates_metadata,
                                                                 gen=None)
        n += len(entries)
        unchanged += same
        meta_only += meta
        dead += gone_dead
        known += seen
        to_embed += len(pending)
        if pending:
            est = pipe.estimate([e.record.text for e in pending])
            unique += est.unique
            cached += est.cached
            invalid += est.invalid
            tokens += est.tokens
            requests += est.requests
    rpm, tpm = spec.pipeline.rpm, spec.pipeline.tpm
    eta = None
    if rpm or tpm:
        eta = max(requests / rpm * 60 if rpm else 0.0, tokens / tpm * 60 if tpm else 0.0)
    batch_price = batch_price_of(pipe.provider.name, pipe.price_per_1m_tokens)
    return JobEstimate(model=pipe.provider.spec, records=n, unchanged=unchanged, metadata_only=meta_only,
                       to_embed=to_embed, cached=cached, to_send=unique - cached, invalid=invalid, dead=dead,
                       deletions=max(0, store.count() - known) if spec.delete_missing else 0, tokens=tokens,
                       cost_usd=cost_of(tokens, pipe.price_per_1m_tokens), requests=requests, eta_seconds=eta,
                       price_per_1m_tokens=pipe.price_per_1m_tokens, rpm=rpm, tpm=tpm,
                       batch_price_per_1m_tokens=batch_price, batch_cost_usd=cost_of(tokens, batch_price),
                       batch_window=BATCH_COMPLETION_WINDOW if batch_price is not None else None)


# ------------------------------------------------------------------ public API
def estimate(source: SourceLike, *, out: Any = None, api_key: str | None = None, rebuild: bool = False,
             **options: Any) -> JobEstimate:
    """What :func:`run` with the same arguments would do and cost, with no API call and no write.

    Reports records unchanged, metadata-only, to embed; distinct texts cached and to send;
    tokens, cost, requests and the ETA at ``rpm``/``tpm``; deletions. Without ``out`` or
    ``state``, every record counts as new. The cost is given at the direct and the batch price.
    """
    options.pop("batch_api", None)  # both prices are always shown
    spec = _spec(source, out, options)
    sink = sink_from(spec.sink) if spec.sink is not None else None
    pipe = job_pipeline(spec, sink=sink, api_key=api_key)
    try:
        store = SQLiteJobStore(None) if rebuild or (sink is None and spec.state is None) else \
            open_store(spec, sink, readonly=True)
        with store:
            store.check_model(pipe.provider.spec, pipe.expected_dims)
            return estimate_pass(spec, store, pipe, sink)
    finally:
        pipe.close()


class _Progress:
    """Counts settled chunks, and requests as they come back, and hands a :class:`JobProgress` to the callback.

    Between two chunks the record count advances by the inputs of each request that came
    back (capped below the next settled count), so a long chunk does not freeze the display;
    a 429 or a limiter wait shows as ``waiting``.
    """

    def __init__(self, callback: Callable[[JobProgress], None] | None, pipe: EmbeddingPipeline,
                 total: int | None) -> None:
        self.callback, self.pipe, self.total = callback, pipe, total
        self.records = self.unchanged = self.dead = 0
        self.inflight = 0  # inputs that came back in requests of chunks not settled yet
        self.waiting: str | None = None
        self.started = time.monotonic()
        self._lock = threading.Lock()
        if callback is not None:
            pipe.hooks.add(self._event)

    def close(self) -> None:
        if self.callback is not None:
            self.pipe.hooks.remove(self._event)

    def _event(self, event: Event) -> None:
        with self._lock:
            if isinstance(event, RequestDone):
                if event.status == 200 or event.status is None:
                    self.inflight += event.inputs
                self.waiting = None
            elif isinstance(event, RateLimited):
                self.waiting = f"rate-limited (429): retrying in {event.wait:.0f}s"
            elif isinstance(event, LimiterWaited) and event.wait >= 1:
                self.waiting = f"pacing to --rpm/--tpm: {event.wait:.0f}s"
            else:
                return
        self._report()

    def settled(self, chunk: Chunk, outcome: ChunkOutcome | None) -> None:
        with self._lock:
            self.records += chunk.read
            self.unchanged += chunk.unchanged
            self.dead += outcome.dead if outcome is not None else 0
            self.inflight = max(0, self.inflight - (outcome.embedded if outcome is not None else 0))
        self._report()

    def _report(self) -> None:
        if self.callback is None:
            return
        st = self.pipe.stats
        with self._lock:
            shown = self.records + self.inflight
            if self.total is not None:
                shown = min(shown, self.total)
            progress = JobProgress(records=shown, total=self.total, embedded=st.embedded, cached=st.hits,
                                   unchanged=self.unchanged, dead=self.dead, tokens=st.tokens, cost_usd=st.cost_usd,
                                   elapsed=time.monotonic() - self.started, waiting=self.waiting)
        self.callback(progress)


def process_all(spec: JobSpec, chunks: Iterable[Chunk], *, store: SQLiteJobStore, pipeline: EmbeddingPipeline,
                sink: Sink, progress: _Progress | None = None, spill: Spill | None = None) -> str:
    """Process ``chunks`` with :data:`IN_FLIGHT` at a time, settling them in order; ``"done"`` or ``"budget"``."""
    owner = default_owner()
    pending: deque[tuple[Chunk, Future[ChunkOutcome] | None]] = deque()
    budget = False

    def settle() -> None:
        nonlocal budget
        chunk, future = pending.popleft()
        outcome = future.result() if future is not None else None
        budget = budget or (outcome is not None and outcome.budget_exceeded)
        if progress is not None:
            progress.settled(chunk, outcome)

    with ThreadPoolExecutor(IN_FLIGHT, thread_name_prefix="embedpipe-job") as pool:
        try:
            for chunk in chunks:
                future = (pool.submit(process_chunk, spec, chunk, store=store, pipeline=pipeline, sink=sink,
                                      owner=owner, spill=spill) if chunk.records else None)
                pending.append((chunk, future))
                while pending and (len(pending) > IN_FLIGHT or pending[0][1] is None or pending[0][1].done()):
                    settle()
                if budget:
                    break
            while pending:
                settle()
        finally:
            for _, future in pending:
                if future is not None:
                    future.cancel()
    return "budget" if budget else "done"


def run(source: SourceLike, *, out: Any = None, api_key: str | None = None, rebuild: bool = False,
        estimate_first: bool = True, on_estimate: Callable[[JobEstimate], None] | None = None,
        progress: Callable[[JobProgress], None] | None = None, **options: Any) -> JobResult:
    """Embed every record of ``source`` into ``out``; run it again to resume or to update.

    ``source``: a ``.jsonl``/``.csv``/``.parquet`` path (``format`` to force one), a folder of
    ``.txt``/``.md`` files, a source URL, an iterable of records or mappings, or a whole
    :class:`~embedpipe.jobs.JobSpec` (then give no other option). ``out``: a folder (Parquet
    dataset, the default), a ``.jsonl`` path, a sink URL, a :class:`~embedpipe.jobs.Sink`, or
    a LlamaIndex or LangChain vector store (which need ``state=``). The other ``options``
    are the fields of :class:`~embedpipe.PipelineConfig` (``model``, ``cache``, ``rpm``…)
    and of the job (``chunk_size``, ``budget_usd``, ``state``, ``delete_missing``,
    ``id_field``, ``text_field``, ``format``), with the defaults those classes state. The
    API key comes from ``api_key`` or the environment.

    With ``estimate_first`` (the default), the source is read once to estimate the run
    (handed to ``on_estimate``); if the cost of the uncached part exceeds ``budget_usd``,
    :class:`~embedpipe.jobs.BudgetRefusedError` is raised before anything is sent. During
    the run the budget stops it cleanly, checkpointed (``result.budget_exceeded``): that is
    the only check when ``estimate_first=False``.

    ``batch_api=True`` (or a :class:`~embedpipe.jobs.BatchOptions`) sends the uncached texts
    through the provider's Batch API at its batch price (OpenAI, Azure OpenAI: half), within
    a 24-hour window, before the chunks are written; see :mod:`embedpipe.jobs.batch_api`.
    The budget is then checked against the batch price.

    Raises :class:`~embedpipe.jobs.JobConflictError` when ``out`` holds another model's
    vectors (pass ``rebuild=True``), :class:`~embedpipe.jobs.JobAbortedError` when the API
    fails every request of a chunk (an outage: what was done is kept).
    """
    batch = batch_options(options.pop("batch_api", None))
    spec = _spec(source, out, options)
    sink = sink_from(spec.sink)
    pipe = job_pipeline(spec, sink=sink, api_key=api_key)
    try:
        if batch is not None:
            batch_provider(pipe)  # refused here, before anything is read or sent
        with open_store(spec, sink, secrets=secrets_of(pipe, api_key)) as store:
            store.lock()
            spill = None
            if str(store.path) != ":memory:":
                # Room for the chunks in flight, reserved before anything is sent: if the disk fills, what was
                # paid for goes there, and the next run (this line) puts it into the cache first.
                spill = Spill.beside(store.path, vectors=spec.chunk_size * IN_FLIGHT, dimensions=pipe.expected_dims)
                spill.restore(pipe.cache)
                spill.reserve()
            est = None
            if estimate_first:
                sink.bind(pipe)
                if not rebuild:
                    store.check_model(pipe.provider.spec, pipe.expected_dims)
                # A rebuild is estimated against an empty state, and wipes nothing until the estimate passes.
                with contextlib.ExitStack() as stack:
                    view = stack.enter_context(SQLiteJobStore(None)) if rebuild else store
                    est = estimate_pass(spec, view, pipe, sink)
                if on_estimate is not None:
                    on_estimate(est)
                cost = est.batch_cost_usd if batch is not None else est.cost_usd  # a batch run pays the batch price
                if spec.budget_usd is not None and cost is not None and cost > spec.budget_usd:
                    raise BudgetRefusedError(
                        f"the estimate for the uncached part, ${cost:.6f} ({est.tokens:,} tokens), exceeds "
                        f"the budget of ${spec.budget_usd:.6f}; nothing was sent", est, spec.budget_usd)
            if est is not None and est.tokens:
                # What a crash may re-bill is what is in flight: at most a small share of the job.
                pipe.max_tokens_in_flight = at_risk_for(est.tokens)
            total = est.records if est is not None else None
            if total is None and progress is not None:
                total = job_source(spec).count()
            tracker = _Progress(progress, pipe, total)
            started = time.time()
            before = store.latest_run()
            chunks = plan_chunks(spec, store, pipeline=pipe, sink=sink, rebuild=rebuild)
            batches = None
            try:
                if batch is not None:
                    chunks, batches = through_batches(spec, chunks, store=store, pipeline=pipe, options=batch)
                status = process_all(spec, chunks, store=store, pipeline=pipe, sink=sink, progress=tracker,
                                     spill=spill)
            except BaseException:
                chunks.close()
                gen = store.latest_run()
                if gen is not None and gen != before:
                    store.end_run(gen, "error")
                raise
            finally:
                tracker.close()
            chunks.close()
            result = finish_job(spec, store, sink=sink, status=status, started=started)
            if spill is not None:
                spill.remove()
            return _with_estimate(result, est, batches.infos() if batches is not None else ())
    finally:
        pipe.close()
        sink.close()


def _with_estimate(result: JobResult, est: JobEstimate | None, batches: tuple[BatchInfo, ...] = ()) -> JobResult:
    import dataclasses

    return dataclasses.replace(result, estimate=est, batches=batches)


__all__ = ["DEFAULT_CHUNK_SIZE", "JobEstimate", "JobProgress", "JobResult", "estimate", "estimate_pass",
           "process_all", "run"]
