"""Half-price runs through the Batch API (OpenAI, Azure OpenAI): plan, submit, survive a kill, re-attach, harvest.

``jobs.run(..., batch_api=True)`` (``embedpipe run --batch-api``) puts this step between
:func:`~embedpipe.jobs.plan_chunks` and :func:`~embedpipe.jobs.process_chunk`:

1. the chunks are read once (spooled to a temporary file, so memory holds no corpus) and
   their uncached texts planned into batch input files within the API's limits
   (:class:`BatchLimits`: lines and bytes per file, embedding inputs per batch; one model per
   file; each line one embeddings request within the provider's inputs and tokens caps);
2. each file is recorded in the job store, uploaded (``purpose="batch"``) and its batch
   created (``completion_window="24h"``), every id written to the store before going on;
3. the batches are polled with backoff, their output files validated like any response
   (count, dimensions, NaN: :func:`embedpipe.engine.validate.check_response`) and the
   vectors written to the pipeline's cache under the pipeline's own keys;
4. then every chunk goes through :func:`~embedpipe.jobs.process_chunk` as usual: it finds
   the batch's vectors in the cache (billing nothing) and embeds through the normal API only
   what the batches did not return (error-file lines: retried there, dead-lettered if they
   fail for good).

Killed at any point, the same command re-attaches: a file recorded as uploaded is submitted
(after checking the account's batches for one already made from it), a submitted batch is
polled, never created again. An expired or cancelled batch keeps its completed part (it
was billed); the rest is planned into new batches, up to :attr:`BatchOptions.max_rounds`
times, before the normal API takes what is left.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
import tempfile
import time
import uuid
from collections.abc import Callable, Generator, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from embedpipe import codec
from embedpipe.cost import BATCH_COMPLETION_WINDOW, batch_price_of, cost_of
from embedpipe.engine.validate import check_response
from embedpipe.errors import ConfigurationError, EmbedPipeError, InvalidResponseError
from embedpipe.jobs.results import BatchInfo
from embedpipe.jobs.spec import JobSpec
from embedpipe.jobs.state import SQLiteJobStore
from embedpipe.jobs.unit import Chunk
from embedpipe.pipeline import EmbeddingPipeline
from embedpipe.providers.openai import map_openai_error

log = logging.getLogger("embedpipe.jobs.batch")

#: statuses a batch never leaves
FINAL = frozenset({"completed", "expired", "cancelled", "failed"})
#: final statuses whose unfinished lines are planned into a new batch (a failed batch failed
#: validation: the same file would fail again, so its texts go to the normal API)
REPLANNED = frozenset({"expired", "cancelled"})
#: embedpipe's steps for one batch file, in order
PLANNED, UPLOADED, SUBMITTING, SUBMITTED, HARVESTED = "planned", "uploaded", "submitting", "submitted", "harvested"


class BatchAPIError(EmbedPipeError):
    """A files or batches call failed; ``retryable`` when asking again later may succeed."""

    def __init__(self, message: str, *, retryable: bool = False) -> None:
        super().__init__(message)
        self.retryable = retryable


@dataclass(frozen=True)
class BatchLimits:
    """How big one batch input file may grow.

    OpenAI's documented limits (https://platform.openai.com/docs/guides/batch, as of
    2026-12-02): 50,000 requests and 200 MB per input file, and for ``/v1/embeddings`` at
    most 50,000 embedding inputs over all the requests of a batch. Smaller values make more,
    smaller batches (each finishes sooner, and a kill loses less of the wait).
    """

    max_requests: int = 50_000
    max_bytes: int = 200 * 1024 * 1024
    max_inputs: int = 50_000

    def __post_init__(self) -> None:
        for name in ("max_requests", "max_bytes", "max_inputs"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigurationError(f"BatchLimits.{name}={value!r} must be a positive integer")


@dataclass(frozen=True)
class BatchProgress:
    """Where the batches of a run stand; handed to :attr:`BatchOptions.on_progress` at each poll."""

    batches: tuple[BatchInfo, ...]
    elapsed: float

    @property
    def requests(self) -> int:
        return sum(b.requests for b in self.batches)

    @property
    def completed(self) -> int:
        return sum(b.completed for b in self.batches)

    def by_status(self) -> dict[str, int]:
        """Batch count per API status (``planned``/``uploaded`` before a batch exists)."""
        counts: dict[str, int] = {}
        for b in self.batches:
            name = b.status or b.state
            counts[name] = counts.get(name, 0) + 1
        return counts


@dataclass(frozen=True)
class BatchOptions:
    """How a ``batch_api`` run plans and waits: ``jobs.run(..., batch_api=BatchOptions(...))``.

    ``poll_initial_s`` grows by half at each poll that finds nothing new, up to
    ``poll_max_s``. ``max_rounds``: how many times texts of an expired or cancelled batch
    are planned into a new batch in one run before the normal API takes them.
    ``sleep`` is injectable for tests.
    """

    limits: BatchLimits = field(default_factory=BatchLimits)
    poll_initial_s: float = 5.0
    poll_max_s: float = 60.0
    max_rounds: int = 2
    on_progress: Callable[[BatchProgress], None] | None = None
    sleep: Callable[[float], Any] = time.sleep

    def __post_init__(self) -> None:
        if not self.poll_initial_s > 0 or not self.poll_max_s >= self.poll_initial_s:
            raise ConfigurationError(f"poll_initial_s={self.poll_initial_s!r} and poll_max_s={self.poll_max_s!r} "
                                     "must be > 0, the maximum at least the first")
        if not isinstance(self.max_rounds, int) or self.max_rounds < 0:
            raise ConfigurationError(f"max_rounds={self.max_rounds!r} must be an integer >= 0")


def batch_options(value: bool | BatchOptions | None) -> BatchOptions | None:
    """``batch_api=`` as given to ``jobs.run``: ``True`` for the defaults, options, or off."""
    if value is None or value is False:
        return None
    if value is True:
        return BatchOptions()
    if isinstance(value, BatchOptions):
        return value
    raise ConfigurationError(f"batch_api={value!r}: pass True or a BatchOptions")


def batch_provider(pipe: EmbeddingPipeline) -> Any:
    """The pipeline's provider if it can go through a Batch API, else a ConfigurationError saying why."""
    provider = pipe.provider
    if batch_price_of(provider.name, 1.0) is None or not callable(getattr(provider, "batch_client", None)):
        voyage = (" Voyage's batch endpoint has no client in its SDK (voyageai 0.5): not supported yet."
                  if provider.name == "voyage" else "")
        raise ConfigurationError(f"--batch-api is for openai: and azure: models, not {provider.spec}.{voyage}")
    if pipe.cache is None:
        raise ConfigurationError("--batch-api needs a cache (--cache): the batches' vectors reach the chunks "
                                 "through it")
    return provider


# ------------------------------------------------------------------ the store's batch tables
class BatchLedger:
    """The job store's ``batch_files``/``batch_items`` tables: every file and batch id, and which keys it holds."""

    COLUMNS = ("plan_id", "state", "batch_status", "batch_id", "file_id", "requests", "inputs", "completed",
               "failed", "cached", "output_file_id", "error_file_id", "created", "tokens", "model")

    def __init__(self, store: SQLiteJobStore, job_id: str) -> None:
        self.store, self.job_id = store, job_id

    def add(self, plan_id: str, gen: int, model: str, requests: int, tokens: int, size: int,
            items: list[tuple[str, int, str, int]]) -> None:
        """Record a planned file and its items ``(custom_id, position, key, tokens)`` in one transaction."""
        now = time.time()
        with self.store.transaction() as db:
            db.execute("INSERT OR IGNORE INTO batch_files(plan_id, job_id, gen, model, requests, inputs, tokens, "
                       "bytes, state, created, updated) VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                       (plan_id, self.job_id, gen, model, requests, len(items), tokens, size, PLANNED, now, now))
            db.executemany("INSERT OR IGNORE INTO batch_items(plan_id, custom_id, position, key, tokens) "
                           "VALUES (?,?,?,?,?)", [(plan_id, *item) for item in items])

    def update(self, plan_id: str, **values: Any) -> None:
        allowed = {"state", "file_id", "batch_id", "batch_status", "output_file_id", "error_file_id", "completed",
                   "failed", "cached"}
        bad = set(values) - allowed
        if bad:
            raise ValueError(f"unknown batch_files columns {sorted(bad)}")
        sets = ", ".join(f"{k}=?" for k in values)
        with self.store.transaction() as db:
            db.execute(f"UPDATE batch_files SET {sets}, updated=? WHERE plan_id=?",
                       (*values.values(), time.time(), plan_id))

    def rows(self, *states: str) -> list[dict[str, Any]]:
        """This job's batch files (every job's when ``job_id`` is empty), oldest first, in ``states``."""
        where = f" AND state IN ({','.join('?' * len(states))})" if states else ""
        with self.store.transaction() as db:
            cur = db.execute(f"SELECT {', '.join(self.COLUMNS)} FROM batch_files WHERE (job_id=? OR ?=''){where} "
                             "ORDER BY created, plan_id", (self.job_id, self.job_id, *states))
            return [dict(zip(self.COLUMNS, row, strict=True)) for row in cur.fetchall()]

    def items(self, plan_id: str) -> dict[str, list[tuple[str, int]]]:
        """custom_id -> its inputs' ``(key, tokens)`` in request order."""
        out: dict[str, list[tuple[str, int]]] = {}
        with self.store.transaction() as db:
            for custom_id, key, tokens in db.execute(
                    "SELECT custom_id, key, tokens FROM batch_items WHERE plan_id=? ORDER BY custom_id, position",
                    (plan_id,)):
                out.setdefault(custom_id, []).append((key, tokens))
        return out

    def covered(self) -> set[str]:
        """Keys that a batch holds and that no new batch may plan: those of batches under way, and of
        batches that finished (their error lines go to the normal API, not to another batch)."""
        with self.store.transaction() as db:
            cur = db.execute(
                "SELECT DISTINCT i.key FROM batch_items i JOIN batch_files f USING (plan_id) WHERE f.job_id=? AND "
                "(f.state IN (?, ?, ?) OR (f.state=? AND f.batch_status NOT IN ('expired', 'cancelled')))",
                (self.job_id, UPLOADED, SUBMITTING, SUBMITTED, HARVESTED))
            return {row[0] for row in cur.fetchall()}

    def drop_unsent(self) -> int:
        """Forget files planned but never uploaded (their temporary files died with the process)."""
        with self.store.transaction() as db:
            ids = [r[0] for r in db.execute("SELECT plan_id FROM batch_files WHERE job_id=? AND state=?",
                                            (self.job_id, PLANNED))]
            for plan_id in ids:
                db.execute("DELETE FROM batch_items WHERE plan_id=?", (plan_id,))
                db.execute("DELETE FROM batch_files WHERE plan_id=?", (plan_id,))
        return len(ids)

    def info(self, row: dict[str, Any]) -> BatchInfo:
        return BatchInfo(plan_id=row["plan_id"], state=row["state"], status=row["batch_status"],
                         batch_id=row["batch_id"], file_id=row["file_id"], requests=row["requests"],
                         inputs=row["inputs"], completed=row["completed"], failed=row["failed"], cached=row["cached"])


# ------------------------------------------------------------------ planning files
class _FilePlanner:
    """Writes request lines into batch input files on disk, cutting files and requests at the limits."""

    def __init__(self, folder: Path, body: Callable[[list[str]], dict[str, Any]], url: str, limits: BatchLimits,
                 per_request: int, tokens_per_request: int | None) -> None:
        self.folder, self.body, self.url, self.limits = folder, body, url, limits
        self.per_request, self.tokens_per_request = min(per_request, limits.max_inputs), tokens_per_request
        #: the files written: (path, items (custom_id, position, key, tokens), tokens, requests)
        self.files: list[tuple[Path, list[tuple[str, int, str, int]], int, int]] = []
        self._texts: list[tuple[str, str, int]] = []      # the request being filled: (key, text, tokens)
        self._out: IO[bytes] | None = None
        self._items: list[tuple[str, int, str, int]] = []
        self._requests = self._size = self._inputs = self._tokens = 0

    def add(self, key: str, text: str, tokens: int) -> None:
        if self._texts and (len(self._texts) >= self.per_request or (
                self.tokens_per_request and sum(t for *_, t in self._texts) + tokens > self.tokens_per_request)):
            self._flush_request()
        self._texts.append((key, text, tokens))

    def _flush_request(self) -> None:
        if not self._texts:
            return
        texts, self._texts = self._texts, []
        line = self._line(self._requests, texts)
        limits = self.limits
        if self._requests and (self._requests + 1 > limits.max_requests or self._size + len(line) > limits.max_bytes
                               or self._inputs + len(texts) > limits.max_inputs):
            self._close_file()
            line = self._line(0, texts)
        if len(line) > limits.max_bytes:
            raise ConfigurationError(f"one batch request of {len(texts)} texts is {len(line):,} bytes, over the "
                                     f"{limits.max_bytes:,}-byte file limit; lower --batch-size")
        if self._out is None:
            self._out = open(self.folder / f"batch-{len(self.files):05d}.jsonl", "wb")  # noqa: SIM115  # closed in _close_file
        custom_id = f"r{self._requests}"
        self._items += [(custom_id, pos, key, tok) for pos, (key, _, tok) in enumerate(texts)]
        self._out.write(line)
        self._requests += 1
        self._size += len(line)
        self._inputs += len(texts)
        self._tokens += sum(t for *_, t in texts)

    def _line(self, index: int, texts: list[tuple[str, str, int]]) -> bytes:
        line = {"custom_id": f"r{index}", "method": "POST", "url": self.url,
                "body": self.body([text for _, text, _ in texts])}
        return json.dumps(line, ensure_ascii=False, separators=(",", ":")).encode("utf-8") + b"\n"

    def _close_file(self) -> None:
        if self._out is None:
            return
        self._out.close()
        self.files.append((Path(self._out.name), self._items, self._tokens, self._requests))
        self._out, self._items = None, []
        self._requests = self._size = self._inputs = self._tokens = 0

    def close(self) -> None:
        self._flush_request()
        self._close_file()


# ------------------------------------------------------------------ the driver
class BatchRun:
    """One run's batch step: plan, submit, poll and harvest; see the module's docstring."""

    def __init__(self, spec: JobSpec, store: SQLiteJobStore, pipe: EmbeddingPipeline, options: BatchOptions) -> None:
        self.spec, self.store, self.pipe, self.options = spec, store, pipe, options
        self.provider = batch_provider(pipe)
        self.cache = pipe.cache
        self.ledger = BatchLedger(store, spec.job_id)
        self.material = pipe.key_material("document")
        self.client: Any = None
        self.price = batch_price_of(self.provider.name, pipe.price_per_1m_tokens)
        self.started = time.monotonic()
        self.gen: int | None = None
        self.seen: set[str] = set()  # plan ids this run submitted or re-attached to
        self._paths: dict[str, Path] = {}  # plan id -> the input file this process wrote
        info = self.provider.info
        caps = [c for c in (info.max_input_tokens, pipe.max_batch_tokens, info.max_batch_tokens) if c]
        self.token_limit = min(caps) if caps else None
        self.tokens_per_request = min(c for c in (pipe.max_batch_tokens, info.max_batch_tokens) if c) \
            if (pipe.max_batch_tokens or info.max_batch_tokens) else None
        self.per_request = pipe.batch_size  # --batch-size, else the provider's inputs-per-request cap

    # -------------------------------------------------------------- entry
    def through(self, chunks: Iterable[Chunk]) -> Generator[Chunk, None, None]:
        """Read ``chunks`` (spooled), run the batches to the end, then yield the chunks again."""
        with tempfile.TemporaryDirectory(prefix="embedpipe-batch-") as tmp:
            folder = Path(tmp)
            with open(folder / "chunks.pickle", "w+b") as spool:
                self._run(chunks, spool, folder)
                yield from self._respool(spool)

    def _run(self, chunks: Iterable[Chunk], spool: IO[bytes], folder: Path) -> None:
        self.client = self.provider.batch_client()
        try:
            dropped = self.ledger.drop_unsent()
            if dropped:
                log.info("embedpipe: %d batch file(s) planned but never uploaded are planned again", dropped)
            source: Iterable[Chunk] = self._spooled(chunks, spool)
            for round_ in range(self.options.max_rounds + 1):
                self._plan(source, folder / f"round-{round_}")
                self._submit_all()
                replan = self._poll_all()
                if not replan:
                    break
                source = self._respool(spool)
            else:
                log.warning("embedpipe: batches kept expiring or being cancelled; the normal API takes the rest")
        finally:
            self.client.close()

    def _spooled(self, chunks: Iterable[Chunk], spool: IO[bytes]) -> Iterator[Chunk]:
        # Pickle, not the chunks' JSON: records keep their metadata exactly as the source gave it
        # (dates, decimals), and the file is this process's own, read back by it only.
        for chunk in chunks:
            self.gen = chunk.gen
            pickle.dump(chunk, spool, protocol=pickle.HIGHEST_PROTOCOL)
            yield chunk
        spool.flush()

    @staticmethod
    def _respool(spool: IO[bytes]) -> Iterator[Chunk]:
        spool.seek(0)
        while True:
            try:
                chunk = pickle.load(spool)  # our own spool file, written above
            except EOFError:
                break
            yield chunk
        spool.seek(0, os.SEEK_END)

    # -------------------------------------------------------------- 1. plan
    def _plan(self, chunks: Iterable[Chunk], folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        covered = self.ledger.covered()
        planner = _FilePlanner(folder, self.provider.batch_body, self.provider.batch_endpoint, self.options.limits,
                               self.per_request, self.tokens_per_request)
        tokenizer = self.provider.tokenizer
        assert self.cache is not None
        for chunk in chunks:
            texts = list(dict.fromkeys(e.record.text for e in chunk.records if _batchable(e.record.text)))
            if not texts:
                continue
            keys = self.cache.keys_for(self.material, texts, "document")
            fresh = [(k, t) for k, t in zip(keys, texts, strict=True) if k not in covered]
            covered.update(k for k, _ in fresh)
            if not fresh:
                continue
            values = self.cache.get_many([k for k, _ in fresh])
            todo = [kt for kt, v in zip(fresh, values, strict=True) if v is None]
            counts = tokenizer.count([t for _, t in todo]) if todo else []
            for (key, text), tokens in zip(todo, counts, strict=True):
                # Longer texts are split by the engine: they go through the normal API.
                if self.token_limit is None or tokens <= self.token_limit:
                    planner.add(key, text, tokens)
        planner.close()
        gen = self.gen if self.gen is not None else (self.store.latest_run() or 0)
        for path, items, tokens, requests in planner.files:
            data = path.read_bytes()
            # A re-planned file may hold exactly what an expired one held: the id must still be new.
            plan_id = hashlib.sha256(f"{self.spec.job_id}:{uuid.uuid4().hex}:".encode() + data).hexdigest()[:32]
            self.ledger.add(plan_id, gen, self.provider.spec, requests, tokens, len(data), items)
            self._paths[plan_id] = path

    # -------------------------------------------------------------- 2. submit
    def _submit_all(self) -> None:
        for row in self.ledger.rows(PLANNED, UPLOADED, SUBMITTING):
            plan_id = row["plan_id"]
            self.seen.add(plan_id)
            if row["state"] == PLANNED:
                path = self._paths.get(plan_id)
                if path is None:  # planned by a process that died before uploading: planned again later
                    continue
                with open(path, "rb") as f:
                    uploaded = self._api("upload", self.client.files.create,
                                         file=(f"embedpipe-{plan_id}.jsonl", f), purpose="batch")
                self.ledger.update(plan_id, state=UPLOADED, file_id=uploaded.id)
                row["file_id"] = uploaded.id
                row["state"] = UPLOADED
            if row["state"] == UPLOADED:
                # Marked first: a kill between here and the batch id leaves SUBMITTING, which re-attaches.
                self.ledger.update(plan_id, state=SUBMITTING)
                batch = None
            else:
                batch = self._find_batch(row["file_id"], row["created"])
            if batch is None:
                batch = self._api(
                    "batch creation", self.client.batches.create,
                    input_file_id=row["file_id"], endpoint=self.provider.batch_endpoint,
                    completion_window=BATCH_COMPLETION_WINDOW,
                    metadata={"embedpipe_job": self.spec.job_id, "embedpipe_plan": plan_id})
            self.ledger.update(plan_id, state=SUBMITTED, batch_id=batch.id, batch_status=batch.status)
            log.info("embedpipe: batch %s submitted (file %s, %d requests)", batch.id, row["file_id"],
                     row["requests"])

    def _api(self, what: str, call: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """One files/batches call; the SDK's errors become embedpipe's (the SDK already retried)."""
        try:
            return call(*args, **kwargs)
        except Exception as exc:
            err = map_openai_error(exc)
            raise BatchAPIError(f"the Batch API's {what} failed: {err}. What was submitted is recorded: run the "
                                "same command again to re-attach", retryable=err.retryable) from exc

    def _find_batch(self, file_id: str, since: float) -> Any:
        """The batch already created from ``file_id`` (by a process killed before recording it), or None."""
        for batch in self._api("batch listing", self.client.batches.list, limit=100):
            if batch.input_file_id == file_id:
                return batch
            if batch.created_at < since - 3600:  # the list is newest first: older ones cannot be ours
                break
        return None

    # -------------------------------------------------------------- 3. poll and harvest
    def _poll_all(self) -> bool:
        """Poll every submitted batch until it is final and harvested; whether any ended expired or cancelled."""
        replan = False
        pause = self.options.poll_initial_s
        while True:
            waiting = self.ledger.rows(SUBMITTED)
            if not waiting:
                return replan
            self.seen.update(r["plan_id"] for r in waiting)
            changed = False
            for row in waiting:
                try:
                    batch = self._api("poll", self.client.batches.retrieve, row["batch_id"])
                except BatchAPIError as exc:
                    if not exc.retryable:
                        raise
                    # A batch waits for hours: a network blip must not end the run. The next poll asks again.
                    log.warning("embedpipe: %s; polling again", exc)
                    continue
                counts = batch.request_counts
                done = int(getattr(counts, "completed", 0) or 0) if counts is not None else 0
                failed = int(getattr(counts, "failed", 0) or 0) if counts is not None else 0
                if (batch.status, done, failed) != (row["batch_status"], row["completed"], row["failed"]):
                    changed = True
                    self.ledger.update(row["plan_id"], batch_status=batch.status, completed=done, failed=failed)
                if batch.status in FINAL:
                    self._harvest(row, batch)
                    replan = replan or batch.status in REPLANNED
            self._report()
            if not self.ledger.rows(SUBMITTED):
                return replan
            pause = self.options.poll_initial_s if changed else min(pause * 1.5, self.options.poll_max_s)
            self.options.sleep(pause)

    def _harvest(self, row: dict[str, Any], batch: Any) -> None:
        """Validate the output file into the cache; count the error file's lines (the normal API retries them)."""
        plan_id = row["plan_id"]
        items = self.ledger.items(plan_id)
        cached = bad = 0
        tokens = 0
        if batch.output_file_id:
            writes: list[tuple[str, bytes]] = []
            for line in self._lines(batch.output_file_id):
                if not line.strip():
                    continue
                got, billed, invalid = self._read_line(line, items)
                writes += got
                tokens += billed
                bad += invalid
                if len(writes) >= 2000:
                    self._write(writes)
                    cached += len(writes)
                    writes = []
            self._write(writes)
            cached += len(writes)
        errors: dict[str, int] = {}
        if batch.error_file_id:
            for line in self._lines(batch.error_file_id):
                if line.strip():
                    reason = _error_reason(line)
                    errors[reason] = errors.get(reason, 0) + 1
        if batch.status == "failed":
            problems = [getattr(e, "message", str(e)) for e in (getattr(batch.errors, "data", None) or [])]
            log.warning("embedpipe: batch %s failed validation (%s); the normal API takes its texts", batch.id,
                        "; ".join(problems[:3]) or "no reason given")
        if errors or bad:
            log.warning("embedpipe: batch %s (%s): %d line(s) failed %s, %d vector(s) invalid; the normal API "
                        "takes them", batch.id, batch.status, sum(errors.values()), errors or "", bad)
        counts = batch.request_counts
        with self.store.transaction() as db:
            gen = self.gen if self.gen is not None else self.store.latest_run()
            if gen is not None:
                self.store.add_counts(db, gen, {"tokens": tokens, "cost_usd": cost_of(tokens, self.price) or 0.0})
        self.ledger.update(plan_id, state=HARVESTED, batch_status=batch.status, cached=cached,
                           output_file_id=batch.output_file_id, error_file_id=batch.error_file_id,
                           completed=int(getattr(counts, "completed", 0) or 0) if counts else 0,
                           failed=int(getattr(counts, "failed", 0) or 0) if counts else 0)

    def _lines(self, file_id: str) -> Iterator[str]:
        """The lines of a batch output or error file, streamed (an output file can reach hundreds of MB)."""
        try:
            with self.client.files.with_streaming_response.content(file_id) as response:
                yield from response.iter_lines()
        except BatchAPIError:
            raise
        except Exception as exc:
            raise BatchAPIError(f"downloading {file_id} failed: {map_openai_error(exc)}; run the same command "
                                "again to download it again", retryable=True) from exc

    def _read_line(self, line: str, items: dict[str, list[tuple[str, int]]]) -> tuple[list[tuple[str, bytes]], int,
                                                                                       int]:
        """One output line: its cache writes, its billed tokens, its invalid rows."""
        try:
            obj = json.loads(line)
            custom_id = str(obj["custom_id"])
            response = obj.get("response") or {}
            status = int(response.get("status_code") or 0)
        except (ValueError, KeyError, TypeError, AttributeError):
            log.warning("embedpipe: an output line that is not a batch response was skipped: %.80r", line)
            return [], 0, 0
        inputs = items.get(custom_id)
        if inputs is None or status != 200:
            return [], 0, len(inputs or ())
        try:
            vectors, billed = self.provider.parse_batch_body(response.get("body"), len(inputs))
            checked = check_response(vectors, len(inputs), native=self.pipe.provider.info.dimensions,
                                     dimensions=self.spec.pipeline.dimensions, spec=self.provider.spec)
        except InvalidResponseError as exc:
            log.warning("embedpipe: batch line %s is unusable (%s); the normal API takes its %d text(s)", custom_id,
                        exc, len(inputs))
            return [], 0, len(inputs)
        bad = set(checked.bad_rows)
        writes = [(key, codec.encode(checked.vectors[k], tok)) for k, (key, tok) in enumerate(inputs)
                  if k not in bad]
        return writes, int(billed if billed is not None else sum(t for _, t in inputs)), len(bad)

    def _write(self, writes: list[tuple[str, bytes]]) -> None:
        if writes:
            assert self.cache is not None
            self.cache.set_many(writes)

    def _report(self) -> None:
        if self.options.on_progress is not None:
            self.options.on_progress(BatchProgress(self.infos(), time.monotonic() - self.started))

    def infos(self) -> tuple[BatchInfo, ...]:
        """The batches this run submitted or re-attached to."""
        return tuple(self.ledger.info(r) for r in self.ledger.rows() if r["plan_id"] in self.seen)


def _batchable(text: Any) -> bool:
    """A text the batch can carry as is (the engine dead-letters or splits the others itself)."""
    if not isinstance(text, str) or not text.strip():
        return False
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _error_reason(line: str) -> str:
    try:
        obj = json.loads(line)
        response = obj.get("response")
        if response:
            return f"HTTP {response.get('status_code')}"
        return str((obj.get("error") or {}).get("code") or "error")
    except (ValueError, AttributeError):
        return "unreadable"


def batches(out: Any = None, *, state: str | os.PathLike[str] | None = None) -> tuple[BatchInfo, ...]:
    """Every batch the job whose output is ``out`` (or whose state is ``state``) has planned, oldest first."""
    from embedpipe.jobs.dlq import open_state

    st, _ = open_state(out, state, readonly=False)  # read-write: an older state file gains the tables
    with st:
        ledger = BatchLedger(st, "")
        return tuple(ledger.info(r) for r in ledger.rows())


def through_batches(spec: JobSpec, chunks: Iterable[Chunk], *, store: SQLiteJobStore, pipeline: EmbeddingPipeline,
                    options: BatchOptions) -> tuple[Generator[Chunk, None, None], BatchRun]:
    """Run the batch step over ``chunks``; the chunks come back, in order, once the batches are harvested.

    The batch work happens when the first chunk is asked for. The :class:`BatchRun` tells
    which batches the run saw (:meth:`BatchRun.infos`).
    """
    run = BatchRun(spec, store, pipeline, options)
    return run.through(chunks), run


__all__ = ["FINAL", "BatchAPIError", "BatchLedger", "BatchLimits", "BatchOptions", "BatchProgress", "BatchRun",
           "batch_options", "batch_provider", "batches", "through_batches"]
