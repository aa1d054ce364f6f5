"""The ``embedpipe`` command line: ``run``, ``estimate``, ``dlq``, ``cache`` and ``eval``.

A thin layer over :mod:`embedpipe.jobs`: options become keyword arguments, results
become text and exit codes. Exit codes: 0 all embedded; 3 finished, with new dead letters;
4 stopped at (or refused by) the budget; 1 error; 2 usage (bad options, or an output
built with another model). The API key comes from the environment (``OPENAI_API_KEY``).
"""

from __future__ import annotations

import datetime as dt
import functools
import json
import logging
import os
import sys
from collections.abc import Callable
from typing import Any, TypeVar
from urllib.parse import parse_qsl, urlencode

import click

from embedpipe import __version__
from embedpipe._urls import redact_url
from embedpipe.errors import BudgetExceededError, ConfigurationError, EmbedPipeError
from embedpipe.jobs.spec import JOB_DEFAULTS
from embedpipe.serve.cli import serve as serve_command

F = TypeVar("F", bound=Callable[..., Any])

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_DEAD_LETTERS, EXIT_BUDGET = 0, 1, 2, 3, 4


def _fail(message: str, code: int) -> None:
    click.echo(f"embedpipe: {message}", err=True)
    sys.exit(code)


def _handle_errors(fn: F) -> F:
    """Map embedpipe's errors to messages and exit codes, once for every command."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from embedpipe.jobs import BudgetRefusedError

        try:
            return fn(*args, **kwargs)
        except BudgetRefusedError as exc:
            # The estimate is already on screen: jobs.run hands it to on_estimate before refusing.
            _fail(f"refused: {exc}", EXIT_BUDGET)
        except BudgetExceededError as exc:
            _fail(str(exc), EXIT_BUDGET)
        except ConfigurationError as exc:
            _fail(str(exc), EXIT_USAGE)
        except (EmbedPipeError, OSError) as exc:
            _fail(str(exc) or type(exc).__name__, EXIT_ERROR)
        except KeyboardInterrupt:
            _fail("interrupted; the work done so far is saved: run the same command again to carry on", 130)

    return wrapper  # type: ignore[return-value]


# ------------------------------------------------------------------ shared options
def _job_options(fn: F) -> F:
    """The options ``run`` and ``estimate`` share."""
    options = [
        click.argument("source", type=click.Path()),
        click.option("--model", "-m", required=True, help="Model spec: openai:text-embedding-3-small, local:..., "
                     "fake:64."),
        click.option("--state", type=click.Path(dir_okay=False), help="State file (default: OUT/_state.sqlite)."),
        click.option("--cache", help="Cache URL: sqlite:///path.db, redis://host:6379/0, memory://, none "
                     "(default: $EMBEDPIPE_CACHE or a SQLite file in the user cache folder)."),
        click.option("--dimensions", type=click.IntRange(min=1), help="Output dimensions (Matryoshka models)."),
        click.option("--rpm", type=click.IntRange(min=1), help="Requests per minute the account allows."),
        click.option("--tpm", type=click.IntRange(min=1), help="Tokens per minute the account allows."),
        click.option("--budget-usd", type=click.FloatRange(min=0), help="Refuse a run estimated above this, and "
                     "stop cleanly before spending more."),
        click.option("--base-url", help="An OpenAI-compatible server's URL."),
        click.option("--id-field", help=f"The field holding each record's id (default: {JOB_DEFAULTS['id_field']})."),
        click.option("--text-field", help=f"The field holding the text (default: {JOB_DEFAULTS['text_field']})."),
        click.option("--format", "format_", type=click.Choice(["jsonl", "csv", "parquet", "dir", "images", "audio"]),
                     help="Source format (default: from the suffix; a folder of .txt/.md files)."),
        click.option("--max-concurrency", type=click.IntRange(min=1), help="Requests in flight at once."),
        click.option("--batch-size", type=click.IntRange(min=1), help="Inputs per request."),
        click.option("--chunk-size", type=click.IntRange(min=1),
                     help=f"Records read, embedded and written together (default: {JOB_DEFAULTS['chunk_size']})."),
        click.option("--chunking", type=click.Choice(["naive", "late"]), help="Split each record (a document) into "
                     "chunks, one output row each (id DOCID#hash); late pools them from the whole document (local "
                     "models)."),
        click.option("--splitter", type=click.Choice(["stable"]), help="How --chunking splits (default: stable, "
                     "edit-stable StableSplitter)."),
        click.option("--split-tokens", type=click.IntRange(min=2), help="Target chunk size in tokens for --chunking "
                     "(default: 128)."),
        click.option("--price-per-1m-tokens", type=click.FloatRange(min=0),
                     help="USD per million tokens, for a model whose price embedpipe does not know."),
        click.option("--rebuild", is_flag=True, help="Start over: re-embed everything into OUT (another model "
                     "or dimensions)."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def _job_kwargs(kw: dict[str, Any]) -> dict[str, Any]:
    """Options given on the command line, named as ``jobs.run`` names them; what was not given is left to the
    defaults of :class:`~embedpipe.PipelineConfig` and :class:`~embedpipe.jobs.JobSpec`."""
    args = dict(kw)
    args["format"] = args.pop("format_")
    return {k: v for k, v in args.items() if v is not None}


# ------------------------------------------------------------------ printing
def _usd(value: float | None) -> str:
    return "unknown" if value is None else f"${value:,.6f}" if value < 1 else f"${value:,.2f}"


def _duration(seconds: float) -> str:
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m {seconds % 60:02d}s"
    return f"{seconds // 3600}h {seconds % 3600 // 60:02d}m"


def _print_estimate(est: Any) -> None:
    rows = [
        ("records", f"{est.records:,}", "in the source"),
        ("unchanged", f"{est.unchanged:,}", "already in the output"),
        ("metadata", f"{est.metadata_only:,}", "metadata changed: updated without embedding"),
        ("to embed", f"{est.to_embed:,}", "new or changed records"),
        ("  cached", f"{est.cached:,}", "texts already in the cache: no API call"),
        ("  to send", f"{est.to_send:,}", f"texts: {est.tokens:,} tokens in {est.requests:,} requests"),
        ("empty", f"{est.invalid:,}", "texts that will go to the dead-letter queue"),
        ("dead", f"{est.dead:,}", "dead letters left alone (embedpipe dlq retry)"),
        ("deletions", f"{est.deletions:,}", "records gone from the source, to remove from the output"),
        ("no API", f"{est.cached_share:.1%}", "of the records need no API call (done or cached)"),
    ]
    price = (f"at ${est.price_per_1m_tokens:g} per 1M tokens" if est.price_per_1m_tokens is not None
             else "the price of this model is unknown: pass --price-per-1m-tokens")
    rows.append(("cost", _usd(est.cost_usd), price))
    if getattr(est, "batch_price_per_1m_tokens", None) is not None:
        rows.append(("batch cost", _usd(est.batch_cost_usd), f"with --batch-api, at ${est.batch_price_per_1m_tokens:g} "
                     f"per 1M tokens, done within {est.batch_window}"))
    if est.eta_seconds is not None:
        limits = " and ".join(f"{name} {value:,}" for name, value in (("rpm", est.rpm), ("tpm", est.tpm)) if value)
        rows.append(("ETA", _duration(est.eta_seconds), f"at least, at {limits}"))
    else:
        rows.append(("ETA", "unknown", "give --rpm/--tpm to estimate it"))
    click.echo(f"estimate for {est.model}:")
    for name, value, note in rows:
        click.echo(f"  {name:<10} {value:>14}  {note}")


def _print_result(result: Any, out: str) -> None:
    verb = "stopped at the budget" if result.budget_exceeded else "finished"
    click.echo(f"{verb} in {_duration(result.elapsed_s)}: {result.records:,} records; {result.written:,} written "
               f"({result.embedded:,} texts embedded, {result.cached:,} from the cache), {result.unchanged:,} "
               f"unchanged, {result.metadata_updated:,} metadata updates, {result.deleted:,} deleted")
    click.echo(f"tokens {result.tokens:,}, cost {_usd(result.cost_usd)}, requests {result.requests:,}")
    if result.dead_letters_total:
        click.echo(f"{result.dead_letters_total:,} dead letter(s) ({result.dead_letters:,} new): "
                   f"embedpipe dlq list --out {out}")
    if result.budget_exceeded:
        click.echo("the work done is saved: run the same command with a larger --budget-usd to carry on")
    for b in getattr(result, "batches", ()):
        click.echo(f"batch {b.batch_id or b.plan_id}: {b.status or b.state}, {b.completed:,}/{b.requests:,} "
                   f"requests done, {b.failed:,} failed, {b.cached:,} vectors cached")


def _batch_printer(p: Any) -> None:
    """The Batch API's progress: one line per poll on stderr, each batch's status (counted when there are many)."""
    if len(p.batches) <= 4:
        states = ", ".join(f"{b.batch_id or b.plan_id} {b.status or b.state} {b.completed:,}/{b.requests:,}"
                           for b in p.batches)
    else:
        states = ", ".join(f"{n} {s}" for s, n in sorted(p.by_status().items()))
    click.echo(f"batches: {states}; {p.completed:,}/{p.requests:,} requests done ({_duration(p.elapsed)})", err=True)


class _Progress:
    """A tqdm bar fed by the job's progress callback: rate and ETA, cache-hit share and cost so far."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.bar: Any = None

    def __call__(self, p: Any) -> None:
        if not self.enabled:
            return
        if self.bar is None:
            from tqdm import tqdm

            self.bar = tqdm(total=p.total, unit="rec", dynamic_ncols=True, file=sys.stderr, smoothing=0.1)
        self.bar.update(max(0, p.records - self.bar.n))
        hit = "-" if p.hit_share is None else f"{p.hit_share:.0%}"
        waiting = f", {p.waiting}" if getattr(p, "waiting", None) else ""
        self.bar.set_postfix_str(f"hit {hit}, {_usd(p.cost_usd)}, dead {p.dead}{waiting}", refresh=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# ------------------------------------------------------------------ commands
@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(__version__, prog_name="embedpipe")
def main() -> None:
    """Embed corpora durably: resumable, incremental, within budget.

    Exit codes: 0 all embedded; 3 finished with new dead letters; 4 stopped at the budget;
    1 error; 2 usage.
    """
    logging.basicConfig(level=logging.WARNING, format="%(message)s", stream=sys.stderr)


@main.command()
@_job_options
@click.option("--out", "-o", help="The run's output, to count what is already done (optional).")
@_handle_errors
def estimate(**kw: Any) -> None:
    """Report tokens, cost, cached share, requests and ETA for a run; makes no API call."""
    from embedpipe import jobs

    args = _job_kwargs(kw)
    source = args.pop("source")
    _print_estimate(jobs.estimate(source, **args))


@main.command()
@_job_options
@click.option("--out", "-o", required=True, help="Output: a folder (Parquet dataset) or a file ending in .jsonl.")
@click.option("--max-retries", type=click.IntRange(min=0), help="Retries per request before a record is "
              "dead-lettered.")
@click.option("--no-estimate", is_flag=True, help="Skip reading the source once to estimate first (a budget is "
              "then enforced only during the run).")
@click.option("--progress/--no-progress", default=None, help="Show a progress bar (default: on a terminal).")
@click.option("--metrics-port", type=click.IntRange(1, 65535), help="Serve Prometheus /metrics on this port "
              "(127.0.0.1) while the run goes (pip install 'embedpipe[serve]').")
@click.option("--workers", help="Run on Celery workers: celery+redis://host:6379/0 or celery+amqp://host// "
              "(start them with embedpipe worker).")
@click.option("--store", help="With --workers: the Redis of the job's shared state (default: a Redis broker's URL).")
@click.option("--audio-to-text", help="Speech-to-text for --format audio: local-whisper:tiny.en (default), "
              "local-whisper:/path, openai:whisper-1.")
@click.option("--batch-api", is_flag=True, help="Send the uncached texts through the Batch API at half price "
              "(openai:, azure:), done within 24 hours; a re-run re-attaches to the batches.")
@click.option("--batch-inputs", type=click.IntRange(min=1), help="With --batch-api: most texts per batch "
              "(default 50,000, the API's limit); smaller batches finish sooner.")
@click.option("--batch-poll-max", type=click.FloatRange(min=0.01), default=60.0, show_default=True,
              help="With --batch-api: most seconds between polls.")
@_handle_errors
def run(no_estimate: bool, progress: bool | None, workers: str | None, store: str | None,
        audio_to_text: str | None = None, batch_api: bool = False, batch_inputs: int | None = None,
        batch_poll_max: float = 60.0, metrics_port: int | None = None, **kw: Any) -> None:
    """Embed SOURCE into --out. Run it again to resume after a crash or to pick up changes.

    SOURCE is a .jsonl, .csv or .parquet file, or a folder of .txt/.md files (id = the
    relative path). Unchanged records are skipped, changed ones re-embedded, records gone
    from the source removed from the output; failures go to the dead-letter queue.
    """
    from embedpipe import jobs

    args = _job_kwargs(kw)
    source = args.pop("source")
    if args.get("format") == "audio":  # transcripts go through the run's cache
        from embedpipe.jobs.media import AudioFolderSource

        source = AudioFolderSource(source, audio_to_text=audio_to_text or "local-whisper:tiny.en",
                                   cache=args.get("cache"), id_field=args.get("id_field", "id"))
    if metrics_port is not None:
        if workers is not None:
            raise ConfigurationError("with --workers, each worker serves the metrics: embedpipe worker --metrics-port")
        from embedpipe.metrics import PrometheusMetrics

        metrics = PrometheusMetrics()
        metrics.start_http_server(metrics_port)
        args["hooks"] = (metrics,)
    bar = _Progress(sys.stderr.isatty() if progress is None else progress)
    try:
        if workers is None:
            if store is not None:
                raise ConfigurationError("--store is for runs on --workers")
            if batch_api:
                args["batch_api"] = jobs.BatchOptions(
                    limits=jobs.BatchLimits(max_inputs=batch_inputs or jobs.BatchLimits.max_inputs),
                    poll_initial_s=min(5.0, batch_poll_max), poll_max_s=batch_poll_max, on_progress=_batch_printer)
            result = jobs.run(source, estimate_first=not no_estimate, on_estimate=_print_estimate, progress=bar,
                              **args)
        else:
            if batch_api:
                raise ConfigurationError("--batch-api runs in one process: drop --workers")
            result = _run_on_workers(source, args, workers, store, estimate_first=not no_estimate, progress=bar)
    finally:
        bar.close()
    _print_result(result, args["out"])
    sys.exit(result.exit_code)


def _broker_of(workers: str) -> str:
    if not workers.startswith("celery+"):
        raise ConfigurationError(f"--workers {redact_url(workers)!r}: give a Celery broker URL prefixed celery+, "
                                 "e.g. celery+redis://host:6379/0 or celery+amqp://guest@host//")
    return workers.removeprefix("celery+")


def _run_on_workers(source: str, args: dict[str, Any], workers: str, store: str | None, *, estimate_first: bool,
                    progress: Any) -> Any:
    from embedpipe import distributed, jobs
    from embedpipe.distributed.celery import make_app

    args = dict(args)
    rebuild = bool(args.pop("rebuild", False))
    spec = jobs.JobSpec.from_options(source, args.pop("out"), **args)
    app = make_app(_broker_of(workers), store)
    job = distributed.submit(spec, app=app, store=store, rebuild=rebuild, estimate_first=estimate_first,
                             on_estimate=_print_estimate, progress=progress)
    click.echo(f"job {job.job_id} submitted to {redact_url(_broker_of(workers))}", err=True)
    return job.wait()


@main.command()
@click.option("--broker", required=True, help="A Celery broker URL: redis://host:6379/0 or amqp://user@host//.")
@click.option("--store", help="The Redis of the jobs' shared state (default: tasks name it).")
@click.option("-c", "--concurrency", type=click.IntRange(min=1), help="Pool processes or threads (default: cores).")
@click.option("--pool", type=click.Choice(["prefork", "threads", "solo"]), default="prefork", show_default=True)
@click.option("-n", "--hostname", help="The worker's name (default: celery@HOST).")
@click.option("--loglevel", default="INFO", show_default=True)
@click.option("--metrics-port", type=click.IntRange(1, 65535), help="Serve Prometheus /metrics for every pool "
              "process of this worker on this port (127.0.0.1).")
@_handle_errors
def worker(broker: str, store: str | None, concurrency: int | None, pool: str, hostname: str | None,
           loglevel: str, metrics_port: int | None) -> None:
    """Process chunks of distributed runs (embedpipe run --workers celery+BROKER) on this host.

    API keys come from this host's environment (OPENAI_API_KEY, ...); nothing secret travels in messages.
    """
    if metrics_port is not None:
        from embedpipe.distributed.celery import serve_worker_metrics

        serve_worker_metrics(metrics_port)  # before any pool process starts: they share one multiprocess folder
    from embedpipe.distributed.celery import make_app

    app = make_app(broker, store)
    argv = ["worker", "--pool", pool, "--loglevel", loglevel]
    argv += ["--concurrency", str(concurrency)] if concurrency else []
    argv += ["--hostname", hostname] if hostname else []
    app.worker_main(argv)


@main.group("jobs")
def jobs_group() -> None:
    """List, follow, cancel and resume distributed jobs (their shared state is in Redis: --store)."""


def _store_option(fn: F) -> F:
    return click.option("--store", required=True, help="The Redis of the jobs' shared state.")(fn)


@jobs_group.command("list")
@_store_option
@_handle_errors
def jobs_list(store: str) -> None:
    """Every job the store knows, with its chunk counts."""
    from embedpipe.distributed.ledger import jobs_in

    for job_id, spec, states in jobs_in(store):
        counts = ", ".join(f"{n} {state}" for state, n in sorted(states.items())) or "no chunks yet"
        click.echo(f"{job_id}  {spec.get('source')} -> {spec.get('sink')}  ({counts})")


@jobs_group.command("status")
@click.argument("job_id")
@_store_option
@_handle_errors
def jobs_status(job_id: str, store: str) -> None:
    """Chunks per state, attempts, spend and budget of JOB_ID."""
    from embedpipe.distributed.ledger import RedisJobLedger

    ledger = RedisJobLedger(store, job_id)
    meta = ledger.meta()
    if "spec" not in meta:
        raise ConfigurationError(f"the store knows no job {job_id!r}: embedpipe jobs list --store ...")
    states: dict[str, int] = {}
    for state in ledger.states().values():
        states[state] = states.get(state, 0) + 1
    click.echo(f"job {job_id}: " + (", ".join(f"{n} {s}" for s, n in sorted(states.items())) or "no chunks"))
    click.echo(f"  in flight now: {ledger.live_leases()}; spent ${float(meta.get('spent') or 0):.6f}"
               + (f" of ${float(meta['budget']):.6f}" if meta.get("budget") else "")
               + ("; CANCELLED" if meta.get("cancelled") else ""))


@jobs_group.command("cancel")
@click.argument("job_id")
@_store_option
@_handle_errors
def jobs_cancel(job_id: str, store: str) -> None:
    """Stop JOB_ID: workers leave its remaining chunks alone; what was committed is kept."""
    from embedpipe.distributed.ledger import RedisJobLedger

    RedisJobLedger(store, job_id).cancel()
    click.echo(f"job {job_id} cancelled; embedpipe jobs resume {job_id} carries on")


@jobs_group.command("resume")
@click.argument("job_id")
@_store_option
@click.option("--broker", required=True, help="The Celery broker to publish the remaining chunks on.")
@click.option("--progress/--no-progress", default=None, help="Show a progress bar (default: on a terminal).")
@_handle_errors
def jobs_resume(job_id: str, store: str, broker: str, progress: bool | None) -> None:
    """Submit JOB_ID again from its recorded spec: what is committed stays, the rest is published."""
    from embedpipe import distributed
    from embedpipe.distributed.celery import make_app
    from embedpipe.distributed.ledger import RedisJobLedger
    from embedpipe.jobs import JobSpec

    spec_json = RedisJobLedger(store, job_id).get("spec")
    if spec_json is None:
        raise ConfigurationError(f"the store knows no job {job_id!r}: embedpipe jobs list --store ...")
    bar = _Progress(sys.stderr.isatty() if progress is None else progress)
    try:
        result = distributed.submit(JobSpec.from_json(spec_json), app=make_app(broker, store), store=store,
                                    on_estimate=_print_estimate, progress=bar).wait()
    finally:
        bar.close()
    _print_result(result, str(JobSpec.from_json(spec_json).sink))
    sys.exit(result.exit_code)


@main.command()
@click.option("--out", "-o", required=True, help="The damaged output folder (a run's --out).")
@click.option("--state", type=click.Path(dir_okay=False), help="Its state file, if not OUT/_state.sqlite.")
@_handle_errors
def repair(out: str, state: str | None) -> None:
    """Set damaged parts and state aside in OUT/_quarantine/ and rebuild the state from the readable parts.

    Readers of OUT then see what is readable (it is published anew). Then run the same
    `embedpipe run` command again: it re-embeds the records that were in damaged parts, from
    the cache where it holds them.
    """
    from embedpipe.jobs.repair import repair as repair_output

    result = repair_output(out, state=state)
    if not result.quarantined:
        click.echo(f"{out}: nothing is damaged ({result.records:,} records)")
    else:
        for name in result.quarantined:
            click.echo(f"set aside: {name}")
        what = "rebuilt from the readable parts" if result.state_rebuilt else "kept"
        click.echo(f"state {what}: {result.records:,} records; {result.forgotten:,} to re-embed. Run the same "
                   "`embedpipe run` command again to restore them (from the cache where it holds them).")
    sys.exit(result.exit_code)


# ------------------------------------------------------------------ dlq
def _target_options(fn: F) -> F:
    fn = click.option("--state", type=click.Path(dir_okay=False), help="The run's state file (default: "
                      "OUT/_state.sqlite).")(fn)
    fn = click.option("--out", "-o", help="The run's --out, which locates its state.")(fn)
    return fn


@main.command("batches")
@_target_options
@_handle_errors
def batches_command(out: str | None, state: str | None) -> None:
    """The Batch API batches of a --batch-api run: ids, status, requests done and failed, vectors cached."""
    from embedpipe.jobs.batch_api import batches

    found = batches(out, state=state)
    for b in found:
        click.echo(f"{b.batch_id or '-':<32} {b.status or b.state:<12} {b.completed:>7,}/{b.requests:<7,} done  "
                   f"{b.failed:>6,} failed  {b.cached:>8,} cached  file {b.file_id or '-'}")
    click.echo(f"{len(found):,} batch(es)")


@main.group()
def dlq() -> None:
    """The dead-letter queue: records that failed for good, kept with their text and metadata."""


@dlq.command("list")
@_target_options
@click.option("--json", "as_json", is_flag=True, help="One JSON object per letter, with text and metadata.")
@_handle_errors
def dlq_list(out: str | None, state: str | None, as_json: bool) -> None:
    """Show dead letters: record id, reason, attempts, time."""
    from embedpipe import jobs

    letters = jobs.dead_letters(out, state=state)
    if as_json:
        for d in letters:
            click.echo(json.dumps({"id": d.id, "reason": d.reason, "attempts": d.attempts, "time": d.time,
                                   "text": d.text, "metadata": dict(d.metadata)}, ensure_ascii=False))
        return
    if not letters:
        click.echo("no dead letters")
        return
    width = min(40, max(len("id"), *(len(d.id) for d in letters)))
    click.echo(f"{'id':<{width}}  attempts  {'time':<19}  reason")
    for d in letters:
        when = dt.datetime.fromtimestamp(d.time).strftime("%Y-%m-%d %H:%M:%S")
        reason = d.reason if len(d.reason) <= 160 else d.reason[:157] + "..."
        click.echo(f"{d.id:<{width}}  {d.attempts:>8}  {when}  {reason}")
    click.echo(f"{len(letters):,} dead letter(s)")


@dlq.command("retry")
@_target_options
@click.option("--id", "ids", multiple=True, help="Retry only this record id (repeatable).")
@click.option("--model", "-m", help="Model spec (default: the run's).")
@click.option("--dimensions", type=click.IntRange(min=1), help="Output dimensions (default: the run's).")
@click.option("--cache", help="Cache URL (default: the pipeline's default cache).")
@click.option("--base-url", help="An OpenAI-compatible server's URL (default: the run's).")
@click.option("--rpm", type=click.IntRange(min=1))
@click.option("--tpm", type=click.IntRange(min=1))
@click.option("--budget-usd", type=click.FloatRange(min=0))
@click.option("--max-concurrency", type=click.IntRange(min=1))
@_handle_errors
def dlq_retry(out: str | None, state: str | None, ids: tuple[str, ...], **kw: Any) -> None:
    """Embed dead letters again; successes go into the output and leave the queue."""
    from embedpipe import jobs

    result = jobs.retry_dead_letters(out, state=state, ids=list(ids) or None,
                                     **{k: v for k, v in kw.items() if v is not None})
    click.echo(f"{result.recovered:,} recovered, {result.failed:,} failed again, {result.remaining:,} left in the "
               f"queue; tokens {result.tokens:,}, cost {_usd(result.cost_usd)}")
    sys.exit(result.exit_code)


@dlq.command("purge")
@_target_options
@click.option("--id", "ids", multiple=True, help="Drop only this record id (repeatable).")
@_handle_errors
def dlq_purge(out: str | None, state: str | None, ids: tuple[str, ...]) -> None:
    """Drop dead letters (all, or --id). A later run tries them again if they are still in the source."""
    from embedpipe import jobs

    n = jobs.purge_dead_letters(out, state=state, ids=list(ids) or None)
    click.echo(f"{n:,} dead letter(s) dropped")


# ------------------------------------------------------------------ cache
def _cache_url(url: str | None, **options: Any) -> str:
    from embedpipe.cache import default_cache_url

    url = url or default_cache_url()
    extra = {k: str(v) for k, v in options.items() if v is not None}
    if not extra:
        return url
    # Appended, not rebuilt: urlunsplit would turn sqlite:////abs.db into sqlite://abs.db.
    base, _, query = url.partition("?")
    return f"{base}?{urlencode({**dict(parse_qsl(query)), **extra})}"


def _size(n: int | None) -> str:
    if n is None:
        return "unknown"
    value = float(n)
    for unit in ("B", "KB", "MB", "GB"):
        if value < 1000:
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    return f"{value:.1f} TB"


_cache_option = click.option("--cache", help="Cache URL (default: $EMBEDPIPE_CACHE or the user cache folder's "
                             "SQLite file).")


@main.group()
def cache() -> None:
    """The vector cache: stats, prune, export and import."""


@cache.command("stats")
@_cache_option
@_target_options
@_handle_errors
def cache_stats(cache: str | None, out: str | None, state: str | None) -> None:
    """Show the cache's size, entries and hit rate (the hit rate of a job's runs, with --out or --state)."""
    from embedpipe.cache import SQLiteCache, cache_from_url

    url = _cache_url(cache)
    backend = cache_from_url(url)
    try:
        st = backend.stats()
        click.echo(f"cache     {redact_url(url)} ({st.backend})")
        click.echo(f"entries   {'unknown' if st.entries is None else f'{st.entries:,}'}")
        size = _size(st.bytes)
        if isinstance(backend, SQLiteCache):
            size += f" in entries, {_size(backend.file_size())} on disk"
        elif st.backend == "redis":
            size += " used by the whole Redis server"
        click.echo(f"size      {size}")
    finally:
        backend.close()
    if out is None and state is None:
        click.echo("hit rate  pass --out (or --state) to see a job's hit rate")
        return
    from embedpipe.jobs.dlq import open_state

    job_state, _ = open_state(out, state)
    with job_state:
        every = job_state.runs()
    runs = [r for r in every if r.cached + r.embedded]
    if not runs:
        click.echo(f"hit rate  none of {len(every)} run(s) needed a vector yet")
        return
    last = runs[-1]
    hits, total = sum(r.cached for r in runs), sum(r.cached + r.embedded for r in runs)
    idle = len(every) - len(runs)
    click.echo(f"hit rate  {last.cached / (last.cached + last.embedded):.1%} in the last run that needed vectors "
               f"({last.cached:,} of {last.cached + last.embedded:,} texts), {hits / total:.1%} over all "
               f"{len(every)} run(s)" + (f" ({idle} found everything unchanged)" if idle else ""))


@cache.command("prune")
@_cache_option
@click.option("--ttl", help="Remove entries older than this (7d, 12h, 30m...).")
@click.option("--max-bytes", help="Evict the least recently used entries down to this size (2GB, 500MB...).")
@_handle_errors
def cache_prune(cache: str | None, ttl: str | None, max_bytes: str | None) -> None:
    """Apply the cache's TTL and maximum size now."""
    from embedpipe.cache import cache_from_url

    backend = cache_from_url(_cache_url(cache, ttl=ttl, max_bytes=max_bytes))
    try:
        removed = backend.prune()
        entries = backend.stats().entries
    finally:
        backend.close()
    click.echo(f"{removed:,} entries removed; {'unknown' if entries is None else f'{entries:,}'} left")


@cache.command("export")
@click.argument("path", type=click.Path(dir_okay=False))
@_cache_option
@_handle_errors
def cache_export(path: str, cache: str | None) -> None:
    """Write the cache's vectors to a Parquet file (key, vector, tokens)."""
    from embedpipe.cache import cache_from_url
    from embedpipe.jobs import export_cache

    backend = cache_from_url(_cache_url(cache))
    try:
        written, skipped = export_cache(backend, path)
    finally:
        backend.close()
    click.echo(f"{written:,} vectors exported to {path}" + (f" ({skipped:,} other entries skipped)" if skipped
                                                             else ""))


@cache.command("import")
@click.argument("path")
@_cache_option
@click.option("--model", "-m", help="The model of a file of text and vector columns (to derive the cache keys).")
@click.option("--dimensions", type=click.IntRange(min=1), help="Their dimensions, if not the model's native ones.")
@click.option("--base-url", help="The OpenAI-compatible server they came from, if not OpenAI's.")
@click.option("--text-field", default="text", show_default=True, help="The column or payload field of the texts.")
@_handle_errors
def cache_import(path: str, cache: str | None, model: str | None, dimensions: int | None,
                 base_url: str | None, text_field: str) -> None:
    """Warm the cache from a Parquet file (an export, or text and vector columns with --model) or from a vector
    database's URL (postgresql://...?table=docs, qdrant://, chroma://, lancedb://, milvus://) with --model."""
    from embedpipe.cache import cache_from_url
    from embedpipe.jobs import import_cache

    if "://" not in path and not os.path.isfile(path):
        raise click.BadParameter(f"{path!r} is neither a file nor a database URL", param_hint="PATH")
    backend = cache_from_url(_cache_url(cache))
    try:
        n = import_cache(backend, path, model=model, dimensions=dimensions, base_url=base_url,
                         text_field=text_field)
    finally:
        backend.close()
    click.echo(f"{n:,} vectors imported")


@main.command("eval")
@click.argument("docs")
@click.argument("more_models", nargs=-1, metavar="[SPEC...]")
@click.option("--models", "models", multiple=True, required=True,
              help="Candidate model specs, e.g. --models local:all-MiniLM-L6-v2 openai:text-embedding-3-small@256 "
                   "(@N: Matryoshka dims).")
@click.option("--queries", "-q", help="JSONL of {query, relevant: [ids]}; without it, titles serve as queries.")
@click.option("--cache", help="Cache URL every embedding goes through (default: sqlite file in the current folder).")
@click.option("--out", "-o", required=True, help="Folder for report.md, results.json and the plots.")
@click.option("--chunking", "chunking", multiple=True, type=click.Choice(["none", "naive", "late"]),
              help="Chunkings crossed with the models (repeatable; default none).")
@click.option("--split-tokens", type=click.IntRange(min=2), default=128, show_default=True,
              help="Target chunk size in tokens for naive and late chunking (StableSplitter).")
@click.option("--corpus-size", type=click.IntRange(min=1), help="Project the cost to this many documents.")
@click.option("--limit", type=click.IntRange(min=1), help="Evaluate on the first N documents only.")
@click.option("--resamples", type=click.IntRange(min=10), default=2000, show_default=True,
              help="Bootstrap resamples for the 95% intervals.")
@_handle_errors
def eval_(docs: str, more_models: tuple[str, ...], models: tuple[str, ...], queries: str | None,
          cache: str | None, out: str, chunking: tuple[str, ...], split_tokens: int, corpus_size: int | None,
          limit: int | None, resamples: int) -> None:
    """Compare embedding models on DOCS (any job source): recall, MRR, nDCG, latency, size and cost."""
    from embedpipe.eval import compare

    report = compare(docs, models=[*models, *more_models], queries=queries,
                     cache=cache or "sqlite:///embedpipe-eval-cache.db", out=out, chunking=chunking or ("none",),
                     split_tokens=split_tokens, corpus_size=corpus_size, limit=limit, resamples=resamples)
    click.echo(f"{len(report.candidates)} candidates, {report.embedded:,} texts embedded; "
               f"wrote {out}/report.md and {out}/results.json")


main.add_command(serve_command)  # embedpipe serve: the service lives in embedpipe/serve/cli.py
from embedpipe.cli_watch import watch  # noqa: E402  (a command of its own module, registered here)

main.add_command(watch)

if __name__ == "__main__":
    main()
