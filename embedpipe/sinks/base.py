"""What every database sink shares: the schema check, batching, retries, error mapping and read-back.

A concrete sink (:mod:`embedpipe.sinks.pgvector`, ``qdrant``, ``chroma``, ``lancedb``,
``milvus``) is an adapter of a few small methods over its client library: read the
collection's schema, create it, upsert one batch, delete ids, fetch ids, drop. This base
class drives them the same way for each:

* when the job opens the sink (before any write), :meth:`DatabaseSink.prepare` reads the existing collection's
  dimensions and metric; a mismatch with the job raises :class:`CollectionMismatchError`
  (a :class:`~embedpipe.errors.ConfigurationError`) and nothing is written;
* writes go in batches of ``batch_size`` rows, each an upsert by id, so a batch replayed
  after a crash (written, but not yet committed to the job state) changes nothing;
* every call passes through :meth:`DatabaseSink.call`, the one place where a library's
  errors become embedpipe's: transient ones (connection lost, timeouts) are retried with
  tenacity, the rest raise :class:`SinkError`;
* after the run, :meth:`verify` reads back a sample of ids and compares vectors and content
  hashes, raising :class:`~embedpipe.jobs.SinkVerificationError` on any difference.

Each row holds ``id``, ``vector``, ``content_hash`` (SHA-256 of the text, hex), ``model``,
``dimensions``, ``metadata`` (JSON) and, unless ``?store_text=false``, the ``text``.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np
from tenacity import Retrying, retry_if_exception, stop_after_attempt, wait_random_exponential

from embedpipe._urls import URL
from embedpipe.errors import ConfigurationError, DimensionMismatchError, EmbedPipeError
from embedpipe.jobs.errors import SinkVerificationError
from embedpipe.jobs.records import Entry
from embedpipe.jobs.sinks import Receipt, Sink

if TYPE_CHECKING:
    from embedpipe.jobs.state import JobState
    from embedpipe.pipeline import EmbeddingPipeline

log = logging.getLogger("embedpipe.jobs")

T = TypeVar("T")

#: the loc a database's rows have in the job state: the database is one place
DB_LOC = "db"
#: the distance metrics every sink takes (``?metric=``), in the words of their libraries
METRICS = ("cosine", "l2", "ip")
#: options every database sink URL takes
COMMON_OPTIONS = ("batch_size", "metric", "store_text", "verify_sample")
_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


class SinkError(EmbedPipeError):
    """A vector database refused a call, or stayed unreachable through the retries."""


class CollectionMismatchError(ConfigurationError, DimensionMismatchError):
    """The existing table or collection has other dimensions or another metric than the job; nothing was written."""


@dataclass(frozen=True)
class Rows:
    """One batch of rows to upsert, column by column."""

    ids: list[str]
    vectors: np.ndarray  #: float32, (n, dims)
    content_hashes: list[str]
    texts: list[str] | None  #: None with ``store_text=false``
    metadata: list[str]  #: JSON objects
    model: str

    @property
    def dimensions(self) -> int:
        return int(self.vectors.shape[1])

    def __len__(self) -> int:
        return len(self.ids)


@dataclass(frozen=True)
class Stored:
    """What a database holds for one id, as read back."""

    vector: np.ndarray
    content_hash: str


def positive_int(url: URL, name: str, default: int) -> int:
    """The positive integer option ``name`` of ``url``, else ``default``."""
    value = url.options.get(name)
    if value is None:
        return default
    if not value.isdigit() or int(value) < 1:
        raise ConfigurationError(f"{name}={value!r} in the sink URL {url} must be a positive integer")
    return int(value)


def flag(url: URL, name: str, default: bool) -> bool:
    """The boolean option ``name`` of ``url`` (true/false, 1/0, yes/no, on/off), else ``default``."""
    value = url.options.get(name)
    if value is None:
        return default
    if value.lower() in _TRUE:
        return True
    if value.lower() in _FALSE:
        return False
    raise ConfigurationError(f"{name}={value!r} in the sink URL {url} must be true or false")


def required(url: URL, name: str) -> str:
    """The option ``name`` of ``url``; raises naming it when it is missing or empty."""
    value = url.options.get(name, "")
    if not value:
        raise ConfigurationError(f"the sink URL {url} names no {name}: add ?{name}=NAME")
    return value


class DatabaseSink(Sink):
    """Base class of vector-database sinks. Override the adapter methods between the two rulers below.

    ``library_errors`` are the exception types :meth:`call` maps into :class:`SinkError`;
    :meth:`is_transient` says which of them are worth retrying.
    """

    updates_metadata = False
    verify_sample = 32
    #: exception types of the client library that :meth:`call` maps
    library_errors: tuple[type[BaseException], ...] = ()
    #: attempts per call (the first try included) for transient errors
    attempts = 5

    def __init__(self, *, collection: str, batch_size: int, metric: str = "cosine", store_text: bool = True,
                 verify_sample: int | None = None, sleep: Callable[[float], None] | None = None) -> None:
        metric = metric.lower()
        if metric not in METRICS:
            raise ConfigurationError(f"metric={metric!r} for {type(self).__name__}; use one of {', '.join(METRICS)}")
        self.collection = collection
        self.batch_size = batch_size
        self.metric = metric
        self.store_text = store_text
        if verify_sample is not None:
            self.verify_sample = verify_sample
        #: ids the last :meth:`verify` read back and found as written
        self.verified = 0
        self._dims: int | None = None
        self._expected: int | None = None
        retry_kwargs: dict[str, Any] = {} if sleep is None else {"sleep": sleep}
        self._retrying = Retrying(stop=stop_after_attempt(self.attempts),
                                  wait=wait_random_exponential(multiplier=0.2, max=5),
                                  retry=retry_if_exception(self._retryable), reraise=True, **retry_kwargs)

    @classmethod
    def common_options(cls, url: URL) -> dict[str, Any]:
        """The keyword arguments of :data:`COMMON_OPTIONS` that ``url`` sets."""
        out: dict[str, Any] = {}
        if "batch_size" in url.options:
            out["batch_size"] = positive_int(url, "batch_size", 1)
        if "metric" in url.options:
            out["metric"] = url.options["metric"]
        out["store_text"] = flag(url, "store_text", True)
        if "verify_sample" in url.options:
            value = url.options["verify_sample"]
            if not value.isdigit():
                raise ConfigurationError(f"verify_sample={value!r} in the sink URL {url} must be an integer >= 0")
            out["verify_sample"] = int(value)
        return out

    # ------------------------------------------------------------------ adapter methods
    def existing_schema(self) -> tuple[int | None, str] | None:
        """The existing collection's ``(dimensions, metric)``, or ``None`` when there is none.

        Dimensions are ``None`` when the collection exists but cannot tell them yet (empty)."""
        raise NotImplementedError

    def create(self, dims: int) -> None:
        """Create the collection (and its index) for ``dims``-dimensional vectors and :attr:`metric`."""
        raise NotImplementedError

    def upsert(self, rows: Rows) -> None:
        """Insert or replace ``rows`` by id; durable when it returns."""
        raise NotImplementedError

    def remove(self, ids: Sequence[str]) -> None:
        """Delete ``ids`` (absent ones are ignored)."""
        raise NotImplementedError

    def fetch(self, ids: Sequence[str]) -> dict[str, Stored]:
        """What the collection holds for those of ``ids`` it has."""
        raise NotImplementedError

    def count_rows(self) -> int:
        """How many rows the collection holds (0 when it does not exist)."""
        raise NotImplementedError

    def drop(self) -> None:
        """Remove the collection and everything in it (absent: nothing to do)."""
        raise NotImplementedError

    def pairs(self, text_field: str, batch_size: int) -> Iterator[tuple[list[str], np.ndarray]]:
        """Every (text, vector) of the collection, ``batch_size`` at a time: for warming a cache from it.

        ``text_field`` names the column or payload field that holds the text."""
        raise NotImplementedError

    def is_transient(self, exc: BaseException) -> bool:
        """Whether ``exc`` (one of :attr:`library_errors`) may pass if the call is tried again."""
        return False

    def location(self) -> str:
        """Where the collection is, for messages and :meth:`describe` (never with a password)."""
        raise NotImplementedError

    def stored_form(self, vector: np.ndarray) -> np.ndarray:
        """The vector as the database keeps it (a store that normalizes for cosine returns it normalized)."""
        return vector

    # ------------------------------------------------------------------ shared machinery
    def _retryable(self, exc: BaseException) -> bool:
        return isinstance(exc, self.library_errors) and self.is_transient(exc)

    def call(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)``, retried on transient errors; a library error becomes :class:`SinkError`."""
        try:
            return self._retrying(fn, *args)
        except EmbedPipeError:
            raise
        except self.library_errors as exc:
            what = "unreachable" if self.is_transient(exc) else "refused the call"
            raise SinkError(f"{self.location()} {what} ({fn.__name__}): {type(exc).__name__}: {exc}") from exc

    def describe(self) -> str:
        return f"{type(self).__name__}:{self.location()}"

    def default_state_path(self) -> Path:
        """A state file in the user's state folder, one per collection (``--state`` overrides it)."""
        import platformdirs

        digest = hashlib.sha256(self.describe().encode()).hexdigest()[:16]
        safe = "".join(c if c.isalnum() or c in "_." else "-" for c in self.collection)[:40]
        return Path(platformdirs.user_state_dir("embedpipe")) / "jobs" / f"{safe}-{digest}.sqlite"

    def bind(self, pipeline: EmbeddingPipeline) -> None:
        # Checked in open(), not here: a rebuild binds first and resets the collection after.
        self._expected = pipeline.expected_dims

    def prepare(self, dims: int) -> None:
        """Check the existing collection against ``dims`` and :attr:`metric`, or create it; before any write."""
        if self._dims == dims:
            return
        schema = self.call(self.existing_schema)
        if schema is None:
            self.call(self.create, dims)
        else:
            have_dims, have_metric = schema
            if have_dims is not None and have_dims != dims:
                raise CollectionMismatchError(
                    f"{self.location()} holds {have_dims}-dimensional vectors but this job makes {dims}-dimensional "
                    "ones; nothing was written. Use another collection, or the model it was built with")
            if have_metric != self.metric:
                raise CollectionMismatchError(
                    f"{self.location()} is indexed for the {have_metric} metric, not {self.metric}; nothing was "
                    f"written. Pass ?metric={have_metric} or use another collection")
        self._dims = dims

    def open(self, state: JobState) -> None:
        # The state lives apart from the database: if the collection was dropped or emptied
        # since, the records the state calls done must be written again.
        if self._expected is not None:
            self.prepare(self._expected)
        if state.count("done") and self.call(self.count_rows) == 0:
            n = state.forget_written()
            log.warning("embedpipe: %s is empty or gone; its %d record(s) will be written again", self.location(), n)

    def rows(self, entries: Sequence[Entry], vectors: np.ndarray, model: str) -> Rows:
        """The batch of rows for ``entries`` and their ``vectors``."""
        return Rows(ids=[e.record.id for e in entries], vectors=np.ascontiguousarray(vectors, dtype=np.float32),
                    content_hashes=[e.content_hash.hex() for e in entries],
                    texts=[e.record.text for e in entries] if self.store_text else None,
                    metadata=[e.metadata_json for e in entries], model=model)

    def write(self, entries: Sequence[Entry], vectors: np.ndarray, model: str) -> Receipt:
        dims = int(vectors.shape[1])
        if self._dims is None:
            self.prepare(dims)
        elif dims != self._dims:
            raise CollectionMismatchError(f"{self.location()} takes {self._dims}-dimensional vectors; this write "
                                          f"has {dims}-dimensional ones")
        for start in range(0, len(entries), self.batch_size):
            stop = start + self.batch_size
            self.call(self.upsert, self.rows(entries[start:stop], vectors[start:stop], model))
        return Receipt([DB_LOC] * len(entries))

    def delete(self, ids: Sequence[str]) -> None:
        for start in range(0, len(ids), self.batch_size):
            self.call(self.remove, list(ids[start:start + self.batch_size]))

    def reset(self) -> None:
        self.call(self.drop)
        self._dims = None

    def verify(self, sample: Sequence[tuple[Entry, np.ndarray]]) -> None:
        found = self.call(self.fetch, [e.record.id for e, _ in sample])
        missing, differ = [], []
        for entry, written in sample:
            vector = self.stored_form(written)
            got = found.get(entry.record.id)
            if got is None:
                missing.append(entry.record.id)
            elif got.content_hash != entry.content_hash.hex() or got.vector.shape != vector.shape or \
                    not np.allclose(got.vector, vector, rtol=1e-5, atol=1e-6):
                differ.append(entry.record.id)
        if missing or differ:
            raise SinkVerificationError(
                f"read-back of {len(sample)} ids from {self.location()}: {len(missing)} missing {missing[:5]}, "
                f"{len(differ)} with another vector or content hash {differ[:5]}")
        self.verified = len(sample)
        log.info("embedpipe: verified %d ids read back from %s (vectors and content hashes)", len(sample),
                 self.location())

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.location()!r})"


__all__ = ["COMMON_OPTIONS", "DB_LOC", "METRICS", "CollectionMismatchError", "DatabaseSink", "Rows", "SinkError",
           "Stored", "flag", "positive_int", "required"]
