"""The job unit: :func:`plan_chunks`, :func:`process_chunk` and :func:`finish_job`, which every driver calls.

The CLI's ``run``, a Celery task and an HTTP ingest worker drive the same three steps on
the same state (a :class:`~embedpipe.jobs.JobStore`):

1. :func:`plan_chunks` reads the source once, compares each record with the store (new,
   changed, unchanged, metadata-only; what it does not see is gone) and yields
   :class:`Chunk`\\ s. A chunk carries its records, so whoever processes it needs no access
   to the source, and it serialises to JSON (:meth:`Chunk.to_dict`).
2. :func:`process_chunk` embeds a chunk, writes it to the sink and commits it, under a
   lease. It is idempotent: a chunk already committed is skipped; one whose lease another
   worker holds is left alone; one re-run after a crash is served by the cache (the
   vectors paid for before the crash) and committed once.
3. :func:`finish_job` deletes what left the source, compacts the sink, reads a sample
   back and returns the run's :class:`~embedpipe.jobs.JobResult`.

A driver only schedules: it holds no logic of its own.
"""

from __future__ import annotations

import hashlib
import logging
import os
import random
import threading
import time
from collections.abc import Generator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, cast

import numpy as np

from embedpipe._urls import public_url
from embedpipe.errors import BudgetExceededError, ConfigurationError
from embedpipe.events import Hook
from embedpipe.jobs.chunked import embed_entries, job_source, record_batches
from embedpipe.jobs.errors import JobAbortedError, JobConflictError
from embedpipe.jobs.records import Entry, Record
from embedpipe.jobs.results import JobResult
from embedpipe.jobs.sinks import Sink, sink_from
from embedpipe.jobs.spec import JobSpec
from embedpipe.jobs.spill import DiskFullError, Spill, encoded, is_disk_full
from embedpipe.jobs.state import Failed, SQLiteJobStore, Written, job_store_from
from embedpipe.jobs.store import ChunkStore
from embedpipe.owners import owner_name
from embedpipe.pipeline import EmbeddingPipeline

log = logging.getLogger("embedpipe.jobs")

#: chunks embedding at once in one process: the next one is sent while the last one is written
IN_FLIGHT = 2
#: how long a chunk's lease lasts unless renewed; a worker renews it while it embeds
LEASE_SECONDS = 120.0
_SEQ_BITS = 32


# ------------------------------------------------------------------ chunks
@dataclass(frozen=True)
class Chunk:
    """A slice of the source, sorted out against the store: the records to embed and what was left alone.

    ``records`` are the new or changed records (with their content hashes); ``read`` counts
    every record of the slice, ``unchanged``, ``metadata_only`` and ``dead`` those that need
    no embedding. ``chunk_id`` is derived from the run and the records, so a redelivered
    copy of a chunk is the same chunk (a later run re-plans what is still pending into new
    chunks, whose committed records it finds unchanged).
    """

    job_id: str
    gen: int
    index: int
    records: tuple[Entry, ...]
    read: int = 0
    unchanged: int = 0
    metadata_only: int = 0
    dead: int = 0

    @property
    def chunk_id(self) -> str:
        """A digest of the job, the run, and each record's id, text and metadata hashes."""
        h = hashlib.sha256(f"{self.job_id}:{self.gen}:{self.index}".encode())
        for e in self.records:
            h.update(e.record.id.encode("utf-8", "surrogatepass") + b"\0" + e.content_hash + e.meta_hash)
        return h.hexdigest()[:32]

    @property
    def seq(self) -> int:
        """The chunk's place among all chunks of the job, runs included (later chunks' versions win)."""
        return (self.gen << _SEQ_BITS) | self.index

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready form (records with id, text, metadata): what a task message carries."""
        return {"job_id": self.job_id, "gen": self.gen, "index": self.index, "read": self.read,
                "unchanged": self.unchanged, "metadata_only": self.metadata_only, "dead": self.dead,
                "records": [{"id": e.record.id, "text": e.record.text, "metadata": e.record.metadata}
                            for e in self.records]}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Chunk:
        """The chunk :meth:`to_dict` described (hashes are recomputed from the records)."""
        records = tuple(Entry.of(Record(str(r["id"]), str(r["text"]), dict(r.get("metadata") or {})))
                        for r in data["records"])
        return cls(job_id=str(data["job_id"]), gen=int(data["gen"]), index=int(data["index"]), records=records,
                   read=int(data.get("read", len(records))), unchanged=int(data.get("unchanged", 0)),
                   metadata_only=int(data.get("metadata_only", 0)), dead=int(data.get("dead", 0)))


@dataclass(frozen=True)
class ChunkOutcome:
    """What :func:`process_chunk` did with one chunk.

    ``status``: ``"done"`` (committed now), ``"skipped"`` (committed before: nothing done),
    ``"leased"`` (another worker holds its live lease: back off), ``"empty"`` (nothing to
    embed), ``"budget"`` (stopped before crossing the budget; nothing committed for what was
    not embedded).
    """

    chunk_id: str
    status: str
    attempt: int = 0
    written: int = 0
    dead: int = 0
    embedded: int = 0
    cached: int = 0
    tokens: int = 0
    requests: int = 0
    cost_usd: float | None = 0.0
    budget_exceeded: bool = False


def classify(store: ChunkStore, records: Sequence[Record], *, updates_metadata: bool, gen: int | None,
             force: bool = False) -> tuple[list[Entry], list[Entry], int, int, int, int]:
    """Sort ``records`` out against ``store``: ``(entries, to_embed, unchanged, metadata_only, dead, known)``.

    With a ``gen``, the records are marked seen by that run and metadata-only changes queued
    for the sink (``updates_metadata``; otherwise they are embedded again, from the cache).
    ``force`` embeds every record whatever the store says.
    """
    by_id = {r.id: r for r in records}  # a repeated id: the last one wins, as it would across chunks
    if len(by_id) < len(records):
        log.warning("embedpipe: %d repeated id(s) in one chunk; the last of each is kept", len(records) - len(by_id))
    entries = [Entry.of(r) for r in by_id.values()]
    stored = store.lookup(list(by_id))
    to_embed: list[Entry] = []
    updates: list[tuple[str, bytes, str]] = []
    unchanged = dead = 0
    for e in entries:
        old = stored.get(e.record.id)
        same_text = old is not None and old.content_hash == e.content_hash
        if force:
            to_embed.append(e)
        elif old is not None and same_text and old.status == "done":
            if old.meta_hash == e.meta_hash:
                unchanged += 1
            elif updates_metadata:
                updates.append((e.record.id, e.meta_hash, e.metadata_json))
            else:
                to_embed.append(e)  # re-written through the sink; the vector comes from the cache
        elif old is not None and same_text and old.status == "dead" and old.meta_hash == e.meta_hash:
            dead += 1  # failed before, unchanged since: `dlq retry` is for these
        else:
            to_embed.append(e)
    if gen is not None:
        full = cast(SQLiteJobStore, store)  # marking needs the job store itself, which only planners pass with a gen
        full.mark_seen(list(stored), gen)
        full.update_metadata(updates)
    return entries, to_embed, unchanged, len(updates), dead, len(stored)


# ------------------------------------------------------------------ opening a job's parts
def open_store(spec: JobSpec, sink: Sink | None = None, *, readonly: bool = False,
               secrets: Sequence[str | None] = ()) -> SQLiteJobStore:
    """The job store ``spec.state`` names, else the sink's own (``OUT/_state.sqlite``)."""
    if spec.state is not None:
        return job_store_from(spec.state, readonly=readonly, secrets=secrets)
    sink = sink or sink_from(spec.sink)
    path = sink.default_state_path()
    if path is None:
        raise ConfigurationError(f"{sink!r} keeps no job state of its own: pass state='path/to/state.sqlite'")
    return SQLiteJobStore(path, readonly=readonly, secrets=secrets)


def job_pipeline(spec: JobSpec, *, sink: Sink | None = None, api_key: str | None = None,
                 hooks: Sequence[Hook] = ()) -> EmbeddingPipeline:
    """The pipeline a job embeds with: its config with ``errors="collect"`` and the job's budget, and
    (unless the config sets one) batches small enough that :data:`IN_FLIGHT` chunks fill
    ``max_concurrency`` requests. A sink that prefers a cache (a vector store's embeddings)
    lends it when the config names the default cache."""
    config = spec.pipeline.replace(errors="collect", budget_usd=spec.budget_usd,
                                   hooks=(*spec.pipeline.hooks, *hooks))
    if sink is not None and config.cache == "default":
        preferred = sink.preferred_cache()
        if preferred is not None:
            config = config.replace(cache=preferred)
    pipe = config.build(api_key=api_key)
    if config.batch_size is None:
        pipe.batch_size = max(1, min(pipe.batch_size, spec.chunk_size * IN_FLIGHT // pipe.max_concurrency))
    return pipe


def secrets_of(pipe: EmbeddingPipeline, api_key: str | None = None) -> list[str]:
    """The secrets a job's store must never write: the key given, the provider's, the environment's."""
    # The provider's own key is registered with the redactor when the provider is built.
    found = [api_key, os.environ.get("OPENAI_API_KEY")]
    return [s for s in found if isinstance(s, str) and s]


def default_owner() -> str:
    """A lease owner name unique to this process: ``host:pid:tail``."""
    return owner_name()


# ------------------------------------------------------------------ 1. plan
def plan_chunks(spec: JobSpec, store: SQLiteJobStore, *, pipeline: EmbeddingPipeline | None = None,
                sink: Sink | None = None, rebuild: bool = False) -> Generator[Chunk, None, None]:
    """Start a run and yield the source's chunks, each sorted out against ``store``.

    Before the first chunk: the store is checked against the model (another model's
    output is a :class:`~embedpipe.jobs.JobConflictError` unless ``rebuild``), the sink is
    bound to the pipeline and opened (recovering from a crash), and a new run generation
    begins. Records are marked seen as they are read; when the generator is exhausted the
    run is marked fully planned, which lets :func:`finish_job` delete what was not seen.
    Chunks with nothing to embed are yielded too (their counts feed progress); a driver
    may skip publishing them.
    """
    sink = sink or sink_from(spec.sink)
    own = pipeline is None
    pipe = pipeline or job_pipeline(spec, sink=sink)
    try:
        spec_name = pipe.provider.spec
        dtype = pipe.value_format.dtype
        if dtype not in sink.output_dtypes:
            raise ConfigurationError(f"{sink!r} cannot store {dtype} vectors (it takes {sorted(sink.output_dtypes)}); "
                                     "use a Parquet or JSONL output, or output_dtype='float32'")
        sink.bind(pipe)
        if rebuild:
            store.reset()
            sink.reset()
        else:
            store.check_model(spec_name, pipe.expected_dims)
        sink.open(store)
        with store.transaction() as db:
            store.set_meta(db, model=spec_name, requested_dimensions=spec.pipeline.dimensions,
                           sink=sink.describe(), base_url=public_url(spec.pipeline.base_url), job_id=spec.job_id,
                           spec=_spec_json(spec), chunking=spec.options.get("chunking"))
        gen = store.begin_run()
        src = job_source(spec, pipe)
        for index, records in enumerate(record_batches(src, spec.chunk_size)):
            entries, to_embed, unchanged, meta_only, dead, _ = classify(
                store, records, updates_metadata=sink.updates_metadata, gen=gen)
            with store.transaction() as db:
                store.add_counts(db, gen, {"records": len(entries), "unchanged": unchanged,
                                           "metadata_updated": meta_only})
            yield Chunk(spec.job_id, gen, index, tuple(to_embed), read=len(entries), unchanged=unchanged,
                        metadata_only=meta_only, dead=dead)
        store.mark_planned(gen)
    finally:
        if own:
            pipe.close()


def _spec_json(spec: JobSpec) -> str | None:
    try:
        return spec.to_json()
    except ConfigurationError:
        return None  # a spec holding objects (a vector store) is not recorded


# ------------------------------------------------------------------ 2. process
class _LeaseKeeper:
    """Renews a chunk's lease every third of its life while the chunk is embedded."""

    def __init__(self, store: ChunkStore, chunk_id: str, owner: str, ttl: float) -> None:
        self.store, self.chunk_id, self.owner, self.ttl = store, chunk_id, owner, ttl
        self.lost = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="embedpipe-lease", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.ttl / 3):
            try:
                if not self.store.renew_lease(self.chunk_id, self.owner, self.ttl):
                    self.lost = True
                    return
            except Exception:  # a store hiccup: try again at the next tick, the lease has time left
                log.warning("embedpipe: could not renew the lease of chunk %s", self.chunk_id, exc_info=True)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def process_chunk(spec: JobSpec, chunk: Chunk, *, store: ChunkStore, pipeline: EmbeddingPipeline | None = None,
                  sink: Sink | None = None, hooks: Sequence[Hook] = (), owner: str | None = None,
                  lease_seconds: float = LEASE_SECONDS, sample_size: int | None = None,
                  spill: Spill | None = None) -> ChunkOutcome:
    """Embed ``chunk``, write it to the sink and commit it, once.

    Idempotent: a chunk already committed returns ``"skipped"`` without any call; one whose
    live lease another ``owner`` holds returns ``"leased"``; a re-run after a crash finds
    what was paid for in the cache, and the commit (the sink's write, then the store's
    transaction, which also marks the chunk done) happens once. Records whose text failed
    for good are dead-lettered in the same transaction. When the API fails every request
    (an outage), what succeeded is committed and :class:`~embedpipe.jobs.JobAbortedError`
    is raised, with nothing dead-lettered for it.
    """
    cid = chunk.chunk_id
    if not chunk.records:
        return ChunkOutcome(cid, "empty")
    if store.chunk_status(cid) == "done":
        return ChunkOutcome(cid, "skipped")
    owner = owner or default_owner()
    attempt = store.acquire_lease(cid, chunk.gen, owner, lease_seconds)
    if attempt is None:
        return ChunkOutcome(cid, "skipped" if store.chunk_status(cid) == "done" else "leased")
    sink = sink or sink_from(spec.sink)
    own = pipeline is None
    pipe = pipeline or job_pipeline(spec, sink=sink, hooks=hooks)
    keeper = _LeaseKeeper(store, cid, owner, lease_seconds)
    committed = False
    try:
        if own:
            sink.bind(pipe)
        # What another chunk (or an earlier copy of this one) committed since planning is not redone.
        _, pending, *_ = classify(store, [e.record for e in chunk.records], updates_metadata=sink.updates_metadata,
                                  gen=None)
        keep = {e.record.id for e in pending}
        entries = [e for e in chunk.records if e.record.id in keep]
        if not entries:
            store.commit(chunk.gen, [], [], chunk_id=cid, seq=chunk.seq)
            committed = True
            return ChunkOutcome(cid, "done", attempt)
        texts = [e.record.text for e in entries]
        if spec.budget_usd is not None and getattr(store, "reserves_spend", False):
            # A store shared by many workers holds the job's budget: reserve what this chunk would cost
            # (its uncached part) before sending anything, so N workers never spend N budgets.
            cost = pipe.estimate(texts).cost_usd or 0.0
            if not store.reserve_spend(cid, cost, lease_seconds):  # type: ignore[attr-defined]  # reserves_spend
                return ChunkOutcome(cid, "budget", attempt, budget_exceeded=True)
        try:
            arr = embed_entries(spec, pipe, entries)  # embed_array, or late chunk vectors (jobs/chunked.py)
        except BudgetExceededError:
            # The call's estimate did not fit what is left of the budget: nothing was sent.
            return ChunkOutcome(cid, "budget", attempt, budget_exceeded=True)
        st = arr.stats
        failures = arr.failures
        over_budget = {i for i, f in failures.items() if f.kind == "budget"}
        transient = [i for i, f in failures.items() if i not in over_budget and not f.record_fault]
        # Failures that are not the records' fault while the provider embedded nothing at all in
        # this call are an outage (API down, bad key, no quota): dead-lettering the corpus would
        # help nobody. Stop; a re-run goes on from here.
        outage = st.embedded == 0 and (len(transient) >= 2 or (len(transient) == len(entries) > 0))
        skip = over_budget | (set(transient) if outage else set())
        dead = [Failed(entries[i], str(f)) for i, f in failures.items() if i not in skip]
        ok = [i for i in range(len(entries)) if i not in failures]
        budget_hit = arr.budget_exceeded or bool(over_budget)
        complete = not skip
        counts = {"embedded": st.embedded, "cached": st.hits, "tokens": st.tokens, "requests": st.requests,
                  "cost_usd": st.cost_usd or 0.0, "dead": len(dead)}
        with store.write_lock:
            written: list[Written] = []
            meta: dict[str, Any] = {}
            samples: list[tuple[float, Entry, Any]] = []
            k = sink.verify_sample if sample_size is None else sample_size
            vectors = np.asarray(arr)[ok]
            try:
                if ok:
                    dims = _check_dims(store, pipe.provider.spec, int(vectors.shape[1]))
                    receipt = sink.write([entries[i] for i in ok], vectors, pipe.provider.spec)
                    written = [Written(entries[i], loc) for i, loc in zip(ok, receipt.locs, strict=True)]
                    meta = {**receipt.meta, "dimensions": dims}
                    if k:
                        rng = random.Random(cid)
                        samples = [(rng.random(), entries[i], vectors[j]) for j, i in enumerate(ok)]
                counts["written"] = len(written)
                # An incomplete chunk (budget, outage) is committed for what it did but not marked done:
                # a later run re-plans the rest.
                store.commit(chunk.gen, written, dead, meta, chunk_id=cid if complete else None, seq=chunk.seq,
                             counts=counts, samples=samples, sample_size=k)
            except Exception as exc:
                if not is_disk_full(exc):
                    raise
                raise _disk_full(exc, pipe, [entries[i].record.text for i in ok], vectors, spill, sink) from exc
            committed = complete
        outcome = ChunkOutcome(cid, "budget" if budget_hit else "done", attempt, written=len(written),
                               dead=len(dead), embedded=st.embedded, cached=st.hits, tokens=st.tokens,
                               requests=st.requests, cost_usd=st.cost_usd, budget_exceeded=budget_hit)
        if outage:
            reason = str(failures[transient[0]])
            raise JobAbortedError(
                f"every request of a chunk failed ({len(transient)} records): {reason}. The run stopped; what was "
                "done is saved and nothing was dead-lettered for this. Fix the cause and run the same command again")
        return outcome
    finally:
        keeper.stop()
        if not committed:
            store.release_lease(cid, owner)
        if own:
            pipe.close()


def _disk_full(exc: BaseException, pipe: EmbeddingPipeline, texts: list[str], vectors: np.ndarray,
               spill: Spill | None, sink: Sink) -> DiskFullError:
    """The error for a chunk whose vectors could not be written: the paid ones saved into the spill's room first."""
    where = getattr(exc, "filename", None) or getattr(exc, "path", None) or sink.describe()
    kept = 0
    if spill is not None and texts and pipe.cache is not None:
        keys = pipe.cache.keys_for(pipe.key_material("document"), texts, "document")
        kept = spill.save(keys, encoded(vectors, pipe.provider.tokenizer.count(texts)))
    saved = (f"{kept} of {len(texts)} vector(s) paid for were kept in {spill.path}; the next run puts them into the "
             "cache first" if spill is not None and texts else "nothing paid for was lost")
    return DiskFullError(f"no space left on device at {where}: the run stopped, checkpointed; {saved}. Free space "
                         "and run the same command again")


def _check_dims(store: ChunkStore, spec: str, dims: int) -> int:
    have = store.get("dimensions")
    if have is not None and int(have) != dims:
        raise JobConflictError(f"{spec} returned {dims}-dimensional vectors but the output holds {have}-dimensional "
                               "ones; pass --rebuild to start over")
    return dims


# ------------------------------------------------------------------ 3. finish
def finish_job(spec: JobSpec, store: SQLiteJobStore, *, sink: Sink | None = None, gen: int | None = None,
               status: str | None = None, started: float | None = None) -> JobResult:
    """End run ``gen`` (the latest by default): delete what left the source, compact, verify, summarise.

    Deletions happen only when the run's plan read the whole source, and only with
    ``spec.delete_missing``. The sink then compacts and reads back the store's sample (a
    mismatch raises :class:`~embedpipe.jobs.SinkVerificationError`). ``status`` is how the
    run ended (``"done"``, or ``"budget"`` when it stopped at the budget); by default
    ``"done"``, or ``"incomplete"`` while chunks of the run are not committed.
    """
    sink = sink or sink_from(spec.sink)
    gen = gen if gen is not None else store.latest_run()
    if gen is None:
        raise ConfigurationError(f"the job store at {store.path} has no run to finish: plan one first")
    counts = store.run_counts(gen)
    deleted = 0
    if counts["planned"] and spec.delete_missing:
        while ids := store.gone(gen):
            sink.delete(ids)
            store.forget(ids)
            deleted += len(ids)
    sink.compact(store)
    sample = store.samples()
    if sample:
        sink.verify(sample)
    final = status or ("incomplete" if store.chunk_counts(gen).get("running") else "done")
    store.end_run(gen, final, deleted=deleted)
    counts = store.run_counts(gen)
    dims = store.get("dimensions")
    begun = started if started is not None else float(counts["started"])
    return JobResult(out=sink.describe(), state=str(store.path), model=store.get("model") or str(spec.pipeline.model),
                     dimensions=int(dims) if dims else None, records=int(counts["records"]),
                     written=int(counts["written"]), embedded=int(counts["embedded"]), cached=int(counts["cached"]),
                     unchanged=int(counts["unchanged"]), metadata_updated=int(counts["metadata_updated"]),
                     deleted=int(counts["deleted"]), dead_letters=int(counts["dead"]),
                     dead_letters_total=store.dead_letter_count(), tokens=int(counts["tokens"]),
                     cost_usd=counts["cost_usd"], requests=int(counts["requests"]),
                     elapsed_s=time.time() - begun, budget_exceeded=final == "budget", job_id=spec.job_id)


__all__ = ["IN_FLIGHT", "LEASE_SECONDS", "Chunk", "ChunkOutcome", "classify", "default_owner", "finish_job",
           "job_pipeline", "open_store", "plan_chunks", "process_chunk", "secrets_of"]
