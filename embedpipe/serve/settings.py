"""What ``embedpipe serve`` runs: models, cache, keys and server limits, from a TOML file and the command line.

A config file (``--config serve.toml``)::

    [models.small]                        # a request's "model": "small" selects it
    spec = "openai:text-embedding-3-small"
    base_url = "http://10.0.0.5:8000/v1"  # pipeline options: dimensions, rpm, tpm, budget_usd, ...
    rpm = 3000

    [cache]
    url = "redis://127.0.0.1:6379/0"

    [keys]
    url = "sqlite:///keys.db"
    limits = "redis://127.0.0.1:6379/0"   # where per-key rpm/tpm are counted (default memory://)

    [sinks.docs]                          # POST /v1/ingest {"sink": "docs", ...} writes here
    url = "parquet:////data/vectors/docs"  # any sink URL `embedpipe run --out` takes

    [store]
    url = "sqlite:////data/embedpipe/jobs.sqlite"  # the ingest jobs (default: the user data folder)

    [workers]
    url = "celery+redis://queue:6379/0"   # run ingest chunks on Celery workers (default: in the service)

    [server]
    host = "0.0.0.0"
    port = 8000
    max_wait_ms = 5

Command-line options override the file; ``--model SPEC`` names the model after the part
of the spec after its colon (``text-embedding-3-small``), ``--model NAME=SPEC`` by ``NAME``.
"""

from __future__ import annotations

import dataclasses
import json
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from embedpipe.errors import ConfigurationError

__all__ = ["ModelSettings", "ServeSettings", "load_settings", "parse_model_option", "settings_from_json",
           "settings_to_json"]

#: pipeline options a [models.NAME] table may carry (EmbeddingPipeline's keyword arguments)
PIPELINE_OPTIONS = frozenset({
    "dimensions", "base_url", "rpm", "tpm", "rate_limiter", "budget_usd", "price_per_1m_tokens", "batch_size",
    "max_concurrency", "max_batch_tokens", "max_retries", "max_rate_limit_wait", "timeout", "on_long_input",
    "namespace", "provider_options",
})
_SERVER_FIELDS = ("host", "port", "metrics_port", "max_wait_ms", "max_batch_inputs", "max_batch_tokens",
                  "partial_batches", "max_queue", "max_body_bytes", "max_inputs", "log_format", "max_ingest_bytes",
                  "ingest_chunk_size", "job_lease_s")

#: what a sink's name may be (``[sinks.NAME]``; the ingest routes check requests against it too)
SINK_NAME = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
_SINK_NAME = re.compile(SINK_NAME)


@dataclass(frozen=True)
class ModelSettings:
    """One model the service offers: the name requests use, its spec and pipeline options."""

    name: str
    spec: str
    options: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ServeSettings:
    """Everything the service needs; the defaults are the local ones (127.0.0.1:8000, no keys)."""

    models: tuple[ModelSettings, ...] = ()
    cache: str | None = "memory://"
    keys: str | None = None
    #: where per-key rpm/tpm are counted: ``memory://`` (one process) or ``redis://…`` (every worker and host)
    key_limits: str = "memory://"
    host: str = "127.0.0.1"
    port: int = 8000
    metrics_port: int | None = None
    #: how long the micro-batcher waits for company before sending a batch
    max_wait_ms: float = 2.0
    max_batch_inputs: int = 2048
    max_batch_tokens: int = 300_000
    #: calls in flight while a batch that is not full may still leave (full ones use the model's concurrency)
    partial_batches: int = 1
    #: inputs waiting in the micro-batcher before requests are refused with 429
    max_queue: int = 65_536
    max_body_bytes: int = 2 * 1024 * 1024
    max_inputs: int = 2048
    log_format: str = "text"
    #: the ingest sinks, by the name requests use: ``{"docs": "parquet:///vectors/docs"}`` (``[sinks.NAME] url``)
    sinks: dict[str, str] = field(default_factory=dict)
    #: the registry of ingest jobs (``sqlite:///path``); ``None``: ``serve/jobs.sqlite`` in the user data folder
    store: str | None = None
    #: ``celery+redis://…`` runs ingest chunks on Celery workers; ``None``: the service's own worker loop
    job_workers: str | None = None
    max_ingest_bytes: int = 32 * 1024 * 1024
    #: records per chunk of an ingest job (one embed call and one output part each)
    ingest_chunk_size: int = 500
    #: how long an ingest job stays leased to a service that stopped renewing it (one killed) before another resumes it
    job_lease_s: float = 30.0

    def __post_init__(self) -> None:
        if self.log_format not in ("text", "json"):
            raise ConfigurationError(f"log_format={self.log_format!r}: use 'text' or 'json'")
        for name in ("max_batch_inputs", "max_batch_tokens", "partial_batches", "max_queue", "max_body_bytes",
                     "max_inputs", "max_ingest_bytes", "ingest_chunk_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigurationError(f"[server] {name}={value!r} must be a positive integer")
        if not isinstance(self.max_wait_ms, (int, float)) or not 0 <= self.max_wait_ms <= 1000:
            raise ConfigurationError(f"[server] max_wait_ms={self.max_wait_ms!r} must be between 0 and 1000")
        if not isinstance(self.job_lease_s, (int, float)) or not self.job_lease_s > 0:
            raise ConfigurationError(f"[server] job_lease_s={self.job_lease_s!r} must be a positive number of seconds")
        for sink, url in self.sinks.items():
            if not _SINK_NAME.match(sink):
                raise ConfigurationError(f"[sinks.{sink}]: a sink name is letters, digits, '.', '_' and '-'")
            if not isinstance(url, str) or not url.strip():
                raise ConfigurationError(f"[sinks.{sink}] needs url = \"…\" (a sink URL or path)")
        if self.job_workers is not None and not self.job_workers.startswith("celery+"):
            raise ConfigurationError(f"[workers] url={self.job_workers!r}: give a Celery broker URL prefixed "
                                     "celery+, e.g. celery+redis://host:6379/0")
        names = [m.name for m in self.models]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ConfigurationError(f"model name(s) {dupes} are configured twice")

    def replace(self, **changes: Any) -> ServeSettings:
        return dataclasses.replace(self, **changes)


def parse_model_option(value: str, base_url: str | None = None) -> ModelSettings:
    """``SPEC`` or ``NAME=SPEC`` (``--model``) as a :class:`ModelSettings`."""
    name, eq, spec = value.partition("=")
    if not eq:
        spec, name = value, value.partition(":")[2]
    name, spec = name.strip(), spec.strip()
    if ":" not in spec or not spec.partition(":")[2]:
        raise ConfigurationError(f"--model {value!r}: give a spec provider:name (openai:text-embedding-3-small) "
                                 "or NAME=SPEC")
    if not name:
        raise ConfigurationError(f"--model {value!r}: the model name is empty")
    return ModelSettings(name, spec, {"base_url": base_url} if base_url else {})


def _read_toml(path: Path) -> dict[str, Any]:
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover - Python 3.10
        import tomli as tomllib
    try:
        with path.open("rb") as f:
            data: dict[str, Any] = tomllib.load(f)
            return data
    except OSError as exc:
        raise ConfigurationError(f"cannot read the config file {path}: {exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigurationError(f"{path} is not valid TOML: {exc}") from None


def _models_from(path: Path, tables: Any) -> list[ModelSettings]:
    if not isinstance(tables, dict):
        raise ConfigurationError(f"{path}: [models] must hold tables [models.NAME]")
    out = []
    for name, table in tables.items():
        if not isinstance(table, dict) or not isinstance(table.get("spec"), str):
            raise ConfigurationError(f"{path}: [models.{name}] needs spec = \"provider:model\"")
        options = {k: v for k, v in table.items() if k != "spec"}
        unknown = sorted(set(options) - PIPELINE_OPTIONS)
        if unknown:
            raise ConfigurationError(f"{path}: [models.{name}] has unknown option(s) {unknown}; known: "
                                     f"{sorted(PIPELINE_OPTIONS)}")
        out.append(ModelSettings(name, table["spec"], options))
    return out


def _sinks_from(path: Path, tables: Any) -> dict[str, str]:
    if not isinstance(tables, dict):
        raise ConfigurationError(f"{path}: [sinks] must hold tables [sinks.NAME] with url = \"…\"")
    out = {}
    for name, table in tables.items():
        if not isinstance(table, dict) or set(table) != {"url"} or not isinstance(table["url"], str):
            raise ConfigurationError(f"{path}: [sinks.{name}] takes url = \"…\" (a sink URL or path) only")
        out[name] = table["url"]
    return out


def load_settings(config: str | Path | None = None, **overrides: Any) -> ServeSettings:
    """The settings of a TOML file (or the defaults), with the non-``None`` ``overrides`` applied.

    ``overrides`` are the command line's: ``models`` (a list of ``--model`` values), ``base_url``,
    ``cache``, ``keys``, ``key_limits``, ``store``, ``job_workers`` and the ``[server]`` fields.
    """
    values: dict[str, Any] = {}
    models: list[ModelSettings] = []
    if config is not None:
        path = Path(config)
        data = _read_toml(path)
        known = ("models", "cache", "keys", "server", "sinks", "store", "workers")
        unknown = sorted(set(data) - set(known))
        if unknown:
            raise ConfigurationError(f"{path}: unknown table(s) {unknown}; known: {', '.join(known)}")
        values["sinks"] = _sinks_from(path, data.get("sinks", {}))
        for table, name in (("store", "store"), ("workers", "job_workers")):
            section = data.get(table, {})
            if not isinstance(section, dict) or set(section) - {"url"}:
                raise ConfigurationError(f"{path}: [{table}] takes url = \"…\" only")
            if "url" in section:
                values[name] = section["url"]
        models = _models_from(path, data.get("models", {}))
        cache = data.get("cache", {})
        if "url" in cache:
            values["cache"] = cache["url"]
        keys = data.get("keys", {})
        if "url" in keys:
            values["keys"] = keys["url"]
        if "limits" in keys:
            values["key_limits"] = keys["limits"]
        server = data.get("server", {})
        bad = sorted(set(server) - set(_SERVER_FIELDS))
        if bad:
            raise ConfigurationError(f"{path}: [server] has unknown option(s) {bad}; known: {list(_SERVER_FIELDS)}")
        values.update(server)
    cli_models = overrides.pop("models", None) or []
    base_url = overrides.pop("base_url", None)
    if cli_models:
        given = [parse_model_option(m, base_url) for m in cli_models]
        names = {m.name for m in given}
        models = [m for m in models if m.name not in names] + given
    elif base_url:
        models = [dataclasses.replace(m, options={**m.options, "base_url": base_url}) for m in models]
    for name, value in overrides.items():
        if value is not None:
            values[name] = value
    if isinstance(values.get("cache"), str) and values["cache"].strip().lower() in ("none", "off", ""):
        values["cache"] = None
    try:
        return ServeSettings(models=tuple(models), **values)
    except TypeError as exc:
        raise ConfigurationError(f"invalid serve settings: {exc}") from None


def settings_to_json(settings: ServeSettings) -> str:
    """``settings`` as JSON, for worker processes (``uvicorn --workers N``) to rebuild them."""
    return json.dumps(dataclasses.asdict(settings))


def settings_from_json(text: str) -> ServeSettings:
    data = json.loads(text)
    data["models"] = tuple(ModelSettings(**m) for m in data.get("models", ()))
    return ServeSettings(**data)
