"""What a job is: a source, a sink, a pipeline configuration and how to cut the work, frozen and serialisable.

>>> from embedpipe import PipelineConfig
>>> from embedpipe.jobs import JobSpec
>>> spec = JobSpec(source="docs.jsonl", sink="vectors/", pipeline=PipelineConfig(model="fake:8"))
>>> JobSpec.from_json(spec.to_json()) == spec
True
>>> len(spec.job_id)
16

A :class:`JobSpec` is what every driver of a job hands around: the CLI, a Celery task, an
HTTP ingest worker. Its JSON holds no API key and no URL password (the pipeline config
drops them, and so do the source, sink and store URLs here); each process reads its own
from the environment when it builds the pipeline.

Its ``job_id`` is derived from what defines the output (the source, the sink, the model,
its dimensions and the cache namespace): the same job submitted twice is the same job,
and resumes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from embedpipe.config import PipelineConfig, strip_password
from embedpipe.errors import ConfigurationError
from embedpipe.jobs.chunked import check_chunking, chunk_options

#: records read, compared and written together; a chunk is one embed call and one output part
DEFAULT_CHUNK_SIZE = 2000
#: bump when a field changes meaning; from_json refuses what it cannot read
SPEC_VERSION = 1
#: the source options a spec carries (how records are read from the source)
SOURCE_OPTIONS = ("id_field", "text_field", "format", "chunking", "splitter", "split_tokens")
#: pipeline options whose default differs in jobs: a long 429 storm should pause a night's run, not end it
JOB_PIPELINE_DEFAULTS: Mapping[str, Any] = {"max_rate_limit_wait": 900.0}
#: the options of a run that are not the pipeline's, with their defaults (stated here once)
JOB_DEFAULTS: Mapping[str, Any] = {
    "chunk_size": DEFAULT_CHUNK_SIZE,
    "budget_usd": None,
    "delete_missing": True,
    "state": None,
    "id_field": "id",
    "text_field": "text",
    "format": None,
    "chunking": None,  # each record a document split into chunk rows: "naive" or "late" (embedpipe.jobs.chunked)
    "splitter": None,
    "split_tokens": None,
}


def _location(value: Any) -> Any:
    """A path as an absolute string (so the id does not depend on the working directory); URLs and objects as is."""
    if isinstance(value, os.PathLike) or (isinstance(value, str) and "://" not in value):
        return str(Path(value).expanduser().resolve())
    return value


@dataclass(frozen=True)
class JobSpec:
    """One embedding job: ``source`` → ``pipeline`` → ``sink``, cut into chunks of ``chunk_size`` records.

    ``source`` and ``sink`` are paths or URLs (:data:`embedpipe.registry.sources`, ``.sinks``),
    or objects (a :class:`~embedpipe.jobs.Source`, a vector store): such a spec runs in this
    process but :meth:`to_json` refuses it. ``state`` is the job store (a path or a URL of
    :data:`embedpipe.registry.job_stores`); ``None`` is the sink's own (``OUT/_state.sqlite``).
    ``budget_usd`` bounds one run's spend. ``delete_missing`` (the default) mirrors the
    source: records it no longer holds leave the output. ``options`` holds how the source is
    read (``id_field``, ``text_field``, ``format``) and, for a job whose records are
    documents cut into chunk rows, ``chunking``, ``splitter``, ``split_tokens``
    (:mod:`embedpipe.jobs.chunked`).
    """

    source: Any
    sink: Any
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)
    chunk_size: int = DEFAULT_CHUNK_SIZE
    budget_usd: float | None = None
    delete_missing: bool = True
    state: Any = None
    options: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.pipeline, PipelineConfig):
            raise ConfigurationError(f"pipeline must be a PipelineConfig, not {type(self.pipeline).__name__}")
        if not isinstance(self.chunk_size, int) or isinstance(self.chunk_size, bool) or self.chunk_size < 1:
            raise ConfigurationError(f"chunk_size={self.chunk_size!r} must be a positive integer")
        if self.budget_usd is not None and not self.budget_usd >= 0:
            raise ConfigurationError(f"budget_usd={self.budget_usd!r} must be >= 0")
        unknown = sorted(set(self.options) - set(SOURCE_OPTIONS))
        if unknown:
            raise ConfigurationError(f"unknown JobSpec option(s) {unknown}; known: {list(SOURCE_OPTIONS)}")
        object.__setattr__(self, "options", {k: v for k, v in dict(self.options).items() if v is not None})
        check_chunking(self.options.get("chunking"), self.options.get("splitter"), self.options.get("split_tokens"))
        for name in ("source", "sink", "state"):
            object.__setattr__(self, name, _location(getattr(self, name)))

    @classmethod
    def from_options(cls, source: Any, out: Any, **options: Any) -> JobSpec:
        """A spec from ``jobs.run``'s keywords (or the CLI's options): each goes to the pipeline's
        config or to the job, by name; an unknown one is a :class:`ConfigurationError` naming it."""
        pipe_fields = {f.name for f in fields(PipelineConfig)}
        job: dict[str, Any] = {}
        pipe: dict[str, Any] = {}
        for name, value in options.items():
            if name in JOB_DEFAULTS:
                job[name] = value
            elif name in pipe_fields:
                pipe[name] = value
            else:
                known = sorted(pipe_fields | set(JOB_DEFAULTS))
                raise ConfigurationError(f"unknown job option {name!r}; known: {', '.join(known)}")
        source_options = {k: job.pop(k) for k in SOURCE_OPTIONS if k in job}
        pipe = {**JOB_PIPELINE_DEFAULTS, **pipe}
        if "model" not in pipe:
            raise ConfigurationError("a job needs a model: pass model='openai:text-embedding-3-small' (or --model)")
        job = {k: v for k, v in job.items() if v is not None or k == "budget_usd"}
        return cls(source=source, sink=out, pipeline=PipelineConfig(**pipe), options=source_options, **job)

    def replace(self, **changes: Any) -> JobSpec:
        """A copy with ``changes`` applied (validated like a new spec)."""
        return dataclasses.replace(self, **changes)

    def option(self, name: str) -> Any:
        """A source option (``id_field``, ``text_field``, ``format``), or its default."""
        return self.options.get(name, JOB_DEFAULTS[name])

    # ------------------------------------------------------------------ identity
    @property
    def job_id(self) -> str:
        """16 hex digits derived from what defines the output: source, sink, model, dimensions, namespace.

        A job given more workers, another budget or chunk size is still the same job.
        """
        def name(value: Any) -> str:
            return strip_password(value) if isinstance(value, str) else f"{type(value).__name__}@{id(value):x}"

        model = self.pipeline.model
        ident = {"source": name(self.source), "sink": name(self.sink), "model": name(model),
                 "dimensions": self.pipeline.dimensions, "namespace": self.pipeline.namespace,
                 "id_field": self.option("id_field"), "text_field": self.option("text_field"),
                 **chunk_options(self.options)}  # absent without chunking: older jobs keep their ids
        digest = hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()
        return digest[:16]

    # ------------------------------------------------------------------ JSON
    def unserialisable(self) -> list[str]:
        """The fields that hold objects JSON cannot carry (the pipeline's are named ``pipeline.<field>``)."""
        bad = [n for n in ("source", "sink", "state") if not (getattr(self, n) is None or
                                                              isinstance(getattr(self, n), str))]
        return bad + [f"pipeline.{n}" for n in self.pipeline.unserialisable()]

    def to_dict(self) -> dict[str, Any]:
        """The JSON-ready fields, with no API key and no URL password."""
        bad = self.unserialisable()
        if bad:
            raise ConfigurationError(f"this JobSpec cannot be serialised: {', '.join(bad)} hold(s) Python objects; "
                                     "pass paths and URLs (and model specs) instead")
        return {"version": SPEC_VERSION, "source": strip_password(self.source), "sink": strip_password(self.sink),
                "state": None if self.state is None else strip_password(self.state),
                "pipeline": self.pipeline.to_dict(), "chunk_size": self.chunk_size, "budget_usd": self.budget_usd,
                "delete_missing": self.delete_missing, "options": dict(self.options)}

    def to_json(self) -> str:
        """JSON with no secret in it; see :meth:`from_json`."""
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> JobSpec:
        data = dict(data)
        version = data.pop("version", SPEC_VERSION)
        if version != SPEC_VERSION:
            raise ConfigurationError(f"JobSpec version {version!r} is not {SPEC_VERSION}; upgrade embedpipe")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigurationError(f"unknown JobSpec field(s) {unknown}; known: {sorted(known)}")
        pipeline = data.pop("pipeline", {})
        return cls(pipeline=PipelineConfig.from_dict(pipeline), **data)

    @classmethod
    def from_json(cls, text: str) -> JobSpec:
        """The spec :meth:`to_json` wrote."""
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigurationError(f"JobSpec JSON is invalid: {exc}") from None
        if not isinstance(data, dict):
            raise ConfigurationError("JobSpec JSON must be an object")
        return cls.from_dict(data)


__all__ = ["DEFAULT_CHUNK_SIZE", "JOB_DEFAULTS", "JOB_PIPELINE_DEFAULTS", "SOURCE_OPTIONS", "JobSpec"]
