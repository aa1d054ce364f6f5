"""Run an embedding job: stream a source through the pipeline into a sink, resumable and incremental.

Re-running the same job is resume and incremental update in one. Per chunk of records
the runner compares each id's text and metadata hashes with the state: unchanged
records are skipped, metadata-only changes are queued for the sink, and new or changed
texts are embedded (the cache, written as each response arrives, serves whatever an
interrupted run already paid for). The sink writes the chunk durably, then the state
commits it. When the whole source has been read, records it no longer holds are
deleted and the sink compacts.

Memory holds a few chunks at a time (``chunk_size`` records, two in flight), never the
corpus: the state is in SQLite, and "seen in this run" is a generation number there.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from embedpipe._urls import public_url
from embedpipe.cache import CacheBackend
from embedpipe.cost import cost_of
from embedpipe.errors import BudgetExceededError, ConfigurationError
from embedpipe.jobs.errors import BudgetRefusedError, JobAbortedError, JobConflictError
from embedpipe.jobs.records import Entry, Record, chunked
from embedpipe.jobs.sinks import Sink, sink_from
from embedpipe.jobs.sources import Source, source_from
from embedpipe.jobs.state import Failed, JobState, Written
from embedpipe.pipeline import EmbeddingArray, EmbeddingPipeline

log = logging.getLogger("embedpipe.jobs")

#: records read, compared and written together; a chunk is one embed call and one output part
DEFAULT_CHUNK_SIZE = 2000
#: chunks embedding at once: the next one is sent while the last one is written
IN_FLIGHT = 2
_DEFAULT: Any = object()

SourceLike = str | os.PathLike[str] | Source | Iterable[Record | Mapping[str, Any]]


# ------------------------------------------------------------------ results
@dataclass(frozen=True)
class JobEstimate:
    """What a run would do and cost, worked out from the source, the state and the cache, with no API call."""

    model: str
    records: int           #: records in the source
    unchanged: int         #: already in the output as they are
    metadata_only: int     #: text unchanged, metadata changed: updated without embedding
    to_embed: int          #: new or changed records
    cached: int            #: distinct texts among those already in the cache
    to_send: int           #: distinct texts the provider must embed
    invalid: int           #: empty texts (they go to the dead-letter queue)
    dead: int              #: dead letters left alone (unchanged since they failed)
    deletions: int         #: output records no longer in the source
    tokens: int            #: tokens to send
    cost_usd: float | None  #: their cost; None when the model's price is unknown
    requests: int          #: requests to send
    eta_seconds: float | None  #: lower bound at rpm/tpm; None without limits
    price_per_1m_tokens: float | None = None
    rpm: int | None = None
    tpm: int | None = None

    @property
    def cached_share(self) -> float:
        """Share of the source's records that need no API call (in the output, or their text cached)."""
        return 1.0 - self.to_send / self.records if self.records else 1.0


@dataclass(frozen=True)
class JobProgress:
    """Where a running job is; handed to the ``progress`` callback after each chunk."""

    records: int           #: records read and settled so far
    total: int | None      #: records in the source, when known
    embedded: int          #: texts the provider embedded
    cached: int            #: texts served from the cache
    unchanged: int         #: records already in the output
    dead: int              #: records sent to the dead-letter queue
    tokens: int
    cost_usd: float | None
    elapsed: float

    @property
    def hit_share(self) -> float | None:
        """Share of settled vectors that cost nothing (unchanged, or from the cache)."""
        free = self.unchanged + self.cached
        total = free + self.embedded
        return free / total if total else None


@dataclass(frozen=True)
class JobResult:
    """What a run did. ``exit_code``: 0 all embedded, 3 finished with dead letters, 4 stopped at the budget."""

    out: str
    state: str
    model: str
    dimensions: int | None
    records: int           #: records read from the source
    written: int           #: rows written with a new vector
    embedded: int          #: texts the provider embedded
    cached: int            #: texts served from the cache
    unchanged: int         #: records left as they were
    metadata_updated: int  #: rows whose metadata alone changed
    deleted: int           #: rows removed because their record left the source
    dead_letters: int      #: records dead-lettered by this run
    dead_letters_total: int  #: letters in the queue after the run
    tokens: int
    cost_usd: float | None
    requests: int
    elapsed_s: float
    budget_exceeded: bool  #: stopped (checkpointed) before crossing the budget
    estimate: JobEstimate | None = None

    @property
    def completed(self) -> bool:
        """Whether the whole source was read (not stopped at the budget)."""
        return not self.budget_exceeded

    @property
    def exit_code(self) -> int:
        """The CLI's exit code for this result."""
        if self.budget_exceeded:
            return 4
        return 3 if self.dead_letters_total else 0


# ------------------------------------------------------------------ setup shared by run, estimate and retry
def state_path_for(sink: Sink, state: str | os.PathLike[str] | None) -> Path:
    """The state file: ``state`` if given, else the sink's own (``OUT/_state.sqlite``)."""
    if state is not None:
        return Path(state)
    path = sink.default_state_path()
    if path is None:
        raise ConfigurationError(f"{sink!r} keeps no job state of its own: pass state='path/to/state.sqlite'")
    return path


def build_pipeline(model: str, *, sink: Sink | None = None, cache: Any = _DEFAULT, chunk_size: int,
                   batch_size: int | None = None, **options: Any) -> EmbeddingPipeline:
    """The pipeline a job embeds with: ``errors="collect"``, and batches small enough that a chunk fills
    ``max_concurrency`` requests."""
    options = {k: v for k, v in options.items() if v is not None}
    if cache is _DEFAULT and sink is not None:
        cache = sink.preferred_cache() or _DEFAULT
    if cache is not _DEFAULT:
        options["cache"] = None if isinstance(cache, str) and cache.lower() == "none" else cache
    pipe = EmbeddingPipeline(model, errors="collect", batch_size=batch_size, **options)
    if batch_size is None:
        pipe.batch_size = max(1, min(pipe.batch_size, chunk_size * IN_FLIGHT // pipe.max_concurrency))
    return pipe


def _secrets(pipe: EmbeddingPipeline, api_key: str | None) -> list[str]:
    found = [api_key, getattr(pipe.provider, "_api_key", None), os.environ.get("OPENAI_API_KEY")]
    return [s for s in found if isinstance(s, str) and s]


@dataclass
class _Chunk:
    """One chunk of records, sorted out against the state."""

    entries: list[Entry]
    to_embed: list[Entry] = field(default_factory=list)
    unchanged: int = 0
    metadata_only: int = 0
    dead: int = 0
    known: int = 0


@dataclass
class _Counts:
    records: int = 0
    written: int = 0
    unchanged: int = 0
    metadata_updated: int = 0
    dead: int = 0
    deleted: int = 0


class _Job:
    """The moving parts of one run (or retry), and the steps they share."""

    def __init__(self, sink: Sink, state: JobState, pipe: EmbeddingPipeline, chunk_size: int,
                 progress: Callable[[JobProgress], None] | None = None, total: int | None = None) -> None:
        self.sink = sink
        self.state = state
        self.pipe = pipe
        self.spec = pipe.provider.spec
        self.chunk_size = chunk_size
        self.progress = progress
        self.total = total
        self.counts = _Counts()
        self.budget_hit = False
        self.started = time.monotonic()
        self.sample: list[tuple[Entry, np.ndarray]] = []
        self._seen_written = 0
        self._rng = random.Random(0)
        dims = state.get("dimensions")
        self.dims = int(dims) if dims else None
        #: embed every record whatever the state says (``dlq retry``)
        self.force = False

    # -- sorting records out against the state (no I/O beyond SQLite) ---------------------
    def classify(self, records: Sequence[Record], gen: int | None) -> _Chunk:
        """Compare ``records`` with the state; with a ``gen``, mark them seen and queue metadata updates."""
        by_id = {r.id: r for r in records}  # a repeated id: the last one wins, as it would across chunks
        if len(by_id) < len(records):
            log.warning("embedpipe: %d repeated id(s) in one chunk; the last of each is kept",
                        len(records) - len(by_id))
        chunk = _Chunk([Entry.of(r) for r in by_id.values()])
        stored = self.state.lookup(list(by_id))
        chunk.known = len(stored)
        updates: list[tuple[str, bytes, str]] = []
        for e in chunk.entries:
            old = stored.get(e.record.id)
            same_text = old is not None and old.content_hash == e.content_hash
            if self.force:
                chunk.to_embed.append(e)
            elif old is not None and same_text and old.status == "done":
                if old.meta_hash == e.meta_hash:
                    chunk.unchanged += 1
                elif self.sink.updates_metadata:
                    updates.append((e.record.id, e.meta_hash, e.metadata_json))
                else:
                    chunk.to_embed.append(e)  # re-written through the sink; the vector comes from the cache
            elif old is not None and same_text and old.status == "dead" and old.meta_hash == e.meta_hash:
                chunk.dead += 1  # failed before, unchanged since: `dlq retry` is for these
            else:
                chunk.to_embed.append(e)
        chunk.metadata_only = len(updates)
        if gen is not None:
            self.state.mark_seen(list(stored), gen)
            self.state.update_metadata(updates)
        return chunk

    # -- settling one embedded chunk ------------------------------------------------------
    def settle(self, chunk: _Chunk, future: Future[EmbeddingArray] | None, gen: int) -> None:
        """Write what a chunk's embed call produced, then commit it; dead-letter what failed for good."""
        c = self.counts
        c.records += len(chunk.entries)
        c.unchanged += chunk.unchanged
        c.metadata_updated += chunk.metadata_only
        if future is None:
            self._report()
            return
        try:
            arr = future.result()
        except BudgetExceededError:
            self.budget_hit = True  # the call's estimate did not fit what is left: nothing was sent
            self._report()
            return
        entries = chunk.to_embed
        failures = arr.failures
        over_budget = {i for i, f in failures.items() if f.kind == "budget"}
        self.budget_hit = self.budget_hit or arr.budget_exceeded or bool(over_budget)
        transient = [i for i, f in failures.items() if i not in over_budget and not f.record_fault]
        # Failures that are not the records' fault while the provider embedded nothing at all in
        # this call are an outage (API down, bad key, no quota): dead-lettering the corpus would
        # help nobody. Stop; a re-run goes on from here.
        silent = arr.stats.embedded == 0
        outage = silent and (len(transient) >= 2 or (len(transient) == len(entries) > 0))
        skip = over_budget | (set(transient) if outage else set())
        dead = [Failed(entries[i], str(f)) for i, f in failures.items() if i not in skip]
        ok = [i for i in range(len(entries)) if i not in failures]
        written: list[Written] = []
        meta: dict[str, Any] = {}
        if ok:
            vectors = np.asarray(arr)[ok]
            self._check_dims(int(vectors.shape[1]))
            receipt = self.sink.write([entries[i] for i in ok], vectors, self.spec)
            written = [Written(entries[i], loc) for i, loc in zip(ok, receipt.locs, strict=True)]
            meta = {**receipt.meta, "dimensions": self.dims}
            for k, i in enumerate(ok):
                self._keep_sample(entries[i], vectors[k])
        self.state.commit(gen, written, dead, meta)
        c.written += len(written)
        c.dead += len(dead)
        self._report()
        if outage:
            reason = str(failures[transient[0]])
            raise JobAbortedError(
                f"every request of a chunk failed ({len(transient)} records): {reason}. The run stopped; what was "
                "done is saved and nothing was dead-lettered for this. Fix the cause and run the same command again")

    def _check_dims(self, dims: int) -> None:
        if self.dims is None:
            self.dims = dims
        elif dims != self.dims:
            raise JobConflictError(f"{self.spec} returned {dims}-dimensional vectors but the output holds "
                                   f"{self.dims}-dimensional ones; pass --rebuild to start over")

    def _keep_sample(self, entry: Entry, vector: np.ndarray) -> None:
        # Reservoir sampling: a uniform sample of what was written, in constant memory.
        k = self.sink.verify_sample
        if not k:
            return
        self._seen_written += 1
        if len(self.sample) < k:
            self.sample.append((entry, vector.copy()))
        else:
            j = self._rng.randrange(self._seen_written)
            if j < k:
                self.sample[j] = (entry, vector.copy())

    def _report(self) -> None:
        if self.progress is None:
            return
        st = self.pipe.stats
        c = self.counts
        self.progress(JobProgress(records=c.records, total=self.total, embedded=st.embedded, cached=st.hits,
                                  unchanged=c.unchanged, dead=c.dead, tokens=st.tokens, cost_usd=st.cost_usd,
                                  elapsed=time.monotonic() - self.started))

    # -- the loop: read, classify, embed (two chunks in flight), settle -------------------------
    def embed_all(self, chunks: Iterable[Sequence[Record]], gen: int) -> None:
        """Process ``chunks`` until they run out or the budget is reached."""
        pending: deque[tuple[_Chunk, Future[EmbeddingArray] | None]] = deque()
        with ThreadPoolExecutor(IN_FLIGHT, thread_name_prefix="embedpipe-job") as pool:
            try:
                for records in chunks:
                    chunk = self.classify(records, gen)
                    future = (pool.submit(self.pipe.embed_array, [e.record.text for e in chunk.to_embed])
                              if chunk.to_embed else None)
                    pending.append((chunk, future))
                    while pending and (len(pending) > IN_FLIGHT or pending[0][1] is None or pending[0][1].done()):
                        self.settle(*pending.popleft(), gen)
                    if self.budget_hit:
                        break
                while pending:
                    self.settle(*pending.popleft(), gen)
            finally:
                for _, future in pending:
                    if future is not None:
                        future.cancel()

    def finish(self, gen: int, completed: bool) -> None:
        """Delete what left the source (after a complete read only), compact, verify."""
        if completed:
            while ids := self.state.gone(gen):
                self.sink.delete(ids)
                self.state.forget(ids)
                self.counts.deleted += len(ids)
        self.sink.compact(self.state)
        if self.sample:
            self.sink.verify(self.sample)


def _estimate_pass(job: _Job, source: Source, rpm: int | None, tpm: int | None) -> JobEstimate:
    pipe = job.pipe
    n = unchanged = meta_only = to_embed = dead = known = 0
    unique = cached = invalid = tokens = requests = 0
    for records in chunked(source, job.chunk_size):
        chunk = job.classify(records, None)
        n += len(chunk.entries)
        unchanged += chunk.unchanged
        meta_only += chunk.metadata_only
        dead += chunk.dead
        known += chunk.known
        to_embed += len(chunk.to_embed)
        if chunk.to_embed:
            est = pipe.estimate([e.record.text for e in chunk.to_embed])
            unique += est.unique
            cached += est.cached
            invalid += est.invalid
            tokens += est.tokens
            requests += est.requests
    eta = None
    if rpm or tpm:
        eta = max(requests / rpm * 60 if rpm else 0.0, tokens / tpm * 60 if tpm else 0.0)
    return JobEstimate(model=job.spec, records=n, unchanged=unchanged, metadata_only=meta_only, to_embed=to_embed,
                       cached=cached, to_send=unique - cached, invalid=invalid, dead=dead,
                       deletions=max(0, job.state.count() - known), tokens=tokens,
                       cost_usd=cost_of(tokens, pipe.price_per_1m_tokens), requests=requests, eta_seconds=eta,
                       price_per_1m_tokens=pipe.price_per_1m_tokens, rpm=rpm, tpm=tpm)


# ------------------------------------------------------------------ public API
def estimate(source: SourceLike, *, model: str, out: Any = None, state: str | os.PathLike[str] | None = None,
             cache: str | CacheBackend | None = _DEFAULT, dimensions: int | None = None, rpm: int | None = None,
             tpm: int | None = None, base_url: str | None = None, api_key: str | None = None,
             id_field: str = "id", text_field: str = "text", format: str | None = None,
             max_concurrency: int | None = None, batch_size: int | None = None,
             chunk_size: int = DEFAULT_CHUNK_SIZE, rebuild: bool = False, **pipeline_options: Any) -> JobEstimate:
    """What :func:`run` with the same arguments would do and cost, with no API call and no write.

    Reports records unchanged, metadata-only, to embed; distinct texts cached and to send;
    tokens, cost, requests and the ETA at ``rpm``/``tpm``; deletions. Without ``out`` or
    ``state``, every record counts as new.
    """
    src = source_from(source, id_field=id_field, text_field=text_field, format=format)
    sink = sink_from(out) if out is not None else None
    path = None
    if not rebuild and (sink is not None or state is not None):
        path = state_path_for(sink or Sink(), state)
    pipe = build_pipeline(model, sink=sink, cache=cache, chunk_size=chunk_size, batch_size=batch_size,
                          dimensions=dimensions, rpm=rpm, tpm=tpm, base_url=base_url, api_key=api_key,
                          max_concurrency=max_concurrency, **pipeline_options)
    try:
        with JobState(path, readonly=True) as st:
            st.check_model(pipe.provider.spec, pipe.expected_dims)
            job = _Job(sink or Sink(), st, pipe, chunk_size)
            return _estimate_pass(job, src, rpm, tpm)
    finally:
        pipe.close()


def run(source: SourceLike, *, model: str, out: Any, state: str | os.PathLike[str] | None = None,
        cache: str | CacheBackend | None = _DEFAULT, dimensions: int | None = None, rpm: int | None = None,
        tpm: int | None = None, budget_usd: float | None = None, base_url: str | None = None,
        api_key: str | None = None, id_field: str = "id", text_field: str = "text", format: str | None = None,
        max_concurrency: int | None = None, batch_size: int | None = None, chunk_size: int = DEFAULT_CHUNK_SIZE,
        rebuild: bool = False, estimate_first: bool = True,
        on_estimate: Callable[[JobEstimate], None] | None = None,
        progress: Callable[[JobProgress], None] | None = None, **pipeline_options: Any) -> JobResult:
    """Embed every record of ``source`` into ``out``; run it again to resume or to update.

    ``source``: a ``.jsonl``/``.csv``/``.parquet`` path (``format`` to force one), a folder of
    ``.txt``/``.md`` files, or an iterable of records or mappings. ``out``: a folder (Parquet
    dataset, the default), a ``.jsonl`` path, a :class:`~embedpipe.jobs.Sink`, or a LlamaIndex
    or LangChain vector store (which need ``state=``). ``cache``: a URL or backend; by default
    the pipeline's default cache. The API key comes from ``api_key`` or the environment.

    With ``estimate_first`` (the default), the source is read once to estimate the run
    (handed to ``on_estimate``); if the cost of the uncached part exceeds ``budget_usd``,
    :class:`~embedpipe.jobs.BudgetRefusedError` is raised before anything is sent. During
    the run the budget stops it cleanly, checkpointed (``result.budget_exceeded``): that is
    the only check when ``estimate_first=False``.

    Raises :class:`~embedpipe.jobs.JobConflictError` when ``out`` holds another model's
    vectors (pass ``rebuild=True``), :class:`~embedpipe.jobs.JobAbortedError` when the API
    fails every request of a chunk (an outage: what was done is kept).
    """
    if chunk_size < 1:
        raise ConfigurationError(f"chunk_size={chunk_size!r} must be a positive integer")
    src = source_from(source, id_field=id_field, text_field=text_field, format=format)
    sink = sink_from(out)
    path = state_path_for(sink, state)
    pipe = build_pipeline(model, sink=sink, cache=cache, chunk_size=chunk_size, batch_size=batch_size,
                          dimensions=dimensions, rpm=rpm, tpm=tpm, budget_usd=budget_usd, base_url=base_url,
                          api_key=api_key, max_concurrency=max_concurrency, **pipeline_options)
    try:
        with JobState(path, secrets=_secrets(pipe, api_key)) as st:
            st.lock()
            spec = pipe.provider.spec
            sink.bind(pipe)
            if not rebuild:
                st.check_model(spec, pipe.expected_dims)
                sink.open(st)
            est = None
            if estimate_first:
                # A rebuild is estimated against an empty state, and wipes nothing until the estimate passes.
                with contextlib.ExitStack() as stack:
                    view = stack.enter_context(JobState(None)) if rebuild else st
                    est = _estimate_pass(_Job(sink, view, pipe, chunk_size), src, rpm, tpm)
                if on_estimate is not None:
                    on_estimate(est)
                if budget_usd is not None and est.cost_usd is not None and est.cost_usd > budget_usd:
                    raise BudgetRefusedError(
                        f"the estimate for the uncached part, ${est.cost_usd:.6f} ({est.tokens:,} tokens), exceeds "
                        f"the budget of ${budget_usd:.6f}; nothing was sent", est, budget_usd)
            if rebuild:
                st.reset()
                sink.reset()
                sink.open(st)
            with st.transaction() as db:
                st.set_meta(db, model=spec, requested_dimensions=dimensions, sink=sink.describe(),
                            base_url=public_url(base_url))
            total = est.records if est is not None else src.count() if progress is not None else None
            job = _Job(sink, st, pipe, chunk_size, progress, total)
            gen = st.begin_run()
            status = "error"
            try:
                job.embed_all(chunked(src, chunk_size), gen)
                job.finish(gen, completed=not job.budget_hit)
                status = "budget" if job.budget_hit else "done"
            finally:
                stt = pipe.stats
                st.end_run(gen, status, records=job.counts.records, embedded=stt.embedded, cached=stt.hits,
                           tokens=stt.tokens, cost_usd=stt.cost_usd, dead=job.counts.dead)
            return _result(job, sink, st, est)
    finally:
        pipe.close()
        sink.close()


def _result(job: _Job, sink: Sink, st: JobState, est: JobEstimate | None) -> JobResult:
    c = job.counts
    stats = job.pipe.stats
    return JobResult(out=sink.describe(), state=str(st.path), model=job.spec, dimensions=job.dims,
                     records=c.records, written=c.written, embedded=stats.embedded, cached=stats.hits,
                     unchanged=c.unchanged, metadata_updated=c.metadata_updated, deleted=c.deleted,
                     dead_letters=c.dead, dead_letters_total=st.dead_letter_count(), tokens=stats.tokens,
                     cost_usd=stats.cost_usd, requests=stats.requests,
                     elapsed_s=time.monotonic() - job.started, budget_exceeded=job.budget_hit, estimate=est)


__all__ = ["DEFAULT_CHUNK_SIZE", "JobEstimate", "JobProgress", "JobResult", "estimate", "run"]
