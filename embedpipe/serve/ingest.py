"""Ingest jobs of the service: bodies stored durably, run as :class:`~embedpipe.jobs.JobSpec`\\ s by a worker loop.

``POST /v1/ingest`` validates the records (a 400 names the record), writes them as one
NDJSON file in the service's data folder (written to a temporary file, fsynced, renamed,
the folder fsynced) and only then answers ``202 {"job_id"}``. The job is a
:class:`~embedpipe.jobs.JobSpec` with that file as its source, the configured sink
(``[sinks.NAME] url``) as its sink and ``delete_missing=False``: an ingest upserts and never
deletes. The file is named by the body's hash, so the spec's ``job_id`` covers the body:
two ingests into one sink are two jobs, and the same body into the same sink is the same job.

:class:`JobWorker` is the loop that runs them, in a thread of the service: it leases the next
job from the :class:`~embedpipe.serve.jobstore.IngestRegistry`, renews the lease while it
works, and drives :func:`~embedpipe.jobs.plan_chunks` → :func:`~embedpipe.jobs.process_chunk`
→ :func:`~embedpipe.jobs.finish_job` exactly as ``jobs.run`` does (through
:func:`~embedpipe.jobs.runner.process_all`), or hands the spec to Celery workers with
:func:`embedpipe.distributed.submit` when ``[workers] url`` names a broker. A service killed
mid-job leaves a lease that runs out; the next one to lease the job resumes it from the job's
own store, the cache serving what was paid for before.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import platformdirs

from embedpipe.config import PipelineConfig
from embedpipe.errors import ConfigurationError
from embedpipe.jobs import Chunk, JobSpec, finish_job, plan_chunks
from embedpipe.jobs.errors import JobLockedError
from embedpipe.jobs.runner import process_all
from embedpipe.jobs.sinks import sink_from
from embedpipe.jobs.unit import default_owner, job_pipeline, open_store, secrets_of
from embedpipe.metrics import PrometheusMetrics
from embedpipe.serve.jobstore import IngestJob, IngestRegistry
from embedpipe.serve.settings import ModelSettings, ServeSettings

__all__ = ["IngestError", "JobWorker", "default_store_path", "encode_rows", "ingest_spec", "job_status", "ndjson_items",
           "parse_records", "registry_path", "store_body"]

log = logging.getLogger("embedpipe.serve")

#: the fields of an ingest record; any other key is refused (metadata goes under "metadata")
RECORD_FIELDS = frozenset({"id", "text", "metadata"})
#: seconds between two looks at the registry when no job is queued
POLL_SECONDS = 0.25


class IngestError(ValueError):
    """A body that cannot be ingested; the message names the record and the field."""


def default_store_path() -> Path:
    """The default registry of ingest jobs: ``serve/jobs.sqlite`` in the user's data folder."""
    return Path(platformdirs.user_data_dir("embedpipe")) / "serve" / "jobs.sqlite"


def registry_path(settings: ServeSettings) -> Path:
    """The registry file ``[store] url`` names (``sqlite:///path``, or a path), or the default."""
    url = settings.store
    if url is None:
        return default_store_path()
    if "://" not in url:
        return Path(url).expanduser().resolve()
    from embedpipe._urls import parse_url

    parsed = parse_url(url, "job store")
    if parsed.scheme != "sqlite":
        raise ConfigurationError(f"--store {parsed}: the service keeps its jobs in SQLite: give sqlite:///path")
    return Path(parsed.file_path("job store")).resolve()


# ------------------------------------------------------------------ bodies
def _record(i: int, raw: Any) -> dict[str, Any]:
    where = f"records[{i}]"
    if not isinstance(raw, dict):
        raise IngestError(f"{where} must be an object with id, text and metadata, not {type(raw).__name__}")
    unknown = sorted(set(raw) - RECORD_FIELDS)
    if unknown:
        raise IngestError(f"{where} has unknown field(s) {unknown}; a record has id, text and metadata")
    rid, text, meta = raw.get("id"), raw.get("text"), raw.get("metadata")
    if isinstance(rid, bool) or not isinstance(rid, (str, int)) or rid == "":
        raise IngestError(f"{where}.id must be a non-empty string (or an integer), not {rid!r}")
    if not isinstance(text, str) or not text.strip():
        raise IngestError(f"{where}.text must be a non-empty string")
    if meta is None:
        meta = {}
    if not isinstance(meta, dict):
        raise IngestError(f"{where}.metadata must be an object, not {type(meta).__name__}")
    clash = sorted({"id", "text"} & set(meta))
    if clash:
        raise IngestError(f"{where}.metadata must not hold the key(s) {clash}")
    return {"id": str(rid), "text": text, **meta}


def ndjson_items(body: bytes) -> list[Any]:
    """The objects of an NDJSON body, one per non-empty line; raises :class:`IngestError` naming the line."""
    items = []
    for n, line in enumerate(body.split(b"\n"), 1):
        if not line.strip():
            continue
        try:
            items.append(json.loads(line))
        except ValueError as exc:
            raise IngestError(f"line {n} of the NDJSON body is not JSON: {exc}") from None
    return items


def parse_records(items: Any) -> list[dict[str, Any]]:
    """``items`` (a body's ``records``, or :func:`ndjson_items`) checked, as the flat rows the stored file holds;
    raises :class:`IngestError` naming the record and the field."""
    if not isinstance(items, list):
        raise IngestError("'records' must be a list of {\"id\", \"text\", \"metadata\"} objects")
    if not items:
        raise IngestError("there are no records to ingest")
    rows: list[dict[str, Any]] = []
    seen: set[str] = set()
    for i, raw in enumerate(items):
        row = _record(i, raw)
        if row["id"] in seen:
            raise IngestError(f"records[{i}].id {row['id']!r} appears twice in this body")
        seen.add(row["id"])
        rows.append(row)
    return rows


def encode_rows(rows: list[dict[str, Any]]) -> tuple[bytes, str]:
    """``rows`` as canonical NDJSON, and its SHA-256: the same rows always make the same bytes."""
    data = b"".join(json.dumps(r, ensure_ascii=False, sort_keys=True, separators=(",", ":")).encode() + b"\n"
                    for r in rows)
    return data, hashlib.sha256(data).hexdigest()


def store_body(folder: Path, data: bytes, digest: str) -> Path:
    """Write ``data`` (:func:`encode_rows`) to ``folder/ingest-<hash>.jsonl``, durably: fsynced before it is
    renamed into place, and the folder fsynced after."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"ingest-{digest[:32]}.jsonl"
    if path.exists() and path.stat().st_size == len(data):
        return path
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".ingest-", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dirfd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(dirfd)
    finally:
        os.close(dirfd)
    return path


def ingest_spec(settings: ServeSettings, model: ModelSettings, sink_url: str, source: Path) -> JobSpec:
    """The job of one ingest: the stored body into the sink, with the model's pipeline, never deleting."""
    pipeline = PipelineConfig(model=model.spec, cache=settings.cache, **model.options)
    return JobSpec(source=str(source), sink=sink_url, pipeline=pipeline, chunk_size=settings.ingest_chunk_size,
                   delete_missing=False, options={"format": "jsonl"})


# ------------------------------------------------------------------ status
def job_status(job: IngestJob) -> dict[str, Any]:
    """``GET /v1/jobs/{id}``: state, the latest run's counts, tokens and cost over every run, and an ETA."""
    spec = JobSpec.from_json(job.spec)
    counts: dict[str, int] = {"records": job.records, "written": 0, "embedded": 0, "cached": 0, "unchanged": 0,
                              "dead_letters": 0}
    tokens, cost, requests = 0, 0.0, 0
    started: float | None = None
    if job.gens:
        try:
            with open_store(spec, readonly=True) as store:
                runs = [store.run_counts(g) for g in job.gens]
        except Exception as exc:  # the store is not there yet (or went away): answer what the registry knows
            log.debug("no job store for %s yet: %s", job.job_id, exc)
            runs = []
        for r in runs:
            tokens += int(r.get("tokens") or 0)
            cost += float(r.get("cost_usd") or 0.0)
            requests += int(r.get("requests") or 0)
        if runs:
            last = runs[-1]
            for k in ("written", "embedded", "cached", "unchanged"):
                counts[k] = int(last.get(k) or 0)
            counts["dead_letters"] = int(last.get("dead") or 0)
            started = float(last.get("started") or 0.0) or None
    settled = counts["written"] + counts["unchanged"] + counts["dead_letters"]
    eta: float | None = None
    if job.state == "succeeded":
        eta = 0.0
    elif job.state == "running" and started is not None and settled:
        rate = settled / max(1e-6, time.time() - started)
        eta = round(max(0, job.records - settled) / rate, 3)
    return {"job_id": job.job_id, "state": job.state, "sink": job.sink, "model": job.model, "counts": counts,
            "tokens": tokens, "requests": requests, "cost_usd": cost, "eta_s": eta, "error": job.error,
            "attempts": job.attempts, "created": job.created, "started": job.started, "finished": job.finished}


# ------------------------------------------------------------------ the worker loop
class _Cancelled(Exception):
    """The job was cancelled (or its lease taken) between two chunks."""


class _Stopped(Exception):
    """The service is stopping: the job goes back to the queue after the chunks in flight."""


class JobWorker:
    """The service's worker loop: one thread leasing ingest jobs from ``registry`` and running them.

    ``celery_url`` (a broker URL, without ``celery+``) hands each job's chunks to Celery
    workers instead. ``lease_seconds`` is how long a job stays leased to a worker that
    stopped renewing (a killed service): then another leases it and resumes it.
    """

    def __init__(self, registry: IngestRegistry, *, cache: Any = None, metrics: PrometheusMetrics | None = None,
                 lease_seconds: float = 30.0, celery_url: str | None = None, poll: float = POLL_SECONDS) -> None:
        self.registry = registry
        self.cache = cache
        self.metrics = metrics
        self.lease_seconds = lease_seconds
        self.celery_url = celery_url
        self.poll = poll
        self.owner = f"{default_owner()}:serve"
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._celery: Any = None

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="embedpipe-ingest-worker", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Stop after the chunks in flight; the job in hand goes back to the queue, to resume from there."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                job = self.registry.lease_next(self.owner, self.lease_seconds)
            except Exception:
                log.exception("embedpipe serve: the job registry failed; trying again")
                self._stop.wait(1.0)
                continue
            if job is None:
                self._stop.wait(self.poll)
                continue
            self._count("running")
            self.run_one(job)

    def _count(self, state: str) -> None:
        if self.metrics is not None:
            self.metrics.job_state(state)

    # ------------------------------------------------------------------ one job
    def run_one(self, job: IngestJob) -> None:
        """Run a leased job to its end (or to a cancel), recording the outcome in the registry."""
        cancel = threading.Event()
        lost = threading.Event()
        if self.metrics is not None:
            self.metrics.jobs_running.inc()
        beat = threading.Thread(target=self._beat, args=(job.job_id, cancel, lost), daemon=True,
                                name=f"embedpipe-ingest-lease-{job.job_id}")
        beat.start()
        state, error, result = "failed", None, None
        try:
            result = self._run(job, cancel)
            state = "succeeded" if not result.get("budget_exceeded") else "failed"
            error = "stopped at the budget; what was done is kept: ingest again to carry on" \
                if state == "failed" else None
        except _Stopped:
            state = "stopped"
        except _Cancelled:
            state = "cancelled" if cancel.is_set() and not lost.is_set() else "lost"
        except JobLockedError as exc:
            log.info("embedpipe serve: job %s waits: %s", job.job_id, exc)
            state = "busy"
        except Exception as exc:
            log.exception("embedpipe serve: ingest job %s failed", job.job_id)
            error = f"{type(exc).__name__}: {exc}"
        finally:
            cancel.set()
            beat.join(5)
            if self.metrics is not None:
                self.metrics.jobs_running.dec()
        if state in ("busy", "stopped"):
            # Another process runs a job on the same sink (try again later), or this service stops (the
            # next one to lease the job resumes it at once, without waiting for the lease to run out).
            self.registry.release(job.job_id, self.owner)
            self._stop.wait(1.0)
            return
        if state == "lost":
            log.warning("embedpipe serve: the lease of job %s was taken; leaving it to its new worker", job.job_id)
            return
        if self.registry.finish(job.job_id, self.owner, state, error=error, result=result):
            self._count(state)

    def _beat(self, job_id: str, cancel: threading.Event, lost: threading.Event) -> None:
        while not cancel.wait(min(5.0, max(0.2, self.lease_seconds / 4))):
            try:
                ours, cancelled = self.registry.heartbeat(job_id, self.owner)
            except Exception:
                log.warning("embedpipe serve: could not renew the lease of job %s", job_id, exc_info=True)
                continue
            if not ours:
                lost.set()
            if cancelled or not ours:
                cancel.set()
                return

    def _run(self, job: IngestJob, cancel: threading.Event) -> dict[str, Any]:
        spec = JobSpec.from_json(job.spec)
        if self.celery_url is not None:
            return self._run_on_celery(job, spec, cancel)
        if self.cache is not None and spec.pipeline.cache == "memory://":
            # One process: the job shares the service's own memory cache (a URL would make a new, empty one).
            spec = spec.replace(pipeline=spec.pipeline.replace(cache=self.cache))
        sink = sink_from(spec.sink)
        hooks = [self.metrics] if self.metrics is not None else []
        pipe = job_pipeline(spec, sink=sink, hooks=hooks)
        try:
            with open_store(spec, sink, secrets=secrets_of(pipe)) as store:
                store.lock()
                chunks = plan_chunks(spec, store, pipeline=pipe, sink=sink)
                try:
                    status = process_all(spec, self._gated(job.job_id, chunks, cancel), store=store, pipeline=pipe,
                                         sink=sink)
                except BaseException:
                    chunks.close()
                    gen = store.latest_run()
                    if gen is not None and gen in self._gens(job.job_id):
                        store.end_run(gen, "interrupted" if self._stop.is_set() else
                                      "cancelled" if cancel.is_set() else "error")
                    raise
                chunks.close()
                result = finish_job(spec, store, sink=sink, status=status)
        finally:
            pipe.close()
        return _scalars(result)

    def _gens(self, job_id: str) -> tuple[int, ...]:
        found = self.registry.get(job_id)
        return found.gens if found is not None else ()

    def _gated(self, job_id: str, chunks: Iterator[Chunk], cancel: threading.Event) -> Iterator[Chunk]:
        """The planned chunks, noting the run in the registry and stopping at a cancel."""
        noted = False
        for chunk in chunks:
            if self._stop.is_set():
                raise _Stopped(job_id)
            if cancel.is_set() or self.registry.cancel_requested(job_id):
                cancel.set()
                raise _Cancelled(job_id)
            if not noted:
                self.registry.add_gen(job_id, chunk.gen)
                noted = True
            if self.metrics is not None:
                self.metrics.job_records.inc(chunk.read)
            yield chunk
        if cancel.is_set():
            raise _Cancelled(job_id)

    def _run_on_celery(self, job: IngestJob, spec: JobSpec, cancel: threading.Event) -> dict[str, Any]:
        from embedpipe.distributed import submit
        from embedpipe.distributed.celery import make_app
        from embedpipe.jobs.errors import JobAbortedError

        if self._celery is None:
            assert self.celery_url is not None  # only called with one
            self._celery = make_app(self.celery_url)
        before = _latest_run(spec)
        running = submit(spec, app=self._celery)
        noted = False
        while True:
            if not noted:
                gen = _latest_run(spec)
                if gen is not None and gen != before:
                    self.registry.add_gen(job.job_id, gen)
                    noted = True
            try:
                result = running.wait(timeout=self.poll)
                break
            except TimeoutError:
                if cancel.is_set():
                    running.cancel()
                    with contextlib.suppress(JobAbortedError):  # the cancel we asked for
                        running.wait(timeout=60)
                    raise _Cancelled(job.job_id) from None
        return _scalars(result)


def _latest_run(spec: JobSpec) -> int | None:
    try:
        with open_store(spec, readonly=True) as store:
            return store.latest_run()
    except Exception:  # no store yet: the submitter creates it
        return None


def _scalars(result: Any) -> dict[str, Any]:
    """The JSON-ready fields of a :class:`~embedpipe.jobs.JobResult`."""
    values = {f.name: getattr(result, f.name) for f in dataclasses.fields(result)}
    return {k: v for k, v in values.items() if isinstance(v, (int, float, str, bool, type(None)))}
