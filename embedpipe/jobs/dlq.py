"""The dead-letter queue of a job: list, retry or purge the records that failed for good.

Letters live in the job's state (``OUT/_state.sqlite``) with the record's text and
metadata, so a retry needs no source; it embeds with the model, dimensions and base URL
the run recorded (options given here take precedence) and writes into the run's output.
The retry itself is :func:`embedpipe.deadletters.retry`, the one the LlamaIndex transform
uses; :class:`JobDeadLetters` is the queue as a store that settles into the job's output.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from embedpipe.deadletters import DeadLetter, DeadLetterStore, RetryOutcome, retry
from embedpipe.errors import ConfigurationError
from embedpipe.jobs.errors import JobAbortedError, JobConflictError
from embedpipe.jobs.records import Entry, Record
from embedpipe.jobs.sinks import Sink, sink_from, sink_from_description
from embedpipe.jobs.spec import JobSpec
from embedpipe.jobs.state import Failed, JobState, Written
from embedpipe.jobs.unit import job_pipeline, secrets_of


@dataclass(frozen=True)
class RetryResult:
    """What a retry did. ``exit_code``: 0 queue empty, 3 letters remain, 4 stopped at the budget."""

    recovered: int           #: letters embedded and written to the output
    failed: int              #: letters that failed again (their reason and attempts updated)
    remaining: int           #: letters in the queue now
    tokens: int
    cost_usd: float | None
    budget_exceeded: bool

    @property
    def exit_code(self) -> int:
        """The CLI's exit code for this result."""
        if self.budget_exceeded:
            return 4
        return 3 if self.remaining else 0


def _entry(letter: DeadLetter) -> Entry:
    return Entry.of(Record(letter.id, letter.text, dict(letter.metadata)))


class JobDeadLetters(DeadLetterStore):
    """A job's dead-letter queue as a store: :meth:`settle` writes the recovered vectors into the job's output
    and commits them, with the failures, in one state transaction (as a run commits a chunk)."""

    def __init__(self, state: JobState, sink: Sink, spec: str, gen: int) -> None:
        self.state = state
        self.sink = sink
        self.spec = spec
        self.gen = gen
        dims = state.get("dimensions")
        self.dims = int(dims) if dims else None
        #: what was written, for the sink's read-back check
        self.sample: list[tuple[Entry, np.ndarray]] = []

    def add(self, letters: Sequence[DeadLetter]) -> None:
        self.state.commit(self.gen, [], [Failed(_entry(d), d.reason) for d in letters])

    def get(self, ids: Sequence[str]) -> list[DeadLetter]:
        found = {d.id: d for d in self.state.dead_letters(ids)}
        return [found[i] for i in ids if i in found]

    def all(self) -> list[DeadLetter]:
        return self.state.dead_letters()

    def remove(self, ids: Sequence[str]) -> None:
        """Drop the letters and their dead records, as ``dlq purge`` does: a later run tries them again."""
        self.state.purge(list(ids))

    def clear(self) -> None:
        self.state.purge()

    def __len__(self) -> int:
        return self.state.dead_letter_count()

    def settle(self, outcome: RetryOutcome) -> None:
        # As in a run: failures that are not the records' fault while the provider embedded nothing
        # are an outage, and count as no attempt.
        transient = {d.id for d in outcome.transient} if outcome.outage else set()
        failed = [Failed(_entry(d), d.reason) for d in outcome.failed if d.id not in transient]
        written: list[Written] = []
        meta: dict[str, Any] = {}
        if outcome.recovered:
            entries = [_entry(letter) for letter, _ in outcome.recovered]
            vectors = np.asarray([vector for _, vector in outcome.recovered], dtype=np.float32)
            dims = int(vectors.shape[1])
            if self.dims is not None and dims != self.dims:
                raise JobConflictError(f"{self.spec} returned {dims}-dimensional vectors but the output holds "
                                       f"{self.dims}-dimensional ones; pass --rebuild to start over")
            self.dims = dims
            receipt = self.sink.write(entries, vectors, self.spec)
            written = [Written(e, loc) for e, loc in zip(entries, receipt.locs, strict=True)]
            meta = {**receipt.meta, "dimensions": dims}
            room = self.sink.verify_sample - len(self.sample)
            self.sample += [(e, vectors[k].copy()) for k, e in enumerate(entries[:max(0, room)])]
        self.state.commit(self.gen, written, failed, meta)
        if transient:
            raise JobAbortedError(
                f"every request of a retry batch failed ({len(transient)} records): {outcome.transient[0].reason}. "
                "The retry stopped; what was recovered is saved and those letters are unchanged. Fix the cause and "
                "retry again")


def open_state(out: Any = None, state: str | os.PathLike[str] | None = None, *,
               readonly: bool = True) -> tuple[JobState, Sink | None]:
    """The state of the job whose output is ``out`` (or at ``state``), and its sink where one can be named."""
    sink = sink_from(out) if out is not None else None
    if sink is None and state is None:
        raise ConfigurationError("name the job: pass out= (the run's --out) or state= (its --state)")
    path = Path(state) if state is not None else (sink or Sink()).default_state_path()
    if path is None:
        raise ConfigurationError(f"{sink!r} keeps no job state of its own: pass state='path/to/state.sqlite'")
    if not path.is_file():
        raise ConfigurationError(f"no job state at {path}: has a run written to this output?")
    st = JobState(path, readonly=readonly)
    if sink is None:
        sink = sink_from_description(st.get("sink") or "")
    return st, sink


def dead_letters(out: Any = None, *, state: str | os.PathLike[str] | None = None) -> list[DeadLetter]:
    """The job's dead letters, oldest first: record id, text, metadata, reason, attempts, time."""
    st, _ = open_state(out, state)
    with st:
        return st.dead_letters()


def purge_dead_letters(out: Any = None, *, state: str | os.PathLike[str] | None = None,
                       ids: list[str] | None = None) -> int:
    """Drop letters (all, or ``ids``); return how many. A later run tries them again if they are still in the source."""
    st, _ = open_state(out, state, readonly=False)
    with st:
        st.lock()
        return st.purge(ids)


def late_chunked_job_refused(chunking: str | None) -> None:
    """Raise when the run was a late-chunked job: a letter alone would be embedded without its document."""
    if chunking == "late":
        raise ConfigurationError("this output was made with chunking='late': a dead chunk cannot be embedded "
                                 "without the rest of its document. Fix the document in the source and run the "
                                 "job again (its chunks are re-planned together)")


def retry_dead_letters(out: Any = None, *, state: str | os.PathLike[str] | None = None,
                       ids: list[str] | None = None, api_key: str | None = None, **options: Any) -> RetryResult:
    """Embed the letters again (all, or ``ids``) and write the ones that succeed into the run's output.

    Successes leave the queue; failures stay with the new reason and one more attempt.
    The model, dimensions and base URL default to the run's; the other ``options`` are
    those of :func:`~embedpipe.jobs.run` (``cache``, ``rpm``, ``budget_usd``, ``chunk_size``…).
    """
    st, sink = open_state(out, state, readonly=False)
    with st:
        st.lock()
        if sink is None:
            raise ConfigurationError(f"the state at {st.path} names no file output; pass out= (the vector store)")
        late_chunked_job_refused(st.get("chunking"))
        options = {k: v for k, v in options.items() if v is not None}
        options.setdefault("model", st.get("model"))
        if not options["model"]:
            raise ConfigurationError(f"the state at {st.path} names no model; pass model=")
        if st.get("requested_dimensions"):
            options.setdefault("dimensions", int(st.get("requested_dimensions") or 0))
        if st.get("base_url"):
            options.setdefault("base_url", st.get("base_url"))
        spec = JobSpec.from_options(None, sink, state=st.path, **options)
        pipe = job_pipeline(spec, sink=sink, api_key=api_key)
        try:
            st.secrets = secrets_of(pipe, api_key)
            st.check_model(pipe.provider.spec, pipe.expected_dims)
            sink.bind(pipe)
            sink.open(st)
            runs = st.runs()
            queue = JobDeadLetters(st, sink, pipe.provider.spec, runs[-1].gen if runs else 0)
            outcome = retry(queue, pipe, ids, secrets=st.secrets, batch_size=spec.chunk_size)
            sink.compact(st)
            if queue.sample:
                sink.verify(queue.sample)
            stats = pipe.stats
            return RetryResult(recovered=len(outcome.recovered), failed=len(outcome.failed),
                               remaining=st.dead_letter_count(), tokens=stats.tokens, cost_usd=stats.cost_usd,
                               budget_exceeded=outcome.budget_exceeded)
        finally:
            pipe.close()


__all__ = ["JobDeadLetters", "RetryResult", "dead_letters", "open_state", "purge_dead_letters", "retry_dead_letters"]
