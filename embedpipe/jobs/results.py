"""What a job reports: its estimate before, its progress during, and its result after a run."""

from __future__ import annotations

from dataclasses import dataclass


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
    #: the same tokens through the Batch API (``--batch-api``), when the provider has one
    batch_price_per_1m_tokens: float | None = None
    batch_cost_usd: float | None = None
    batch_window: str | None = None  #: the completion window a batch is given (``"24h"``)

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
    #: what the run is waiting for, when it is (a 429 storm, the rate limiter), else ``None``
    waiting: str | None = None

    @property
    def hit_share(self) -> float | None:
        """Share of settled vectors that cost nothing (unchanged, or from the cache)."""
        free = self.unchanged + self.cached
        total = free + self.embedded
        return free / total if total else None


@dataclass(frozen=True)
class BatchInfo:
    """One Batch API batch of a run, as the job's state last saw it."""

    plan_id: str
    state: str            #: embedpipe's step: planned, uploaded, submitting, submitted, harvested
    status: str | None    #: the batch's status at the API (validating … completed, expired, cancelled, failed)
    batch_id: str | None
    file_id: str | None
    requests: int         #: lines in its input file
    inputs: int           #: texts in them
    completed: int        #: lines done
    failed: int           #: lines in the error file
    cached: int = 0       #: vectors validated and written to the cache from its output file


@dataclass(frozen=True)
class JobResult:
    """What a run did. ``exit_code``: 0 all embedded, 3 finished with new dead letters, 4 stopped at the budget."""

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
    job_id: str | None = None  #: the :attr:`JobSpec.job_id <embedpipe.jobs.JobSpec.job_id>`
    batches: tuple[BatchInfo, ...] = ()  #: with ``batch_api``: the batches this run submitted or re-attached to

    @property
    def completed(self) -> bool:
        """Whether the whole source was read (not stopped at the budget)."""
        return not self.budget_exceeded

    @property
    def exit_code(self) -> int:
        """The CLI's exit code: 4 stopped at the budget, 3 this run dead-lettered records, else 0.

        Letters left from earlier runs do not count (the summary reports them), so a cron job
        alerts once per new failure, not forever.
        """
        if self.budget_exceeded:
            return 4
        return 3 if self.dead_letters else 0


__all__ = ["BatchInfo", "JobEstimate", "JobProgress", "JobResult"]
