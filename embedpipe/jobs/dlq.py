"""The dead-letter queue of a job: list, retry or purge the records that failed for good.

Letters live in the job's state (``OUT/_state.sqlite``) with the record's text and
metadata, so a retry needs no source; it embeds with the model, dimensions and base URL
the run recorded (options given here take precedence) and writes into the run's output.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from embedpipe.deadletter import DeadLetter
from embedpipe.errors import ConfigurationError
from embedpipe.jobs.records import Record, chunked
from embedpipe.jobs.runner import _DEFAULT, DEFAULT_CHUNK_SIZE, _Job, _secrets, build_pipeline, state_path_for
from embedpipe.jobs.sinks import Sink, sink_from, sink_from_description
from embedpipe.jobs.state import JobState


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


def open_state(out: Any = None, state: str | os.PathLike[str] | None = None, *,
               readonly: bool = True) -> tuple[JobState, Sink | None]:
    """The state of the job whose output is ``out`` (or at ``state``), and its sink where one can be named."""
    sink = sink_from(out) if out is not None else None
    if sink is None and state is None:
        raise ConfigurationError("name the job: pass out= (the run's --out) or state= (its --state)")
    path = state_path_for(sink or Sink(), state)
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


def retry_dead_letters(out: Any = None, *, state: str | os.PathLike[str] | None = None,
                       ids: list[str] | None = None, model: str | None = None, dimensions: int | None = None,
                       cache: Any = _DEFAULT, base_url: str | None = None, api_key: str | None = None,
                       rpm: int | None = None, tpm: int | None = None, budget_usd: float | None = None,
                       max_concurrency: int | None = None, batch_size: int | None = None,
                       chunk_size: int = DEFAULT_CHUNK_SIZE, **pipeline_options: Any) -> RetryResult:
    """Embed the letters again (all, or ``ids``) and write the ones that succeed into the run's output.

    Successes leave the queue; failures stay with the new reason and one more attempt.
    The model, dimensions and base URL default to the run's.
    """
    st, sink = open_state(out, state, readonly=False)
    with st:
        st.lock()
        if sink is None:
            raise ConfigurationError(f"the state at {st.path} names no file output; pass out= (the vector store)")
        model = model or st.get("model")
        if not model:
            raise ConfigurationError(f"the state at {st.path} names no model; pass model=")
        if dimensions is None and st.get("requested_dimensions"):
            dimensions = int(st.get("requested_dimensions") or 0)
        pipe = build_pipeline(model, sink=sink, cache=cache, chunk_size=chunk_size, batch_size=batch_size,
                              dimensions=dimensions, rpm=rpm, tpm=tpm, budget_usd=budget_usd,
                              base_url=base_url or st.get("base_url"), api_key=api_key,
                              max_concurrency=max_concurrency, **pipeline_options)
        try:
            st.secrets = _secrets(pipe, api_key)
            st.check_model(pipe.provider.spec, pipe.expected_dims)
            sink.bind(pipe)
            sink.open(st)
            job = _Job(sink, st, pipe, chunk_size)
            job.force = True
            runs = st.runs()
            gen = runs[-1].gen if runs else 0
            records = (Record(d.id, d.text, dict(d.metadata)) for d in st.dead_letters(ids))
            job.embed_all(chunked(records, chunk_size), gen)
            job.finish(gen, completed=False)
            stats = pipe.stats
            return RetryResult(recovered=job.counts.written, failed=job.counts.dead,
                               remaining=st.dead_letter_count(), tokens=stats.tokens, cost_usd=stats.cost_usd,
                               budget_exceeded=job.budget_hit)
        finally:
            pipe.close()


__all__ = ["RetryResult", "dead_letters", "open_state", "purge_dead_letters", "retry_dead_letters"]
