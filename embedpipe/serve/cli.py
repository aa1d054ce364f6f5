"""``embedpipe serve``: run the service, and ``embedpipe serve keys add|list|revoke`` to manage its keys."""

from __future__ import annotations

import functools
import os
import sys
import tempfile
from collections.abc import Callable
from typing import Any, TypeVar

import click

from embedpipe.errors import ConfigurationError, EmbedPipeError

F = TypeVar("F", bound=Callable[..., Any])

__all__ = ["serve"]


def _errors(fn: F) -> F:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except ConfigurationError as exc:
            click.echo(f"embedpipe serve: {exc}", err=True)
            sys.exit(2)
        except (EmbedPipeError, OSError) as exc:
            click.echo(f"embedpipe serve: {exc}", err=True)
            sys.exit(1)

    return wrapper  # type: ignore[return-value]


@click.group("serve", invoke_without_command=True)
@click.option("--host", help="Address to listen on (default 127.0.0.1; another needs --keys).")
@click.option("--port", type=click.IntRange(0, 65535), help="Port (default 8000).")
@click.option("--model", "models", multiple=True, metavar="SPEC|NAME=SPEC",
              help="A model to serve, e.g. openai:text-embedding-3-small (requests name it text-embedding-3-small) "
                   "or small=openai:text-embedding-3-small. Repeatable.")
@click.option("--base-url", help="The upstream server for the --model specs (an OpenAI-compatible URL).")
@click.option("--cache", help="Cache URL shared by every model: memory://, sqlite:///cache.db, redis://... or none "
                              "(default memory://).")
@click.option("--keys", help="Key store URL: sqlite:///keys.db, redis://..., postgresql://... Without it the service "
                             "is open and listens on 127.0.0.1 only.")
@click.option("--key-limits", help="Where per-key rpm/tpm are counted: memory:// (default) or redis://... (shared by "
                                   "workers and hosts; fails closed).")
@click.option("--config", "config", type=click.Path(exists=True, dir_okay=False), help="A TOML file with "
              "[models.NAME], [cache], [keys], [sinks.NAME], [store], [workers] and [server] tables; options given "
              "here override it.")
@click.option("--metrics-port", type=click.IntRange(1, 65535), help="Serve /metrics on this port, without keys.")
@click.option("--max-wait-ms", type=click.FloatRange(0, 1000), help="How long a batch waits for company (default 2).")
@click.option("--store", help="Where ingest jobs are kept: sqlite:///jobs.sqlite (default: serve/jobs.sqlite in the "
                              "user data folder); the stored bodies go next to it.")
@click.option("--workers", "workers_option", default="1", show_default=True, metavar="N|celery+BROKER",
              help="uvicorn worker processes (per-key limits then belong in Redis: --key-limits redis://...), or "
                   "celery+redis://host:6379/0 to run ingest jobs on Celery workers (embedpipe worker).")
@click.option("--log-format", type=click.Choice(["text", "json"]), help="json: one JSON object per line, with the "
              "request id.")
@click.pass_context
@_errors
def serve(ctx: click.Context, /, workers_option: str, config: str | None, **kw: Any) -> None:
    """Serve OpenAI's /v1/embeddings with one cache, coalescing, keys, limits, budgets and metrics, and
    POST /v1/ingest: records into a configured sink, as durable background jobs."""
    if ctx.invoked_subcommand is not None:
        return
    workers = 1
    if workers_option.startswith("celery+"):
        kw["job_workers"] = workers_option
    elif workers_option.isdigit() and int(workers_option) >= 1:
        workers = int(workers_option)
    else:
        raise ConfigurationError(f"--workers {workers_option!r}: give a number of processes, or a Celery broker "
                                 "URL prefixed celery+ (celery+redis://host:6379/0)")
    import uvicorn

    from embedpipe.metrics import PrometheusMetrics
    from embedpipe.serve.app import SETTINGS_ENV, create_app
    from embedpipe.serve.logs import configure_logging
    from embedpipe.serve.settings import load_settings, settings_to_json

    settings = load_settings(config, **kw)
    configure_logging(settings.log_format)
    click.echo(f"embedpipe serve: {', '.join(f'{m.name} ({m.spec})' for m in settings.models) or 'no model'} on "
               f"http://{settings.host}:{settings.port}/v1" + ("" if settings.keys else
                                                              " — OPEN: no --keys, so 127.0.0.1 only"), err=True)
    if workers == 1:
        metrics = PrometheusMetrics()
        app = create_app(settings, metrics=metrics)
        if settings.metrics_port is not None:
            metrics.start_http_server(settings.metrics_port, settings.host)
        uvicorn.run(app, host=settings.host, port=settings.port, log_config=None, access_log=False)
        return
    # Several workers: each builds its app from the settings in the environment; metrics go through
    # prometheus-client's multiprocess files, which /metrics (and --metrics-port) aggregate.
    import asyncio

    from embedpipe.serve.app import Service

    asyncio.run(Service(settings).aclose())  # settings are checked here, before any worker starts
    os.environ[SETTINGS_ENV] = settings_to_json(settings)
    os.environ.setdefault("PROMETHEUS_MULTIPROC_DIR", tempfile.mkdtemp(prefix="embedpipe-metrics-"))
    if settings.metrics_port is not None:
        import prometheus_client
        from prometheus_client import multiprocess

        registry = prometheus_client.CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        prometheus_client.start_http_server(settings.metrics_port, addr=settings.host, registry=registry)
    uvicorn.run("embedpipe.serve.app:app_from_env", factory=True, host=settings.host, port=settings.port,
                workers=workers, log_config=None, access_log=False)


_KEYS_OPTION = click.option("--keys", "keys_url", envvar="EMBEDPIPE_SERVE_KEYS", required=True,
                            help="Key store URL (or $EMBEDPIPE_SERVE_KEYS).")


@serve.group("keys")
def keys() -> None:
    """Add, list and revoke the service's API keys."""


@keys.command("add")
@click.argument("name")
@click.option("--key", help="The key to store (default: a new random one, printed once).")
@click.option("--rpm", type=click.IntRange(min=1), help="Requests per minute this key may make.")
@click.option("--tpm", type=click.IntRange(min=1), help="Tokens per minute this key may send.")
@click.option("--budget-usd", type=click.FloatRange(min=0), help="USD this key may spend upstream, in total.")
@_KEYS_OPTION
@_errors
def keys_add(name: str, key: str | None, rpm: int | None, tpm: int | None, budget_usd: float | None,
             keys_url: str) -> None:
    """Store a key named NAME; prints the key (only its hash is kept)."""
    from embedpipe.serve.keystore import key_store_from

    store = key_store_from(keys_url)
    try:
        created = store.add(name, key=key, rpm=rpm, tpm=tpm, budget_usd=budget_usd)
    finally:
        store.close()
    if key is None:
        click.echo(created)
    else:
        click.echo(f"added key {name!r}", err=True)


@keys.command("list")
@_KEYS_OPTION
@_errors
def keys_list(keys_url: str) -> None:
    """The keys, with their hash prefix, limits and spend (never the keys)."""
    from embedpipe.serve.keystore import key_store_from

    store = key_store_from(keys_url)
    try:
        records = store.list()
    finally:
        store.close()
    click.echo(f"{'name':<24} {'hash':<8} {'rpm':>8} {'tpm':>10} {'budget_usd':>12} {'spent_usd':>12} status")
    for r in records:
        budget = "-" if r.budget_usd is None else f"{r.budget_usd:.4f}"
        click.echo(f"{r.name:<24} {r.label:<8} {r.rpm or '-':>8} {r.tpm or '-':>10} {budget:>12} "
                   f"{r.spent_usd:>12.6f} {'revoked' if r.revoked else 'active'}")


@keys.command("revoke")
@click.argument("name")
@_KEYS_OPTION
@_errors
def keys_revoke(name: str, keys_url: str) -> None:
    """Refuse the key named NAME from now on."""
    from embedpipe.serve.keystore import key_store_from

    store = key_store_from(keys_url)
    try:
        store.revoke(name)
    finally:
        store.close()
    click.echo(f"revoked key {name!r}", err=True)
