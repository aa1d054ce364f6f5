"""Durable embedding jobs: stream a corpus into a vector output, resumable and incremental.

>>> from embedpipe import jobs
>>> result = jobs.run("docs.jsonl", model="openai:text-embedding-3-small", out="vectors/")  # doctest: +SKIP
>>> result.exit_code                                                                        # doctest: +SKIP
0

Run the same call again after a crash and it carries on; run it after the source changed
and it embeds only what changed, removes what left, and updates metadata in place.
:func:`estimate` says what a run will cost without calling the API; :func:`dead_letters`,
:func:`retry_dead_letters` and :func:`purge_dead_letters` manage records that failed for
good. :func:`read_output` reads a Parquet output's published table, whole, even while a run
publishes a new one. The ``embedpipe`` command line is a thin layer over these functions.

:func:`run` drives the job unit, which other drivers (Celery workers, the ingest service)
call too: a :class:`JobSpec` says what the job is, a :class:`JobStore` holds its state,
and :func:`plan_chunks`, :func:`process_chunk` and :func:`finish_job` are its steps.
"""

from __future__ import annotations

from embedpipe.jobs.batch_api import BatchLimits, BatchOptions, BatchProgress
from embedpipe.jobs.cache_transfer import export_cache, import_cache
from embedpipe.jobs.dlq import RetryResult, dead_letters, purge_dead_letters, retry_dead_letters
from embedpipe.jobs.errors import (
    BudgetRefusedError,
    DamagedOutputError,
    JobAbortedError,
    JobConflictError,
    JobLockedError,
    SinkVerificationError,
    SourceError,
)
from embedpipe.jobs.records import Entry, Record
from embedpipe.jobs.repair import RepairResult, repair
from embedpipe.jobs.results import BatchInfo, JobEstimate, JobProgress, JobResult
from embedpipe.jobs.runner import estimate, run
from embedpipe.jobs.sinks import JSONLSink, ParquetSink, Receipt, Sink, read_output, sink_from
from embedpipe.jobs.sources import (
    CSVSource,
    DirectorySource,
    IterableSource,
    JSONLSource,
    ParquetSource,
    Source,
    source_from,
)
from embedpipe.jobs.spec import DEFAULT_CHUNK_SIZE, JobSpec
from embedpipe.jobs.state import JobState, SQLiteJobStore
from embedpipe.jobs.store import JobStore
from embedpipe.jobs.unit import Chunk, ChunkOutcome, finish_job, plan_chunks, process_chunk

__all__ = [
    "BatchInfo",
    "BatchLimits",
    "BatchOptions",
    "BatchProgress",
    "DEFAULT_CHUNK_SIZE",
    "BudgetRefusedError",
    "DamagedOutputError",
    "CSVSource",
    "Chunk",
    "ChunkOutcome",
    "DirectorySource",
    "Entry",
    "IterableSource",
    "JSONLSink",
    "JSONLSource",
    "JobAbortedError",
    "JobConflictError",
    "JobEstimate",
    "JobLockedError",
    "JobProgress",
    "JobSpec",
    "JobState",
    "JobStore",
    "JobResult",
    "ParquetSink",
    "ParquetSource",
    "Receipt",
    "Record",
    "RepairResult",
    "SQLiteJobStore",
    "RetryResult",
    "Sink",
    "SinkVerificationError",
    "Source",
    "SourceError",
    "dead_letters",
    "estimate",
    "export_cache",
    "finish_job",
    "import_cache",
    "plan_chunks",
    "process_chunk",
    "purge_dead_letters",
    "read_output",
    "repair",
    "retry_dead_letters",
    "run",
    "sink_from",
    "source_from",
]
